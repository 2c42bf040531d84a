//! A scoring head over the LLM's hidden states, trained with a listwise loss (in the manner of
//! LLM-SRec / E4SRec): candidate `c` of a row scores
//!
//! ```text
//! s_c = (ĥ_user · U) · (ĥ_c · V) / (√H √r)  [+ γ · r_c]
//! ```
//!
//! where `h_user` is the last layer's hidden state at the `[UserEmb]` token (which carries the
//! recommender's state of the history) or, in prompts without one, at the prompt's last token, `h_c` the hidden state at candidate `c`'s marker token (`[CansEmb]`, or `[PH]`
//! after its title in a text prompt), `U`, `V` are `[H, r]`, and, with the recommender prior, `r_c`
//! is the frozen recommender's own score (`ĥ`: a hidden state divided by its root mean square) of `c` for this history, weighted by a learned `γ`
//! (starting at 1). `V` starts at zero, so a run with the prior starts out ranking exactly like its
//! recommender and training moves it from there; without the prior it starts at chance.
//! Saved as `head.safetensors` (`head.u`, `head.v`, `head.gamma`).

use super::Tokenized;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::path::Path;

/// What a run's head was built with (saved in `run.json`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeadConfig {
    pub rank: usize,
    /// Add the recommender's own candidate scores (hybrid prompts only).
    pub prior: bool,
}

pub struct Head {
    pub cfg: HeadConfig,
    pub u: Var,
    pub v: Var,
    pub gamma: Var,
}

impl Head {
    /// `U ~ N(0, 1/H)`, `V = 0`, `γ = 1`, seeded.
    pub fn new(hidden: usize, cfg: HeadConfig, seed: u64, dev: &Device) -> Result<Self> {
        if cfg.rank == 0 {
            candle_core::bail!("--head-rank must be at least 1");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4845_4144);
        let normal = Normal::new(0.0f64, 1.0 / (hidden as f64).sqrt()).expect("valid std");
        let u: Vec<f32> = (0..hidden * cfg.rank)
            .map(|_| normal.sample(&mut rng) as f32)
            .collect();
        Ok(Self {
            cfg,
            u: Var::from_tensor(&Tensor::from_vec(u, (hidden, cfg.rank), dev)?)?,
            v: Var::zeros((hidden, cfg.rank), DType::F32, dev)?,
            gamma: Var::from_tensor(&Tensor::ones(1, DType::F32, dev)?)?,
        })
    }

    /// The trainable tensors with their file names.
    pub fn vars(&self) -> Vec<(String, Var)> {
        vec![
            ("head.u".into(), self.u.clone()),
            ("head.v".into(), self.v.clone()),
            ("head.gamma".into(), self.gamma.clone()),
        ]
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        super::projector::save_vars(&self.vars(), path)
    }

    /// Loads `head.safetensors`, checking the shapes against `hidden` and `cfg.rank`.
    pub fn load(path: &Path, hidden: usize, cfg: HeadConfig, dev: &Device) -> Result<Self> {
        let mut t = candle_core::safetensors::load(path, dev)?;
        let mut get = |name: &str, shape: &[usize]| {
            super::projector::take_var(&mut t, path, name, shape, DType::F32, "")
        };
        Ok(Self {
            cfg,
            u: get("head.u", &[hidden, cfg.rank])?,
            v: get("head.v", &[hidden, cfg.rank])?,
            gamma: get("head.gamma", &[1])?,
        })
    }

    /// The recommender's own candidate scores `[B, K]` when this head adds them (prompts that
    /// carry behaviour only; `None` otherwise).
    pub fn prior(
        &self,
        rec: &super::Recommender,
        refs: &[&Tokenized],
        view: super::prompts::ItemView,
    ) -> Result<Option<Tensor>> {
        if !(self.cfg.prior && view.uses_embeddings()) {
            return Ok(None);
        }
        let hist: Vec<&[u32]> = refs.iter().map(|r| r.history.as_slice()).collect();
        let cands: Vec<&[u32]> = refs.iter().map(|r| r.candidates.as_slice()).collect();
        rec.candidate_scores(&hist, &cands).map(Some)
    }

