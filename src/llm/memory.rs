//! The memory guard: before a backbone is loaded, the peak resident memory of the job is estimated
//! from the config alone (weights in the format their dtype gives them, activations for the batch
//! and sequence length, adapters with their optimizer state) and compared with the memory this
//! process may use (`LLARA_MEMORY_LIMIT`, the cgroup's limit, or `MemAvailable`). A job that does
//! not fit stops with the estimate and the settings that would fit, instead of being killed for
//! memory after a long load.
//!
//! The estimate is for the CPU (host memory); on a GPU the host holds little of the model.

use super::config::Config;
use crate::kernels::weight::{quantized, Blocks, Precision};
use candle_core::quantized::GgmlDType;
use candle_core::DType;

/// What the backbone will be used for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Workload {
    /// Rows per forward pass.
    pub batch: usize,
    /// Tokens per row (prompt and answer; for scoring, prompt and packed candidates).
    pub seq_len: usize,
    /// Training: activations kept for the backward pass, the adapters' gradients and optimizer
    /// state; else inference (a KV cache of `seq_len` per row).
    pub train: bool,
    /// Activation checkpointing per decoder layer (training).
    pub checkpoint: bool,
    /// LoRA rank on all seven projections (0: none).
    pub lora_r: usize,
    /// Training: rows per inference pass run beside the training state (validation,
    /// generation after the steps), `seq_len` tokens each with their KV cache; 0: none.
    pub infer_batch: usize,
}

/// The estimate, in bytes, by part.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// The frozen projections in their format.
    pub weights: u64,
    /// Input embeddings and the LM head (on the CPU: f32, or bf16 under bf16 or block weights).
    pub embeddings: u64,
    /// Activations kept at the peak of a step (and the KV cache in inference).
    pub activations: u64,
    /// Adapters: values, gradients and AdamW's two moments.
    pub adapters: u64,
    /// The program, tokenizer, allocator slack and per-call buffers.
    pub overhead: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.weights + self.embeddings + self.activations + self.adapters + self.overhead
    }
}

/// Bytes per frozen projection weight in `dt` on the CPU (the bf16 packing holds 2 where the
/// AVX512-BF16 kernel runs; elsewhere the weights are widened to f32 once).
fn weight_bytes(dt: DType) -> u64 {
    match dt {
        DType::BF16 => {
            if crate::kernels::bf16::kernel() == crate::kernels::bf16::Kernel::Avx512Bf16 {
                2
            } else {
                4
            }
        }
        other => other.size_in_bytes() as u64,
    }
}

/// Bytes of a frozen projection `[out, inp]` stored as `p` says on the CPU (a GGUF file's own
/// blocks, unknown here, are taken as q4_k: the loader passes the file's format instead).
fn proj_bytes(p: Precision, out: u64, inp: u64) -> u64 {
    let dt = match p.blocks {
        None => return out * inp * weight_bytes(p.dtype),
        Some(Blocks::To(dt)) => dt,
        Some(Blocks::Native) => GgmlDType::Q4K,
    };
    match Precision::fit(dt, inp as usize) {
        Some(dt) => (out as f64 * inp as f64 * quantized::bytes_per_weight(dt)) as u64,
        None => out * inp * weight_bytes(p.dtype),
    }
}

