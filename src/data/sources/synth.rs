//! A synthetic dataset that needs no download: readable movie-like titles and real sequential
//! structure. Items belong to genres; each item has a few hidden successor items (mostly in its own
//! genre). A user has a favourite genre and walks the successor graph, with occasional jumps within
//! the genre and to popular items. A sequential model that learns the successor graph therefore beats
//! popularity.

use crate::data::split::{build_rows, Interaction, SplitMethod};
use crate::data::text::content_hash;
use crate::data::{DataError, Prepared, Result};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Parameters of the generator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SynthOptions {
    pub users: usize,
    pub items: usize,
    pub genres: usize,
    /// Interactions per user: uniform in `min_len..=max_len`.
    pub min_len: usize,
    pub max_len: usize,
    /// Probability that the next item is a successor of the current one.
    pub follow: f64,
    pub seed: u64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            users: 1000,
            items: 300,
            genres: 6,
            min_len: 12,
            max_len: 30,
            follow: 0.75,
            seed: 42,
        }
    }
}

const GENRES: [&str; 8] = [
    "Western", "Noir", "Space", "Comedy", "Horror", "Romance", "Heist", "Fantasy",
];
const ADJECTIVES: [&str; 24] = [
    "Silent", "Crimson", "Last", "Hidden", "Golden", "Broken", "Midnight", "Distant", "Electric",
    "Frozen", "Wild", "Lonely", "Burning", "Secret", "Velvet", "Iron", "Lost", "Bright", "Hollow",
    "Restless", "Paper", "Silver", "Northern", "Quiet",
];
const NOUNS: [&str; 24] = [
    "Harbor",
    "Frontier",
    "Garden",
    "Mirror",
    "Station",
    "Empire",
    "River",
    "Circus",
    "Orchard",
    "Lighthouse",
    "Carnival",
    "Kingdom",
    "Highway",
    "Island",
    "Machine",
    "Castle",
    "Canyon",
    "Letter",
    "Signal",
    "Forest",
    "Detective",
    "Comet",
    "Bridge",
    "Storm",
];

/// Unique readable titles: "The <Adjective> <Noun>" with the genre, numbered sequels past the
/// word lists' combinations.
fn titles(n: usize, genres: usize, rng: &mut ChaCha8Rng) -> Vec<String> {
    let mut combos: Vec<(usize, usize)> = (0..ADJECTIVES.len())
        .flat_map(|a| (0..NOUNS.len()).map(move |b| (a, b)))
        .collect();
    combos.shuffle(rng);
    (0..n)
        .map(|i| {
            let (a, b) = combos[i % combos.len()];
            let genre = GENRES[i % genres];
            let sequel = i / combos.len();
            let base = format!("The {} {} ({genre})", ADJECTIVES[a], NOUNS[b]);
            if sequel == 0 {
                base
            } else {
                format!("{base} {}", sequel + 1)
            }
        })
        .collect()
}

