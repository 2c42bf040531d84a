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

/// The target's rank among all items except those in `exclude` (the history), and how many items
/// it competed with: every item that is neither the target nor in `exclude` (the pool the fixed
/// candidate sets draw their negatives from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FullRank {
    /// 0-based: how many pool items score at least as high as the target.
    pub rank: usize,
    /// The pool's size.
    pub pool: usize,
}

/// The target's rank among all items except those in `exclude` (the history).
pub fn full_rank_of(scores: &[f32], exclude: &[u32], target: u32) -> FullRank {
    let t = scores[target as usize];
    let mut r = scores
        .iter()
        .enumerate()
        .filter(|&(i, &s)| i as u32 != target && beats(s, t))
        .count();
    let mut ex = exclude.to_vec();
    ex.sort_unstable();
    ex.dedup(); // a history may repeat an item
    let mut excluded = 0;
    for e in ex {
        if e != target && (e as usize) < scores.len() {
            excluded += 1;
            if beats(scores[e as usize], t) {
                r -= 1;
            }
        }
    }
    FullRank {
        rank: r,
        pool: scores.len() - 1 - excluded,
    }
}

/// The probability that the target ranks first in a candidate set of `count` items: the target
/// plus `count - 1` negatives drawn uniformly without replacement from the pool (as `llara data`
/// draws them), given the target's full rank. This is HR@1 averaged over every possible candidate
/// set, the same quantity the fixed sets estimate, without their sampling noise:
/// C(pool − rank, k) / C(pool, k) with k = count − 1.
pub fn expected_hr1(full: FullRank, count: usize) -> f64 {
    let k = count.saturating_sub(1);
    if k > full.pool {
        return if full.rank == 0 { 1.0 } else { 0.0 };
    }
    let mut p = 1.0f64;
    for j in 0..k {
        let free = full.pool as f64 - full.rank as f64 - j as f64;
        if free <= 0.0 {
            return 0.0;
        }
        p *= free / (full.pool - j) as f64;
    }
    p
}

/// Accumulates HR@{1,5,10} and NDCG@{5,10} on candidate sets, full-catalogue HR@10/NDCG@10 and
/// the expected HR@1 over every candidate set of the same size.
#[derive(Debug, Clone, Default)]
pub struct RankAccumulator {
    ranks: Vec<usize>,
    full_ranks: Vec<usize>,
    expected_hr1: Vec<f64>,
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
    /// A row's full-catalogue rank; `count` is the size of its candidate set.
    pub fn push_full(&mut self, full: FullRank, count: usize) {
        self.full_ranks.push(full.rank);
        self.expected_hr1.push(expected_hr1(full, count));
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
            expected_hr1: (!self.expected_hr1.is_empty())
                .then(|| self.expected_hr1.iter().sum::<f64>() / self.expected_hr1.len() as f64),
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
    /// HR@1 averaged over every candidate set the data's sampler could draw (see [`expected_hr1`]).
    #[serde(
        rename = "expected_hr@1",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub expected_hr1: Option<f64>,
}

/// What picks the best epoch on the valid split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selection {
    /// HR@1 on the fixed valid candidate sets, ties broken by NDCG@5 (LLaRA's rule).
    Hr1,
    /// HR@1 averaged over every possible valid candidate set (computed exactly from each row's
    /// full-catalogue rank), ties broken by full-catalogue NDCG@10: no candidate-sampling noise.
    #[default]
    ExpectedHr1,
}

impl Selection {
    pub const ALL: [Selection; 2] = [Selection::Hr1, Selection::ExpectedHr1];

    /// The name flags and config files use.
    pub fn name(self) -> &'static str {
        match self {
            Selection::Hr1 => "hr1",
            Selection::ExpectedHr1 => "expected-hr1",
        }
    }
}

impl RankMetrics {
    /// Model selection order: HR@1, then NDCG@5.
    pub fn better_than(&self, other: &RankMetrics) -> bool {
        self.better_by(other, Selection::Hr1)
    }

    /// Whether `self` is better than `other` under `rule` (metrics a rule needs but a split lacks
    /// count as 0).
    pub fn better_by(&self, other: &RankMetrics, rule: Selection) -> bool {
        match rule {
            Selection::Hr1 => (self.hr1, self.ndcg5) > (other.hr1, other.ndcg5),
            Selection::ExpectedHr1 => {
                let key = |m: &RankMetrics| {
                    (
                        m.expected_hr1.unwrap_or(0.0),
                        m.full_ndcg10.unwrap_or(0.0),
                        m.hr1,
                    )
                };
                key(self) > key(other)
            }
        }
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
        assert_eq!(
            full_rank_of(&scores, &[1], 2),
            FullRank { rank: 1, pool: 3 }
        );
        assert_eq!(full_rank_of(&scores, &[], 0), FullRank { rank: 4, pool: 4 });
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

    #[test]
    fn expected_hr1_is_the_average_over_every_candidate_set() {
        // Pool of 6 negatives, 2 of them beat the target, sets of 3 (2 negatives): of the
        // C(6, 2) = 15 pairs, C(4, 2) = 6 avoid both winners.
        let f = FullRank { rank: 2, pool: 6 };
        assert!((expected_hr1(f, 3) - 6.0 / 15.0).abs() < 1e-12);
        // Brute force over every pair agrees.
        let wins = [true, true, false, false, false, false];
        let mut first = 0;
        let mut total = 0;
        for a in 0..6 {
            for b in a + 1..6 {
                total += 1;
                if !wins[a] && !wins[b] {
                    first += 1;
                }
            }
        }
        assert!((expected_hr1(f, 3) - first as f64 / total as f64).abs() < 1e-12);
        assert_eq!(expected_hr1(FullRank { rank: 0, pool: 6 }, 3), 1.0);
        assert_eq!(expected_hr1(FullRank { rank: 5, pool: 6 }, 3), 0.0);
        // The accumulator averages it.
        let mut acc = RankAccumulator::default();
        acc.push(0);
        acc.push_full(FullRank { rank: 0, pool: 6 }, 3);
        acc.push(1);
        acc.push_full(f, 3);
        let m = acc.finish();
        assert!((m.expected_hr1.unwrap() - (1.0 + 0.4) / 2.0).abs() < 1e-12);
        // Selection by it ignores the fixed sets' HR@1.
        let mut better = m;
        better.hr1 = 0.0;
        better.expected_hr1 = Some(0.9);
        assert!(better.better_by(&m, Selection::ExpectedHr1));
        assert!(!better.better_by(&m, Selection::Hr1));
    }
}
