//! Any dataset as CSV/TSV: an interactions file with columns `user,item,timestamp[,rating]` and an
//! items file with columns `item,title` (column names configurable). Items are re-indexed densely in
//! the items file's order; the original ids are kept in `item_ids.tsv`.

use crate::data::split::{build_rows, Interaction, SplitMethod};
use crate::data::text::{check_title, content_hash, read_bytes};
use crate::data::{DataError, Prepared, Result};
use std::collections::HashMap;
use std::path::Path;

/// Column names and parsing options.
#[derive(Debug, Clone)]
pub struct Columns {
    pub user: String,
    pub item: String,
    pub time: String,
    /// Only read when `min_rating` is set.
    pub rating: String,
    /// The items file's id column.
    pub item_id: String,
    pub title: String,
    /// Field delimiter; `None`: tab for `.tsv`/`.tab` files, comma otherwise.
    pub delimiter: Option<u8>,
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            user: "user".into(),
            item: "item".into(),
            time: "timestamp".into(),
            rating: "rating".into(),
            item_id: "item".into(),
            title: "title".into(),
            delimiter: None,
        }
    }
}

fn delimiter_for(path: &Path, explicit: Option<u8>) -> u8 {
    explicit.unwrap_or_else(|| {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("tsv") | Some("tab") => b'\t',
            _ => b',',
        }
    })
}

/// Translates a csv error into one that names the file and line.
fn csv_error(path: &Path, e: csv::Error) -> DataError {
    let line = e.position().map(|p| p.line());
    let msg = match e.kind() {
        csv::ErrorKind::Utf8 { err, .. } => format!(
            "not valid UTF-8 (field {}); expected UTF-8 text",
            err.field() + 1
        ),
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => {
            format!("found {len} columns, expected {expected_len} like the header")
        }
        csv::ErrorKind::Io(err) => return DataError::file(path, err.to_string()),
        _ => e.to_string(),
    };
    match line {
        Some(l) => DataError::line(path, l, msg),
        None => DataError::file(path, msg),
    }
}

struct Table {
    header: Vec<String>,
    /// (line number, fields)
    records: Vec<(u64, Vec<String>)>,
}

fn read_table(path: &Path, bytes: &[u8], delimiter: u8) -> Result<Table> {
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .from_reader(bytes);
    let header: Vec<String> = rdr
        .headers()
        .map_err(|e| csv_error(path, e))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    if header.iter().all(String::is_empty) {
        return Err(DataError::file(path, "empty file; expected a header line"));
    }
    let mut records = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| csv_error(path, e))?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        records.push((line, rec.iter().map(str::to_string).collect()));
    }
    Ok(Table { header, records })
}

fn column(path: &Path, table: &Table, name: &str, flag: &str) -> Result<usize> {
    table.header.iter().position(|h| h == name).ok_or_else(|| {
        DataError::line(
            path,
            1,
            format!(
                "no column {name:?} in the header (found {:?}); name it with {flag}",
                table.header
            ),
        )
    })
}

/// Options of the interactions source.
#[derive(Debug, Clone)]
pub struct Options {
    pub columns: Columns,
    pub split: SplitMethod,
    /// Keep only interactions with rating >= this (needs the rating column).
    pub min_rating: Option<f64>,
    pub name: String,
    pub domain: String,
}

