//! The bf16 GEMM for frozen weights: `C (f32) = alpha · A · B` where `A [m, k]` is f32 (rounded to
//! bf16, round-to-nearest-even, once per call) and `B [k, n]` is a frozen weight packed once, in
//! bf16, for the kernel that runs. Products of two bf16 values are exact in f32 and every sum is
//! accumulated in f32 (as PyTorch's bf16 matmul and its autocast do).
//!
//! Which kernel runs is decided here, once per process ([`kernel`]):
//! - **AVX512-BF16** (`vdpbf16ps`: 16 f32 lanes, each the sum of two bf16 products per
//!   instruction) on AMD CPUs that have it (Zen 4 on), where it was measured at twice the f32
//!   GEMM's rate (`scripts/bench_gemm.sh`). `B` is packed in panels of 16 columns whose elements
//!   are (k, k+1) pairs, the layout the instruction multiplies; the micro-kernel keeps an 8 × 48
//!   block of `C` in 24 registers. Intel CPUs with AVX512-BF16 (Cooper Lake, Sapphire Rapids on)
//!   issue it at about half their f32 FMA rate (measured on Sapphire Rapids: ~115 against ~200
//!   GFLOP/s on one core), so there it is not chosen unless asked for
//!   (`LLARA_BF16_KERNEL=avx512-bf16`).
//! - **f32** otherwise: the weight's bf16 values are widened once to an f32 `[k, n]` copy and the
//!   shared f32 GEMM ([`super::gemm`]) multiplies the unrounded `A` with it. The bf16 weights give
//!   the same model on every CPU; only this path's inputs are not rounded. `LLARA_BF16_KERNEL=f32`
//!   chooses it anywhere.
//! - **AMX** (`tdpbf16ps`, Sapphire Rapids on) is not built: this project's machines that ran this
//!   code had no AMX, and a kernel nobody ran does not ship. [`describe`] says so where the CPU has
//!   AMX.
//!
//! Every element of `C` is one thread's dot product over all of `k` in a fixed order, whatever the
//! number of threads: results are the same bytes on 1 and 2 threads.

use std::sync::OnceLock;

/// The bf16 GEMM kernels this build can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `vdpbf16ps` on 512-bit vectors.
    Avx512Bf16,
    /// No bf16 instruction: the f32 GEMM on widened weights.
    F32,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512Bf16 => "AVX512-BF16",
            Kernel::F32 => "f32 (bf16 weights widened)",
        }
    }
}

/// Whether the CPU has AVX512-BF16 and the OS enables AVX-512 state (`is_x86_feature_detected!`
/// checks CPUID and XCR0).
pub fn cpu_has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether CPUID's vendor string is AMD's.
fn cpu_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let r = std::arch::x86_64::__cpuid(0);
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&r.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&r.edx.to_le_bytes());
        v[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &v == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The kernel this process runs (see the module's notes): `LLARA_BF16_KERNEL` (`avx512-bf16` or
/// `f32`) when set and runnable, else AVX512-BF16 on AMD CPUs that have it, else f32.
pub fn kernel() -> Kernel {
    static K: OnceLock<Kernel> = OnceLock::new();
    *K.get_or_init(|| {
        match std::env::var("LLARA_BF16_KERNEL").as_deref() {
            Ok("f32") => return Kernel::F32,
            Ok("avx512-bf16") if cpu_has_avx512_bf16() => return Kernel::Avx512Bf16,
            Ok(other) => tracing::warn!(
                "LLARA_BF16_KERNEL={other}: expected avx512-bf16 (on a CPU that has it) or f32; \
                 choosing by CPU"
            ),
            Err(_) => {}
        }
        if cpu_has_avx512_bf16() && cpu_is_amd() {
            Kernel::Avx512Bf16
        } else {
            Kernel::F32
        }
    })
}

/// Whether the CPU reports AMX tiles (CPUID leaf 7: AMX-BF16 in EDX bit 22, AMX-TILE bit 24).
pub fn cpu_has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Leaf 7 exists when leaf 0 reports it.
        let max = std::arch::x86_64::__cpuid(0).eax;
        if max >= 7 {
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            return edx & (1 << 22) != 0 && edx & (1 << 24) != 0;
        }
    }
    false
}

