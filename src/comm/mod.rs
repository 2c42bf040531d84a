//! Communicators: how the processes of one data-parallel run (`mpirun -np N llara tune …`)
//! exchange gradients, decisions and results.
//!
//! One trait, [`Communicator`], three rooms: [`single::Single`] (one process, every collective a
//! no-op: the default), `mpi::Mpi` (CPU nodes, through the system's MPI; cargo feature `mpi`).
//! (An NCCL communicator for several GPUs is not built yet.) The engines do
//! the transport; this module adds what the run needs on top of them: gradients reduced in one
//! fixed order ([`all_reduce_grads`]), agreement on a stop ([`any`]), a check that every rank runs
//! the same binary and options ([`agree`]), and row shards gathered back in row order
//! ([`gather_rows`]).
//!
//! Which communicator a process gets is decided once, from the launcher's environment
//! ([`from_env`]): under `mpirun`/`srun` with more than one process, the MPI one (or an error
//! saying the binary was built without it).

#[cfg(feature = "mpi")]
pub mod mpi;
pub mod single;

use candle_core::{DType, Tensor, Var};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// The engine refused or failed a call.
    #[error("{engine}: {message}")]
    Engine {
        engine: &'static str,
        message: String,
    },
    /// The ranks disagree (binary, options, data): each named rank differs from rank 0.
    #[error("{0}")]
    Mismatch(String),
    /// The launcher started several processes but this binary cannot join them.
    #[error("{0}")]
    Launch(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, CommError>;

/// The collectives a data-parallel run needs. Every rank calls the same collectives in the same
/// order (the run's code paths are the same on every rank; only rank 0 writes files).
pub trait Communicator {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn size(&self) -> usize;
    /// The engine's name (`single`, `mpi`, `nccl`) for logs and errors.
    fn engine(&self) -> &'static str;
    /// The element-wise sum over ranks of a 1-D f32 tensor, on every rank. Host engines sum in
    /// rank order (rank 0's values + rank 1's + …), so every rank gets the same bits and a rerun
    /// with the same size repeats them.
    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor>;
    /// Replaces `bytes` on every rank by `root`'s.
    fn broadcast(&self, root: usize, bytes: &mut Vec<u8>) -> Result<()>;
    /// Every rank's `bytes`, in rank order, on `root` (an empty list on the others).
    fn gather(&self, root: usize, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the job at once with `code` (after an error on one rank, whose
    /// peers would otherwise wait in their next collective).
    fn abort(&self, code: i32) -> !;
}

/// The launcher's view of this process: rank, size and ranks on this node, from the variables
/// Open MPI (`OMPI_COMM_WORLD_*`), MPICH/Hydra and Intel MPI (`PMI_*`, `MPI_LOCALNRANKS`), PMIx
/// (`PMIX_RANK`) and Slurm (`SLURM_PROCID`, `SLURM_NTASKS`) set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub size: usize,
    pub local_size: usize,
}

impl Launch {
    pub fn from_env() -> Option<Self> {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok()?.trim().parse::<usize>().ok())
        };
        let size = var(&["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"])?;
        let rank = var(&[
            "OMPI_COMM_WORLD_RANK",
            "PMI_RANK",
            "PMIX_RANK",
            "SLURM_PROCID",
        ])
        .unwrap_or(0);
        let local_size = var(&[
            "OMPI_COMM_WORLD_LOCAL_SIZE",
            "MPI_LOCALNRANKS",
            "SLURM_NTASKS_PER_NODE",
        ])
        .unwrap_or(1)
        .max(1);
        Some(Self {
            rank,
            size,
            local_size,
        })
    }
}

/// The communicator of this process: `mpi::Mpi` when a launcher started more than one process
/// and the binary has the `mpi` feature; an error when it started several and the binary lacks
/// it (N copies of a single-process run would write over each other); [`single::Single`] else.
pub fn from_env() -> Result<Box<dyn Communicator>> {
    match Launch::from_env() {
        Some(l) if l.size > 1 => multi(l),
        _ => Ok(Box::new(single::Single)),
    }
}

#[cfg(feature = "mpi")]
fn multi(_l: Launch) -> Result<Box<dyn Communicator>> {
    Ok(Box::new(mpi::Mpi::init()?))
}

#[cfg(not(feature = "mpi"))]
fn multi(l: Launch) -> Result<Box<dyn Communicator>> {
    Err(CommError::Launch(format!(
        "the launcher started {} processes (this is rank {}), but this llara was built without MPI: \
         build it with `cargo build --release --features mpi` (needs an MPI library, e.g. Debian's \
         libopenmpi-dev), or run it as one process",
        l.size, l.rank
    )))
}

/// Whether any rank says `flag` (one collective; the same answer on every rank).
pub fn any(comm: &dyn Communicator, flag: bool) -> Result<bool> {
    if comm.size() == 1 {
        return Ok(flag);
    }
    let t = Tensor::new(&[f32::from(u8::from(flag))], &candle_core::Device::Cpu)?;
    let s: Vec<f32> = comm.all_reduce_sum(&t)?.to_vec1()?;
    Ok(s[0] > 0.0)
}

/// Sums `values` over ranks (counts and sums of a step: exact for integers below 2²⁴).
pub fn sum_f32(comm: &dyn Communicator, values: &[f32]) -> Result<Vec<f32>> {
    if comm.size() == 1 {
        return Ok(values.to_vec());
    }
    let t = Tensor::new(values, &candle_core::Device::Cpu)?;
    Ok(comm.all_reduce_sum(&t)?.to_vec1()?)
}

