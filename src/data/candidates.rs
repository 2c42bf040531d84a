//! Fixed, seeded candidate sets: for each evaluation row, the target plus items drawn uniformly
//! without replacement from the items absent from the row's history (and different from the target),
//! in shuffled order.
//!
//! Each row has its own random stream: ChaCha8 keyed by (seed, split) with the row index as stream
//! number. A row's set therefore depends only on the seed, the split, the row's index and contents
//! and the item count: not on thread count or iteration order.

use super::{DataError, Result, Row};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;

/// The random stream of one row.
pub fn row_rng(seed: u64, split: &str, row: usize) -> ChaCha8Rng {
    let split_id: u64 = match split {
        "train" => 0,
        "valid" => 1,
        "test" => 2,
        other => other.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        }),
    };
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&split_id.to_le_bytes());
    key[16..24].copy_from_slice(b"llaracan");
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(row as u64);
    rng
}

crate::message_error!(
    /// A row whose candidate set cannot be drawn (too few items, or a count of 0).
    SampleError
);

/// The candidate set of one row.
pub fn sample_row(
    row: &Row,
    n_items: usize,
    count: usize,
    rng: &mut ChaCha8Rng,
) -> std::result::Result<Vec<u32>, SampleError> {
    if count == 0 {
        return Err("the candidate count must be at least 1".into());
    }
    let mut excluded: HashSet<u32> = row.history.iter().copied().collect();
    excluded.insert(row.next);
    let eligible = n_items - excluded.len();
    let need = count - 1;
    if need > eligible {
        return Err(format!(
            "{count} candidates requested but only {eligible} items are neither in the history nor the target (plus the target: {})",
            eligible + 1
        ).into());
    }
    let mut out = Vec::with_capacity(count);
    out.push(row.next);
    if need * 2 <= eligible {
        // Rejection sampling: uniform over eligible items, without replacement.
        while out.len() < count {
            let i = rng.random_range(0..n_items as u32);
            if !excluded.contains(&i) {
                excluded.insert(i);
                out.push(i);
            }
        }
    } else {
        let pool: Vec<u32> = (0..n_items as u32)
            .filter(|i| !excluded.contains(i))
            .collect();
        out.extend(pool.choose_multiple(rng, need).copied());
    }
    out.shuffle(rng);
    Ok(out)
}

/// Candidate sets for every row of a split, in row order.
pub fn sample_split(
    rows: &[Row],
    split: &str,
    n_items: usize,
    count: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    use rayon::prelude::*;
    let sets: Vec<std::result::Result<Vec<u32>, SampleError>> = rows
        .par_iter()
        .enumerate()
        .map(|(i, row)| sample_row(row, n_items, count, &mut row_rng(seed, split, i)))
        .collect();
    // Collected first so that the error reported is always the first failing row's.
    sets.into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.map_err(|msg| {
                DataError::Invalid(format!("{split} row {}: {msg} (lower --candidates)", i + 1))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invariants_and_determinism() {
        let rows: Vec<Row> = (0..200)
            .map(|i| Row {
                history: (0..(i % 11) as u32)
                    .map(|h| (h * 7 + i as u32) % 50)
                    .collect(),
                next: (i as u32 * 13) % 50,
            })
            .filter(|r| !r.history.contains(&r.next))
            .collect();
        let a = sample_split(&rows, "test", 50, 20, 42).unwrap();
        let b = sample_split(&rows, "test", 50, 20, 42).unwrap();
        assert_eq!(a, b);
        let c = sample_split(&rows, "valid", 50, 20, 42).unwrap();
        assert_ne!(a, c);
        for (row, cands) in rows.iter().zip(&a) {
            assert_eq!(cands.len(), 20);
            assert!(cands.contains(&row.next));
            let set: HashSet<_> = cands.iter().collect();
            assert_eq!(set.len(), 20);
            assert!(cands.iter().all(|c| *c < 50));
            assert!(cands.iter().all(|c| !row.history.contains(c)));
        }
        // The target is not always first: the set is shuffled.
        assert!(rows.iter().zip(&a).any(|(r, c)| c[0] != r.next));
    }

    #[test]
    fn dense_pool_path_and_too_many() {
        let row = Row {
            history: (0..10).collect(),
            next: 10,
        };
        let mut rng = row_rng(1, "test", 0);
        let c = sample_row(&row, 30, 20, &mut rng).unwrap();
        let mut sorted = c.clone();
        sorted.sort();
        assert_eq!(sorted, (10..30).collect::<Vec<u32>>());
        assert!(sample_row(&row, 29, 20, &mut rng).is_err());
    }
}
