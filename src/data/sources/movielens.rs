//! Raw MovieLens-100K (`u.data`, `u.item` as GroupLens ships them) by LLaRA's recipe:
//! ratings >= 3 kept, item id = movie id - 1 over all 1,682 movies, users ranked by their first rating
//! (over all ratings) and split 8:1:1, titles as LLaRA's `get_mv_title` makes them.

use crate::data::split::{build_rows, Interaction, SplitMethod};
use crate::data::text::{check_title, content_hash, latin1, read_bytes, utf8_lines};
use crate::data::{DataError, Prepared, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// LLaRA's title recipe: drop the 7-character " (YYYY)" suffix, then move the first of ", The",
/// ", A", ", An" found anywhere in the title to the front, removing every occurrence of it
/// (bug for bug: "Affair to Remember, An" becomes "A Affair to Remembern").
pub fn llara_title(raw: &str) -> String {
    let chars: Vec<char> = raw.chars().collect();
    let cut: String = chars[..chars.len().saturating_sub(7)].iter().collect();
    for sub in [", The", ", A", ", An"] {
        if cut.contains(sub) {
            return format!("{} {}", &sub[2..], cut.replace(sub, ""));
        }
    }
    cut
}

pub fn load(src: &Path, min_rating: f64) -> Result<Prepared> {
    let item_path = src.join("u.item");
    let item_bytes = read_bytes(&item_path)?;
    let mut titles = Vec::new();
    let mut empty = Vec::new();
    // u.item is ISO-8859-1; split lines on the raw bytes.
    for (k, line) in item_bytes.split(|&b| b == b'\n').enumerate() {
        let no = k as u64 + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let text = latin1(line);
        let fields: Vec<&str> = text.split('|').collect();
        if fields.len() < 2 {
            return Err(DataError::line(
                &item_path,
                no,
                format!(
                    "expected pipe-separated fields `movie id|title|...`, found {} field",
                    fields.len()
                ),
            ));
        }
        let id: usize = fields[0].parse().map_err(|_| {
            DataError::line(
                &item_path,
                no,
                format!("movie id {:?} is not a positive integer", fields[0]),
            )
        })?;
        if id != titles.len() + 1 {
            let msg = if id <= titles.len() && id >= 1 {
                format!("duplicate movie id {id}")
            } else {
                format!(
                    "movie id {id} where {} was expected; ids must run 1..N in order",
                    titles.len() + 1
                )
            };
            return Err(DataError::line(&item_path, no, msg));
        }
        let title = llara_title(fields[1]);
        check_title(&title).map_err(|m| DataError::line(&item_path, no, m.0))?;
        if title.trim().is_empty() {
            empty.push(titles.len() as u32);
        }
        titles.push(title);
    }
    if titles.is_empty() {
        return Err(DataError::file(
            &item_path,
            "no movies; expected `movie id|title|...` lines",
        ));
    }
    let n_items = titles.len();

    let data_path = src.join("u.data");
    let data_bytes = read_bytes(&data_path)?;
    let mut user_index: BTreeMap<u64, u32> = BTreeMap::new();
    let mut raw: Vec<(u64, u32, f64, i64)> = Vec::new();
    for (no, line) in utf8_lines(&data_path, &data_bytes)? {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 4 {
            return Err(DataError::line(
                &data_path,
                no,
                format!(
                    "expected 4 tab-separated columns (user, item, rating, timestamp), found {}",
                    f.len()
                ),
            ));
        }
        let bad = |what: &str, v: &str| {
            DataError::line(&data_path, no, format!("{what} {v:?} is not an integer"))
        };
        let user: u64 = f[0].trim().parse().map_err(|_| bad("user id", f[0]))?;
        let item: u64 = f[1].trim().parse().map_err(|_| bad("movie id", f[1]))?;
        let rating: f64 = f[2].trim().parse().map_err(|_| bad("rating", f[2]))?;
        let time: i64 = f[3].trim().parse().map_err(|_| bad("timestamp", f[3]))?;
        if item == 0 || item > n_items as u64 {
            return Err(DataError::line(
                &data_path,
                no,
                format!("movie id {item} is out of range; u.item has movies 1..{n_items}"),
            ));
        }
        user_index.insert(user, 0);
        raw.push((user, (item - 1) as u32, rating, time));
    }
    if raw.is_empty() {
        return Err(DataError::file(&data_path, "no ratings"));
    }
    // Dense users in id order, so that the tie-break "by user id" is the dense index.
    for (k, v) in user_index.values_mut().enumerate() {
        *v = k as u32;
    }
    let interactions: Vec<Interaction> = raw
        .iter()
        .map(|&(u, item, rating, time)| Interaction {
            user: user_index[&u],
            item,
            time,
            kept: rating >= min_rating,
        })
        .collect();
    let n_users = user_index.len();
    let tiebreak: Vec<usize> = (0..n_users).collect();
    let built = build_rows(n_users, &tiebreak, &interactions, SplitMethod::UserTime);
    let params = format!("movielens-100k min_rating={min_rating}");
    Ok(Prepared {
        name: "movielens".into(),
        domain: "movie".into(),
        source: "movielens-100k".into(),
        split: SplitMethod::UserTime.name().into(),
        original_ids: Some((1..=n_items).map(|i| i.to_string()).collect()),
        titles,
        splits: built.splits,
        users: Some(built.users),
        interactions: Some(built.kept_interactions),
        content_hash: content_hash([params.as_bytes(), &item_bytes, &data_bytes]),
        empty_title_items: empty,
    })
}

#[cfg(test)]
mod tests {
    use super::llara_title;

    #[test]
    fn titles_like_llara() {
        assert_eq!(
            llara_title("Usual Suspects, The (1995)"),
            "The Usual Suspects"
        );
        assert_eq!(llara_title("Toy Story (1995)"), "Toy Story");
        assert_eq!(
            llara_title("Affair to Remember, An (1957)"),
            "A Affair to Remembern"
        );
        assert_eq!(llara_title("unknown"), "");
        assert_eq!(
            llara_title("Cry, the Beloved Country (1995)"),
            "Cry, the Beloved Country"
        );
    }
}
