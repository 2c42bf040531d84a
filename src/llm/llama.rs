//! The Llama decoder, written for training as well as generation: it takes input embeddings (so
//! chosen positions can carry other vectors), right-padded batches with a causal + padding mask,
//! returns the final hidden states and computes logits only where asked. Tensor names follow the
//! Hugging Face checkpoint (`model.layers.0.self_attn.q_proj.weight`, …).

use super::adapter::{Lora, LoraConfig, Target};
use super::config::Config;
use super::ops::{self, AttnMask, RopeTable};
use crate::kernels::dropout::Dropout;
use crate::kernels::weight::quantized::Quantized;
use crate::kernels::weight::{Blocks, FrozenWeight, Precision};
use candle_core::backprop::GradStore;
use candle_core::quantized::GgmlDType;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, Var, D};
use std::sync::{Arc, Mutex};

/// Where the frozen weights come from: a name (Hugging Face naming) → tensor lookup.
pub trait WeightSource {
    /// The tensor called `name`, or `None` when absent.
    fn tensor(&self, name: &str) -> Result<Option<Tensor>>;

    /// The tensor called `name` as the source stores it, where that is one of the block formats
    /// of [`crate::kernels::weight::quantized`] (a GGUF file's quantized tensors); `None` for a
    /// tensor stored as floats, or a source that stores none in blocks.
    fn stored_blocks(&self, _name: &str) -> Result<Option<candle_core::quantized::QTensor>> {
        Ok(None)
    }
}

impl WeightSource for std::collections::HashMap<String, Tensor> {
    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        Ok(self.get(name).cloned())
    }
}

/// A frozen projection with an optional bias and an optional LoRA adapter. The weight is held
/// once, in the layout its GEMM multiplies ([`FrozenWeight`]: an f32 weight's transpose, a bf16
/// weight's packing on the CPU; the tensor itself elsewhere).
#[derive(Clone)]
pub struct Proj {
    pub weight: FrozenWeight,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

impl Proj {
    /// A projection of `weight [out, in]`, turned into its format (the tensor is not kept).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Proj {
            weight: FrozenWeight::new(weight)?,
            bias,
            lora: None,
        })
    }

    fn forward(&self, x: &Tensor, dropout: &mut Option<&mut Dropout>) -> Result<Tensor> {
        match &self.lora {
            None => ops::frozen_linear(x, &self.weight, self.bias.as_ref()),
            Some(l) => ops::lora_linear(
                x,
                &self.weight,
                self.bias.as_ref(),
                l.a.as_tensor(),
                l.b.as_tensor(),
                l.scale,
                dropout,
            ),
        }
    }
}

#[derive(Clone)]
pub struct Layer {
    pub input_layernorm: Tensor,
    pub q_proj: Proj,
    pub k_proj: Proj,
    pub v_proj: Proj,
    pub o_proj: Proj,
    pub post_attention_layernorm: Tensor,
    /// Qwen3's per-head RMSNorm weights `[head_dim]` on q and k.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub gate_proj: Proj,
    pub up_proj: Proj,
    pub down_proj: Proj,
}

impl Layer {
    pub fn proj_mut(&mut self, t: Target) -> &mut Proj {
        match t {
            Target::Q => &mut self.q_proj,
            Target::K => &mut self.k_proj,
            Target::V => &mut self.v_proj,
            Target::O => &mut self.o_proj,
            Target::Gate => &mut self.gate_proj,
            Target::Up => &mut self.up_proj,
            Target::Down => &mut self.down_proj,
        }
    }

    pub fn proj(&self, t: Target) -> &Proj {
        match t {
            Target::Q => &self.q_proj,
            Target::K => &self.k_proj,
            Target::V => &self.v_proj,
            Target::O => &self.o_proj,
            Target::Gate => &self.gate_proj,
            Target::Up => &self.up_proj,
            Target::Down => &self.down_proj,
        }
    }
}

/// Keys and values of earlier steps, per layer: `[B, kv_heads, T, head_dim]`. Cloning is cheap
/// (tensors are shared); a forward pass extends its own copy only.
#[derive(Clone)]
pub struct KvCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    /// Per row, per cached step: whether that key may be attended (false on right padding).
    pub key_valid: Vec<Vec<bool>>,
    /// Whether a forward pass stores its new keys and values (else each layer attends the cached
    /// ones and its own, then drops its own: one layer's worth of extended keys at a time).
    keeps_new: bool,
}

impl KvCache {
    pub fn new(layers: usize, batch: usize) -> Self {
        Self {
            kv: vec![None; layers],
            key_valid: vec![Vec::new(); batch],
            keeps_new: true,
        }
    }

    /// A copy for one pass that reads this cache and keeps nothing it computes (scoring
    /// continuations of a shared prompt): the same attention as a clone, without holding every
    /// layer's extended keys and values until the pass ends.
    pub fn reader(&self) -> Self {
        Self {
            keeps_new: false,
            ..self.clone()
        }
    }