/// One line for logs and `llara llm info`: which bf16 GEMM runs, and why not another.
pub fn describe() -> String {
    let mut why = vec![];
    if kernel() == Kernel::F32 && cpu_has_avx512_bf16() {
        why.push(
            if std::env::var("LLARA_BF16_KERNEL").as_deref() == Ok("f32") {
                "AVX512-BF16 present, f32 asked for by LLARA_BF16_KERNEL"
            } else {
                "AVX512-BF16 present but not chosen: slower than f32 outside AMD's CPUs"
            },
        );
    }
    why.push(if cpu_has_amx() {
        "AMX present but not used: no AMX kernel is built"
    } else {
        "no AMX on this CPU"
    });
    format!("bf16 GEMM: {} ({})", kernel().name(), why.join("; "))
}

/// bf16 bits of `x`, rounded to nearest even (NaN stays NaN).
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// f32 value of bf16 bits.
#[inline]
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Columns per panel of a packed `B` (one 512-bit vector of f32).
const LANES: usize = 16;
/// Rows of `C` per micro-kernel call.
const MR: usize = 8;
/// Panels per micro-kernel call (8 × 3 accumulators: 24 of the 32 vector registers).
const NV: usize = 3;

/// A frozen `B [k, n]` packed for [`kernel`] (or the one given to [`Packed::with_kernel`]).
pub struct Packed {
    k: usize,
    n: usize,
    kernel: Kernel,
    /// AVX512-BF16: `ceil(n/16)` panels, each `ceil(k/2)` vectors of 16 (k, k+1) bf16 pairs
    /// (`u32`: the even k in the low half); rows past `k` and columns past `n` are zero.
    pairs: Vec<u32>,
    /// f32 fallback: `B` widened, row-major `[k, n]`.
    wide: Vec<f32>,
}

impl Packed {
    /// Packs `B` for this CPU's kernel; `b(kk, j)` gives the bf16 bits of `B[kk, j]`.
    pub fn new(k: usize, n: usize, b: impl Fn(usize, usize) -> u16 + Sync) -> Packed {
        Self::with_kernel(kernel(), k, n, b)
    }

    /// Packs `B` for a given kernel, whichever [`kernel`] chose (tests and benchmarks run both;
    /// [`Kernel::Avx512Bf16`] on a CPU without the instruction falls back to [`Kernel::F32`]).
    pub fn with_kernel(
        kernel_wanted: Kernel,
        k: usize,
        n: usize,
        b: impl Fn(usize, usize) -> u16 + Sync,
    ) -> Packed {
        use rayon::prelude::*;
        let kernel = if kernel_wanted == Kernel::Avx512Bf16 && cpu_has_avx512_bf16() {
            Kernel::Avx512Bf16
        } else {
            Kernel::F32
        };
        let mut p = Packed {
            k,
            n,
            kernel,
            pairs: Vec::new(),
            wide: Vec::new(),
        };
        match kernel {
            Kernel::Avx512Bf16 => {
                let kp = k.div_ceil(2);
                let panels = n.div_ceil(LANES);
                let at = |kk: usize, j: usize| -> u32 {
                    if kk < k && j < n {
                        b(kk, j) as u32
                    } else {
                        0
                    }
                };
                p.pairs = vec![0u32; panels * kp * LANES];
                p.pairs
                    .par_chunks_mut(kp * LANES)
                    .enumerate()
                    .for_each(|(panel, dst)| {
                        for q in 0..kp {
                            for l in 0..LANES {
                                let j = panel * LANES + l;
                                dst[q * LANES + l] = at(2 * q, j) | (at(2 * q + 1, j) << 16);
                            }
                        }
                    });
            }
            Kernel::F32 => {
                p.wide = vec![0f32; k * n];
                p.wide
                    .par_chunks_mut(n.max(1))
                    .enumerate()
                    .for_each(|(kk, row)| {
                        for (j, v) in row.iter_mut().enumerate() {
                            *v = from_bf16(b(kk, j));
                        }
                    });
            }
        }
        p
    }

