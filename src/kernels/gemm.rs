//! The one GEMM wrapper of the crate: row-major f32 slices, optional transposes, accumulate, scale,
//! and the threading policy every caller shares. gemm's own multi-threading does not give the
//! same bits from run to run, so the product is split into fixed blocks of single-threaded gemm
//! calls, one per thread of the rayon pool (or run on the calling thread: [`mm_serial`]); a few
//! rows times a transposed matrix (generation) take a dot-product path instead.

use super::simd::dot;

/// `c[m, n] = (acc ? c : 0) + alpha · op(a) · op(b)` for row-major contiguous slices; `op(a)` is
/// `a [m, k]`, or `a [k, m]` transposed when `ta`; likewise `op(b)` is `b [k, n]` or `b [n, k]`ᵀ.
#[allow(clippy::too_many_arguments)]
pub fn mm(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    acc: bool,
    alpha: f32,
) {
    mm_in(pool_threads(), c, a, b, m, n, k, ta, tb, acc, alpha)
}

/// [`mm`] on the calling thread only, for callers that are themselves one task of a parallel
/// loop (the GRU recurrence's fixed row blocks).
#[allow(clippy::too_many_arguments)]
pub fn mm_serial(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    acc: bool,
    alpha: f32,
) {
    mm_in(1, c, a, b, m, n, k, ta, tb, acc, alpha)
}

/// The blocks a pooled GEMM is split into: one per thread of candle's (and rayon's) CPU pool.
pub fn pool_threads() -> usize {
    candle_core::utils::get_num_threads()
}

#[allow(clippy::too_many_arguments)]
fn mm_in(
    threads: usize,
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    acc: bool,
    alpha: f32,
) {
    assert!(
        c.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "mm: slice too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            c[..m * n].fill(0.0);
        }
        return;
    }
    if m <= 4 && !ta && tb {
        // A few rows times a row-major matrix (generation): row dot products stream `b` once,
        // where gemm would pack it first.
        return small_m(threads, c, a, b, m, n, k, acc, alpha);
    }
    // SAFETY: `c` holds at least m·n elements (asserted above).
    unsafe { gemm_blocks(threads, c.as_mut_ptr(), a, b, m, n, k, ta, tb, acc, alpha) }
}

/// A new row-major `[m, n]` = `alpha · op(a) · op(b)` (see [`mm`]), which the GEMM writes without
/// the buffer being zero-filled first.
#[allow(clippy::too_many_arguments)]
pub fn mm_new(
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    alpha: f32,
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 || (m <= 4 && !ta && tb) {
        let mut c = vec![0f32; m * n];
        mm(&mut c, a, b, m, n, k, ta, tb, false, alpha);
        return c;
    }
    assert!(
        a.len() >= m * k && b.len() >= k * n,
        "mm_new: slice too short"
    );
    let mut c = Vec::with_capacity(m * n);
    // SAFETY: the buffer has capacity m·n; with `acc` false the GEMM writes every element of the
    // m·n result and reads none, so all of them are initialized before `set_len`.
    unsafe {
        gemm_blocks(
            pool_threads(),
            c.as_mut_ptr(),
            a,
            b,
            m,
            n,
            k,
            ta,
            tb,
            false,
            alpha,
        );
        c.set_len(m * n);
    }
    c
}

