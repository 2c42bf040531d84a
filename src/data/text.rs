//! Reading text inputs with errors that name the file and line.

use super::{DataError, Result};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Reads a whole file.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| DataError::io(path, e))
}

/// Splits `bytes` into lines (1-based numbers), dropping a trailing `\r`, and checks each is UTF-8.
pub fn utf8_lines<'a>(path: &Path, bytes: &'a [u8]) -> Result<Vec<(u64, &'a str)>> {
    let mut out = Vec::new();
    let mut lines = bytes.split(|&b| b == b'\n').peekable();
    let mut no = 0u64;
    while let Some(line) = lines.next() {
        no += 1;
        if line.is_empty() && lines.peek().is_none() {
            break; // the file's final newline
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let s = std::str::from_utf8(line).map_err(|e| {
            DataError::line(
                path,
                no,
                format!(
                    "not valid UTF-8 (byte {} of the line); expected UTF-8 text",
                    e.valid_up_to() + 1
                ),
            )
        })?;
        out.push((no, s));
    }
    Ok(out)
}

/// Decodes ISO-8859-1 (Latin-1): every byte is the code point of the same value.
pub fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

/// sha256 of several inputs, each prefixed by its length so that boundaries count.
pub fn content_hash<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

crate::message_error!(
    /// A title that cannot go into a prompt or `items.tsv`.
    TitleError
);

/// Checks a title is usable in a prompt and in `items.tsv`.
pub fn check_title(title: &str) -> std::result::Result<(), TitleError> {
    if title.contains('\t') || title.contains('\n') || title.contains('\r') {
        return Err(TitleError(format!(
            "title {title:?} contains a tab or line break; titles must be one line without tabs"
        )));
    }
    Ok(())
}
