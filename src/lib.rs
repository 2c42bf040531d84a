//! llara: LLaRA (Large Language-Recommendation Assistant) as one Rust crate.
//!
//! The pipeline has one module per stage; see `ARCHITECTURE.md` for the code map.
//! - [`data`]: dataset folders (items, chronological histories, splits, fixed candidate sets).
//! - [`sr`]: sequential recommenders (SASRec, GRU4Rec, Caser), their training and evaluation.
//! - [`eval`]: ranking metrics shared by every model.
//! - [`device`]: `--device`; the `llara` command line is the binary's (`src/main.rs`, `src/cli/`).
//! - [`fsutil`]: atomic output (temporary folder renamed at the end); [`interrupt`]: graceful
//!   stop on SIGINT/SIGTERM.

pub mod data;
pub mod device;
pub mod eval;
pub mod fsutil;
pub mod interrupt;
pub mod kernels;
pub mod llara;
pub mod llm;
pub mod sr;