    /// Packs `B [k, n]` from f32 values rounded to bf16 ([`to_bf16`]): `src` is `B` row-major
    /// `[k, n]`, or with `transposed` `Bᵀ` row-major `[n, k]` (a weight `W [n, k]` for the forward
    /// `x · Wᵀ`). The same packing as [`Packed::new`] on those values, with loops the compiler
    /// vectorizes (a dequantized tile of a block-format weight is packed on every product).
    pub fn from_f32(src: &[f32], k: usize, n: usize, transposed: bool) -> Packed {
        use rayon::prelude::*;
        assert_eq!(src.len(), k * n, "Packed::from_f32: source size");
        let kernel = kernel();
        if kernel != Kernel::Avx512Bf16 || !k.is_multiple_of(2) || !n.is_multiple_of(LANES) {
            return if transposed {
                Self::new(k, n, |kk, j| to_bf16(src[j * k + kk]))
            } else {
                Self::new(k, n, |kk, j| to_bf16(src[kk * n + j]))
            };
        }
        let kp = k / 2;
        let pair = |a: f32, b: f32| to_bf16(a) as u32 | (to_bf16(b) as u32) << 16;
        let mut pairs = vec![0u32; (n / LANES) * kp * LANES];
        pairs
            .par_chunks_mut((kp * LANES).max(1))
            .enumerate()
            .for_each(|(panel, dst)| {
                if transposed {
                    for l in 0..LANES {
                        let row = &src[(panel * LANES + l) * k..][..k];
                        for (q, two) in row.chunks_exact(2).enumerate() {
                            dst[q * LANES + l] = pair(two[0], two[1]);
                        }
                    }
                } else {
                    for (q, d) in dst.chunks_exact_mut(LANES).enumerate() {
                        let r0 = &src[2 * q * n + panel * LANES..][..LANES];
                        let r1 = &src[(2 * q + 1) * n + panel * LANES..][..LANES];
                        for l in 0..LANES {
                            d[l] = pair(r0[l], r1[l]);
                        }
                    }
                }
            });
        Packed {
            k,
            n,
            kernel,
            pairs,
            wide: Vec::new(),
        }
    }

    /// `B = Wᵀ` for a row-major bf16 weight `W [n, k]` (the forward `x · Wᵀ`).
    pub fn transposed_of(w: &[half::bf16], n: usize, k: usize) -> Packed {
        assert_eq!(w.len(), n * k, "Packed::transposed_of: weight size");
        Self::new(k, n, |kk, j| w[j * k + kk].to_bits())
    }