/// Checks that every rank computed the same `fingerprint` (of the binary, the options, the
/// inputs) as rank 0: an error on every rank naming the ranks that differ, and `what` differs.
pub fn agree(comm: &dyn Communicator, what: &str, fingerprint: &str) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mut theirs = fingerprint.as_bytes().to_vec();
    comm.broadcast(0, &mut theirs)?;
    let differs = theirs != fingerprint.as_bytes();
    let all = comm.gather(0, &[u8::from(differs)])?;
    let mut verdict = all
        .iter()
        .enumerate()
        .filter(|(_, b)| b.first() == Some(&1))
        .map(|(r, _)| r.to_string())
        .collect::<Vec<_>>()
        .join(",")
        .into_bytes();
    comm.broadcast(0, &mut verdict)?;
    if verdict.is_empty() {
        return Ok(());
    }
    Err(CommError::Mismatch(format!(
        "rank {} runs with a different {what} than rank 0 (every rank must run the same llara binary \
         with the same options and inputs); this is rank {}",
        String::from_utf8_lossy(&verdict),
        comm.rank()
    )))
}

/// Sums gradients over ranks in place: every trainable tensor of `vars` (in their fixed order;
/// a tensor some rank has no gradient for counts as zeros there), plus the `extra` values (the
/// step's loss and counts), in one collective. A tensor no rank has a gradient for stays absent.
pub fn all_reduce_grads(
    comm: &dyn Communicator,
    vars: &[(String, Var)],
    grads: &mut BTreeMap<String, Tensor>,
    extra: &mut [f32],
) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let cpu = candle_core::Device::Cpu;
    let dev = vars
        .first()
        .map_or(cpu.clone(), |(_, v)| v.device().clone());
    // [extra…, presence of each tensor…, each tensor's values…]
    let mut parts: Vec<Tensor> = vec![Tensor::new(&*extra, &dev)?];
    let presence: Vec<f32> = vars
        .iter()
        .map(|(n, _)| f32::from(u8::from(grads.contains_key(n))))
        .collect();
    parts.push(Tensor::new(presence.as_slice(), &dev)?);
    for (n, v) in vars {
        parts.push(match grads.get(n) {
            Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
            None => Tensor::zeros(v.elem_count(), DType::F32, &dev)?,
        });
    }
    let flat = Tensor::cat(&parts, 0)?;
    let sum = comm.all_reduce_sum(&flat)?;
    let head: Vec<f32> = sum.narrow(0, 0, extra.len() + vars.len())?.to_vec1()?;
    extra.copy_from_slice(&head[..extra.len()]);
    let mut at = extra.len() + vars.len();
    for (i, (n, v)) in vars.iter().enumerate() {
        let k = v.elem_count();
        if head[extra.len() + i] > 0.0 {
            let g = sum
                .narrow(0, at, k)?
                .reshape(v.shape())?
                .to_dtype(v.dtype())?;
            grads.insert(n.clone(), g);
        }
        at += k;
    }
    Ok(())
}

/// This rank's share of `n_batches` batches: a contiguous range, so that the shards in rank
/// order are the batches in order (the first `n % size` ranks take one more).
pub fn shard(n_batches: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let (q, r) = (n_batches / size.max(1), n_batches % size.max(1));
    let start = rank * q + rank.min(r);
    start..start + q + usize::from(rank < r)
}

/// Every rank's `local` results concatenated in rank order, on rank 0 (the others get an
/// empty list). With [`shard`]ed inputs that is the one-process order.
pub fn gather_rows<T: Serialize + DeserializeOwned>(
    comm: &dyn Communicator,
    local: Vec<T>,
) -> Result<Vec<T>> {
    if comm.size() == 1 {
        return Ok(local);
    }
    let bytes = serde_json::to_vec(&local).map_err(|e| CommError::Engine {
        engine: comm.engine(),
        message: format!("serializing rank {}'s results: {e}", comm.rank()),
    })?;
    let mut out = vec![];
    for (r, b) in comm.gather(0, &bytes)?.into_iter().enumerate() {
        let part: Vec<T> = serde_json::from_slice(&b).map_err(|e| CommError::Engine {
            engine: comm.engine(),
            message: format!("reading rank {r}'s results: {e}"),
        })?;
        out.extend(part);
    }
    Ok(out)
}

/// `value` as rank 0 has it, on every rank.
pub fn broadcast_json<T: Serialize + DeserializeOwned>(
    comm: &dyn Communicator,
    value: T,
) -> Result<T> {
    if comm.size() == 1 {
        return Ok(value);
    }
    let mut bytes = serde_json::to_vec(&value).map_err(|e| CommError::Engine {
        engine: comm.engine(),
        message: format!("serializing a broadcast: {e}"),
    })?;
    comm.broadcast(0, &mut bytes)?;
    serde_json::from_slice(&bytes).map_err(|e| CommError::Engine {
        engine: comm.engine(),
        message: format!("reading rank 0's broadcast: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_contiguous_cover_everything_once_and_differ_by_at_most_one() {
        for n in 0..40 {
            for size in 1..9 {
                let ranges: Vec<_> = (0..size).map(|r| shard(n, r, size)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[size - 1].end, n);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1);
                }
            }
        }
    }

    #[test]
    fn one_process_collectives_return_their_input() {
        let c = single::Single;
        assert!(any(&c, true).unwrap() && !any(&c, false).unwrap());
        agree(&c, "config", "abc").unwrap();
        assert_eq!(gather_rows(&c, vec![3, 1, 2]).unwrap(), vec![3, 1, 2]);
        assert_eq!(sum_f32(&c, &[1.5, 2.0]).unwrap(), vec![1.5, 2.0]);
    }
}
