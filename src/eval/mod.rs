//! Evaluation shared by every model: ranking metrics on the fixed candidate sets.

pub mod metrics;