    /// `B = W` for a row-major bf16 weight `W [k, n]` (the input gradient `dy · W`).
    pub fn of(w: &[half::bf16], k: usize, n: usize) -> Packed {
        assert_eq!(w.len(), k * n, "Packed::of: weight size");
        Self::new(k, n, |kk, j| w[kk * n + j].to_bits())
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// `(k, n)`: the shape of `B`.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// Bytes held (the packing is the weight's only copy).
    pub fn bytes(&self) -> usize {
        self.pairs.len() * 4 + self.wide.len() * 4
    }

    /// The bf16 bits of `B[kk, j]`.
    #[inline]
    pub fn get(&self, kk: usize, j: usize) -> u16 {
        match self.kernel {
            Kernel::Avx512Bf16 => {
                let kp = self.k.div_ceil(2);
                let v = self.pairs[((j / LANES) * kp + kk / 2) * LANES + j % LANES];
                (v >> (16 * (kk % 2))) as u16
            }
            Kernel::F32 => to_bf16(self.wide[kk * self.n + j]),
        }
    }

    /// `Bᵀ [n, k]` packed for the same kernel, made from this packing (the other orientation of a
    /// frozen weight, for the one call that needs it).
    pub fn transposed(&self) -> Packed {
        Self::with_kernel(self.kernel, self.n, self.k, |kk, j| self.get(j, kk))
    }
}

/// `c[m, n] = (acc ? c : 0) + alpha · A · B` for a row-major `a [m, k]`.
pub fn mm(c: &mut [f32], a: &[f32], m: usize, b: &Packed, acc: bool, alpha: f32) {
    mm_threads(super::gemm::pool_threads(), c, a, m, b, acc, alpha)
}

/// [`mm`] split into blocks for `threads` threads.
fn mm_threads(
    threads: usize,
    c: &mut [f32],
    a: &[f32],
    m: usize,
    b: &Packed,
    acc: bool,
    alpha: f32,
) {
    let (k, n) = (b.k, b.n);
    assert!(
        c.len() >= m * n && a.len() >= m * k,
        "bf16 mm: slice too short"
    );
    match b.kernel {
        Kernel::F32 => super::gemm::mm(c, a, &b.wide, m, n, k, false, false, acc, alpha),
        // SAFETY: `c` holds at least m·n values (asserted above).
        Kernel::Avx512Bf16 => unsafe { avx512(threads, c.as_mut_ptr(), a, m, b, acc, alpha) },
    }
}

/// A new row-major `[m, n] = alpha · A · B`, written without zero-filling the buffer first.
pub fn mm_new(a: &[f32], m: usize, b: &Packed, alpha: f32) -> Vec<f32> {
    let (k, n) = (b.k, b.n);
    assert!(a.len() >= m * k, "bf16 mm_new: slice too short");
    match b.kernel {
        Kernel::F32 => super::gemm::mm_new(a, &b.wide, m, n, k, false, false, alpha),
        Kernel::Avx512Bf16 => {
            let mut c = Vec::with_capacity(m * n);
            // SAFETY: the buffer has capacity m·n; without `acc` the kernel writes every one of
            // the m·n values (every row, every column of each panel) and reads none, so all are
            // initialized before `set_len`.
            unsafe {
                avx512(
                    super::gemm::pool_threads(),
                    c.as_mut_ptr(),
                    a,
                    m,
                    b,
                    false,
                    alpha,
                );
                c.set_len(m * n);
            }
            c
        }
    }
}

/// The AVX512-BF16 product into `c`.
///
/// # Safety
/// `c` must be valid for writes (and, with `acc`, reads) of `m·n` values; `b` packed for
/// [`Kernel::Avx512Bf16`] (which [`Packed::with_kernel`] chooses only where the CPU has it).
unsafe fn avx512(
    threads: usize,
    c: *mut f32,
    a: &[f32],
    m: usize,
    b: &Packed,
    acc: bool,
    alpha: f32,
) {
    if m == 0 || b.n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    x86::mm(threads, c, a, m, b, acc, alpha);
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX512-BF16 is detected on x86-64 only");
}

/// Rounds `a [m, k]` to bf16 rows of `ceil(k/2)` (k, k+1) pairs (a zero appended to an odd row).
fn pack_rows(a: &[f32], m: usize, k: usize) -> Vec<u32> {
    use rayon::prelude::*;
    let kp = k.div_ceil(2);
    let mut out = vec![0u32; m * kp];
    let vector = cpu_has_avx512_bf16();
    let fill = |(i, dst): (usize, &mut [u32])| {
        let row = &a[i * k..][..k];
        #[cfg(target_arch = "x86_64")]
        if vector {
            // SAFETY: the CPU has AVX512-BF16 (`vector`).
            return unsafe { x86::round_row(row, dst) };
        }
        round_row_scalar(row, dst, 0);
    };
    if m * k >= 1 << 16 {
        out.par_chunks_mut(kp.max(1)).enumerate().for_each(fill);
    } else {
        out.chunks_mut(kp.max(1)).enumerate().for_each(fill);
    }
    out
}

/// Pairs of `row` from pair `q0` on, rounded to bf16.
fn round_row_scalar(row: &[f32], dst: &mut [u32], q0: usize) {
    for (q, d) in dst.iter_mut().enumerate().skip(q0) {
        let lo = to_bf16(row[2 * q]) as u32;
        let hi = row.get(2 * q + 1).map_or(0, |&v| to_bf16(v) as u32);
        *d = lo | (hi << 16);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{pack_rows, Packed, LANES, MR, NV};
    use std::arch::x86_64::*;

    /// Rounds one row to bf16 pairs, 32 values per instruction (round to nearest even).
    ///
    /// # Safety
    /// The CPU must have AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_row(row: &[f32], dst: &mut [u32]) {
        let full = row.len() / 32;
        for c in 0..full {
            let lo = _mm512_loadu_ps(row.as_ptr().add(c * 32));
            let hi = _mm512_loadu_ps(row.as_ptr().add(c * 32 + 16));
            // The second operand fills the low half: elements stay in order.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.as_mut_ptr().add(c * 16) as *mut _, v);
        }
        super::round_row_scalar(row, dst, full * 16);
    }

    /// # Safety
    /// As [`super::avx512`]'s.
    pub(super) unsafe fn mm(
        threads: usize,
        c: *mut f32,
        a: &[f32],
        m: usize,
        b: &Packed,
        acc: bool,
        alpha: f32,
    ) {
        use rayon::prelude::*;
        let (k, n) = (b.k, b.n);
        let kp = k.div_ceil(2);
        let ap = pack_rows(a, m, k);
        let panels = n.div_ceil(LANES);
        let threads = threads.max(1);
        // Below ~8 M multiply-adds (a few rows: generation) waking a second thread costs more than it
        // saves (measured by scripts/bench_gemm.sh).
        let parallel = threads > 1 && m * n * k >= 1 << 23;
        // Split along the longer side of C, as the f32 GEMM does: rows (tokens) when there are
        // many, else groups of panels (a weight's outputs); either way each C element is computed
        // whole by one thread.
        let by_rows = parallel && m >= 2 * MR * threads && m >= n / 2;
        let groups = panels.div_ceil(NV);
        let (c_ptr, ap_ptr) = (c as usize, ap.as_ptr() as usize);
        let block = |i0: usize, i1: usize, g0: usize, g1: usize| {
            // SAFETY: blocks write disjoint rows or disjoint panel groups of C (every row/column
            // index below is < m / < n, and C holds m·n values); the packed operands hold m·kp and
            // panels·kp·16 values; the CPU has AVX512-BF16 (the packing chose this kernel).
            unsafe {
                run_block(
                    c_ptr as *mut f32,
                    ap_ptr as *const u32,
                    b,
                    kp,
                    (i0, i1),
                    (g0, g1),
                    acc,
                    alpha,
                )
            }
        };
        if !parallel {
            block(0, m, 0, groups);
        } else if by_rows {
            let rows = m.div_ceil(threads).div_ceil(MR) * MR;
            (0..threads).into_par_iter().for_each(|t| {
                let i0 = (t * rows).min(m);
                let i1 = ((t + 1) * rows).min(m);
                if i0 < i1 {
                    block(i0, i1, 0, groups);
                }
            });
        } else {
            let per = groups.div_ceil(threads);
            (0..threads).into_par_iter().for_each(|t| {
                let g0 = (t * per).min(groups);
                let g1 = ((t + 1) * per).min(groups);
                if g0 < g1 {
                    block(0, m, g0, g1);
                }
            });
        }
    }

    /// Rows `i0..i1` of C by panel groups `g0..g1` (each of [`NV`] panels, the last maybe fewer).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn run_block(
        c: *mut f32,
        ap: *const u32,
        b: &Packed,
        kp: usize,
        (i0, i1): (usize, usize),
        (g0, g1): (usize, usize),
        acc: bool,
        alpha: f32,
    ) {
        let n = b.n;
        let panels = n.div_ceil(LANES);
        // Rows in chunks whose packed A stays in L2 while every panel group streams past it.
        const MC: usize = 128;
        let mut ic = i0;
        while ic < i1 {
            let ie = (ic + MC).min(i1);
            for g in g0..g1 {
                let p0 = g * NV;
                let nv = (panels - p0).min(NV);
                let bp = b.pairs.as_ptr().add(p0 * kp * LANES);
                let cols = n - p0 * LANES;
                let mut i = ic;
                while i < ie {
                    let mr = (ie - i).min(MR);
                    let a = ap.add(i * kp);
                    let cc = c.add(i * n + p0 * LANES);
                    macro_rules! go {
                        ($($r:literal)*) => {
                            match (mr, nv) {
                                $(($r, 3) => micro::<$r, 3>(kp, a, bp, cc, n, cols, acc, alpha),
                                ($r, 2) => micro::<$r, 2>(kp, a, bp, cc, n, cols, acc, alpha),
                                ($r, 1) => micro::<$r, 1>(kp, a, bp, cc, n, cols, acc, alpha),)*
                                _ => unreachable!("mr in 1..=8, nv in 1..=3"),
                            }
                        };
                    }
                    go!(1 2 3 4 5 6 7 8);
                    i += mr;
                }
            }
            ic = ie;
        }
    }

