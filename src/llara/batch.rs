//! Batching helpers shared by training and evaluation: the fixed rows of a split with their
//! candidate sets, and the loss positions of a right-padded batch.

use super::{stream_seed, Example, Tokenized};
use crate::data::Dataset;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The loss positions of a right-padded batch (row length `t`): position `p − 1` predicts answer
/// token `p`, for the answer tokens only (prompt and padding never count).
pub fn answer_targets(rows: &[&Tokenized], t: usize) -> (Vec<usize>, Vec<u32>) {
    let mut pos = vec![];
    let mut targets = vec![];
    for (b, tk) in rows.iter().enumerate() {
        for p in tk.answer_start..tk.ids.len() {
            pos.push(b * t + p - 1);
            targets.push(tk.ids[p]);
        }
    }
    (pos, targets)
}

/// The fixed rows of `split` with their candidate sets: all, or a subset of `samples` rows drawn
/// from `seed`.
pub fn split_rows(
    ds: &Dataset,
    split: &str,
    template: usize,
    samples: Option<usize>,
    seed: u64,
) -> Vec<(usize, Example)> {
    let (rows, cands) = match split {
        "test" => (&ds.splits.test, &ds.candidates_test),
        _ => (&ds.splits.valid, &ds.candidates_valid),
    };
    let mut idx: Vec<usize> = (0..rows.len()).collect();
    if let Some(n) = samples.filter(|&n| n < rows.len()) {
        idx.shuffle(&mut ChaCha8Rng::seed_from_u64(stream_seed(
            seed,
            "valid-subset",
            0,
        )));
        idx.truncate(n);
        idx.sort_unstable();
    }
    idx.into_iter()
        .map(|i| {
            (
                i,
                Example {
                    history: rows[i].history.clone(),
                    candidates: cands[i].clone(),
                    target: rows[i].next,
                    template,
                },
            )
        })
        .collect()
}
