//! Seeded inverted dropout: masks drawn from ChaCha streams derived from the run's seed, so that
//! training is reproducible (the same seed and size give the same mask on any thread count).
//!
//! A dropout given row keys ([`Dropout::with_rows`]: a batch's examples' indices in their
//! optimizer step) draws each row's flags from that row's own stream, element by element from its
//! start: a row's mask is then the same whichever rows share its batch, however far the batch is
//! padded and on whichever process of a data-parallel run it is computed.

use candle_core::{Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Inverted dropout with masks drawn from a seeded stream.
#[derive(Clone)]
pub struct Dropout {
    pub p: f64,
    rng: ChaCha8Rng,
    /// The key of each row of the batch (its first dimension): see [`Dropout::with_rows`].
    rows: Option<std::sync::Arc<[u64]>>,
}

impl Dropout {
    pub fn new(p: f64, rng: ChaCha8Rng) -> Self {
        Self { p, rng, rows: None }
    }

    /// Keys the masks by row: row `i` of every masked tensor (whose first dimension is the batch)
    /// draws from stream `keys[i]` of the call's generator, from the row's first element on.
    pub fn with_rows(mut self, keys: Vec<u64>) -> Self {
        self.rows = Some(keys.into());
        self
    }

    /// `n` multipliers: `1 / (1 - p)` with probability `1 - p`, else 0.
    pub fn mask_values(&mut self, n: usize) -> Vec<f32> {
        let keep = self.keep_flags(n);
        self.values(&keep)
    }

    /// The multipliers of keep flags: `1 / (1 - p)` where kept, else 0.
    fn values(&self, keep: &[u8]) -> Vec<f32> {
        let scale = self.scale();
        keep.iter()
            .map(|&k| if k != 0 { scale } else { 0.0 })
            .collect()
    }

    /// One 32-bit draw below this keeps its element (probability `1 - p`).
    fn threshold(&self) -> u32 {
        ((1.0 - self.p) * 4_294_967_296.0).min(4_294_967_295.0) as u32
    }

    /// `n` keep flags (1 with probability `1 - p`): the same draws as [`Dropout::mask_values`].
    pub fn keep_flags(&mut self, n: usize) -> Vec<u8> {
        // Compare 32-bit draws with a threshold: one draw per element.
        let threshold = self.threshold();
        (0..n)
            .map(|_| u8::from(self.rng.random::<u32>() < threshold))
            .collect()
    }

    /// `n` keep flags like [`Dropout::keep_flags`], drawn in parallel: one draw from this stream
    /// seeds a generator whose independent ChaCha streams each fill one fixed-size block, so the
    /// flags depend on the seed and `n`, never on the thread count.
    pub fn keep_flags_parallel(&mut self, n: usize) -> Vec<u8> {
        use rand::SeedableRng;
        use rayon::prelude::*;
        const BLOCK: usize = 1 << 15;
        let seed = self.rng.random::<u64>();
        let threshold = self.threshold();
        let mut keep = vec![0u8; n];
        keep.par_chunks_mut(BLOCK).enumerate().for_each(|(i, blk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i as u64);
            blk.iter_mut()
                .for_each(|k| *k = u8::from(rng.random::<u32>() < threshold));
        });
        keep
    }

    /// Keep flags for a tensor of shape `dims`: with row keys, each row's from its own stream
    /// (one draw of this stream seeds the call's generator; row `i` is stream `keys[i]` of it,
    /// word `j` its element `j`, filled in parallel blocks); without, [`Dropout::keep_flags_parallel`].
    pub fn keep_flags_for(&mut self, dims: &[usize]) -> Result<Vec<u8>> {
        use rand::SeedableRng;
        use rayon::prelude::*;
        const BLOCK: usize = 1 << 15;
        let n: usize = dims.iter().product();
        let Some(keys) = self.rows.clone() else {
            return Ok(self.keep_flags_parallel(n));
        };
        let b = dims.first().copied().unwrap_or(1);
        if b != keys.len() {
            candle_core::bail!(
                "dropout keyed by {} rows applied to a batch of {b} rows ({dims:?})",
                keys.len()
            );
        }
        let seed = self.rng.random::<u64>();
        let threshold = self.threshold();
        let mut keep = vec![0u8; n];
        if n == 0 {
            return Ok(keep);
        }
        let per_row = n / b;
        keep.par_chunks_mut(per_row)
            .zip(keys.par_iter())
            .for_each(|(row, &key)| {
                row.par_chunks_mut(BLOCK).enumerate().for_each(|(j, blk)| {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    rng.set_stream(key);
                    rng.set_word_pos((j * BLOCK) as u128);
                    blk.iter_mut()
                        .for_each(|k| *k = u8::from(rng.random::<u32>() < threshold));
                });
            });
        Ok(keep)
    }

    /// A dropout with the same rate (and row keys) and its own stream, seeded by one draw from
    /// this one.
    pub fn fork(&mut self) -> Dropout {
        use rand::SeedableRng;
        Dropout {
            p: self.p,
            rng: ChaCha8Rng::seed_from_u64(self.rng.random::<u64>()),
            rows: self.rows.clone(),
        }
    }

    /// The multiplier of kept elements, `1 / (1 - p)`.
    pub fn scale(&self) -> f32 {
        (1.0 / (1.0 - self.p)) as f32
    }

    pub fn apply(&mut self, x: &Tensor) -> Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = self.keep_flags(x.elem_count());
        x.mul(&self.mask_of(&keep, x)?)
    }

    /// [`Dropout::apply`] with the mask of [`Dropout::mask_like`] (the LLM's LoRA inputs).
    pub fn apply_parallel(&mut self, x: &Tensor) -> Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        x.mul(&self.mask_like(x)?)
    }

    /// The multipliers (`1 / (1 - p)` or 0) for a tensor shaped like `x`, made on `x`'s device in
    /// `x`'s dtype. On the CPU they are the draws of [`Dropout::keep_flags_for`] (the fused
    /// kernel's mask, bit for bit); on other devices the device's own generator draws them,
    /// seeded from this stream, so no mask crosses the bus (and row keys are not followed: such
    /// masks depend on the batch's shape).
    pub fn mask_like(&mut self, x: &Tensor) -> Result<Tensor> {
        let dev = x.device();
        if dev.is_cpu() {
            let keep = self.keep_flags_for(x.dims())?;
            return self.mask_of(&keep, x);
        }
        dev.set_seed(self.rng.random::<u64>())?;
        let u = Tensor::rand(0f32, 1f32, x.shape(), dev)?;
        let keep = u.ge(self.p)?.to_dtype(x.dtype())?;
        keep.affine(self.scale() as f64, 0.0)
    }

    /// The multipliers of `keep` as a tensor shaped like `x`, on its device, in its dtype.
    fn mask_of(&self, keep: &[u8], x: &Tensor) -> Result<Tensor> {
        Tensor::from_vec(self.values(keep), x.shape(), x.device())?.to_dtype(x.dtype())
    }
}