    pub fn len(&self) -> usize {
        self.key_valid.first().map_or(0, |v| v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The positions, mask and optional cache of one forward call.
pub struct Step<'a> {
    /// `[B·T]`: the rotary position of each (row, step).
    pub positions: Vec<usize>,
    /// Per row, whether each new step is a real token (false on right padding).
    pub valid: Vec<Vec<bool>>,
    /// Per row, a segment id for each new step, for several continuations packed into one row:
    /// a step attends the cached keys, earlier steps of segment 0 (shared) and earlier steps of its
    /// own segment. `None`: every step attends every earlier step (plain causal).
    pub segments: Option<Vec<Vec<u32>>>,
    pub cache: Option<&'a mut KvCache>,
}

impl<'a> Step<'a> {
    /// The same step writing into (and reading from) `cache`.
    pub fn with_cache(self, cache: &'a mut KvCache) -> Step<'a> {
        Step {
            cache: Some(cache),
            ..self
        }
    }
}

impl Step<'_> {
    /// A right-padded batch without a cache: row `b` has `lengths[b]` real tokens out of `t`.
    pub fn padded(lengths: &[usize], t: usize) -> Step<'static> {
        Step {
            positions: lengths.iter().flat_map(|_| 0..t).collect(),
            valid: lengths
                .iter()
                .map(|&l| (0..t).map(|i| i < l).collect())
                .collect(),
            segments: None,
            cache: None,
        }
    }
}

pub struct Llama {
    pub cfg: Config,
    /// The input table `[vocab, hidden]`, frozen: a tensor, or under block weights on the CPU in
    /// blocks too (rows dequantized on lookup).
    pub embed_tokens: FrozenWeight,
    dev: Device,
    /// Input rows of the added tokens (`[PH]`, `[HistoryEmb]`, …), ids `vocab_size..`.
    pub extra_embeddings: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// The output projection `[vocab, hidden]`, frozen (the input table's storage when tied).
    pub lm_head: FrozenWeight,
    pub lora: Option<LoraConfig>,
    /// The activations' dtype (the input table may be stored narrower: see [`Llama::load`]).
    act_dtype: DType,
    inv_freq: Vec<f64>,
    /// Activation checkpointing per decoder layer (training only; see [`Llama::set_checkpointing`]).
    checkpoint: Option<Checkpointing>,
}

/// State of activation checkpointing: a scalar variable that keeps every checkpointed layer in
/// the autograd graph, and the adapter gradients computed when layers are recomputed.
#[derive(Clone)]
struct Checkpointing {
    anchor: Var,
    sink: Arc<Mutex<Vec<(Var, Tensor)>>>,
}

fn get(
    src: &dyn WeightSource,
    name: &str,
    shape: &[usize],
    dt: DType,
    dev: &Device,
) -> Result<Tensor> {
    let t = src
        .tensor(name)?
        .ok_or_else(|| candle_core::Error::Msg(format!("tensor {name} is missing")))?;
    convert(name, t, shape, dt, dev)
}

/// The frozen projection weight `name [out, inp]` in the storage `blocks` asks for: a GGUF's own
/// blocks, blocks quantized at load, else a float `wdt` weight (see [`FrozenWeight::new`]).
fn frozen(
    src: &dyn WeightSource,
    name: &str,
    (out, inp): (usize, usize),
    blocks: Option<Blocks>,
    wdt: DType,
    dev: &Device,
) -> Result<FrozenWeight> {
    match blocks {
        Some(Blocks::Native) => {
            if let Some(q) = src.stored_blocks(name)? {
                if q.shape().dims() != [out, inp] {
                    candle_core::bail!(
                        "tensor {name} has shape {:?}, expected {:?}",
                        q.shape().dims(),
                        [out, inp]
                    );
                }
                return Ok(FrozenWeight::from(Quantized::new_on(q, dev)?));
            }
        }
        Some(Blocks::To(dt)) => {
            if let Some(dt) = Precision::fit(dt, inp) {
                let w = get(src, name, &[out, inp], DType::F32, &Device::Cpu)?;
                return Ok(FrozenWeight::from(Quantized::quantize(&w, dt, dev)?));
            }
        }
        None => {}
    }
    FrozenWeight::new(get(src, name, &[out, inp], wdt, dev)?)
}

/// `t` (read as `name`) checked against `shape`, in `dt` on `dev`.
fn convert(name: &str, t: Tensor, shape: &[usize], dt: DType, dev: &Device) -> Result<Tensor> {
    if t.dims() != shape {
        candle_core::bail!("tensor {name} has shape {:?}, expected {shape:?}", t.dims());
    }
    t.to_dtype(dt)?.to_device(dev)
}

impl Llama {
    /// Loads the frozen weights in `precision` (a dtype, or with the projections in GGUF blocks);
    /// `extra_tokens` added-token rows are initialised to the mean input embedding (as
    /// transformers' `resize_token_embeddings` does). On the CPU, bf16 applies to the projections'
    /// weights (the bf16 GEMM of [`crate::kernels::bf16`]) and to the input table and LM head
    /// (stored in bf16, rows widened to f32 when embedded); activations, norms, added-token rows,
    /// adapters stay f32.
    pub fn load(
        src: &dyn WeightSource,
        cfg: &Config,
        extra_tokens: usize,
        precision: impl Into<Precision>,
        dev: &Device,
    ) -> Result<Self> {
        let precision = precision.into();
        let dt = precision.dtype;
        let (h, f, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        // On the CPU, bf16 is the projections' weights only: activations, norms, embeddings and
        // the LM head stay f32, and the bf16 GEMM rounds each input once and accumulates in f32.
        let (wdt, dt) = if dt == DType::BF16 && dev.is_cpu() {
            (DType::BF16, DType::F32)
        } else {
            (dt, dt)
        };
        // Under bf16 or block weights on the CPU the tables (a 7B Llama's two are 1 GB in f32) are
        // kept in bf16 too, the LM head packed for the bf16 GEMM, and embedded rows widened to f32.
        let edt = if (precision.blocks.is_some() || wdt == DType::BF16) && dev.is_cpu() {
            DType::BF16
        } else {
            dt
        };
        // Under blocks quantized at load (on the CPU) the tables are blocks as well
        // (`Precision::table_blocks`: rows that are not whole blocks stay floats).
        let (table_q, head_q) = if dev.is_cpu() {
            precision.table_blocks(h)
        } else {
            (None, None)
        };
        let quantized = |w: Tensor, q: GgmlDType| -> Result<FrozenWeight> {
            Ok(FrozenWeight::from(Quantized::quantize(&w, q, dev)?))
        };
        let table_name = "model.embed_tokens.weight";
        let table_shape = [cfg.vocab_size, h];
        let embed_tokens = match table_q {
            // Quantized from the source's own dtype, widened to f32 a slice of rows at a time
            // (an 8B model's table in f32 is 2.1 GB).
            Some(q) => {
                let t = src.tensor(table_name)?.ok_or_else(|| {
                    candle_core::Error::Msg(format!("tensor {table_name} is missing"))
                })?;
                let own = t.dtype();
                quantized(convert(table_name, t, &table_shape, own, dev)?, q)?
            }
            None => FrozenWeight::plain(get(src, table_name, &table_shape, edt, dev)?)?,
        };
        // Each weight goes into its final layout as it is read: no second copy of the model.
        let proj = |p: &str, out: usize, inp: usize, bias: bool| -> Result<Proj> {
            let name = format!("{p}.weight");
            Ok(Proj {
                weight: frozen(src, &name, (out, inp), precision.blocks, wdt, dev)?,
                bias: if bias {
                    Some(get(src, &format!("{p}.bias"), &[out], dt, dev)?)
                } else {
                    None
                },
                lora: None,
            })
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            // Qwen3's per-head norms of q and k.
            let head_norm = |qk: &str| -> Result<Option<Tensor>> {
                cfg.qk_norm
                    .then(|| {
                        get(
                            src,
                            &format!("{p}.self_attn.{qk}_norm.weight"),
                            &[d],
                            dt,
                            dev,
                        )
                    })
                    .transpose()
            };
            layers.push(Layer {
                input_layernorm: get(src, &format!("{p}.input_layernorm.weight"), &[h], dt, dev)?,
                q_proj: proj(&format!("{p}.self_attn.q_proj"), nh * d, h, cfg.qkv_bias)?,
                k_proj: proj(&format!("{p}.self_attn.k_proj"), nkv * d, h, cfg.qkv_bias)?,
                v_proj: proj(&format!("{p}.self_attn.v_proj"), nkv * d, h, cfg.qkv_bias)?,
                o_proj: proj(&format!("{p}.self_attn.o_proj"), h, nh * d, cfg.o_bias)?,
                post_attention_layernorm: get(
                    src,
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                    dt,
                    dev,
                )?,
                q_norm: head_norm("q")?,
                k_norm: head_norm("k")?,
                gate_proj: proj(&format!("{p}.mlp.gate_proj"), f, h, cfg.mlp_bias)?,
                up_proj: proj(&format!("{p}.mlp.up_proj"), f, h, cfg.mlp_bias)?,
                down_proj: proj(&format!("{p}.mlp.down_proj"), h, f, cfg.mlp_bias)?,
            });
        }
        let norm = get(src, "model.norm.weight", &[h], dt, dev)?;
        // Read once: a streaming source gives each tensor once.
        let lm_head = match src.tensor("lm_head.weight")? {
            Some(t) if !cfg.tie_word_embeddings => match head_q {
                Some(q) => {
                    let own = t.dtype();
                    quantized(convert("lm_head.weight", t, &table_shape, own, dev)?, q)?
                }
                None => FrozenWeight::new(convert("lm_head.weight", t, &table_shape, edt, dev)?)?,
            },
            // Tied: the table itself (blocks, or a table in the activations' dtype); a bf16 table
            // is packed once more for its GEMM.
            _ if table_q.is_some() || edt == dt => embed_tokens.clone(),
            _ => FrozenWeight::new(embed_tokens.tensor()?)?,
        };
        // The mean row, summed in a fixed order (candle's reductions may vary in the last bit).
        // Read in blocks of rows, so no second copy of the table is made.
        let mut acc = vec![0f64; h];
        let vocab = embed_tokens.dims().0;
        for r0 in (0..vocab).step_by(4096) {
            let n = (vocab - r0).min(4096);
            let ids: Vec<u32> = (r0 as u32..(r0 + n) as u32).collect();
            let rows: Vec<Vec<f32>> = embed_tokens.rows(&ids)?.to_dtype(DType::F32)?.to_vec2()?;
            for r in &rows {
                acc.iter_mut().zip(r).for_each(|(a, &v)| *a += v as f64);
            }
        }
        let mean: Vec<f32> = acc.iter().map(|a| (a / vocab as f64) as f32).collect();
        let mean = Tensor::from_vec(mean, (1, h), dev)?.to_dtype(dt)?;
        let extra_embeddings = mean
            .repeat((extra_tokens.max(1), 1))?
            .narrow(0, 0, extra_tokens)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            dev: dev.clone(),
            extra_embeddings,
            layers,
            norm,
            lm_head,
            lora: None,
            act_dtype: dt,
            inv_freq: cfg.inv_freq(),
            checkpoint: None,
        })
    }

