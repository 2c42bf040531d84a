//! llara: LLaRA (Large Language-Recommendation Assistant) as one Rust crate.
//!
//! The pipeline has one module per stage; see `ARCHITECTURE.md` for the code map.
//! - [`kernels`]: the bottom layer: CPU tensor machinery both model families share (the GEMM
//!   wrapper, SIMD reductions, seeded dropout, the fused-or-composed check).
//! - [`data`]: dataset folders (items, chronological histories, splits, fixed candidate sets).
//! - [`sr`]: sequential recommenders (SASRec, GRU4Rec, Caser), their training and evaluation.
//! - [`eval`]: ranking metrics shared by every model.
//! - [`llm`]: the LLM engine (Llama-family backbones, tokenizer, LoRA in PEFT's layout, generation).
//! - [`llara`]: LLaRA itself (prompts, projector, scoring head, curriculum tuning, evaluation).
//! - [`device`]: `--device`; the `llara` command line is the binary's (`src/main.rs`, `src/cli/`).
//! - [`comm`]: communicators of data-parallel runs (one process, MPI).
//! - [`fsutil`]: atomic output (temporary folder renamed at the end); [`interrupt`]: graceful
//!   stop on SIGINT/SIGTERM.

/// A typed error that carries one message (what was wrong and why), for the small checks whose
/// caller adds the file, line or flag: `message_error!(/// docs\n Name);`.
macro_rules! message_error {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
        #[error("{0}")]
        pub struct $name(pub String);

        impl From<String> for $name {
            fn from(msg: String) -> Self {
                $name(msg)
            }
        }

        impl From<&str> for $name {
            fn from(msg: &str) -> Self {
                $name(msg.to_string())
            }
        }
    };
}
pub(crate) use message_error;

pub mod comm;
pub mod data;
pub mod device;
pub mod eval;
pub mod fsutil;
pub mod interrupt;
pub mod kernels;
pub mod llara;
pub mod llm;
pub mod sr;

// What a library user needs for the pipeline, from the crate root.
pub use data::{DataError, Dataset};
pub use eval::metrics::RankMetrics;
pub use llara::evaluate::{evaluate_split, score_candidates, EvalOptions, GenMetrics};
pub use llara::tune::{tune, TuneError, TuneOptions};
pub use llm::{load as load_llm, Llama, LlmError, LlmOptions, LlmTokenizer, LoraConfig};
pub use sr::{load_model as load_recommender, SeqRec, SrError};