    /// Scores `[B, K]` of the candidates of right-padded rows (`hidden [B, T, H]`, every row with
    /// the same K). The user position of a row is its `[UserEmb]` token, else the last prompt token.
    /// `prior [B, K]` (the recommender's scores) is added times γ when given.
    pub fn scores(
        &self,
        hidden: &Tensor,
        rows: &[&Tokenized],
        prior: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let k = rows.first().map_or(0, |r| r.cand_positions.len());
        if rows.len() != b || k == 0 || rows.iter().any(|r| r.cand_positions.len() != k) {
            candle_core::bail!(
                "the head needs one row per batch row, each with the same number (> 0) of candidates"
            );
        }
        let mut user = Vec::with_capacity(b);
        let mut cand = Vec::with_capacity(b * k);
        for (i, r) in rows.iter().enumerate() {
            if r.answer_start == 0 || r.answer_start > t {
                candle_core::bail!("a prompt of no tokens, or longer than the batch");
            }
            let u = r.user_position.unwrap_or(r.answer_start - 1);
            user.push((i * t + u) as u32);
            cand.extend(r.cand_positions.iter().map(|&p| (i * t + p) as u32));
        }
        let dev = hidden.device();
        let flat = hidden.reshape((b * t, h))?.to_dtype(DType::F32)?;
        let hu = flat.index_select(&Tensor::from_vec(user, b, dev)?, 0)?;
        let hc = flat.index_select(&Tensor::from_vec(cand, b * k, dev)?, 0)?;
        // Scale-free: hidden states RMS-normalised, each projection and the dot product scaled by
        // 1/√fan-in, so a score moves by about lr per Adam step whatever the backbone's hidden norms
        // (raw final hidden states of a real LLM would make the first steps swamp the prior).
        let a = rms(&hu)?.matmul(self.u.as_tensor())?; // [B, r]
        let c = (rms(&hc)?.matmul(self.v.as_tensor())? / (h as f64).sqrt())?.reshape((
            b,
            k,
            self.cfg.rank,
        ))?; // [B, K, r]
        let s =
            (c.broadcast_mul(&a.unsqueeze(1)?)?.sum(D::Minus1)? / (self.cfg.rank as f64).sqrt())?; // [B, K]
        match prior {
            Some(p) => s + p.broadcast_mul(self.gamma.as_tensor())?,
            None => Ok(s),
        }
    }
}

/// Rows divided by their root mean square.
fn rms(x: &Tensor) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + 1e-6)?.sqrt()?)
}

/// Listwise cross-entropy: the mean over rows of `−log softmax(scores)[target]`, where `targets[b]`
/// is the index of row `b`'s target among its candidates.
pub fn listwise_loss(scores: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (b, _) = scores.dims2()?;
    if targets.len() != b || b == 0 {
        candle_core::bail!("listwise loss: one target per row, at least one row");
    }
    let logp = candle_nn::ops::log_softmax(scores, D::Minus1)?;
    let tg = Tensor::from_vec(targets.to_vec(), (b, 1), scores.device())?;
    logp.gather(&tg, 1)?.mean_all()?.neg()
}