/// Generates the dataset (users split by first interaction time, as LLaRA does).
pub fn generate(o: &SynthOptions) -> Result<Prepared> {
    if o.genres == 0 || o.genres > GENRES.len() {
        return Err(DataError::Invalid(format!(
            "--genres must be 1..={}, got {}",
            GENRES.len(),
            o.genres
        )));
    }
    if o.items < 4 * o.genres {
        return Err(DataError::Invalid(format!(
            "--items must be at least 4 per genre ({}), got {}",
            4 * o.genres,
            o.items
        )));
    }
    if o.users < 10 {
        return Err(DataError::Invalid(format!(
            "--users must be at least 10, got {}",
            o.users
        )));
    }
    if o.min_len < 2 || o.max_len < o.min_len {
        return Err(DataError::Invalid(format!(
            "sequence lengths must satisfy 2 <= --min-len <= --max-len, got {}..{}",
            o.min_len, o.max_len
        )));
    }
    if !(0.0..=1.0).contains(&o.follow) {
        return Err(DataError::Invalid(format!(
            "--follow must be in [0, 1], got {}",
            o.follow
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed);
    let titles = titles(o.items, o.genres, &mut rng);
    let genre_of = |i: usize| i % o.genres;
    let by_genre: Vec<Vec<u32>> = (0..o.genres)
        .map(|g| {
            (0..o.items)
                .filter(|&i| genre_of(i) == g)
                .map(|i| i as u32)
                .collect()
        })
        .collect();
    // Three successors per item, 80% of them in the item's genre.
    let successors: Vec<[u32; 3]> = (0..o.items)
        .map(|i| {
            let mut s = [0u32; 3];
            for slot in &mut s {
                *slot = loop {
                    let pool = if rng.random_bool(0.8) {
                        &by_genre[genre_of(i)]
                    } else {
                        &by_genre[rng.random_range(0..o.genres)]
                    };
                    let c = *pool.choose(&mut rng).expect("non-empty genre");
                    if c as usize != i {
                        break c;
                    }
                };
            }
            s
        })
        .collect();
    // Popularity: Zipf-like weights over a random permutation of items.
    let mut pop: Vec<u32> = (0..o.items as u32).collect();
    pop.shuffle(&mut rng);
    let pop_weights: Vec<f64> = (0..o.items).map(|r| 1.0 / (r as f64 + 1.0)).collect();
    let pop_total: f64 = pop_weights.iter().sum();
    let popular = |rng: &mut ChaCha8Rng| -> u32 {
        let mut x = rng.random::<f64>() * pop_total;
        for (r, w) in pop_weights.iter().enumerate() {
            x -= w;
            if x <= 0.0 {
                return pop[r];
            }
        }
        pop[o.items - 1]
    };

    let mut interactions = Vec::new();
    for u in 0..o.users {
        let fav = rng.random_range(0..o.genres);
        let len = rng.random_range(o.min_len..=o.max_len);
        let mut time: i64 = 1_600_000_000 + rng.random_range(0..30 * 86_400);
        let mut seen = HashSet::new();
        let mut cur = *by_genre[fav].choose(&mut rng).expect("non-empty genre");
        for _ in 0..len {
            seen.insert(cur);
            interactions.push(Interaction {
                user: u as u32,
                item: cur,
                time,
                kept: true,
            });
            time += rng.random_range(60..86_400);
            let mut next = None;
            for _ in 0..20 {
                let x: f64 = rng.random();
                let c = if x < o.follow {
                    let s = &successors[cur as usize];
                    let y: f64 = rng.random();
                    if y < 0.6 {
                        s[0]
                    } else if y < 0.9 {
                        s[1]
                    } else {
                        s[2]
                    }
                } else if x < o.follow + (1.0 - o.follow) * 0.6 {
                    *by_genre[fav].choose(&mut rng).expect("non-empty genre")
                } else {
                    popular(&mut rng)
                };
                if !seen.contains(&c) {
                    next = Some(c);
                    break;
                }
            }
            match next {
                Some(c) => cur = c,
                None => break, // the walk is stuck among seen items
            }
        }
    }
    let tiebreak: Vec<usize> = (0..o.users).collect();
    let built = build_rows(o.users, &tiebreak, &interactions, SplitMethod::UserTime);
    let params = serde_json::to_string(o).expect("options serialize");
    Ok(Prepared {
        name: "synth".into(),
        domain: "movie".into(),
        source: "synth".into(),
        split: SplitMethod::UserTime.name().into(),
        titles,
        original_ids: None,
        splits: built.splits,
        users: Some(built.users),
        interactions: Some(built.kept_interactions),
        content_hash: content_hash([params.as_bytes()]),
        empty_title_items: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_structured() {
        let o = SynthOptions::default();
        let a = generate(&o).unwrap();
        let b = generate(&o).unwrap();
        assert_eq!(a.splits, b.splits);
        assert_eq!(a.titles, b.titles);
        let unique: HashSet<&String> = a.titles.iter().collect();
        assert_eq!(unique.len(), a.titles.len());
        // Sequential structure: the most frequent next item given the last one predicts far better
        // than the most popular item.
        let mut trans = std::collections::HashMap::<(u32, u32), usize>::new();
        let mut pop = vec![0usize; o.items];
        for r in &a.splits.train {
            if let Some(&last) = r.history.last() {
                *trans.entry((last, r.next)).or_default() += 1;
            }
            pop[r.next as usize] += 1;
        }
        let top = (0..o.items).max_by_key(|&i| pop[i]).unwrap() as u32;
        let mut best = std::collections::HashMap::<u32, (u32, usize)>::new();
        for (&(l, n), &c) in &trans {
            let e = best.entry(l).or_insert((n, 0));
            if c > e.1 {
                *e = (n, c);
            }
        }
        let rows: Vec<_> = a
            .splits
            .test
            .iter()
            .filter(|r| !r.history.is_empty())
            .collect();
        let seq_hits = rows
            .iter()
            .filter(|r| best.get(r.history.last().unwrap()).map(|b| b.0) == Some(r.next))
            .count();
        let pop_hits = rows.iter().filter(|r| r.next == top).count();
        assert!(seq_hits > 3 * pop_hits.max(1), "{seq_hits} vs {pop_hits}");
    }
}
