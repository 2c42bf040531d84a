//! Borrowing the f32 contents of CPU tensors for fused kernels, and making CPU tensors from them.

use candle_core::{CpuStorage, Layout, Result, Shape, Storage, Tensor};

/// The contiguous f32 contents of a CPU storage (fused kernels' inputs).
pub fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: f32 expected");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: contiguous input expected");
    };
    Ok(&v[a..b])
}

/// The same, mutable (in-place kernels' destinations).
pub fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: f32 expected");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: contiguous input expected");
    };
    Ok(&mut v[a..b])
}

/// A contiguous copy of the float values `l` addresses in `s` (any float dtype).
pub fn copy_cpu(s: &CpuStorage, l: &Layout, what: &str) -> Result<CpuStorage> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: contiguous input expected");
    };
    Ok(match s {
        CpuStorage::F32(v) => CpuStorage::F32(v[a..b].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[a..b].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[a..b].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[a..b].to_vec()),
        _ => candle_core::bail!("{what}: float storage expected"),
    })
}

/// A tensor's f32 values, flattened, on the host (a copy).
pub fn host_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Runs `f` on the f32 contents of a CPU tensor (made contiguous first).
pub fn with<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    with_all(&[t], |s| f(s[0]))
}

/// Runs `f` on the f32 contents of several CPU tensors at once (each made contiguous first),
/// without copying them.
pub fn with_all<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let ts = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (st, l) in &guards {
        let Storage::Cpu(cs) = &**st else {
            candle_core::bail!("fused kernel: CPU tensor expected");
        };
        slices.push(f32_slice(cs, l, "fused kernel")?);
    }
    Ok(f(&slices))
}

/// Runs `f` on the bf16 contents of a CPU tensor (made contiguous first), without copying them.
pub fn with_bf16<R>(t: &Tensor, f: impl FnOnce(&[half::bf16]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::BF16(v)) = &*st else {
        candle_core::bail!("bf16 kernel: CPU bf16 tensor expected");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("bf16 kernel: contiguous input expected");
    };
    Ok(f(&v[a..b]))
}

/// A CPU tensor of `shape` from its values.
pub fn cpu_tensor(v: Vec<f32>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

/// Element-wise work on blocks of this many values runs in parallel (the blocks do not depend on
/// the thread count, so neither do the results).
pub const BLOCK: usize = 1 << 14;

/// Fills `out` block by block in parallel: `f(offset, block)`.
pub fn par_blocks(out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    use rayon::prelude::*;
    if out.len() <= BLOCK {
        return f(0, out);
    }
    out.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(c, blk)| f(c * BLOCK, blk));
}
