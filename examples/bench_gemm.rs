//! GFLOP/s of the frozen-weight GEMMs per path and shape: the f32 GEMM (today's path, with the
//! weight's transposed copy) against the bf16 GEMM this CPU dispatches to, on the projection shapes
//! of a SmolLM2-135M training step (forward `x · Wᵀ` and input gradient `dy · W`) and of
//! generation. Run by `scripts/bench_gemm.sh`; threads from `RAYON_NUM_THREADS`.
//!
//!     cargo run --release --example bench_gemm -- [M ...]

use llara::kernels::{bf16, gemm};
use std::time::Instant;

fn data(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Median seconds of `reps` runs of `f` (after one warm-up run).
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[reps / 2]
}

fn main() {
    let ms: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("M: a number of rows"))
        .collect();
    let ms = if ms.is_empty() { vec![1, 8, 1024] } else { ms };
    let threads = candle_core::utils::get_num_threads();
    println!("# {}; {threads} thread(s)", bf16::describe());
    println!();
    println!(
        "| shape (M × K → N) | op | f32 GFLOP/s | bf16 GFLOP/s | bf16 ÷ f32 | rel. error vs f32 |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    // (name, out, in) of SmolLM2-135M's projections.
    let projs = [
        ("q/o", 576, 576),
        ("k/v", 192, 576),
        ("gate/up", 1536, 576),
        ("down", 576, 1536),
    ];
    for &m in &ms {
        for &(name, o, i) in &projs {
            let w = data(o * i, (o * 3 + i) as u32);
            let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            // f32 path: the weight rounded to bf16 too, so both multiply the same weights.
            let wf: Vec<f32> = wb.iter().map(|b| b.to_f32()).collect();
            let mut wt = vec![0f32; i * o];
            for r in 0..o {
                for c in 0..i {
                    wt[c * o + r] = wf[r * i + c];
                }
            }
            let fwd = bf16::Packed::transposed_of(&wb, o, i);
            let bwd = bf16::Packed::of(&wb, o, i);
            let reps = if m >= 256 { 7 } else { 51 };
            for (op, k, n) in [("forward x·Wᵀ", i, o), ("input grad dy·W", o, i)] {
                if m <= 8 && op.starts_with("input") {
                    continue; // generation has no backward pass
                }
                let a = data(m * k, (m + k) as u32);
                let mut c32 = vec![0f32; m * n];
                let mut c16 = vec![0f32; m * n];
                let (bw, p) = if k == i { (&wt, &fwd) } else { (&wf, &bwd) };
                let t32 = time(reps, || {
                    gemm::mm(&mut c32, &a, bw, m, n, k, false, false, false, 1.0)
                });
                let t16 = time(reps, || bf16::mm(&mut c16, &a, m, p, false, 1.0));
                let flop = 2.0 * (m * n * k) as f64;
                let num: f64 = c32
                    .iter()
                    .zip(&c16)
                    .map(|(x, y)| ((x - y) as f64).powi(2))
                    .sum();
                let den: f64 = c32.iter().map(|x| (*x as f64).powi(2)).sum();
                println!(
                    "| {m} × {k} → {n} ({name}) | {op} | {:.0} | {:.0} | {:.2}× | {:.1e} |",
                    flop / t32 / 1e9,
                    flop / t16 / 1e9,
                    t32 / t16,
                    (num / den).sqrt()
                );
            }
        }
    }
}