pub fn load(interactions_path: &Path, items_path: &Path, opts: &Options) -> Result<Prepared> {
    let cols = &opts.columns;
    let items_bytes = read_bytes(items_path)?;
    let items = read_table(
        items_path,
        &items_bytes,
        delimiter_for(items_path, cols.delimiter),
    )?;
    let id_col = column(items_path, &items, &cols.item_id, "--item-id-col")?;
    let title_col = column(items_path, &items, &cols.title, "--title-col")?;
    let mut index: HashMap<String, (u32, u64)> = HashMap::new();
    let mut titles = Vec::new();
    let mut original = Vec::new();
    for (line, rec) in &items.records {
        let id = rec[id_col].trim();
        if id.is_empty() {
            return Err(DataError::line(items_path, *line, "empty item id"));
        }
        let title = rec[title_col].trim();
        if title.is_empty() {
            return Err(DataError::line(
                items_path,
                *line,
                format!("item {id:?} has an empty title; every item needs a title for the prompts"),
            ));
        }
        check_title(title).map_err(|m| DataError::line(items_path, *line, m.0))?;
        if let Some((_, first)) = index.get(id) {
            return Err(DataError::line(
                items_path,
                *line,
                format!("duplicate item id {id:?} (first on line {first})"),
            ));
        }
        index.insert(id.to_string(), (titles.len() as u32, *line));
        titles.push(title.to_string());
        original.push(id.to_string());
    }
    if titles.is_empty() {
        return Err(DataError::file(items_path, "no items after the header"));
    }

    let int_bytes = read_bytes(interactions_path)?;
    let table = read_table(
        interactions_path,
        &int_bytes,
        delimiter_for(interactions_path, cols.delimiter),
    )?;
    let p = interactions_path;
    let uc = column(p, &table, &cols.user, "--user-col")?;
    let ic = column(p, &table, &cols.item, "--item-col")?;
    let tc = column(p, &table, &cols.time, "--time-col")?;
    let rc = match opts.min_rating {
        Some(_) => Some(column(p, &table, &cols.rating, "--rating-col")?),
        None => None,
    };
    let mut users: HashMap<String, u32> = HashMap::new();
    let mut user_names: Vec<String> = Vec::new();
    let mut interactions = Vec::with_capacity(table.records.len());
    for (line, rec) in &table.records {
        let user = rec[uc].trim();
        if user.is_empty() {
            return Err(DataError::line(p, *line, "empty user id"));
        }
        let item = rec[ic].trim();
        let Some(&(item_id, _)) = index.get(item) else {
            return Err(DataError::line(
                p,
                *line,
                format!("item {item:?} is not in {}", items_path.display()),
            ));
        };
        let t = rec[tc].trim();
        let time: i64 = t.parse().map_err(|_| {
            DataError::line(
                p,
                *line,
                format!("timestamp {t:?} is not an integer (unix time expected)"),
            )
        })?;
        let kept = match (rc, opts.min_rating) {
            (Some(rc), Some(min)) => {
                let r = rec[rc].trim();
                let rating: f64 = r.parse().map_err(|_| {
                    DataError::line(p, *line, format!("rating {r:?} is not a number"))
                })?;
                rating >= min
            }
            _ => true,
        };
        let next = users.len() as u32;
        let u = *users.entry(user.to_string()).or_insert_with(|| {
            user_names.push(user.to_string());
            next
        });
        interactions.push(Interaction {
            user: u,
            item: item_id,
            time,
            kept,
        });
    }
    if interactions.is_empty() {
        return Err(DataError::file(p, "no interactions after the header"));
    }
    // Ties between users' first times are broken by user id: numerically when every id is an
    // integer, else as text.
    let n_users = user_names.len();
    let mut by_id: Vec<usize> = (0..n_users).collect();
    let numeric: Option<Vec<i128>> = user_names.iter().map(|u| u.parse::<i128>().ok()).collect();
    match &numeric {
        Some(nums) => by_id.sort_by_key(|&u| nums[u]),
        None => by_id.sort_by(|&a, &b| user_names[a].cmp(&user_names[b])),
    }
    let mut tiebreak = vec![0usize; n_users];
    for (rank, &u) in by_id.iter().enumerate() {
        tiebreak[u] = rank;
    }
    let built = build_rows(n_users, &tiebreak, &interactions, opts.split);
    let params = format!(
        "interactions split={} min_rating={:?} columns={:?}",
        opts.split.name(),
        opts.min_rating,
        cols
    );
    Ok(Prepared {
        name: opts.name.clone(),
        domain: opts.domain.clone(),
        source: "interactions".into(),
        split: opts.split.name().into(),
        titles,
        original_ids: Some(original),
        splits: built.splits,
        users: Some(built.users),
        interactions: Some(built.kept_interactions),
        content_hash: content_hash([params.as_bytes(), &items_bytes, &int_bytes]),
        empty_title_items: Vec::new(),
    })
}
