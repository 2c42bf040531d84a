//! Ranking metrics on fixed candidate sets (HR@k, NDCG@k) and over the full catalogue.
//!
//! The rank of the target is the number of *other* candidates scoring at least as high (ties count
//! against the target), so a model that scores everything alike gets no credit.

use serde::{Deserialize, Serialize};

/// Whether score `s` ranks at or above the target's `t` (a NaN counts against the target).
fn beats(s: f32, t: f32) -> bool {
    s.partial_cmp(&t) != Some(std::cmp::Ordering::Less)
}

/// 0-based rank of the candidate at index `target` given one score per candidate (in candidate
/// order): how many other candidates score at least as high.
pub fn rank_among(scores: &[f32], target: usize) -> usize {
    let t = scores[target];
    scores
        .iter()
        .enumerate()
        .filter(|&(i, &s)| i != target && beats(s, t))
        .count()
}

/// 0-based rank of `target` among `candidates` given a score per item id.
pub fn rank_of(scores: &[f32], candidates: &[u32], target: u32) -> usize {
    let t = scores[target as usize];
    candidates
        .iter()
        .filter(|&&c| c != target && beats(scores[c as usize], t))
        .count()
}

/// 0-based rank of `target` among all items except those in `exclude` (the history).
pub fn full_rank_of(scores: &[f32], exclude: &[u32], target: u32) -> usize {
    let t = scores[target as usize];
    let mut r = scores
        .iter()
        .enumerate()
        .filter(|&(i, &s)| i as u32 != target && beats(s, t))
        .count();
    let mut ex = exclude.to_vec();
    ex.sort_unstable();
    ex.dedup(); // a history may repeat an item
    for e in ex {
        if e != target && beats(scores[e as usize], t) {
            r -= 1;
        }
    }
    r
}

/// Accumulates HR@{1,5,10} and NDCG@{5,10} on candidate sets, and full-catalogue HR@10/NDCG@10.
#[derive(Debug, Clone, Default)]
pub struct RankAccumulator {
    ranks: Vec<usize>,
    full_ranks: Vec<usize>,
}

fn ndcg(rank: usize, k: usize) -> f64 {
    if rank < k {
        1.0 / ((rank + 2) as f64).log2()
    } else {
        0.0
    }
}

impl RankAccumulator {
    pub fn push(&mut self, rank: usize) {
        self.ranks.push(rank);
    }
    pub fn push_full(&mut self, rank: usize) {
        self.full_ranks.push(rank);
    }

    pub fn finish(&self) -> RankMetrics {
        let n = self.ranks.len().max(1) as f64;
        let hr = |k: usize| self.ranks.iter().filter(|&&r| r < k).count() as f64 / n;
        let nd = |k: usize| self.ranks.iter().map(|&r| ndcg(r, k)).sum::<f64>() / n;
        let full = (!self.full_ranks.is_empty()).then(|| {
            let m = self.full_ranks.len() as f64;
            (
                self.full_ranks.iter().filter(|&&r| r < 10).count() as f64 / m,
                self.full_ranks.iter().map(|&r| ndcg(r, 10)).sum::<f64>() / m,
            )
        });
        RankMetrics {
            hr1: hr(1),
            hr5: hr(5),
            hr10: hr(10),
            ndcg5: nd(5),
            ndcg10: nd(10),
            mrr: self
                .ranks
                .iter()
                .map(|&r| 1.0 / (r + 1) as f64)
                .sum::<f64>()
                / n,
            rows: self.ranks.len(),
            full_hr10: full.map(|f| f.0),
            full_ndcg10: full.map(|f| f.1),
        }
    }
}

/// Metrics of one split. Serialized with the keys `hr@1`, `hr@5`, `hr@10`, `ndcg@5`, `ndcg@10`,
/// `mrr`, `rows`, and `full_hr@10` / `full_ndcg@10` when computed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RankMetrics {
    #[serde(rename = "hr@1")]
    pub hr1: f64,
    #[serde(rename = "hr@5")]
    pub hr5: f64,
    #[serde(rename = "hr@10")]
    pub hr10: f64,
    #[serde(rename = "ndcg@5")]
    pub ndcg5: f64,
    #[serde(rename = "ndcg@10")]
    pub ndcg10: f64,
    pub mrr: f64,
    pub rows: usize,
    #[serde(
        rename = "full_hr@10",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub full_hr10: Option<f64>,
    #[serde(
        rename = "full_ndcg@10",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub full_ndcg10: Option<f64>,
}

impl RankMetrics {
    /// Model selection order: HR@1, then NDCG@5.
    pub fn better_than(&self, other: &RankMetrics) -> bool {
        (self.hr1, self.ndcg5) > (other.hr1, other.ndcg5)
    }

    /// A one-table text rendering.
    pub fn table(rows: &[(&str, &RankMetrics)]) -> String {
        let mut s = format!(
            "{:<10} {:>6} {:>7} {:>7} {:>7} {:>8} {:>8} {:>7} {:>10} {:>12}\n",
            "split",
            "rows",
            "HR@1",
            "HR@5",
            "HR@10",
            "NDCG@5",
            "NDCG@10",
            "MRR",
            "full HR@10",
            "full NDCG@10"
        );
        for (name, m) in rows {
            let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
            s.push_str(&format!(
                "{:<10} {:>6} {:>7.4} {:>7.4} {:>7.4} {:>8.4} {:>8.4} {:>7.4} {:>10} {:>12}\n",
                name,
                m.rows,
                m.hr1,
                m.hr5,
                m.hr10,
                m.ndcg5,
                m.ndcg10,
                m.mrr,
                f(m.full_hr10),
                f(m.full_ndcg10)
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_metrics() {
        let scores = [0.1, 0.9, 0.5, 0.5, 0.2];
        assert_eq!(rank_of(&scores, &[0, 1, 2, 3], 1), 0);
        assert_eq!(rank_of(&scores, &[0, 1, 2, 3], 2), 2); // tie with 3 counts against
        assert_eq!(rank_of(&scores, &[0, 2, 4], 4), 1);
        assert_eq!(full_rank_of(&scores, &[1], 2), 1);
        assert_eq!(full_rank_of(&scores, &[], 0), 4);
        let mut acc = RankAccumulator::default();
        acc.push(0);
        acc.push(3);
        let m = acc.finish();
        assert_eq!(m.hr1, 0.5);
        assert_eq!(m.hr5, 1.0);
        assert!((m.ndcg5 - (1.0 + 1.0 / 5f64.log2()) / 2.0).abs() < 1e-12);
        assert!((m.mrr - (1.0 + 0.25) / 2.0).abs() < 1e-12);
        // Constant scores give no credit.
        assert_eq!(rank_of(&[1.0; 5], &[0, 1, 2, 3, 4], 2), 4);
    }
}
