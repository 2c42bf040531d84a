//! Training a recommender as LLaRA's authors did (the DROS recipe): Adam (L2 weight decay), binary
//! cross-entropy of the target's logit against one uniformly sampled negative (or full softmax
//! cross-entropy), evaluation on the valid candidate sets after every epoch, the best epoch kept by
//! HR@1 (ties: NDCG@5), early stopping with patience. Every random draw (initialisation, shuffling,
//! negatives, dropout) comes from ChaCha8 streams derived from the seed.

use super::adam::Adam;
use super::{Arch, Batch, Config, Result, SeqRec, SrError};
use crate::data::{Dataset, Row};
use crate::eval::metrics::{full_rank_of, rank_of, RankAccumulator, RankMetrics, Selection};
use crate::kernels::dropout::Dropout;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Instant;

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    /// Binary cross-entropy: the target against one uniformly sampled negative (LLaRA's recipe).
    Bce,
    /// Softmax cross-entropy over every item.
    Ce,
    /// Softmax cross-entropy over the target and `negatives` uniformly sampled items (shared by
    /// the batch).
    Sampled,
    /// gBCE (gSASRec, Petrov & Macdonald, RecSys 2023): binary cross-entropy over the target and
    /// `negatives` sampled items, the target's probability raised to the power β that undoes the
    /// overconfidence negative sampling causes (`gbce_t` = 1: fully calibrated; 0: plain BCE).
    Gbce,
}

impl Loss {
    pub const ALL: [Loss; 4] = [Loss::Bce, Loss::Ce, Loss::Sampled, Loss::Gbce];

    /// The name flags and config files use.
    pub fn name(self) -> &'static str {
        match self {
            Loss::Bce => "bce",
            Loss::Ce => "ce",
            Loss::Sampled => "sampled",
            Loss::Gbce => "gbce",
        }
    }
}

impl Loss {
    /// Whether the loss samples `negatives` items per step.
    pub fn samples_negatives(self) -> bool {
        matches!(self, Loss::Sampled | Loss::Gbce)
    }
}

fn default_negatives() -> usize {
    256
}
fn default_gbce_t() -> f64 {
    0.75
}

/// Hyper-parameters of a training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    pub model: Arch,
    pub hidden: usize,
    pub lr: f64,
    pub l2: f64,
    pub batch_size: usize,
    pub epochs: usize,
    pub patience: usize,
    pub dropout: f64,
    pub num_heads: usize,
    pub loss: Loss,
    /// Negatives per step for `sampled` and `gbce` (capped at the item count − 1).
    #[serde(default = "default_negatives")]
    pub negatives: usize,
    /// gBCE's calibration `t` in [0, 1].
    #[serde(default = "default_gbce_t")]
    pub gbce_t: f64,
    /// What picks the best epoch.
    #[serde(default)]
    pub select: Selection,
    /// Decay of an exponential moving average of the weights, updated after every step; when
    /// above 0 the average (not the raw weights) is validated, selected and saved. 0: off.
    #[serde(default)]
    pub ema: f64,
    pub seed: u64,
}

/// One epoch's record (a line of `train_log.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub loss: f64,
    pub valid: RankMetrics,
    pub seconds: f64,
    pub examples_per_second: f64,
}

/// What training produces.
pub struct Trained {
    pub varmap: VarMap,
    pub config: Config,
    pub log: Vec<EpochLog>,
    pub best_epoch: usize,
    pub valid: RankMetrics,
    pub test: RankMetrics,
}

fn seeded(seed: u64, purpose: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(purpose);
    rng
}

