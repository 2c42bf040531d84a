//! `llara data stats`: a summary of a dataset folder.

use super::{Dataset, SplitCounts, MAX_HISTORY};
use serde::Serialize;
use std::fmt::Write as _;

/// Popularity of items as targets of the train rows.
#[derive(Debug, Clone, Serialize)]
pub struct Popularity {
    /// Items that are never a train target.
    pub cold_items: usize,
    /// Share of train targets taken by the most popular 1% / 10% of items.
    pub top1_share: f64,
    pub top10_share: f64,
    /// Gini coefficient of target counts over all items (0 = uniform, 1 = one item).
    pub gini: f64,
    /// The most frequent targets: (id, title, count).
    pub top: Vec<(u32, String, usize)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub name: String,
    pub source: String,
    pub domain: String,
    pub items: usize,
    pub rows: SplitCounts,
    pub users: Option<SplitCounts>,
    pub interactions: Option<u64>,
    pub min_history: usize,
    pub candidates: usize,
    /// Rows per history length 0..=10, for train, valid and test.
    pub history_lengths: [Vec<usize>; 3],
    pub mean_history: [f64; 3],
    pub popularity: Popularity,
    pub duplicate_titles: usize,
}

fn gini(counts: &[usize]) -> f64 {
    let n = counts.len();
    let total: usize = counts.iter().sum();
    if n == 0 || total == 0 {
        return 0.0;
    }
    let mut sorted = counts.to_vec();
    sorted.sort_unstable();
    let weighted: f64 = sorted
        .iter()
        .enumerate()
        .map(|(i, &c)| (2.0 * (i as f64 + 1.0) - n as f64 - 1.0) * c as f64)
        .sum();
    weighted / (n as f64 * total as f64)
}

pub fn compute(ds: &Dataset) -> Stats {
    let splits = [&ds.splits.train, &ds.splits.valid, &ds.splits.test];
    let history_lengths = splits.map(|rows| {
        let mut h = vec![0usize; MAX_HISTORY + 1];
        for r in rows.iter() {
            h[r.history.len().min(MAX_HISTORY)] += 1;
        }
        h
    });
    let mean_history = splits.map(|rows| {
        if rows.is_empty() {
            0.0
        } else {
            rows.iter().map(|r| r.history.len()).sum::<usize>() as f64 / rows.len() as f64
        }
    });
    let n = ds.n_items();
    let mut counts = vec![0usize; n];
    for r in &ds.splits.train {
        counts[r.next as usize] += 1;
    }
    let total: usize = counts.iter().sum::<usize>().max(1);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(counts[i]), i));
    let share = |frac: f64| -> f64 {
        let k = ((n as f64 * frac).ceil() as usize).max(1);
        order[..k].iter().map(|&i| counts[i]).sum::<usize>() as f64 / total as f64
    };
    Stats {
        name: ds.meta.name.clone(),
        source: ds.meta.source.clone(),
        domain: ds.meta.domain.clone(),
        items: n,
        rows: ds.meta.rows,
        users: ds.meta.users,
        interactions: ds.meta.interactions,
        min_history: ds.meta.min_history,
        candidates: ds.meta.candidates,
        history_lengths,
        mean_history,
        popularity: Popularity {
            cold_items: counts.iter().filter(|&&c| c == 0).count(),
            top1_share: share(0.01),
            top10_share: share(0.10),
            gini: gini(&counts),
            top: order
                .iter()
                .take(5)
                .map(|&i| (i as u32, ds.titles[i].clone(), counts[i]))
                .collect(),
        },
        duplicate_titles: ds.meta.duplicate_titles.titles,
    }
}

impl Stats {
    /// A plain-text report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let opt = |v: Option<usize>| v.map_or("-".to_string(), |v| v.to_string());
        let w = &mut s;
        writeln!(
            w,
            "dataset {} ({}, items are {}s)",
            self.name, self.source, self.domain
        )
        .ok();
        writeln!(w, "items: {}", self.items).ok();
        writeln!(
            w,
            "interactions: {}",
            self.interactions.map_or("-".into(), |v| v.to_string())
        )
        .ok();
        writeln!(
            w,
            "min history: {}   candidates per row: {}",
            self.min_history, self.candidates
        )
        .ok();
        writeln!(w).ok();
        writeln!(
            w,
            "{:<6} {:>8} {:>8} {:>12}",
            "split", "users", "rows", "mean history"
        )
        .ok();
        let users = self.users;
        for (k, (name, rows)) in [
            ("train", self.rows.train),
            ("valid", self.rows.valid),
            ("test", self.rows.test),
        ]
        .into_iter()
        .enumerate()
        {
            let u = users.map(|u| [u.train, u.valid, u.test][k]);
            writeln!(
                w,
                "{:<6} {:>8} {:>8} {:>12.2}",
                name,
                opt(u),
                rows,
                self.mean_history[k]
            )
            .ok();
        }
        writeln!(w).ok();
        writeln!(
            w,
            "history length  {:>8} {:>8} {:>8}",
            "train", "valid", "test"
        )
        .ok();
        for len in 0..=MAX_HISTORY {
            let [a, b, c] = [0, 1, 2].map(|k| self.history_lengths[k][len]);
            if a + b + c > 0 {
                writeln!(w, "{len:>14}  {a:>8} {b:>8} {c:>8}").ok();
            }
        }
        writeln!(w).ok();
        let p = &self.popularity;
        writeln!(
            w,
            "popularity of train targets: gini {:.3}, top 1% of items {:.1}%, top 10% {:.1}%, never a target: {} items",
            p.gini,
            100.0 * p.top1_share,
            100.0 * p.top10_share,
            p.cold_items
        )
        .ok();
        for (id, title, c) in &p.top {
            writeln!(w, "  {c:>6}  {id:>6}  {title}").ok();
        }
        if self.duplicate_titles > 0 {
            writeln!(w, "duplicate titles: {}", self.duplicate_titles).ok();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn gini_bounds() {
        assert!((super::gini(&[5, 5, 5, 5]) - 0.0).abs() < 1e-12);
        assert!((super::gini(&[0, 0, 0, 8]) - 0.75).abs() < 1e-12);
    }
}
