//! Turning timestamped interactions into chronological rows and train/valid/test splits.

use super::{Row, SplitCounts, Splits, MAX_HISTORY};
use serde::{Deserialize, Serialize};

/// One interaction of a user with an item.
#[derive(Debug, Clone, Copy)]
pub struct Interaction {
    /// Dense user index.
    pub user: u32,
    /// Dense item id.
    pub item: u32,
    pub time: i64,
    /// Whether it passes the source's filter (e.g. rating >= 3). Filtered interactions still count
    /// for a user's first-interaction time, as in LLaRA's MovieLens recipe.
    pub kept: bool,
}

/// How users' sequences become train/valid/test rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitMethod {
    /// LLaRA's: users ranked by the time of their first interaction (ties by user id), the first 80%
    /// are train users (one row per interaction), the next 10% valid and the last 10% test (one row
    /// per user: the last interaction as target).
    UserTime,
    /// Per user: the last interaction is the test row, the second last the valid row, every earlier
    /// one a train row.
    LeaveLastOut,
}

impl SplitMethod {
    pub const ALL: [SplitMethod; 2] = [SplitMethod::UserTime, SplitMethod::LeaveLastOut];

    pub fn name(self) -> &'static str {
        match self {
            SplitMethod::UserTime => "user-time",
            SplitMethod::LeaveLastOut => "leave-last-out",
        }
    }
}

/// The result of [`build_rows`].
#[derive(Debug, Clone)]
pub struct Built {
    pub splits: Splits,
    pub users: SplitCounts,
    pub kept_interactions: u64,
}

fn row_at(seq: &[u32], k: usize) -> Row {
    Row {
        history: seq[k.saturating_sub(MAX_HISTORY)..k].to_vec(),
        next: seq[k],
    }
}

/// Builds rows from interactions given in file order. `user_tiebreak[u]` orders users whose first
/// interactions share a timestamp (their rank by user id).
///
/// Each user's kept interactions are ordered by timestamp, ties kept in file order (a stable sort).
/// Users are ranked by the timestamp of their first interaction over *all* their interactions
/// (kept or not), ties by `user_tiebreak`.
pub fn build_rows(
    n_users: usize,
    user_tiebreak: &[usize],
    interactions: &[Interaction],
    method: SplitMethod,
) -> Built {
    let mut first = vec![i64::MAX; n_users];
    let mut seqs: Vec<Vec<(i64, u32)>> = vec![Vec::new(); n_users];
    let mut kept_interactions = 0u64;
    for it in interactions {
        let u = it.user as usize;
        first[u] = first[u].min(it.time);
        if it.kept {
            seqs[u].push((it.time, it.item));
            kept_interactions += 1;
        }
    }
    for s in &mut seqs {
        s.sort_by_key(|&(t, _)| t); // stable: ties stay in file order
    }
    let mut order: Vec<usize> = (0..n_users).collect();
    order.sort_by_key(|&u| (first[u], user_tiebreak[u]));
    let items = |u: usize| -> Vec<u32> { seqs[u].iter().map(|&(_, i)| i).collect() };

    let mut splits = Splits::default();
    let mut users = SplitCounts::default();
    match method {
        SplitMethod::UserTime => {
            let n_train = n_users * 8 / 10;
            let n_valid = n_users / 10;
            for (rank, &u) in order.iter().enumerate() {
                let seq = items(u);
                if rank < n_train {
                    users.train += 1;
                    splits.train.extend((0..seq.len()).map(|k| row_at(&seq, k)));
                } else {
                    let (rows, count) = if rank < n_train + n_valid {
                        (&mut splits.valid, &mut users.valid)
                    } else {
                        (&mut splits.test, &mut users.test)
                    };
                    *count += 1;
                    if !seq.is_empty() {
                        rows.push(row_at(&seq, seq.len() - 1));
                    }
                }
            }
        }
        SplitMethod::LeaveLastOut => {
            for &u in &order {
                let seq = items(u);
                let n = seq.len();
                if n == 0 {
                    continue;
                }
                users.test += 1;
                splits.test.push(row_at(&seq, n - 1));
                if n >= 2 {
                    users.valid += 1;
                    splits.valid.push(row_at(&seq, n - 2));
                }
                if n >= 3 {
                    users.train += 1;
                    splits.train.extend((0..n - 2).map(|k| row_at(&seq, k)));
                }
            }
        }
    }
    Built {
        splits,
        users,
        kept_interactions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn it(user: u32, item: u32, time: i64) -> Interaction {
        Interaction {
            user,
            item,
            time,
            kept: true,
        }
    }

    #[test]
    fn leave_last_out_rows() {
        let ints = vec![it(0, 5, 3), it(0, 6, 1), it(0, 7, 2), it(0, 8, 4)];
        let b = build_rows(1, &[0], &ints, SplitMethod::LeaveLastOut);
        assert_eq!(
            b.splits.test,
            vec![Row {
                history: vec![6, 7, 5],
                next: 8
            }]
        );
        assert_eq!(
            b.splits.valid,
            vec![Row {
                history: vec![6, 7],
                next: 5
            }]
        );
        assert_eq!(b.splits.train.len(), 2);
        assert_eq!(
            b.splits.train[1],
            Row {
                history: vec![6],
                next: 7
            }
        );
    }

    #[test]
    fn user_time_ranks_by_first_time_over_all_interactions() {
        // user 1 starts first through a filtered interaction, so it is the train user.
        let mut ints: Vec<Interaction> = Vec::new();
        for u in 0..10u32 {
            ints.push(it(u, u, 100 + i64::from(u)));
            ints.push(it(u, u + 10, 200));
        }
        ints.push(Interaction {
            user: 9,
            item: 1,
            time: 0,
            kept: false,
        });
        let tie: Vec<usize> = (0..10).collect();
        let b = build_rows(10, &tie, &ints, SplitMethod::UserTime);
        assert_eq!(
            b.users,
            SplitCounts {
                train: 8,
                valid: 1,
                test: 1
            }
        );
        assert_eq!(b.splits.train[0].next, 9);
        assert_eq!(b.splits.test[0].next, 18);
        assert_eq!(b.kept_interactions, 20);
    }

    #[test]
    fn ties_keep_file_order_and_history_is_capped() {
        let ints: Vec<Interaction> = (0..15).map(|i| it(0, i, 7)).collect();
        let b = build_rows(1, &[0], &ints, SplitMethod::LeaveLastOut);
        assert_eq!(b.splits.test[0].history, (4..14).collect::<Vec<u32>>());
        assert_eq!(b.splits.test[0].next, 14);
    }
}