/// Parameters with PyTorch's (and LLaRA's) initialisation, drawn from the seed.
pub fn init_params(cfg: &Config, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    enum I {
        Normal(f64),
        Uniform(f64),
        Const(f32),
    }
    let h = cfg.hidden_size;
    let n = cfg.item_num;
    let lin = |name: &str, inp: usize, out: usize, wshape: Vec<usize>| {
        let b = 1.0 / (inp as f64).sqrt();
        vec![
            (
                format!("{name}.weight"),
                wshape.iter().product::<usize>(),
                wshape,
                I::Uniform(b),
            ),
            (format!("{name}.bias"), out, vec![out], I::Uniform(b)),
        ]
    };
    let ln = |name: &str| {
        vec![
            (format!("{name}.weight"), h, vec![h], I::Const(1.0)),
            (format!("{name}.bias"), h, vec![h], I::Const(0.0)),
        ]
    };
    let mut specs: Vec<(String, usize, Vec<usize>, I)> = Vec::new();
    match cfg.model {
        Arch::Sasrec => {
            specs.push((
                "item_embeddings.weight".into(),
                (n + 1) * h,
                vec![n + 1, h],
                I::Normal(1.0),
            ));
            specs.push((
                "positional_embeddings.weight".into(),
                cfg.state_size * h,
                vec![cfg.state_size, h],
                I::Normal(1.0),
            ));
            for l in ["ln_1", "ln_2", "ln_3", "feed_forward.layer_norm"] {
                specs.extend(ln(l));
            }
            for l in ["mh_attn.linear_q", "mh_attn.linear_k", "mh_attn.linear_v"] {
                specs.extend(lin(l, h, h, vec![h, h]));
            }
            for l in ["feed_forward.w_1", "feed_forward.w_2"] {
                specs.extend(lin(l, h, h, vec![h, h, 1]));
            }
            specs.extend(lin("s_fc", h, n, vec![n, h]));
        }
        Arch::Gru4rec => {
            specs.push((
                "item_embeddings.weight".into(),
                (n + 1) * h,
                vec![n + 1, h],
                I::Normal(0.01),
            ));
            let b = 1.0 / (h as f64).sqrt();
            for (name, shape) in [
                ("gru.weight_ih_l0", vec![3 * h, h]),
                ("gru.weight_hh_l0", vec![3 * h, h]),
                ("gru.bias_ih_l0", vec![3 * h]),
                ("gru.bias_hh_l0", vec![3 * h]),
            ] {
                specs.push((name.into(), shape.iter().product(), shape, I::Uniform(b)));
            }
            specs.extend(lin("s_fc", h, n, vec![n, h]));
        }
        Arch::Caser => {
            specs.push((
                "item_embeddings.weight".into(),
                (n + 1) * h,
                vec![n + 1, h],
                I::Normal(0.01),
            ));
            let f = cfg.num_filters;
            for (i, &k) in cfg.filter_sizes.iter().enumerate() {
                let std = (2.0 / ((k * h) as f64 + (f * k * h) as f64)).sqrt(); // xavier normal
                specs.push((
                    format!("horizontal_cnn.{i}.weight"),
                    f * k * h,
                    vec![f, 1, k, h],
                    I::Normal(std),
                ));
                specs.push((
                    format!("horizontal_cnn.{i}.bias"),
                    f,
                    vec![f],
                    I::Const(0.1),
                ));
            }
            let t = cfg.state_size;
            let std = (2.0 / (2 * t) as f64).sqrt();
            specs.push((
                "vertical_cnn.weight".into(),
                t,
                vec![1, 1, t, 1],
                I::Normal(std),
            ));
            specs.push(("vertical_cnn.bias".into(), 1, vec![1], I::Const(0.1)));
            let d = h + f * cfg.filter_sizes.len();
            specs.extend(lin("s_fc", d, n, vec![n, d]));
        }
    }
    let mut rng = seeded(seed, 1);
    specs
        .into_iter()
        .map(|(name, count, shape, init)| {
            let values: Vec<f32> = match init {
                I::Normal(std) => {
                    let d = Normal::new(0.0, std).expect("valid normal");
                    (0..count).map(|_| d.sample(&mut rng) as f32).collect()
                }
                I::Uniform(b) => {
                    let d = Uniform::new(-b, b).expect("valid uniform");
                    (0..count).map(|_| d.sample(&mut rng) as f32).collect()
                }
                I::Const(c) => vec![c; count],
            };
            (name, shape, values)
        })
        .collect()
}

