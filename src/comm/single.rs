//! One process: every collective returns its input.

use super::{Communicator, Result};
use candle_core::Tensor;

/// The communicator of a run that is one process (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn engine(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor> {
        Ok(flat.clone())
    }
    fn broadcast(&self, _root: usize, _bytes: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn gather(&self, _root: usize, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes.to_vec()])
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
