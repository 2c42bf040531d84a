//! Count-based recommenders fitted on the training rows, the floor every model is compared with:
//!
//! - `popularity`: how often an item is the next item of a training row;
//! - `markov`: first-order transitions, how often an item follows the history's last item
//!   (the last history item → next item of every training row);
//! - `cooccurrence`: how often an item was the next item of a training row whose history held the
//!   user's last item, weighted by how recent it was there (1 for the last position, 1/2 for the
//!   one before, …).
//!
//! Ties (e.g. items never seen after the last item) are broken by popularity.

use crate::data::Row;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Popularity,
    Markov,
    Cooccurrence,
}

impl Kind {
    /// The baseline named `s`, if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "popularity" => Some(Kind::Popularity),
            "markov" => Some(Kind::Markov),
            "cooccurrence" => Some(Kind::Cooccurrence),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::Popularity => "popularity",
            Kind::Markov => "markov",
            Kind::Cooccurrence => "cooccurrence",
        }
    }
}

/// A fitted baseline.
pub struct Baseline {
    pub kind: Kind,
    popularity: Vec<f64>,
    /// (item in the history, next item) → weight.
    pairs: HashMap<(u32, u32), f64>,
}

impl Baseline {
    pub fn fit(kind: Kind, train: &[Row], n_items: usize) -> Self {
        let mut popularity = vec![0f64; n_items];
        let mut pairs: HashMap<(u32, u32), f64> = HashMap::new();
        for r in train {
            if let Some(p) = popularity.get_mut(r.next as usize) {
                *p += 1.0;
            }
            match kind {
                Kind::Popularity => {}
                Kind::Markov => {
                    if let Some(&last) = r.history.last() {
                        *pairs.entry((last, r.next)).or_default() += 1.0;
                    }
                }
                Kind::Cooccurrence => {
                    let n = r.history.len();
                    for (j, &i) in r.history.iter().enumerate() {
                        *pairs.entry((i, r.next)).or_default() += 1.0 / (n - j) as f64;
                    }
                }
            }
        }
        Self {
            kind,
            popularity,
            pairs,
        }
    }

    /// The score of each candidate for `history`: the baseline's count, ties broken by popularity
    /// (a count outranks any popularity difference).
    pub fn score(&self, history: &[u32], candidates: &[u32]) -> Vec<f32> {
        let scale = self.popularity.iter().cloned().fold(0.0, f64::max) + 1.0;
        let last = history.last().copied();
        candidates
            .iter()
            .map(|&c| {
                let pop = self.popularity.get(c as usize).copied().unwrap_or(0.0);
                let primary = match (self.kind, last) {
                    (Kind::Popularity, _) | (_, None) => 0.0,
                    (_, Some(l)) => self.pairs.get(&(l, c)).copied().unwrap_or(0.0),
                };
                (primary * scale + pop) as f32
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(h: &[u32], next: u32) -> Row {
        Row {
            history: h.to_vec(),
            next,
        }
    }

    #[test]
    fn counts_match_the_definitions() {
        let train = vec![
            row(&[0, 1], 2),
            row(&[1, 0], 3),
            row(&[3, 1], 2),
            row(&[1, 3], 4),
            row(&[2, 0], 3),
            row(&[4], 4),
        ];
        // Popularity of next items: 2 → 2, 3 → 2, 4 → 2, 0 → 0, 1 → 0.
        let p = Baseline::fit(Kind::Popularity, &train, 5);
        assert_eq!(p.score(&[0], &[0, 2, 3]), vec![0.0, 2.0, 2.0]);
        // Markov after 1: 1 → 2 twice (rows 0 and 2); after 0: 0 → 3 twice (rows 1, 4).
        let m = Baseline::fit(Kind::Markov, &train, 5);
        let s = m.score(&[4, 1], &[2, 3, 4, 0]);
        let scale = 3.0; // max popularity 2, + 1
        assert_eq!(s, vec![(2.0 * scale + 2.0) as f32, 2.0, 2.0, 0.0]);
        let s = m.score(&[0], &[2, 3]);
        assert_eq!(s, vec![2.0, (2.0 * scale + 2.0) as f32]);
        // Co-occurrence with item 3: row 1 has no 3; row 2 [3, 1] → 2 with weight 1/2;
        // row 3 [1, 3] → 4 with weight 1.
        let c = Baseline::fit(Kind::Cooccurrence, &train, 5);
        let s = c.score(&[3], &[2, 4, 0]);
        assert_eq!(
            s,
            vec![(0.5 * scale + 2.0) as f32, (scale + 2.0) as f32, 0.0]
        );
        // An empty history falls back to popularity.
        assert_eq!(c.score(&[], &[2, 0]), vec![2.0, 0.0]);
    }
}