/// The GEMM behind [`mm`] and [`mm_new`].
///
/// # Safety
/// `c` must be valid for writes (and, with `acc`, reads) of `m·n` elements; `a` and `b` must
/// hold `m·k` and `k·n`; `m`, `n`, `k` > 0.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_blocks(
    threads: usize,
    c: *mut f32,
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    acc: bool,
    alpha: f32,
) {
    let (a_cs, a_rs) = if ta { (m as isize, 1) } else { (1, k as isize) };
    let (b_cs, b_rs) = if tb { (k as isize, 1) } else { (1, n as isize) };
    // gemm's own multi-threading does not give the same bits from run to run; split `c` into one
    // block per thread instead, each a single-threaded gemm (deterministic for a given thread
    // count). Each block packs the operand it shares with the others, so the split runs along
    // the longer side of `c`: rows (tokens) when there are more of them than columns, else
    // columns (a weight's outputs), so that a short prompt's GEMMs do not pack every weight once
    // per thread.
    let parallel = threads > 1 && m * n * k >= 64 * 64 * 64;
    let by_cols = parallel && n > m && m >= 8 && n >= 32 * threads;
    let blocks = if by_cols || (parallel && m >= 2 * threads) {
        threads
    } else {
        1
    };
    let (a_ptr, b_ptr, c_ptr) = (a.as_ptr() as usize, b.as_ptr() as usize, c as usize);
    // One gemm over rows i0..i0+mb and columns j0..j0+nb of c.
    let block = |i0: usize, mb: usize, j0: usize, nb: usize| {
        // SAFETY: blocks write disjoint rows (or columns) of c; the operand pointers are offset
        // to row i0 of op(a) and column j0 of op(b) (element offsets that depend on whether each
        // is stored transposed); the caller guarantees the sizes, and the strides address exactly
        // those row-major layouts.
        unsafe {
            let a_off = if ta { i0 } else { i0 * k };
            let b_off = if tb { j0 * k } else { j0 };
            gemm::gemm(
                mb,
                nb,
                k,
                (c_ptr as *mut f32).add(i0 * n + j0),
                1,
                n as isize,
                acc,
                (a_ptr as *const f32).add(a_off),
                a_cs,
                a_rs,
                (b_ptr as *const f32).add(b_off),
                b_cs,
                b_rs,
                1.0,
                alpha,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    let run = |bi: usize| {
        if by_cols {
            // Column blocks in multiples of 16 (one AVX-512 vector of f32).
            let cols = n.div_ceil(blocks).div_ceil(16) * 16;
            let j0 = bi * cols;
            if j0 < n {
                block(0, m, j0, cols.min(n - j0));
            }
        } else {
            let rows = m.div_ceil(blocks);
            let i0 = bi * rows;
            if i0 < m {
                block(i0, rows.min(m - i0), 0, n);
            }
        }
    };
    if blocks == 1 {
        run(0);
    } else {
        use rayon::prelude::*;
        (0..blocks).into_par_iter().for_each(run);
    }
}

#[allow(clippy::too_many_arguments)]
fn small_m(
    threads: usize,
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    acc: bool,
    alpha: f32,
) {
    use rayon::prelude::*;
    let rows = |j0: usize, out: &mut [f32]| {
        // out[i * len + jj] for rows i of a and columns j0 + jj.
        let len = out.len() / m;
        for jj in 0..len {
            let brow = &b[(j0 + jj) * k..][..k];
            for i in 0..m {
                out[i * len + jj] = alpha * dot(&a[i * k..][..k], brow);
            }
        }
    };
    let chunk = n.div_ceil(threads.max(1)).max(1);
    let mut parts: Vec<Vec<f32>> = (0..n.div_ceil(chunk))
        .map(|p| vec![0f32; m * chunk.min(n - p * chunk)])
        .collect();
    if n * k >= 1 << 16 && threads > 1 {
        parts
            .par_iter_mut()
            .enumerate()
            .for_each(|(p, out)| rows(p * chunk, out));
    } else {
        parts
            .iter_mut()
            .enumerate()
            .for_each(|(p, out)| rows(p * chunk, out));
    }
    for (p, out) in parts.iter().enumerate() {
        let len = out.len() / m;
        for i in 0..m {
            let dst = &mut c[i * n + p * chunk..][..len];
            let src = &out[i * len..][..len];
            if acc {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_into_a_fresh_buffer_matches_a_naive_product() {
        for &(m, n, k) in &[
            (3, 5, 7),
            (70, 65, 66),
            (130, 9, 80),
            (40, 200, 70),
            (9, 333, 100),
            (2, 50, 30),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0)
                .collect();
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let at = |i: usize, l: usize| if ta { a[l * m + i] } else { a[i * k + l] };
                let bt = |l: usize, j: usize| if tb { b[j * k + l] } else { b[l * n + j] };
                let c = mm_new(&a, &b, m, n, k, ta, tb, 0.5);
                assert_eq!(c.len(), m * n);
                // The serial policy accumulates into what is there.
                let mut s = vec![1f32; m * n];
                mm_serial(&mut s, &a, &b, m, n, k, ta, tb, true, 0.5);
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = 0.5 * (0..k).map(|l| at(i, l) * bt(l, j)).sum::<f32>();
                        assert!((c[i * n + j] - want).abs() < 1e-3, "{m}x{n}x{k} {ta} {tb}");
                        let got = s[i * n + j] - 1.0;
                        assert!((got - want).abs() < 1e-3, "serial {m}x{n}x{k} {ta} {tb}");
                    }
                }
            }
        }
    }
}
