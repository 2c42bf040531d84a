//! Reductions and element-wise maths written so that the compiler vectorizes them (independent
//! accumulators instead of reassociation flags), and the run-time dispatched `exp`.

/// Lanes of the independent accumulators: one AVX-512 vector of f32 (two AVX2 vectors).
const LANES: usize = 16;

/// Dot product with [`LANES`] independent accumulators.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Sum with [`LANES`] independent accumulators.
#[inline]
pub fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut c = a.chunks_exact(LANES);
    for x in &mut c {
        for l in 0..LANES {
            acc[l] += x[l];
        }
    }
    acc.iter().sum::<f32>() + c.remainder().iter().sum::<f32>()
}

/// Sums the rows of a `[rows, width]` contiguous block: `[width]`.
pub fn column_sums(g: &[f32], width: usize) -> Vec<f32> {
    let mut out = vec![0f32; width];
    for row in g.chunks_exact(width) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
    out
}

/// `y += alpha * x`.
#[inline]
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o += alpha * v;
    }
}

/// `e^x` in place over a slice, branch-free so that it vectorizes (AVX-512 or AVX2 where the CPU
/// has them, chosen at run time): `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, a degree-7 Taylor
/// polynomial for `e^r` (relative error below 1e-7) and `2^n` built from the exponent bits.
/// Inputs are clamped to [-87, 88], so `e^-∞` gives about 1.6e-38 rather than 0.
/// Which `exp` [`exp_in_place`] runs on this CPU.
pub fn exp_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2+fma";
        }
    }
    "portable"
}

pub fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features this copy was compiled for (checked just above).
            return unsafe { exp_avx512(xs) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { exp_avx2(xs) };
        }
    }
    exp_portable(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(xs: &mut [f32]) {
    exp_portable(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(xs: &mut [f32]) {
    exp_portable(xs)
}

#[inline(always)]
fn exp_portable(xs: &mut [f32]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2²³ rounds to an integer, which then sits in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    for v in xs.iter_mut() {
        let x = v.clamp(-87.0, 88.0);
        let t = x * LOG2E + MAGIC;
        let n = t - MAGIC;
        let r = x - n * LN2_HI - n * LN2_LO;
        let p = 1.0
            + r * (1.0
                + r * (0.5
                    + r * (1.0 / 6.0
                        + r * (1.0 / 24.0
                            + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
        let pow2 = f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
        *v = p * pow2;
    }
}

/// Softmax in place over one row of scores, over the entries `allowed` keeps (the others become
/// 0); a row with nothing allowed stays all zero. Scores are shifted by the row's allowed maximum
/// before [`exp_in_place`].
pub fn masked_softmax_row(row: &mut [f32], allowed: impl Fn(usize) -> bool) {
    let mut max = f32::NEG_INFINITY;
    for (j, v) in row.iter().enumerate() {
        if allowed(j) && *v > max {
            max = *v;
        }
    }
    row.iter_mut().for_each(|v| *v -= max);
    exp_in_place(row);
    let mut s = 0f32;
    for (j, v) in row.iter_mut().enumerate() {
        if !allowed(j) {
            *v = 0.0;
        }
        s += *v;
    }
    if s > 0.0 {
        let inv = 1.0 / s;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_and_sum_match_a_plain_loop_for_every_tail_length() {
        for n in [0, 1, 7, 15, 16, 17, 33, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let d: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let s: f64 = a.iter().map(|x| *x as f64).sum();
            assert!((dot(&a, &b) as f64 - d).abs() < 1e-5, "dot n={n}");
            assert!((sum(&a) as f64 - s).abs() < 1e-5, "sum n={n}");
        }
    }

    #[test]
    fn masked_softmax_row_normalises_the_allowed_entries_only() {
        let mut row = vec![1.0, 2.0, 3.0, 100.0];
        masked_softmax_row(&mut row, |j| j < 3);
        let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|x| x.exp()).collect();
        let z: f64 = e.iter().sum();
        for j in 0..3 {
            assert!((row[j] as f64 - e[j] / z).abs() < 1e-6);
        }
        assert_eq!(row[3], 0.0);
        let mut none = vec![1.0, 2.0];
        masked_softmax_row(&mut none, |_| false);
        assert_eq!(none, vec![0.0, 0.0]);
    }

    #[test]
    fn fast_exp_matches_std_within_a_few_ulps() {
        let xs: Vec<f32> = (0..20_001).map(|i| -87.0 + i as f32 * 0.0087).collect();
        let mut ys = xs.clone();
        exp_in_place(&mut ys);
        let mut worst = 0f64;
        for (x, y) in xs.iter().zip(&ys) {
            let want = (*x as f64).exp();
            worst = worst.max(((*y as f64 - want) / want).abs());
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        // Masked scores: -inf gives (almost) nothing, never NaN or infinity.
        let mut edge = [f32::NEG_INFINITY, -1e30, 0.0, 1e30];
        exp_in_place(&mut edge);
        assert!(edge[0] < 1e-37 && edge[1] < 1e-37);
        assert_eq!(edge[2], 1.0);
        assert!(edge[3].is_finite() && edge[3] > 1e38);
    }
}