/// Applies dropout when training (`Some`), the identity otherwise.
pub fn maybe_dropout(x: &Tensor, d: &mut Option<&mut Dropout>) -> Result<Tensor> {
    match d {
        Some(d) => d.apply(x),
        None => Ok(x.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_mask_is_made_on_the_tensors_device_in_its_dtype() {
        use candle_core::{DType, Device};
        let x = Tensor::ones((3, 50_000), DType::BF16, &Device::Cpu).unwrap();
        let m = Dropout::new(0.25, ChaCha8Rng::seed_from_u64(4))
            .mask_like(&x)
            .unwrap();
        assert!(m.device().same_device(x.device()));
        assert_eq!((m.dtype(), m.dims()), (DType::BF16, x.dims()));
        // On the CPU: the fused kernel's draws, bit for bit.
        let keep = Dropout::new(0.25, ChaCha8Rng::seed_from_u64(4)).keep_flags_parallel(150_000);
        let m: Vec<f32> = m
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = (1.0f32 / 0.75).to_string();
        for (v, k) in m.iter().zip(&keep) {
            let want: f32 = if *k == 1 { scale.parse().unwrap() } else { 0.0 };
            assert!((v - want).abs() < 1e-2, "{v} vs {want}");
        }
    }

    fn flags(threads: usize, seed: u64, n: usize) -> Vec<u8> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| Dropout::new(0.1, ChaCha8Rng::seed_from_u64(seed)).keep_flags_parallel(n))
    }

    #[test]
    fn keyed_rows_keep_their_mask_whatever_shares_or_pads_the_batch() {
        let d = |keys: Vec<u64>| Dropout::new(0.3, ChaCha8Rng::seed_from_u64(5)).with_rows(keys);
        let (t, h) = (5, 9000); // rows of several blocks and a partial one
        let both = d(vec![3, 8]).keep_flags_for(&[2, t, h]).unwrap();
        let alone = d(vec![8]).keep_flags_for(&[1, t, h]).unwrap();
        assert_eq!(both[t * h..], alone[..]);
        // Padded to more positions: the first t positions are the same flags.
        let padded = d(vec![8, 3]).keep_flags_for(&[2, t + 2, h]).unwrap();
        assert_eq!(padded[..t * h], alone[..]);
        assert_eq!(padded[(t + 2) * h..(t + 2) * h + t * h], both[..t * h]);
        // The same on another thread count; another key draws other flags.
        assert_eq!(
            rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap()
                .install(|| d(vec![8]).keep_flags_for(&[1, t, h]).unwrap()),
            alone
        );
        assert_ne!(d(vec![9]).keep_flags_for(&[1, t, h]).unwrap(), alone);
        let kept = alone.iter().filter(|&&k| k == 1).count() as f64 / alone.len() as f64;
        assert!((kept - 0.7).abs() < 0.02, "kept fraction {kept}");
        assert!(d(vec![1, 2]).keep_flags_for(&[3, t, h]).is_err());
    }

    #[test]
    fn parallel_keep_flags_depend_on_the_seed_not_the_threads() {
        let n = 100_003; // several blocks and a partial one
        let one = flags(1, 7, n);
        assert_eq!(one, flags(3, 7, n));
        assert_ne!(one, flags(1, 8, n));
        let kept = one.iter().filter(|&&k| k == 1).count() as f64 / n as f64;
        assert!((kept - 0.9).abs() < 0.01, "kept fraction {kept}");
        // Blocks draw from different streams, not copies of one.
        assert_ne!(one[..1 << 15], one[1 << 15..2 << 15]);
    }
}
