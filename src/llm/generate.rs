//! Batched generation from input embeddings with a KV cache: greedy by default, temperature and
//! top-p sampling (candle-transformers' `LogitsProcessor`, seeded) when asked; stops at EOS, a stop string or a token limit.

use super::llama::{KvCache, Llama, Step};
use super::tokenizer::LlmTokenizer;
use candle_core::{DType, Device, Result, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

#[derive(Debug, Clone)]
pub struct GenOptions {
    pub max_new_tokens: usize,
    /// 0: greedy.
    pub temperature: f64,
    /// Nucleus sampling mass (1: off).
    pub top_p: f64,
    /// Generation stops when the decoded text contains one of these (it is cut before it).
    pub stop: Vec<String>,
    pub seed: u64,
}

impl Default for GenOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            stop: vec![],
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub ids: Vec<u32>,
    pub text: String,
    /// `eos`, `stop`, or `length`.
    pub finish: &'static str,
}

/// How the next token is chosen: the first largest logit (greedy), or candle-transformers'
/// `LogitsProcessor` (temperature, nucleus) drawing from one stream seeded by `GenOptions::seed`.
enum Sampler {
    Greedy,
    Sample(Box<LogitsProcessor>),
}

impl Sampler {
    fn new(opts: &GenOptions) -> Self {
        if opts.temperature <= 0.0 {
            return Sampler::Greedy;
        }
        let temperature = opts.temperature;
        let sampling = if opts.top_p < 1.0 {
            Sampling::TopP {
                p: opts.top_p,
                temperature,
            }
        } else {
            Sampling::All { temperature }
        };
        Sampler::Sample(Box::new(LogitsProcessor::from_sampling(
            opts.seed, sampling,
        )))
    }

    fn pick(&mut self, logits: &[f32]) -> Result<u32> {
        match self {
            Sampler::Greedy => {
                let mut best = 0;
                for (i, &v) in logits.iter().enumerate() {
                    if v > logits[best] {
                        best = i;
                    }
                }
                Ok(best as u32)
            }
            Sampler::Sample(p) => {
                p.sample(&Tensor::from_slice(logits, logits.len(), &Device::Cpu)?)
            }
        }
    }
}

/// Wall-clock split of one [`generate_timed`] call.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenTiming {
    /// The prompt's forward pass (up to the first token's logits).
    pub prefill_seconds: f64,
    /// Every later step (choosing tokens, one-position forwards).
    pub decode_seconds: f64,
    /// One-position forward passes run after the prefill.
    pub decode_steps: usize,
}

/// Generates a continuation for each row of `embeds [B, T, H]` (row `b` has `lengths[b]` real
/// positions, right-padded).
pub fn generate(
    model: &Llama,
    tok: &LlmTokenizer,
    embeds: &Tensor,
    lengths: &[usize],
    opts: &GenOptions,
) -> Result<Vec<Generated>> {
    generate_timed(model, tok, embeds, lengths, opts).map(|(g, _)| g)
}

/// [`generate`], also returning where the time went.
pub fn generate_timed(
    model: &Llama,
    tok: &LlmTokenizer,
    embeds: &Tensor,
    lengths: &[usize],
    opts: &GenOptions,
) -> Result<(Vec<Generated>, GenTiming)> {
    generate_inner(model, tok, embeds, lengths, opts, None)
}

/// Greedy (or sampled) generation restricted, row by row, to a set of token sequences: at every
/// step a row may only take a token that continues one of its `allowed[row]` sequences given what
/// it has generated so far (a prefix walk of their trie), and it stops when it has produced one
/// of them whole. So every answer is exactly one of the allowed sequences.
pub fn generate_constrained(
    model: &Llama,
    tok: &LlmTokenizer,
    embeds: &Tensor,
    lengths: &[usize],
    opts: &GenOptions,
    allowed: &[Vec<Vec<u32>>],
) -> Result<Vec<Generated>> {
    if allowed.len() != lengths.len() || allowed.iter().any(|a| a.iter().all(Vec::is_empty)) {
        candle_core::bail!("constrained generation needs a non-empty allowed sequence per row");
    }
    generate_inner(model, tok, embeds, lengths, opts, Some(allowed)).map(|(g, _)| g)
}

/// The tokens that may follow `prefix` in `seqs`, and whether `prefix` is one of them whole.
pub fn trie_next(seqs: &[Vec<u32>], prefix: &[u32]) -> (Vec<u32>, bool) {
    let mut next = vec![];
    let mut complete = false;
    for s in seqs {
        if s.len() >= prefix.len() && s[..prefix.len()] == *prefix {
            match s.get(prefix.len()) {
                Some(&t) if !next.contains(&t) => next.push(t),
                Some(_) => {}
                None => complete = true,
            }
        }
    }
    (next, complete)
}

