//! MPI (CPU nodes): the system's MPI library (Open MPI, MPICH, Intel MPI) through rsmpi.
//!
//! Only the main thread calls MPI (`MPI_THREAD_FUNNELED`); the tensor kernels' threads never do.
//! The gradient sum is a gather to rank 0 in chunks, summed there in rank order, and broadcast:
//! every rank gets the same bits, and a rerun with the same number of ranks repeats them (an
//! `MPI_Allreduce` leaves the order to the library's choice of algorithm). Rank 0's link carries
//! `2 (N − 1)` times the gradient's bytes per step: see docs/performance.md, "Scaling".

use super::{CommError, Communicator, Result};
use candle_core::Tensor;
use mpi::datatype::PartitionMut;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, *};

/// Values per gather of [`Communicator::all_reduce_sum`] (16 MiB of f32): rank 0 holds
/// `size` times this at once, not `size` times the whole gradient.
const CHUNK: usize = 1 << 22;

pub struct Mpi {
    world: SimpleCommunicator,
    // Declared last: finalized after the communicator is dropped.
    _universe: mpi::environment::Universe,
}

impl Mpi {
    /// Initializes MPI (once per process).
    pub fn init() -> Result<Self> {
        let (universe, _level) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| CommError::Engine {
                engine: "mpi",
                message: "MPI was already initialized in this process".into(),
            })?;
        let world = universe.world();
        Ok(Self {
            world,
            _universe: universe,
        })
    }

    fn root(&self, root: usize) -> mpi::topology::Process<'_> {
        self.world.process_at_rank(root as i32)
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn engine(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor> {
        let v: Vec<f32> = flat.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let (size, me) = (self.size(), self.rank());
        let root = self.root(0);
        let mut out = vec![0f32; v.len()];
        let mut all = if me == 0 {
            vec![0f32; CHUNK.min(v.len()) * size]
        } else {
            vec![]
        };
        for (mine, dst) in v.chunks(CHUNK).zip(out.chunks_mut(CHUNK)) {
            let n = mine.len();
            if me == 0 {
                let recv = &mut all[..n * size];
                root.gather_into_root(mine, recv);
                dst.copy_from_slice(&recv[..n]);
                for r in 1..size {
                    for (d, s) in dst.iter_mut().zip(&recv[r * n..(r + 1) * n]) {
                        *d += s;
                    }
                }
            } else {
                root.gather_into(mine);
            }
            root.broadcast_into(dst);
        }
        Ok(Tensor::from_vec(out, v.len(), flat.device())?)
    }

    fn broadcast(&self, root: usize, bytes: &mut Vec<u8>) -> Result<()> {
        let r = self.root(root);
        let mut len = bytes.len() as u64;
        r.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        // Open MPI refuses an empty slice's (dangling) pointer even with count 0.
        if len > 0 {
            r.broadcast_into(&mut bytes[..]);
        }
        Ok(())
    }

    fn gather(&self, root: usize, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let r = self.root(root);
        // Every part leads with one byte, so that no rank sends an empty buffer (whose dangling
        // pointer Open MPI refuses even with count 0).
        let framed: Vec<u8> = std::iter::once(0u8).chain(bytes.iter().copied()).collect();
        let bytes = &framed[..];
        let len = i32::try_from(bytes.len()).map_err(|_| CommError::Engine {
            engine: "mpi",
            message: format!(
                "rank {}: a gather of {} bytes (at most 2 GiB)",
                self.rank(),
                bytes.len()
            ),
        })?;
        if self.rank() != root {
            r.gather_into(&len);
            r.gather_varcount_into(bytes);
            return Ok(vec![]);
        }
        let mut counts = vec![0i32; self.size()];
        r.gather_into_root(&len, &mut counts[..]);
        let displs: Vec<i32> = counts
            .iter()
            .scan(0i32, |acc, &c| {
                let d = *acc;
                *acc += c;
                Some(d)
            })
            .collect();
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let mut buf = vec![0u8; total];
        {
            let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
            r.gather_varcount_into_root(bytes, &mut part);
        }
        Ok(counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| buf[d as usize + 1..(d + c) as usize].to_vec())
            .collect())
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