    /// The activations' dtype.
    pub fn dtype(&self) -> DType {
        self.act_dtype
    }

    /// The frozen projection weights' dtype (bf16 under f32 activations for `--dtype bf16` on the
    /// CPU).
    pub fn weight_dtype(&self) -> DType {
        self.layers
            .first()
            .map_or(self.dtype(), |l| l.q_proj.weight.dtype())
    }

    /// The frozen projections' storage as `--dtype` names it (`f32`, `bf16`, `q4_k`).
    pub fn weight_name(&self) -> String {
        self.layers.first().map_or_else(
            || format!("{:?}", self.dtype()).to_lowercase(),
            |l| l.q_proj.weight.name(),
        )
    }

    /// How the frozen projections are held, in words (`bf16, packed for the AVX512-BF16 GEMM`).
    pub fn weight_format(&self) -> String {
        self.layers
            .first()
            .map_or_else(|| "no layers".into(), |l| l.q_proj.weight.describe())
    }

    /// Which kernels multiply the frozen weights, in words (`llara llm info`, the logs).
    pub fn gemm_path(&self) -> String {
        let (w, a) = (self.weight_dtype(), self.dtype());
        let name = self.weight_name();
        if !self.device().is_cpu() {
            return format!("{name} on {:?}", self.device()).to_lowercase();
        }
        if name.starts_with('q') {
            return format!(
                "{}: prompts and training dequantize tiles of rows into the {}; decoding (under {} rows) takes the block dot products on 8-bit activations",
                self.weight_format(),
                crate::kernels::bf16::describe(),
                crate::kernels::weight::quantized::GEMM_ROWS
            );
        }
        if !crate::kernels::fused(&[]) {
            return format!("{w:?} weights, {a:?} activations, composed ops (--fused off)")
                .to_lowercase();
        }
        match w {
            DType::BF16 => format!(
                "bf16 weights, f32 activations and accumulation; {}",
                crate::kernels::bf16::describe()
            ),
            DType::F32 => "f32 GEMM (gemm crate, AVX-512/AVX2 by run-time dispatch)".into(),
            other => format!("{other:?} weights, composed ops").to_lowercase(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Model ids of every row (right-padded to the longest with id 0), as `[B, T, H]` input
    /// embeddings; `inject` = (flat positions `b·T + t`, vectors `[M, H]`) overwrites those
    /// positions, differentiably with respect to the vectors.
    pub fn embed(&self, rows: &[Vec<u32>], inject: Option<(&[usize], &Tensor)>) -> Result<Tensor> {
        let (b, t) = (rows.len(), rows.iter().map(|r| r.len()).max().unwrap_or(0));
        let (v, h) = (self.cfg.vocab_size as u32, self.cfg.hidden_size);
        let n_extra = self.extra_embeddings.dim(0)?;
        let mut base = vec![0u32; b * t];
        let mut map: Vec<u32> = (0..(b * t) as u32).collect();
        let mut uses_pool = false;
        for (bi, r) in rows.iter().enumerate() {
            for (ti, &id) in r.iter().enumerate() {
                let i = bi * t + ti;
                if id < v {
                    base[i] = id;
                } else if ((id - v) as usize) < n_extra {
                    map[i] = (b * t) as u32 + id - v;
                    uses_pool = true;
                } else {
                    candle_core::bail!(
                        "token id {id} is outside the vocabulary ({v} + {n_extra} added)"
                    );
                }
            }
        }
        let dev = self.device();
        let mut x = self.embed_tokens.rows(&base)?.to_dtype(self.dtype())?;
        let mut pool = vec![];
        if let Some((pos, vecs)) = inject {
            if vecs.dims() != [pos.len(), h] {
                candle_core::bail!(
                    "injected vectors {:?}, expected [{}, {h}]",
                    vecs.dims(),
                    pos.len()
                );
            }
            for (m, &p) in pos.iter().enumerate() {
                if p >= b * t {
                    candle_core::bail!("injection position {p} outside the batch ({b}×{t})");
                }
                map[p] = (b * t + n_extra + m) as u32;
            }
            pool.push(vecs.to_dtype(self.dtype())?);
            uses_pool = true;
        }
        if uses_pool {
            let mut parts = vec![x, self.extra_embeddings.clone()];
            parts.extend(pool);
            let all = Tensor::cat(&parts, 0)?;
            x = all.index_select(&Tensor::from_vec(map, b * t, dev)?, 0)?;
        }
        x.reshape((b, t, h))
    }

    /// Runs the decoder over `x [B, T, H]`; returns the final (normed) hidden states `[B, T, H]`.
    /// `dropout` (training) applies LoRA dropout.
    pub fn forward(
        &self,
        x: &Tensor,
        step: Step<'_>,
        mut dropout: Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let Step {
            positions,
            valid,
            segments,
            mut cache,
        } = step;
        if positions.len() != b * t || valid.len() != b {
            candle_core::bail!("positions/valid do not match the batch {b}×{t}");
        }
        if let Some(s) = &segments {
            if s.len() != b || s.iter().any(|r| r.len() != t) {
                candle_core::bail!("segments do not match the batch {b}×{t}");
            }
        }
        let past = cache.as_ref().map_or(0, |c| c.len());
        let k_len = past + t;
        if let Some(c) = cache.as_deref_mut() {
            for (kv, v) in c.key_valid.iter_mut().zip(&valid) {
                kv.extend_from_slice(v);
            }
        }
        let key_valid: Vec<Vec<bool>> = match cache.as_deref() {
            Some(c) => c.key_valid.clone(),
            None => valid.clone(),
        };
        let rep = self.cfg.num_attention_heads / self.cfg.num_key_value_heads;
        let mut allowed = Vec::with_capacity(b * rep * t * k_len);
        for (bi, kv) in key_valid.iter().enumerate() {
            let seg = segments.as_ref().map(|s| &s[bi]);
            for _ in 0..rep {
                for i in 0..t {
                    allowed.extend((0..k_len).map(|j| {
                        let visible = match seg {
                            Some(s) if j >= past => s[j - past] == 0 || s[j - past] == s[i],
                            _ => true,
                        };
                        u8::from(kv[j] && j <= past + i && visible)
                    }));
                }
            }
        }
        let mask = AttnMask::new(allowed, b, rep * t, k_len);
        let table = RopeTable::new(&self.inv_freq, &positions);
        // With a KV cache the pass is inference: nothing will be differentiated, so no layer may
        // keep its activations alive through the autograd graph (adapters and injected vectors
        // are variables and would otherwise make every intermediate tensor part of a graph).
        let inference = cache.is_some();
        let mut x = if inference { x.detach() } else { x.clone() };
        let ckpt = self.checkpoint.as_ref().filter(|_| cache.is_none());
        for (li, layer) in self.layers.iter().enumerate() {
            // Each layer draws its masks from its own stream (seeded from the caller's), so a
            // recomputed layer replays them exactly.
            let mut layer_drop = dropout.as_deref_mut().map(|d| d.fork());
            match ckpt {
                Some(c) => {
                    let y = layer_forward(
                        &self.cfg,
                        layer,
                        &x.detach(),
                        &table,
                        &mask,
                        None,
                        &mut layer_drop.clone().as_mut(),
                    )?
                    .detach();
                    let op = CheckpointedLayer {
                        cfg: self.cfg.clone(),
                        layer: layer.clone(),
                        table: table.clone(),
                        mask: mask.clone(),
                        dropout: layer_drop,
                        sink: c.sink.clone(),
                        output: Mutex::new(Some(y)),
                    };
                    x = x.apply_op2(c.anchor.as_tensor(), op)?;
                }
                None => {
                    let slot = cache.as_deref_mut().map(|c| (&mut c.kv[li], c.keeps_new));
                    x = layer_forward(
                        &self.cfg,
                        layer,
                        &x,
                        &table,
                        &mask,
                        slot,
                        &mut layer_drop.as_mut(),
                    )?;
                    if inference {
                        x = x.detach();
                    }
                }
            }
        }
        ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Turns activation checkpointing on or off: when on, training keeps only each decoder layer's
    /// input and recomputes the layer in the backward pass (about a third more compute, a fraction
    /// of the activation memory). On every device (the recomputation is tensor ops); the
    /// adapter gradients of recomputed layers must be collected with
    /// [`Llama::collect_checkpoint_grads`] after `backward`.
    pub fn set_checkpointing(&mut self, on: bool) -> Result<()> {
        if on && !(self.device().is_cpu() || self.device().is_cuda()) {
            candle_core::bail!(
                "--checkpoint-layers: activation checkpointing runs on the CPU and CUDA, not on {:?}",
                self.device()
            );
        }
        self.checkpoint = if on {
            Some(Checkpointing {
                anchor: Var::zeros(1, DType::F32, self.device())?,
                sink: Arc::new(Mutex::new(vec![])),
            })
        } else {
            None
        };
        Ok(())
    }

    /// `loss.backward()` plus the adapter gradients of checkpointed layers.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        self.collect_checkpoint_grads(&mut grads)?;
        Ok(grads)
    }

    /// Adds the adapter gradients computed while recomputing checkpointed layers to `grads`.
    pub fn collect_checkpoint_grads(&self, grads: &mut GradStore) -> Result<()> {
        let Some(c) = &self.checkpoint else {
            return Ok(());
        };
        let pending: Vec<(Var, Tensor)> = std::mem::take(&mut *c.sink.lock().expect("sink lock"));
        for (v, g) in pending {
            let sum = match grads.get(v.as_tensor()) {
                Some(old) => (old + g)?,
                None => g,
            };
            grads.insert(v.as_tensor(), sum);
        }
        Ok(())
    }

    /// Logits `[N, vocab]` at the flat positions `b·T + t` of `hidden [B, T, H]` (only those rows
    /// go through the output projection).
    pub fn logits_at(&self, hidden: &Tensor, flat_positions: &[usize]) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let idx: Vec<u32> = flat_positions.iter().map(|&p| p as u32).collect();
        if let Some(&p) = flat_positions.iter().find(|&&p| p >= b * t) {
            candle_core::bail!("logit position {p} outside the batch ({b}×{t})");
        }
        let idx = Tensor::from_vec(idx, flat_positions.len(), hidden.device())?;
        let rows = hidden.reshape((b * t, h))?.index_select(&idx, 0)?;
        ops::frozen_linear(&rows, &self.lm_head, None)
    }

    /// Cross-entropy (mean over the target tokens) of `targets` at flat positions of `hidden`,
    /// computed in f32 from the selected rows only.
    pub fn loss_at(
        &self,
        hidden: &Tensor,
        flat_positions: &[usize],
        targets: &[u32],
    ) -> Result<Tensor> {
        if targets.len() != flat_positions.len() || targets.is_empty() {
            candle_core::bail!("loss needs one target per position and at least one");
        }
        let logits = self.logits_at(hidden, flat_positions)?;
        let dt = if logits.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let logp = candle_nn::ops::log_softmax(&logits.to_dtype(dt)?, D::Minus1)?;
        let tg = Tensor::from_vec(targets.to_vec(), (targets.len(), 1), hidden.device())?;
        logp.gather(&tg, 1)?.mean_all()?.neg()
    }
}

fn layer_forward(
    c: &Config,
    l: &Layer,
    x: &Tensor,
    table: &RopeTable,
    mask: &AttnMask,
    slot: Option<(&mut Option<(Tensor, Tensor)>, bool)>,
    dropout: &mut Option<&mut Dropout>,
) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let (nh, nkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let h = ops::rms_norm(x, &l.input_layernorm, c.rms_norm_eps)?;
    let q = l.q_proj.forward(&h, dropout)?.reshape((b, t, nh, d))?;
    let k = l.k_proj.forward(&h, dropout)?.reshape((b, t, nkv, d))?;
    let v = l.v_proj.forward(&h, dropout)?.reshape((b, t, nkv, d))?;
    let norm = |x: Tensor, w: &Option<Tensor>| match w {
        Some(w) => ops::rms_norm(&x, w, c.rms_norm_eps),
        None => Ok(x),
    };
    let q = ops::rope(&norm(q, &l.q_norm)?, table)?;
    let mut k = ops::rope(&norm(k, &l.k_norm)?, table)?;
    let mut v = v.transpose(1, 2)?.contiguous()?;
    if let Some((slot, keep)) = slot {
        if let Some((pk, pv)) = slot.as_ref() {
            k = Tensor::cat(&[pk, &k], 2)?;
            v = Tensor::cat(&[pv, &v], 2)?;
        }
        if keep {
            *slot = Some((k.detach(), v.detach()));
        }
    }
    let o = ops::attention(&q, &k, &v, mask, 1.0 / (d as f64).sqrt())?;
    let x = (x + l.o_proj.forward(&o, dropout)?)?;
    let h = ops::rms_norm(&x, &l.post_attention_layernorm, c.rms_norm_eps)?;
    let g = l.gate_proj.forward(&h, dropout)?;
    let u = l.up_proj.forward(&h, dropout)?;
    x + l.down_proj.forward(&ops::swiglu(&g, &u)?, dropout)?
}

/// A decoder layer run without keeping its activations: the forward pass ran on a detached input;
/// the op hands its output over (taken out of `output`, so the graph keeps one copy of each
/// layer's output: the op's result, which is the next layer's input); the backward pass
/// recomputes the layer with the same dropout masks, returns the input gradient and leaves the
/// adapter gradients in the sink. The second argument is a scalar variable that keeps the op in
/// the graph even when the input does not track gradients.
struct CheckpointedLayer {
    cfg: Config,
    layer: Layer,
    table: RopeTable,
    mask: AttnMask,
    dropout: Option<Dropout>,
    sink: Arc<Mutex<Vec<(Var, Tensor)>>>,
    /// The layer's output (contiguous), until the forward pass takes it.
    output: Mutex<Option<Tensor>>,
}

impl CheckpointedLayer {
    fn take_output(&self) -> Result<Tensor> {
        match self.output.lock().expect("output lock").take() {
            Some(y) => Ok(y),
            None => candle_core::bail!("checkpointed layer: the forward pass ran twice"),
        }
    }
}

impl CustomOp2 for CheckpointedLayer {
    fn name(&self) -> &'static str {
        "checkpointed-layer"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = self.take_output()?;
        let (storage, layout) = y.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*storage else {
            candle_core::bail!("checkpointed layer: CPU output expected");
        };
        let out = crate::kernels::slice::copy_cpu(s, layout, "checkpointed layer")?;
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let y = self.take_output()?;
        let (storage, layout) = y.storage_and_layout();
        let candle_core::Storage::Cuda(s) = &*storage else {
            candle_core::bail!("checkpointed layer: CUDA output expected");
        };
        // The layer's output is a fresh contiguous tensor (made so by the caller): its storage is
        // exactly it.
        Ok((s.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let xv = Var::from_tensor(&x.detach())?;
        let mut d = self.dropout.clone();
        let out = layer_forward(
            &self.cfg,
            &self.layer,
            xv.as_tensor(),
            &self.table,
            &self.mask,
            None,
            &mut d.as_mut(),
        )?;
        let grads = (out * grad.detach())?.sum_all()?.backward()?;
        let mut sink = self.sink.lock().expect("sink lock");
        for t in Target::ALL {
            if let Some(l) = &self.layer.proj(t).lora {
                for v in [&l.a, &l.b] {
                    if let Some(g) = grads.get(v.as_tensor()) {
                        sink.push((v.clone(), g.clone()));
                    }
                }
            }
        }
        Ok((grads.get(xv.as_tensor()).cloned(), None))
    }
}

/// Random weights for `cfg` in Hugging Face naming (normal, std 0.2 for matrices, norms near 1),
/// seeded: tiny backbones for tests and the offline demo. All of them at once; [`RandomWeights`]
/// makes the same values one tensor at a time.
pub fn random_weights(
    cfg: &Config,
    seed: u64,
    dt: DType,
    dev: &Device,
) -> Result<std::collections::HashMap<String, Tensor>> {
    let src = RandomWeights::new(cfg, seed, dt, dev);
    let mut out = std::collections::HashMap::new();
    for (name, _, _) in &src.specs {
        let t = src.tensor(name)?.expect("every listed tensor is made");
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// The weights of [`random_weights`] made when the loader asks for them, so a real-size random
/// backbone (`builtin:random:CONFIG`) never exists twice: the values come from one seeded stream in
/// a fixed order, and a tensor asked for ahead of its turn makes the ones before it, which wait
/// (at most one layer's) until they are asked for. Each tensor is given out once.
pub struct RandomWeights {
    /// (name, shape, whether a norm weight) in the stream's order.
    specs: Vec<(String, Vec<usize>, bool)>,
    dt: DType,
    dev: Device,
    state: Mutex<RandomState>,
}

struct RandomState {
    rng: rand_chacha::ChaCha8Rng,
    next: usize,
    made: std::collections::HashMap<String, Tensor>,
}

impl RandomWeights {
    pub fn new(cfg: &Config, seed: u64, dt: DType, dev: &Device) -> Self {
        use rand::SeedableRng;
        let (h, f, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let mut specs = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![cfg.vocab_size, h],
            false,
        )];
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            specs.push((format!("{p}.input_layernorm.weight"), vec![h], true));
            specs.push((
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                true,
            ));
            if cfg.qk_norm {
                specs.push((format!("{p}.self_attn.q_norm.weight"), vec![d], true));
                specs.push((format!("{p}.self_attn.k_norm.weight"), vec![d], true));
            }
            for (m, out_dim, in_dim, bias) in [
                ("self_attn.q_proj", nh * d, h, cfg.qkv_bias),
                ("self_attn.k_proj", nkv * d, h, cfg.qkv_bias),
                ("self_attn.v_proj", nkv * d, h, cfg.qkv_bias),
                ("self_attn.o_proj", h, nh * d, cfg.o_bias),
                ("mlp.gate_proj", f, h, cfg.mlp_bias),
                ("mlp.up_proj", f, h, cfg.mlp_bias),
                ("mlp.down_proj", h, f, cfg.mlp_bias),
            ] {
                specs.push((format!("{p}.{m}.weight"), vec![out_dim, in_dim], false));
                if bias {
                    specs.push((format!("{p}.{m}.bias"), vec![out_dim], false));
                }
            }
        }
        specs.push(("model.norm.weight".into(), vec![h], true));
        if !cfg.tie_word_embeddings {
            specs.push(("lm_head.weight".into(), vec![cfg.vocab_size, h], false));
        }
        RandomWeights {
            specs,
            dt,
            dev: dev.clone(),
            state: Mutex::new(RandomState {
                rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
                next: 0,
                made: Default::default(),
            }),
        }
    }

    /// The next tensor of the stream, made in blocks of values (each drawn in f64 and converted
    /// to the dtype as one tensor would be: the same values as one conversion of the whole).
    fn make(&self, st: &mut RandomState, shape: &[usize], norm: bool) -> Result<Tensor> {
        use rand_distr::{Distribution, Normal};
        let normal = Normal::new(0.0f64, 0.2).expect("valid std");
        let n: usize = shape.iter().product();
        const BLOCK: usize = 1 << 20;
        let mut parts = TypedValues::new(self.dt, n)?;
        let mut left = n;
        while left > 0 {
            let k = left.min(BLOCK);
            let v: Vec<f64> = (0..k)
                .map(|_| {
                    let x = normal.sample(&mut st.rng);
                    if norm {
                        1.0 + 0.5 * x
                    } else {
                        x
                    }
                })
                .collect();
            parts.push(&Tensor::from_vec(v, k, &Device::Cpu)?.to_dtype(self.dt)?)?;
            left -= k;
        }
        parts.into_tensor(shape)?.to_device(&self.dev)
    }
}

/// Values of one dtype gathered block by block into one buffer.
enum TypedValues {
    F32(Vec<f32>),
    F64(Vec<f64>),
    BF16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

impl TypedValues {
    fn new(dt: DType, n: usize) -> Result<Self> {
        Ok(match dt {
            DType::F32 => Self::F32(Vec::with_capacity(n)),
            DType::F64 => Self::F64(Vec::with_capacity(n)),
            DType::BF16 => Self::BF16(Vec::with_capacity(n)),
            DType::F16 => Self::F16(Vec::with_capacity(n)),
            other => candle_core::bail!("random weights in {other:?}: a float dtype expected"),
        })
    }

    fn push(&mut self, t: &Tensor) -> Result<()> {
        match self {
            Self::F32(v) => v.extend(t.to_vec1::<f32>()?),
            Self::F64(v) => v.extend(t.to_vec1::<f64>()?),
            Self::BF16(v) => v.extend(t.to_vec1::<half::bf16>()?),
            Self::F16(v) => v.extend(t.to_vec1::<half::f16>()?),
        }
        Ok(())
    }

    fn into_tensor(self, shape: &[usize]) -> Result<Tensor> {
        let dev = &Device::Cpu;
        match self {
            Self::F32(v) => Tensor::from_vec(v, shape, dev),
            Self::F64(v) => Tensor::from_vec(v, shape, dev),
            Self::BF16(v) => Tensor::from_vec(v, shape, dev),
            Self::F16(v) => Tensor::from_vec(v, shape, dev),
        }
    }
}

impl WeightSource for RandomWeights {
    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        let mut st = self.state.lock().expect("random weights lock");
        if let Some(t) = st.made.remove(name) {
            return Ok(Some(t));
        }
        if !self.specs[st.next..].iter().any(|(n, _, _)| n == name) {
            return Ok(None);
        }
        while st.next < self.specs.len() {
            let (n, shape, norm) = &self.specs[st.next];
            st.next += 1;
            let t = self.make(&mut st, shape, *norm)?;
            if n == name {
                return Ok(Some(t));
            }
            st.made.insert(n.clone(), t);
        }
        Ok(None)
    }
}