/// The peak resident memory of `w` on a backbone of `cfg` with weights stored as `p` on the CPU.
pub fn estimate(cfg: &Config, p: impl Into<Precision>, w: &Workload) -> Estimate {
    let p = p.into();
    let dt = p.dtype;
    let (h, f, d) = (
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
        cfg.head_dim as u64,
    );
    let (nh, nkv, l) = (
        cfg.num_attention_heads as u64,
        cfg.num_key_value_heads as u64,
        cfg.num_hidden_layers as u64,
    );
    let v = cfg.vocab_size as u64;
    let weights = l
        * (proj_bytes(p, nh * d, h)
            + 2 * proj_bytes(p, nkv * d, h)
            + proj_bytes(p, h, nh * d)
            + 2 * proj_bytes(p, f, h)
            + proj_bytes(p, h, f));
    // Activations and embeddings stay f32 on the CPU under bf16 or block weights.
    let act = if dt == DType::BF16 {
        4
    } else {
        dt.size_in_bytes() as u64
    };
    // Under blocks quantized at load the tables are blocks too (`Precision::table_blocks`, as
    // `Llama::load`; a table whose rows are not whole blocks stays bf16); under bf16 or a GGUF's
    // own blocks the table in bf16 and the head packed in bf16 (tied or not, two tables of 2 bytes).
    let embeddings = if let Some(Blocks::To(_)) = p.blocks {
        let table = |q: Option<GgmlDType>| match q {
            Some(q) => (v as f64 * h as f64 * quantized::bytes_per_weight(q)) as u64,
            None => v * h * 2,
        };
        let (table_q, head_q) = p.table_blocks(h as usize);
        table(table_q)
            + if cfg.tie_word_embeddings {
                0
            } else {
                table(head_q)
            }
    } else if p.blocks.is_some() || dt == DType::BF16 {
        2 * v * h * 2
    } else {
        v * h * act * if cfg.tie_word_embeddings { 1 } else { 2 }
    };
    let n = (w.batch * w.seq_len) as u64;
    let kv_cache = |rows: usize| 2 * l * (rows * w.seq_len) as u64 * nkv * d * act;
    let qkv = (nh + 2 * nkv) * d;
    // What one decoder layer's forward pass keeps for its backward pass: its input, the two norms'
    // outputs, q/k/v before and after rope, the attention output, the residual, gate/up and their
    // product (dropout masks: a byte per input value of each adapted projection).
    let kept = |n: u64| n * (5 * h + 2 * qkv + nh * d + 3 * f) * act + n * (4 * h + 2 * f);
    let layer_kept = kept(n);
    // A layer's backward: gradients of the same tensors, alive at once, and the input gradient's
    // orientation of the largest projection.
    // (Weights in blocks: a tile of dequantized rows.)
    let orientation = match p.blocks {
        None => h.max(nh * d) * f.max(qkv) * weight_bytes(dt),
        Some(_) => 256 * f.max(h).max(nh * d) * 4 + n * f.max(qkv) * 4,
    };
    let layer_bwd = layer_kept + orientation;
    // Inference: the KV cache plus one layer's transient work.
    let infer = |rows: usize| kv_cache(rows) + kept((rows * w.seq_len) as u64);
    let activations = if w.train {
        let step = if w.checkpoint {
            l * n * h * act + layer_kept + layer_bwd
        } else {
            l * layer_kept + layer_bwd
        };
        // The step's buffers are given back before an inference pass (kernels::alloc::trim).
        step.max(if w.infer_batch > 0 {
            infer(w.infer_batch)
        } else {
            0
        })
    } else {
        infer(w.batch)
    };
    // Logits at the answer positions only; a prefill's last position: small beside the rest, but
    // a vocabulary row per position of the batch is kept for the loss.
    let logits = (w.batch as u64) * 32 * v * 4;
    let lora = if w.lora_r > 0 {
        let r = w.lora_r as u64;
        let per = r * ((h + nh * d) + 2 * (h + nkv * d) + (nh * d + h) + 2 * (h + f) + (f + h));
        l * per * 4 * if w.train { 4 } else { 1 }
    } else {
        0
    };
    Estimate {
        weights,
        embeddings,
        activations: activations + logits,
        adapters: lora,
        overhead: 300 << 20,
    }
}

/// The memory this process may use, and where that figure comes from: `LLARA_MEMORY_LIMIT`
/// (bytes, or with a `K`/`M`/`G` suffix), the cgroup's limit less its current use, or the
/// kernel's `MemAvailable`, whichever is smallest.
pub fn available() -> Option<(u64, String)> {
    let mut best: Option<(u64, String)> = None;
    let mut offer = |bytes: u64, what: String| {
        if best.as_ref().is_none_or(|(b, _)| bytes < *b) {
            best = Some((bytes, what));
        }
    };
    if let Ok(s) = std::env::var("LLARA_MEMORY_LIMIT") {
        if let Some(b) = parse_bytes(&s) {
            offer(b, format!("LLARA_MEMORY_LIMIT={s}"));
        }
    }
    let read = |p: &str| std::fs::read_to_string(p).ok();
    // cgroup v2, then v1.
    if let (Some(max), Some(cur)) = (
        read("/sys/fs/cgroup/memory.max"),
        read("/sys/fs/cgroup/memory.current"),
    ) {
        if let (Ok(max), Ok(cur)) = (max.trim().parse::<u64>(), cur.trim().parse::<u64>()) {
            offer(max.saturating_sub(cur), "the cgroup's memory.max".into());
        }
    } else if let (Some(max), Some(cur)) = (
        read("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
        read("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ) {
        if let (Ok(max), Ok(cur)) = (max.trim().parse::<u64>(), cur.trim().parse::<u64>()) {
            if max < 1 << 60 {
                offer(max.saturating_sub(cur), "the cgroup's memory limit".into());
            }
        }
    }
    if let Some(mi) = read("/proc/meminfo") {
        if let Some(kb) = mi
            .lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|x| x.parse::<u64>().ok())
        {
            offer(kb * 1024, "MemAvailable".into());
        }
    }
    best
}

/// `123`, `512M`, `16G`, `1.5G` (binary units).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        't' | 'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let x: f64 = num.trim().parse().ok()?;
    (x.is_finite() && x >= 0.0).then_some((x * mul as f64) as u64)
}