/// The index of each row's target among its candidates.
pub fn target_indices(rows: &[&Tokenized], targets: &[u32]) -> Result<Vec<u32>> {
    rows.iter()
        .zip(targets)
        .map(|(r, t)| {
            r.candidates
                .iter()
                .position(|c| c == t)
                .map(|i| i as u32)
                .ok_or_else(|| candle_core::Error::Msg("a target outside its candidates".into()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(answer_start: usize, cands: Vec<usize>) -> Tokenized {
        Tokenized {
            ids: vec![0; answer_start],
            answer_start,
            slot_items: vec![],
            cand_positions: cands,
            user_position: None,
            history: vec![],
            candidates: vec![7, 8, 9],
            prompt: String::new(),
        }
    }

    #[test]
    fn scores_and_loss_match_a_computation_by_hand() {
        let dev = Device::Cpu;
        let (b, t, h, r) = (2, 5, 3, 2);
        let hv: Vec<f32> = (0..b * t * h).map(|i| ((i as f32) * 0.37).sin()).collect();
        let hidden = Tensor::from_vec(hv.clone(), (b, t, h), &dev).unwrap();
        let head = Head::new(
            h,
            HeadConfig {
                rank: r,
                prior: true,
            },
            1,
            &dev,
        )
        .unwrap();
        let vv: Vec<f32> = (0..h * r).map(|i| (i as f32 * 0.9).cos()).collect();
        head.v
            .set(&Tensor::from_vec(vv.clone(), (h, r), &dev).unwrap())
            .unwrap();
        head.gamma
            .set(&Tensor::from_vec(vec![0.5f32], 1, &dev).unwrap())
            .unwrap();
        let u: Vec<f32> = head.u.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let rows = [row(4, vec![0, 1, 3]), row(5, vec![2, 3, 1])];
        let refs: Vec<&Tokenized> = rows.iter().collect();
        let prior = Tensor::from_vec(vec![1f32, -1., 2., 0., 3., -2.], (2, 3), &dev).unwrap();
        let s: Vec<Vec<f32>> = head
            .scores(&hidden, &refs, Some(&prior))
            .unwrap()
            .to_vec2()
            .unwrap();
        let at = |bi: usize, p: usize| &hv[(bi * t + p) * h..(bi * t + p + 1) * h];
        let proj = |x: &[f32], w: &[f32]| -> Vec<f32> {
            let rms = (x.iter().map(|v| v * v).sum::<f32>() / h as f32 + 1e-6).sqrt();
            (0..r)
                .map(|j| (0..h).map(|i| x[i] / rms * w[i * r + j]).sum())
                .collect()
        };
        let pv: Vec<f32> = prior.flatten_all().unwrap().to_vec1().unwrap();
        let mut want = vec![vec![0f32; 3]; 2];
        for bi in 0..2 {
            let a = proj(at(bi, rows[bi].answer_start - 1), &u);
            for (ci, &p) in rows[bi].cand_positions.iter().enumerate() {
                let c = proj(at(bi, p), &vv);
                want[bi][ci] = a.iter().zip(&c).map(|(x, y)| x * y).sum::<f32>()
                    / ((h as f32).sqrt() * (r as f32).sqrt())
                    + 0.5 * pv[bi * 3 + ci];
            }
        }
        for (x, y) in s.iter().flatten().zip(want.iter().flatten()) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
        assert_eq!(s.iter().flatten().count(), 6);
        // Listwise loss: mean of logsumexp − the target's score.
        let sc = Tensor::from_vec(want.concat(), (2, 3), &dev).unwrap();
        let loss = listwise_loss(&sc, &[2, 0])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let lse = |v: &[f32]| v.iter().map(|x| x.exp()).sum::<f32>().ln();
        let by_hand = ((lse(&want[0]) - want[0][2]) + (lse(&want[1]) - want[1][0])) / 2.0;
        assert!((loss - by_hand).abs() < 1e-5, "{loss} vs {by_hand}");
        // A fresh head (V = 0) gives exactly γ × the prior: the recommender's ranking.
        let fresh = Head::new(h, head.cfg, 1, &dev).unwrap();
        let s0: Vec<f32> = fresh
            .scores(&hidden, &refs, Some(&prior))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(s0, pv);
        // Unequal candidate counts are refused.
        let bad = [row(4, vec![0, 1]), row(5, vec![2, 3, 1])];
        let bad: Vec<&Tokenized> = bad.iter().collect();
        assert!(head.scores(&hidden, &bad, None).is_err());
    }

    #[test]
    fn save_load_round_trip() {
        let dev = Device::Cpu;
        let cfg = HeadConfig {
            rank: 4,
            prior: false,
        };
        let head = Head::new(6, cfg, 3, &dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("head.safetensors");
        head.save(&f).unwrap();
        let back = Head::load(&f, 6, cfg, &dev).unwrap();
        for ((_, a), (_, b)) in head.vars().iter().zip(back.vars()) {
            let (x, y): (Vec<f32>, Vec<f32>) = (
                a.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
                b.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(x, y);
        }
        let e = Head::load(&f, 8, cfg, &dev).err().unwrap().to_string();
        assert!(e.contains("head.u"), "{e}");
    }
}