    /// `R` rows × `V` panels of C: `c[r, j] (+)= alpha · Σ_q a[r, q] · b[q, j]` over pairs `q`,
    /// for the `cols` (≥ 1) valid columns from the first panel on.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn micro<const R: usize, const V: usize>(
        kp: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        acc: bool,
        alpha: f32,
    ) {
        let mut s = [[_mm512_setzero_ps(); V]; R];
        for q in 0..kp {
            let mut bv: [__m512bh; V] = [std::mem::zeroed(); V];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    b.add((v * kp + q) * LANES) as *const _,
                ));
            }
            for (r, row) in s.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *a.add(r * kp + q) as i32,
                ));
                for (x, &bvv) in row.iter_mut().zip(&bv) {
                    *x = _mm512_dpbf16_ps(*x, av, bvv);
                }
            }
        }
        let al = _mm512_set1_ps(alpha);
        for (r, row) in s.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                let left = cols.saturating_sub(v * LANES).min(LANES);
                if left == 0 {
                    continue;
                }
                let mask: __mmask16 = if left == LANES {
                    0xffff
                } else {
                    (1u16 << left) - 1
                };
                let ptr = c.add(r * ldc + v * LANES);
                let mut y = if alpha == 1.0 {
                    x
                } else {
                    _mm512_mul_ps(x, al)
                };
                if acc {
                    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, ptr));
                }
                _mm512_mask_storeu_ps(ptr, mask, y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
            })
            .collect()
    }

    /// The f64 product of the bf16-rounded inputs, and its Frobenius norm.
    fn reference(a: &[f32], w: &[u16], m: usize, k: usize, n: usize, wt: bool) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for l in 0..k {
                    let x = from_bf16(to_bf16(a[i * k + l])) as f64;
                    let y = from_bf16(if wt { w[j * k + l] } else { w[l * n + j] }) as f64;
                    s += x * y;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    fn rel(got: &[f32], want: &[f64]) -> f64 {
        let num: f64 = got
            .iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).powi(2))
            .sum();
        let den: f64 = want.iter().map(|w| w * w).sum();
        (num / den).sqrt()
    }

    #[test]
    fn the_bf16_gemm_matches_an_f64_product_of_the_rounded_inputs() {
        // Shape classes: one row (generation), a few rows, a training batch; k and n that are not
        // multiples of 2, 16 or 32.
        for &(m, k, n) in &[
            (1, 64, 48),
            (1, 77, 35),
            (8, 96, 64),
            (8, 33, 17),
            (13, 45, 100),
            (1024, 96, 80),
            (1024, 31, 49),
        ] {
            let a = data(m * k, (m * 31 + k) as u64);
            let w: Vec<u16> = data(k * n, (n * 7 + k) as u64)
                .iter()
                .map(|&v| to_bf16(v))
                .collect();
            for kern in [Kernel::Avx512Bf16, Kernel::F32] {
                for wt in [false, true] {
                    let p = if wt {
                        Packed::with_kernel(kern, k, n, |kk, j| w[j * k + kk])
                    } else {
                        Packed::with_kernel(kern, k, n, |kk, j| w[kk * n + j])
                    };
                    let want = reference(&a, &w, m, k, n, wt);
                    let c = mm_new(&a, m, &p, 1.0);
                    let e = rel(&c, &want);
                    if p.kernel() == Kernel::Avx512Bf16 {
                        // Inputs rounded exactly as the reference: only f32 accumulation differs.
                        assert!(e <= 1e-6, "{m}x{k}x{n} {kern:?} wt={wt}: rel {e}");
                    } else {
                        // The fallback multiplies unrounded A: bf16's rounding of A shows.
                        assert!(e <= 1e-2, "{m}x{k}x{n} {kern:?} wt={wt}: rel {e}");
                    }
                    // Accumulating with a scale: c' = c + 0.5 · A·B.
                    let mut c2 = c.clone();
                    mm(&mut c2, &a, m, &p, true, 0.5);
                    for (x, y) in c2.iter().zip(&c) {
                        assert!((x - 1.5 * y).abs() <= 1e-5 * (1.0 + y.abs()), "{m}x{k}x{n}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_bf16_gemm_gives_the_same_bytes_on_any_thread_count() {
        // Split by rows (many rows), and by panel groups (few rows, many columns); both above the
        // size from which the work is split at all.
        for (m, k, n) in [(300, 256, 130), (16, 600, 1000)] {
            assert!(m * n * k >= 1 << 23);
            let a = data(m * k, 1);
            let w: Vec<half::bf16> = data(k * n, 2)
                .iter()
                .map(|&v| half::bf16::from_f32(v))
                .collect();
            let p = Packed::of(&w, k, n);
            let run = |t: usize| {
                let mut c = vec![0f32; m * n];
                mm_threads(t, &mut c, &a, m, &p, false, 1.0);
                c
            };
            let one = run(1);
            assert_eq!(one, run(2), "{m}x{k}x{n}");
            assert_eq!(one, run(3), "{m}x{k}x{n}");
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: it rounds to the even one.
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
        let row: Vec<f32> = data(70, 9);
        let packed = pack_rows(&row, 1, 70);
        for (q, p) in packed.iter().enumerate() {
            assert_eq!((p & 0xffff) as u16, to_bf16(row[2 * q]));
            assert_eq!((p >> 16) as u16, to_bf16(row[2 * q + 1]));
        }
    }
}