/// `12.3 GB` (10⁹ bytes, as the performance tables).
pub fn gb(b: u64) -> String {
    format!("{:.2} GB", b as f64 / 1e9)
}

/// Why a workload does not fit, with what would.
#[derive(Debug, thiserror::Error)]
#[error("estimated peak memory {} (weights {}, embeddings {}, activations {}, adapters {}) exceeds the {} available ({source_of}); {suggestion}",
    gb(estimate.total()), gb(estimate.weights), gb(estimate.embeddings), gb(estimate.activations),
    gb(estimate.adapters), gb(*available), source_of = from)]
pub struct MemoryError {
    pub estimate: Estimate,
    pub available: u64,
    pub from: String,
    pub suggestion: String,
}

/// Checks `w` against the memory available (nothing to check where none is known).
pub fn check(cfg: &Config, p: Precision, w: &Workload) -> Result<Estimate, MemoryError> {
    let e = estimate(cfg, p, w);
    let Some((avail, from)) = available() else {
        return Ok(e);
    };
    if e.total() <= avail {
        return Ok(e);
    }
    Err(MemoryError {
        estimate: e,
        available: avail,
        from,
        suggestion: suggest(cfg, p, w, avail),
    })
}

/// The settings nearest to `w` that fit in `avail`: a smaller weight dtype, activation
/// checkpointing, a smaller batch, weights in 4-bit blocks (in that order of preference), or that
/// none does.
fn suggest(cfg: &Config, p: Precision, w: &Workload, avail: u64) -> String {
    let dt = p.dtype;
    let bf16 = Precision::from(DType::BF16);
    let q4 = Precision {
        dtype: DType::BF16,
        blocks: Some(Blocks::To(GgmlDType::Q4K)),
    };
    let mut tries: Vec<(String, Precision, Workload)> = vec![];
    if dt == DType::F32 && p.blocks.is_none() {
        tries.push(("--dtype bf16".into(), bf16, *w));
    }
    if w.train && !w.checkpoint {
        let c = Workload {
            checkpoint: true,
            ..*w
        };
        tries.push(("--checkpoint-layers".into(), p, c));
        if dt == DType::F32 && p.blocks.is_none() {
            tries.push(("--dtype bf16 --checkpoint-layers".into(), bf16, c));
        }
    }
    if w.train && w.infer_batch > 1 {
        tries.push((
            "--eval-batch-size 1".into(),
            p,
            Workload {
                infer_batch: 1,
                ..*w
            },
        ));
    }
    let mut b = w.batch / 2;
    while b >= 1 {
        tries.push((format!("--batch-size {b}"), p, Workload { batch: b, ..*w }));
        if w.train && !w.checkpoint {
            tries.push((
                format!("--batch-size {b} --checkpoint-layers"),
                p,
                Workload {
                    batch: b,
                    checkpoint: true,
                    ..*w
                },
            ));
        }
        b /= 2;
    }
    let one = Workload {
        batch: 1,
        checkpoint: w.train,
        ..*w
    };
    if p.blocks.is_none() {
        tries.push(("--dtype q4_k".into(), q4, *w));
        let mut b = w.batch / 2;
        while b >= 1 && !w.train {
            tries.push((
                format!("--dtype q4_k --batch-size {b}"),
                q4,
                Workload { batch: b, ..*w },
            ));
            b /= 2;
        }
        if w.train {
            tries.push((
                "--dtype q4_k --checkpoint-layers at batch 1".into(),
                q4,
                one,
            ));
        }
    }
    for (what, p2, w2) in tries {
        let e = estimate(cfg, p2, &w2).total();
        if e <= avail {
            return format!("{what} would fit (estimated {})", gb(e));
        }
    }
    let floor = estimate(cfg, q4, &one);
    format!(
        "no setting of --dtype, batch or --checkpoint-layers fits: the weights alone take {} in q4_k (at batch 1{} {})",
        gb(floor.weights + floor.embeddings),
        if w.train { " with checkpointing" } else { "" },
        gb(floor.total())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_bytes("123"), Some(123));
        assert_eq!(parse_bytes("2K"), Some(2048));
        assert_eq!(parse_bytes("1.5G"), Some(3 << 29));
        assert_eq!(parse_bytes("16g"), Some(16 << 30));
        assert_eq!(parse_bytes("x"), None);
        assert_eq!(parse_bytes("-1"), None);
    }
}