fn generate_inner(
    model: &Llama,
    tok: &LlmTokenizer,
    embeds: &Tensor,
    lengths: &[usize],
    opts: &GenOptions,
    allowed: Option<&[Vec<Vec<u32>>]>,
) -> Result<(Vec<Generated>, GenTiming)> {
    let started = std::time::Instant::now();
    let mut timing = GenTiming::default();
    let (b, t, _) = embeds.dims3()?;
    if lengths.len() != b || lengths.iter().any(|&l| l == 0 || l > t) {
        candle_core::bail!("generate: every row needs between 1 and {t} prompt positions");
    }
    let mut sampler = Sampler::new(opts);
    let mut cache = KvCache::new(model.layers.len(), b);
    let mut out: Vec<Vec<u32>> = vec![vec![]; b];
    let mut done: Vec<Option<&'static str>> = vec![None; b];
    let mut texts = vec![String::new(); b];
    // Prefill.
    let hidden = model.forward(
        embeds,
        Step {
            positions: (0..b).flat_map(|_| 0..t).collect(),
            valid: lengths
                .iter()
                .map(|&l| (0..t).map(|i| i < l).collect())
                .collect(),
            segments: None,
            cache: Some(&mut cache),
        },
        None,
    )?;
    let last: Vec<usize> = lengths
        .iter()
        .enumerate()
        .map(|(i, &l)| i * t + l - 1)
        .collect();
    let mut logits = model.logits_at(&hidden, &last)?;
    // Wait for the device before reading the clock (kernels run asynchronously on a GPU).
    model.device().synchronize()?;
    timing.prefill_seconds = started.elapsed().as_secs_f64();
    let decode_started = std::time::Instant::now();
    for step in 0..opts.max_new_tokens {
        let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        let mut next = vec![0u32; b];
        for bi in 0..b {
            if done[bi].is_some() {
                continue;
            }
            let id = match allowed {
                None => sampler.pick(&rows[bi])?,
                Some(a) => {
                    let (ok, _) = trie_next(&a[bi], &out[bi]);
                    let mut masked = vec![f32::NEG_INFINITY; rows[bi].len()];
                    for &t in &ok {
                        if let Some(v) = rows[bi].get(t as usize) {
                            masked[t as usize] = *v;
                        }
                    }
                    // Every allowed logit -inf or NaN (nothing to draw from, or a draw outside the
                    // allowed set): take the first allowed token.
                    match sampler.pick(&masked) {
                        Ok(id) if ok.contains(&id) => id,
                        _ => ok[0],
                    }
                }
            };
            next[bi] = id;
            if tok.eos.contains(&id) {
                done[bi] = Some("eos");
                continue;
            }
            out[bi].push(id);
            let text = tok.decode(&out[bi]).map_err(candle_core::Error::wrap)?;
            if let Some(a) = allowed {
                let (more, complete) = trie_next(&a[bi], &out[bi]);
                if complete && more.is_empty() {
                    let cut = opts.stop.iter().filter_map(|s| text.find(s.as_str())).min();
                    texts[bi] = cut.map_or(text.clone(), |c| text[..c].to_string());
                    done[bi] = Some("stop");
                    continue;
                }
            }
            if let Some(cut) = opts.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                texts[bi] = text[..cut].to_string();
                done[bi] = Some("stop");
            } else {
                texts[bi] = text;
                if out[bi].len() >= opts.max_new_tokens {
                    done[bi] = Some("length");
                }
            }
        }
        if done.iter().all(|d| d.is_some()) || step + 1 == opts.max_new_tokens {
            break;
        }
        let x = model.embed(&next.iter().map(|&i| vec![i]).collect::<Vec<_>>(), None)?;
        let positions: Vec<usize> = (0..b).map(|bi| lengths[bi] + step).collect();
        let hidden = model.forward(
            &x,
            Step {
                positions,
                valid: vec![vec![true]; b],
                segments: None,
                cache: Some(&mut cache),
            },
            None,
        )?;
        logits = model.logits_at(&hidden, &(0..b).collect::<Vec<_>>())?;
        timing.decode_steps += 1;
    }
    model.device().synchronize()?;
    timing.decode_seconds = decode_started.elapsed().as_secs_f64();
    let generated = out
        .into_iter()
        .zip(texts)
        .zip(done)
        .map(|((ids, text), d)| Generated {
            ids,
            text,
            finish: d.unwrap_or("length"),
        })
        .collect();
    Ok((generated, timing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sampler_is_greedy_at_temperature_zero_and_follows_the_softmax_otherwise() {
        let greedy = GenOptions::default();
        assert_eq!(
            Sampler::new(&greedy).pick(&[0.0, 3.0, 3.0, 1.0]).unwrap(),
            1
        );
        // Temperature 1 over logits (0, ln 3): index 1 three times as often as index 0.
        let opts = GenOptions {
            temperature: 1.0,
            seed: 11,
            ..GenOptions::default()
        };
        let mut s = Sampler::new(&opts);
        let logits = [0.0, 3f32.ln()];
        let ones = (0..4000).filter(|_| s.pick(&logits).unwrap() == 1).count();
        assert!((ones as f64 / 4000.0 - 0.75).abs() < 0.03, "{ones} of 4000");
        // The same seed draws the same tokens; another seed other ones.
        let draws = |seed: u64| {
            let mut s = Sampler::new(&GenOptions {
                seed,
                ..opts.clone()
            });
            (0..64)
                .map(|_| s.pick(&[0.0, 0.0, 0.0]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(3), draws(3));
        assert_ne!(draws(3), draws(4));
        // Nucleus sampling keeps only the head of the distribution.
        let mut nucleus = Sampler::new(&GenOptions {
            top_p: 0.5,
            ..opts.clone()
        });
        assert!((0..200).all(|_| nucleus.pick(&[6.0, 0.0, 0.0, 0.0]).unwrap() == 0));
    }

    #[test]
    fn trie_walk_offers_only_continuations() {
        let seqs = vec![vec![1, 2, 3], vec![1, 4], vec![5]];
        let (mut n, c) = trie_next(&seqs, &[]);
        n.sort();
        assert_eq!((n, c), (vec![1, 5], false));
        let (mut n, c) = trie_next(&seqs, &[1]);
        n.sort();
        assert_eq!((n, c), (vec![2, 4], false));
        assert_eq!(trie_next(&seqs, &[1, 4]), (vec![], true));
        assert_eq!(trie_next(&seqs, &[1, 2]), (vec![3], false));
        assert_eq!(trie_next(&seqs, &[9]), (vec![], false));
    }
}