/// A fresh model's variables.
pub fn init_varmap(cfg: &Config, seed: u64, device: &Device) -> Result<VarMap> {
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().expect("varmap lock");
        for (name, shape, values) in init_params(cfg, seed) {
            let t = Tensor::from_vec(values, shape, device)?;
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    Ok(varmap)
}

/// Scores for every row, in batches: `Vec<[item_num]>`.
pub fn score_rows(
    model: &SeqRec,
    cfg: &Config,
    rows: &[Row],
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(512) {
        let refs: Vec<&Row> = chunk.iter().collect();
        let batch = Batch::from_rows(&refs, cfg, device)?;
        let scores = model.forward(&batch, None)?.to_dtype(DType::F32)?;
        out.extend(scores.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// HR/NDCG on fixed candidate sets (and full-catalogue HR@10/NDCG@10 excluding history items).
pub fn evaluate(
    model: &SeqRec,
    cfg: &Config,
    rows: &[Row],
    candidates: &[Vec<u32>],
    device: &Device,
) -> Result<RankMetrics> {
    let scores = score_rows(model, cfg, rows, device)?;
    let mut acc = RankAccumulator::default();
    for ((row, cands), s) in rows.iter().zip(candidates).zip(&scores) {
        acc.push(rank_of(s, cands, row.next));
        acc.push_full(full_rank_of(s, &row.history, row.next), cands.len());
    }
    Ok(acc.finish())
}

/// `softplus(x) = log(1 + e^x)`, stable for large |x|.
fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    x.relu()? + ((x.abs()?.neg()?.exp()? + 1.0)?.log()?)
}

/// `log Σ exp(x)` over the last dimension, kept: `[B, 1]` (shifted by the detached row maximum).
fn logsumexp(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    x.broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + max
}

fn batch_loss(
    model: &SeqRec,
    cfg: &Config,
    rows: &[&Row],
    o: &TrainOptions,
    rng: &mut ChaCha8Rng,
    dropout: &mut Dropout,
    device: &Device,
) -> Result<Tensor> {
    let batch = Batch::from_rows(rows, cfg, device)?;
    let state = model.state(&batch, Some(dropout))?; // [B, D]
    let b = rows.len();
    let targets: Vec<u32> = rows.iter().map(|r| r.next).collect();
    Ok(match o.loss {
        Loss::Bce => {
            // Only the target's and the negative's logits enter the loss: score just those two.
            let n = cfg.item_num as u32;
            let mut pairs = Vec::with_capacity(2 * b);
            for &t in &targets {
                let neg = loop {
                    let c = rng.random_range(0..n);
                    if c != t || n == 1 {
                        break c;
                    }
                };
                pairs.extend([t, neg]);
            }
            let scores = model.score_items(&state, &Tensor::from_vec(pairs, (b, 2), device)?)?;
            let pos = scores.narrow(1, 0, 1)?;
            let neg = scores.narrow(1, 1, 1)?;
            (softplus(&pos.neg()?)?.mean_all()? + softplus(&neg)?.mean_all()?)?
        }
        Loss::Ce => {
            let logits = model.head().forward(&state)?; // [B, N]
            let pos = logits.gather(&Tensor::from_vec(targets, (b, 1), device)?, 1)?;
            (logsumexp(&logits)? - pos)?.mean_all()?
        }
        Loss::Sampled | Loss::Gbce => {
            let n = cfg.item_num;
            let k = o.negatives.min(n.saturating_sub(1)).max(1);
            // k distinct items, shared by every row of the batch: one [B, D] x [D, k] product.
            let negs: Vec<u32> = rand::seq::index::sample(rng, n, k)
                .into_iter()
                .map(|i| i as u32)
                .collect();
            let head = model.head();
            let ids = Tensor::from_vec(negs.clone(), k, device)?;
            let w = head.weight.index_select(&ids, 0)?; // [k, D]
            let bias = head.bias.index_select(&ids, 0)?; // [k]
                                                         // [B, k]; a negative that is the row's own target does not count against it.
            let neg = state.matmul(&w.t()?)?.broadcast_add(&bias)?;
            let mut mask = vec![0f32; b * k];
            for (i, &t) in targets.iter().enumerate() {
                for (j, &c) in negs.iter().enumerate() {
                    if c == t {
                        mask[i * k + j] = -1e9;
                    }
                }
            }
            let neg = (neg + Tensor::from_vec(mask, (b, k), device)?)?;
            let pos = model.score_items(&state, &Tensor::from_vec(targets, (b, 1), device)?)?;
            if o.loss == Loss::Sampled {
                let all = Tensor::cat(&[&pos, &neg], 1)?; // the target first
                (logsumexp(&all)? - pos)?.mean_all()?
            } else {
                // gSASRec: sigma(s+)^beta with beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha the
                // sampling rate k / (n - 1); mean over the target and the k negatives.
                let alpha = k as f64 / (n.max(2) - 1) as f64;
                let t = o.gbce_t;
                let beta = alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha);
                let denom = (b * (k + 1)) as f64;
                ((softplus(&pos.neg()?)?.sum_all()? * beta)? + softplus(&neg)?.sum_all()?)?
                    .affine(1.0 / denom, 0.0)?
            }
        }
    })
}

/// Trains on `ds.splits.train`, selects on valid, reports test. `on_batch(done, loss)` is called
/// after every step (for progress bars); returning `Break` stops training with
/// [`SrError::Stopped`].
pub fn train(
    ds: &Dataset,
    o: &TrainOptions,
    device: &Device,
    mut on_epoch_start: impl FnMut(usize, usize),
    mut on_batch: impl FnMut(usize, f64) -> std::ops::ControlFlow<()>,
    mut on_epoch_end: impl FnMut(&EpochLog, bool),
) -> Result<Trained> {
    if o.batch_size == 0 || o.epochs == 0 {
        return Err(SrError::Invalid(
            "--batch-size and --epochs must be at least 1".into(),
        ));
    }
    if o.loss.samples_negatives() && o.negatives == 0 {
        return Err(SrError::Invalid(format!(
            "--negatives must be at least 1 for --loss {}",
            if o.loss == Loss::Gbce {
                "gbce"
            } else {
                "sampled"
            }
        )));
    }
    if !(0.0..=1.0).contains(&o.gbce_t) {
        return Err(SrError::Invalid(format!(
            "--gbce-t must be in [0, 1], got {}",
            o.gbce_t
        )));
    }
    if !(0.0..1.0).contains(&o.ema) {
        return Err(SrError::Invalid(format!(
            "--ema must be in [0, 1), got {}",
            o.ema
        )));
    }
    let mut cfg = Config::new(o.model, ds.n_items(), o.hidden);
    cfg.dropout = o.dropout;
    cfg.num_heads = o.num_heads;
    cfg.state_size = ds.meta.max_history;
    cfg.validate().map_err(|e| SrError::Invalid(e.0))?;
    let varmap = init_varmap(&cfg, o.seed, device)?;
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = SeqRec::load(vb, &cfg)?;
    let mut names: Vec<String> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .keys()
        .cloned()
        .collect();
    names.sort();
    let vars: Vec<Var> = {
        let data = varmap.data().lock().expect("varmap lock");
        names.iter().map(|n| data[n].clone()).collect()
    };
    let mut opt = Adam::new(vars.clone(), o.lr, o.l2)?;
    let mut ema = (o.ema > 0.0)
        .then(|| super::ema::Ema::new(&vars, o.ema))
        .transpose()?;
    let mut shuffle_rng = seeded(o.seed, 2);
    let mut neg_rng = seeded(o.seed, 3);
    let mut dropout = Dropout::new(o.dropout, seeded(o.seed, 4));

    let train_rows = &ds.splits.train;
    let n_batches = train_rows.len().div_ceil(o.batch_size);
    let mut order: Vec<usize> = (0..train_rows.len()).collect();
    let mut log = Vec::new();
    let mut best: Option<(usize, RankMetrics, HashMap<String, Tensor>)> = None;
    let mut since_best = 0usize;
    for epoch in 1..=o.epochs {
        on_epoch_start(epoch, n_batches);
        let start = Instant::now();
        order.shuffle(&mut shuffle_rng);
        let mut total = 0.0;
        for (i, idx) in order.chunks(o.batch_size).enumerate() {
            let rows: Vec<&Row> = idx.iter().map(|&k| &train_rows[k]).collect();
            let loss = batch_loss(&model, &cfg, &rows, o, &mut neg_rng, &mut dropout, device)?;
            let grads = loss.backward()?;
            opt.step(&grads)?;
            if let Some(avg) = ema.as_mut() {
                avg.update(&vars)?;
            }
            let l = loss.to_scalar::<f32>()? as f64;
            if !l.is_finite() {
                return Err(SrError::Invalid(format!(
                    "the loss became {l} at epoch {epoch}, step {}; lower --lr",
                    i + 1
                )));
            }
            total += l;
            if on_batch(i + 1, l).is_break() {
                return Err(SrError::Stopped { epoch, step: i + 1 });
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        // With an average, validate (and snapshot) it, then put the raw weights back.
        let raw = match &ema {
            Some(avg) => {
                let raw = vars
                    .iter()
                    .map(|v| v.as_tensor().copy())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                for (v, a) in vars.iter().zip(avg.values()) {
                    v.set(a)?;
                }
                Some(raw)
            }
            None => None,
        };
        let valid = evaluate(&model, &cfg, &ds.splits.valid, &ds.candidates_valid, device)?;
        let entry = EpochLog {
            epoch,
            loss: total / n_batches as f64,
            valid,
            seconds,
            examples_per_second: train_rows.len() as f64 / seconds,
        };
        let improved = best
            .as_ref()
            .is_none_or(|(_, m, _)| valid.better_by(m, o.select));
        if improved {
            let snapshot = names
                .iter()
                .zip(&vars)
                .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
                .collect::<Result<HashMap<_, _>>>()?;
            best = Some((epoch, valid, snapshot));
            since_best = 0;
        } else {
            since_best += 1;
        }
        if let Some(raw) = raw {
            for (v, r) in vars.iter().zip(&raw) {
                v.set(r)?;
            }
        }
        on_epoch_end(&entry, improved);
        log.push(entry);
        if since_best >= o.patience.max(1) && epoch < o.epochs {
            tracing::info!("early stop after epoch {epoch}: no better valid score ({:?}) for {since_best} epochs", o.select);
            break;
        }
    }
    let (best_epoch, valid, snapshot) = best.expect("at least one epoch ran");
    for (n, v) in names.iter().zip(&vars) {
        v.set(&snapshot[n])?;
    }
    let test = evaluate(&model, &cfg, &ds.splits.test, &ds.candidates_test, device)?;
    Ok(Trained {
        varmap,
        config: cfg,
        log,
        best_epoch,
        valid,
        test,
    })
}
