//! Dataset sources: each turns its input into a [`Prepared`](super::Prepared) dataset.

pub mod interactions;
pub mod llara_jsonl;
pub mod movielens;
pub mod synth;

/// The prompt noun for a dataset name: movie, game, music artist or item.
pub fn domain_for(name: &str) -> &'static str {
    let n = name.to_ascii_lowercase();
    if n.contains("movie") || n.contains("ml-") || n.starts_with("ml") || n.contains("synth") {
        "movie"
    } else if n.contains("lastfm") || n.contains("music") {
        "music artist"
    } else if n.contains("steam") || n.contains("game") {
        "game"
    } else {
        "item"
    }
}

/// The dataset name of a source path: its folder's name.
pub fn name_of(path: &std::path::Path) -> String {
    std::fs::canonicalize(path)
        .ok()
        .as_deref()
        .unwrap_or(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "dataset".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn domains() {
        assert_eq!(super::domain_for("movielens"), "movie");
        assert_eq!(super::domain_for("lastfm"), "music artist");
        assert_eq!(super::domain_for("steam"), "game");
        assert_eq!(super::domain_for("books"), "item");
    }
}
