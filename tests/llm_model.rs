//! The LLM engine on tiny random backbones (no shared files): gradients against finite
//! differences, fused vs composed ops, padding, KV-cache generation, adapter round trips, merging.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use llara::llm::generate::{generate, GenOptions};
use llara::llm::llama::random_weights;
use llara::llm::lora::{self, adapter_vars, LoraConfig, Target};
use llara::llm::{Config, Llama, LlmOptions, LlmTokenizer, Step};
use rand::{Rng, SeedableRng};

const V: usize = 50;

fn tiny(dt: DType) -> Llama {
    let cfg = Config::tiny(V);
    let w = random_weights(&cfg, 7, dt, &Device::Cpu).unwrap();
    Llama::load(&w, &cfg, 4, dt, &Device::Cpu).unwrap()
}

/// Adapters on every target with non-zero B (so both A and B matter).
fn with_adapters(dt: DType) -> Llama {
    let mut m = tiny(dt);
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        rslora: false,
    };
    lora::add_adapters(&mut m, &cfg, 3).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for (name, v) in adapter_vars(&m) {
        if name.contains("lora_B") {
            let n = v.elem_count();
            let vals: Vec<f64> = (0..n).map(|_| rng.random_range(-0.3..0.3)).collect();
            v.set(
                &Tensor::from_vec(vals, v.shape(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(v.dtype())
                    .unwrap(),
            )
            .unwrap();
        }
    }
    m
}

/// The loss, then the gradient of each of `vars` flattened (`what` names the run when one is
/// missing).
fn loss_and_grads(
    l: &Tensor,
    grads: &GradStore,
    vars: Vec<(String, Var)>,
    what: &str,
) -> Vec<Vec<f32>> {
    let mut out = vec![vec![l.to_scalar::<f32>().unwrap()]];
    for (name, v) in vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient ({what})"));
        out.push(g.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

fn rows() -> Vec<Vec<u32>> {
    // Row 1 is shorter (right padding) and uses an added token (id V + 1).
    vec![vec![3, 17, 5, 9, 22, 41], vec![8, V as u32 + 1, 30, 2]]
}

/// Answer-span loss with two injected vectors; returns the loss and the injected-vector `Var`.
fn loss(m: &Llama, inject: &Var) -> Tensor {
    loss_with_dropout(m, inject, 0.0)
}

/// The same with LoRA dropout `p` drawn from a fixed seed.
fn loss_with_dropout(m: &Llama, inject: &Var, p: f64) -> Tensor {
    let rows = rows();
    let t = 6;
    let x = m
        .embed(&rows, Some((&[2, t + 1], inject.as_tensor())))
        .unwrap();
    let mut d = llara::kernels::dropout::Dropout::new(p, rand_chacha::ChaCha8Rng::seed_from_u64(9));
    let h = m
        .forward(&x, Step::padded(&[6, 4], t), (p > 0.0).then_some(&mut d))
        .unwrap();
    m.loss_at(&h, &[3, 4, t + 2], &[5, 9, 2]).unwrap()
}

fn inject_var(dt: DType) -> Var {
    let vals: Vec<f64> = (0..64).map(|i| ((i as f64) * 0.7).sin() * 0.5).collect();
    Var::from_tensor(
        &Tensor::from_vec(vals, (2, 32), &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap(),
    )
    .unwrap()
}

fn values(v: &Var) -> Vec<f64> {
    v.as_tensor()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn lora_and_injected_embedding_gradients_match_finite_differences() {
    let m = with_adapters(DType::F64);
    let inject = inject_var(DType::F64);
    let l = loss(&m, &inject);
    let grads = l.backward().unwrap();
    let mut vars: Vec<(String, Var)> = adapter_vars(&m);
    assert_eq!(vars.len(), 2 * 7 * 2);
    vars.push(("inject".into(), inject.clone()));
    let f = |m: &Llama| loss(m, &inject).to_scalar::<f64>().unwrap();
    let eps = 1e-6;
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name} received no gradient"));
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            g.iter().any(|x| x.abs() > 1e-9),
            "{name}: gradient is all zero"
        );
        let base = values(v);
        for k in [0, base.len() / 2, base.len() - 1] {
            let mut p = base.clone();
            p[k] += eps;
            v.set(&Tensor::from_vec(p.clone(), v.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let up = f(&m);
            p[k] -= 2.0 * eps;
            v.set(&Tensor::from_vec(p, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let down = f(&m);
            v.set(&Tensor::from_vec(base.clone(), v.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let fd = (up - down) / (2.0 * eps);
            assert!(
                (fd - g[k]).abs() <= 1e-6 + 1e-5 * fd.abs().max(g[k].abs()),
                "{name}[{k}]: finite difference {fd} vs backward {}",
                g[k]
            );
        }
    }
}

#[test]
fn fused_f32_path_matches_composed_f64_path() {
    fused_matches_composed(0.0);
}

#[test]
fn fused_f32_path_matches_composed_f64_path_with_lora_dropout() {
    fused_matches_composed(0.3);
}

fn fused_matches_composed(p: f64) {
    let run = |dt: DType| {
        let m = with_adapters(dt);
        let inject = inject_var(dt);
        let l = loss_with_dropout(&m, &inject, p);
        let grads = l.backward().unwrap();
        let mut out = vec![vec![l
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()]];
        let mut vars = adapter_vars(&m);
        vars.push(("inject".into(), inject));
        for (name, v) in vars {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient ({dt:?})"));
            out.push(
                g.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            );
        }
        out
    };
    let (a, b) = (run(DType::F32), run(DType::F64));
    assert_eq!(a.len(), b.len());
    assert!(!a.is_empty());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.len(), y.len());
        let scale = y.iter().fold(0f64, |s, v| s.max(v.abs())).max(1e-3);
        for (p, q) in x.iter().zip(y) {
            assert!((p - q).abs() <= 2e-4 * scale, "{p} vs {q} (scale {scale})");
        }
    }
}

fn all_logits(m: &Llama, rows: &[Vec<u32>], lengths: &[usize]) -> Vec<Vec<f32>> {
    let t = rows.iter().map(|r| r.len()).max().unwrap();
    let x = m.embed(rows, None).unwrap();
    let h = m.forward(&x, Step::padded(lengths, t), None).unwrap();
    let pos: Vec<usize> = lengths
        .iter()
        .enumerate()
        .flat_map(|(b, &l)| (0..l).map(move |i| b * t + i))
        .collect();
    m.logits_at(&h, &pos).unwrap().to_vec2().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn right_padding_does_not_change_real_positions() {
    let m = with_adapters(DType::F32);
    let r = rows();
    let batch = all_logits(
        &m,
        &[r[0].clone(), [r[1].clone(), vec![0, 0]].concat()],
        &[6, 4],
    );
    let alone = [all_logits(&m, &r[..1], &[6]), all_logits(&m, &r[1..], &[4])].concat();
    assert!(
        max_diff(&batch, &alone) < 1e-5,
        "{}",
        max_diff(&batch, &alone)
    );
}

#[test]
fn merged_and_unmerged_forwards_agree() {
    let mut m = with_adapters(DType::F32);
    let r = rows();
    let padded = vec![r[0].clone(), [r[1].clone(), vec![0, 0]].concat()];
    let before = all_logits(&m, &padded, &[6, 4]);
    let base = all_logits(&tiny(DType::F32), &padded, &[6, 4]);
    assert!(
        max_diff(&before, &base) > 1e-3,
        "the adapters must change the output"
    );
    lora::merge(&mut m).unwrap();
    assert!(adapter_vars(&m).is_empty());
    let after = all_logits(&m, &padded, &[6, 4]);
    assert!(
        max_diff(&before, &after) < 1e-5,
        "{}",
        max_diff(&before, &after)
    );
}

#[test]
fn adapter_save_load_round_trip_is_bit_exact() {
    let m = with_adapters(DType::F32);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    lora::save_adapter(&m, &out, "tiny", false).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 2);
    let mut fresh = tiny(DType::F32);
    let read = lora::load_adapter(&mut fresh, &out).unwrap();
    assert_eq!(Some(read), m.lora.clone());
    for ((n1, a), (n2, b)) in adapter_vars(&m).iter().zip(adapter_vars(&fresh)) {
        assert_eq!(n1, &n2);
        let (x, y): (Vec<f32>, Vec<f32>) = (
            a.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            b.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{n1} differs"
        );
    }
    let r = vec![rows()[0].clone()];
    assert_eq!(all_logits(&m, &r, &[6]), all_logits(&fresh, &r, &[6]));
    // Existing output is not overwritten without permission; a wrong shape is reported by name.
    assert!(lora::save_adapter(&m, &out, "tiny", false).is_err());
    let mut other = Llama::load(
        &random_weights(
            &Config {
                intermediate_size: 48,
                ..Config::tiny(V)
            },
            1,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap(),
        &Config {
            intermediate_size: 48,
            ..Config::tiny(V)
        },
        4,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let e = lora::load_adapter(&mut other, &out)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("do not fit"),
        "{e}"
    );
}

fn word_tokenizer() -> LlmTokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..V)
        .map(|i| (format!("w{i}"), serde_json::json!(i)))
        .collect();
    let doc = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}});
    let inner = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&doc).unwrap()).unwrap();
    LlmTokenizer::new(inner, V, None, vec![]).unwrap()
}

#[test]
fn cached_batched_generation_matches_full_recomputation() {
    let m = with_adapters(DType::F32);
    let tok = word_tokenizer();
    let r = rows();
    let padded = vec![r[0].clone(), [r[1].clone(), vec![0, 0]].concat()];
    let x = m.embed(&padded, None).unwrap();
    let opts = GenOptions {
        max_new_tokens: 6,
        ..Default::default()
    };
    let got = generate(&m, &tok, &x, &[6, 4], &opts).unwrap();
    for (b, row) in r.iter().enumerate() {
        // Greedy decoding by re-running the whole sequence at every step.
        let mut seq = row.clone();
        let mut want = vec![];
        for _ in 0..6 {
            let l = all_logits(&m, std::slice::from_ref(&seq), &[seq.len()]);
            let last = l.last().unwrap();
            let next = (0..last.len())
                .fold(0, |best, i| if last[i] > last[best] { i } else { best })
                as u32;
            want.push(next);
            seq.push(next);
        }
        assert_eq!(got[b].ids, want, "row {b}");
        assert_eq!(got[b].finish, "length");
    }
    // A stop string cuts the text and ends the row.
    let first = tok.decode(&got[0].ids[..1]).unwrap();
    let stopped = generate(
        &m,
        &tok,
        &x,
        &[6, 4],
        &GenOptions {
            stop: vec![first.clone()],
            ..opts.clone()
        },
    )
    .unwrap();
    assert_eq!(stopped[0].finish, "stop");
    assert_eq!(stopped[0].text, "");
    // Sampling is reproducible from the seed.
    let s = GenOptions {
        temperature: 0.8,
        top_p: 0.9,
        seed: 5,
        ..opts
    };
    assert_eq!(
        generate(&m, &tok, &x, &[6, 4], &s).unwrap(),
        generate(&m, &tok, &x, &[6, 4], &s).unwrap()
    );
}

#[test]
fn added_tokens_are_single_ids_after_the_vocabulary() {
    let tok = word_tokenizer();
    let ids = tok
        .encode("w3 w4 [HistoryEmb] w5 [ItemEmb]", false)
        .unwrap();
    assert_eq!(ids, vec![3, 4, V as u32 + 1, 5, V as u32 + 3]);
    assert_eq!(tok.added_id("[PH]"), Some(V as u32));
    // Their input rows exist and out-of-range ids are an error, not a panic.
    let m = tiny(DType::F32);
    assert!(m.embed(&[vec![V as u32 + 3]], None).is_ok());
    assert!(m.embed(&[vec![V as u32 + 4]], None).is_err());
}

#[test]
fn activation_checkpointing_gives_the_same_loss_and_gradients() {
    let run = |ckpt: bool| {
        let mut m = with_adapters(DType::F32);
        m.set_checkpointing(ckpt).unwrap();
        let inject = inject_var(DType::F32);
        let l = loss_with_dropout(&m, &inject, 0.3);
        let grads = m.backward(&l).unwrap();
        let mut vars = adapter_vars(&m);
        vars.push(("inject".into(), inject));
        loss_and_grads(&l, &grads, vars, &format!("checkpointing {ckpt}"))
    };
    let (a, b) = (run(false), run(true));
    assert_eq!(a.len(), b.len());
    assert!(!a.is_empty());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(y) {
            assert!((p - q).abs() <= 1e-6 * (1.0 + q.abs()), "{p} vs {q}");
        }
    }
}

/// The composed path (what a GPU or a bf16 model runs, forced here with the fused kernels off)
/// allocates no gradient for any frozen tensor of the model, with and without activation
/// checkpointing, and its loss and adapter gradients equal the fused path's.
#[test]
fn the_composed_path_gives_no_frozen_weight_a_gradient_and_matches_the_fused_one() {
    for ckpt in [false, true] {
        let run = |fused: bool| {
            llara::kernels::with_fused(fused, || {
                let mut m = with_adapters(DType::F32);
                // The switch decides the dispatch of f32 CPU tensors.
                assert_eq!(llara::kernels::fused(&[&m.norm]), fused);
                m.set_checkpointing(ckpt).unwrap();
                let inject = inject_var(DType::F32);
                let l = loss_with_dropout(&m, &inject, 0.0);
                let grads = m.backward(&l).unwrap();
                // The projections' weights as the composed path multiplies them (the same
                // tensor on every call).
                let weights: Vec<Tensor> = m
                    .layers
                    .iter()
                    .flat_map(|l| Target::ALL.map(|t| l.proj(t).weight.tensor().unwrap()))
                    .collect();
                let head = m.lm_head.tensor().unwrap();
                let table = m.embed_tokens.tensor().unwrap();
                let mut frozen = vec![&table, &m.norm, &head];
                for layer in &m.layers {
                    frozen.extend([&layer.input_layernorm, &layer.post_attention_layernorm]);
                }
                frozen.extend(&weights);
                if !fused {
                    for (i, t) in frozen.iter().enumerate() {
                        assert!(
                            grads.get(t).is_none(),
                            "frozen tensor {i} got a gradient (checkpointing {ckpt})"
                        );
                    }
                }
                let mut vars = adapter_vars(&m);
                vars.push(("inject".into(), inject));
                loss_and_grads(&l, &grads, vars, &format!("fused {fused}"))
            })
        };
        let (a, b) = (run(true), run(false));
        assert_eq!(a.len(), b.len());
        assert!(a.len() > 1);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.len(), y.len());
            let scale = y.iter().fold(0f32, |s, v| s.max(v.abs())).max(1e-3);
            for (p, q) in x.iter().zip(y) {
                assert!(
                    (p - q).abs() <= 2e-4 * scale,
                    "{p} vs {q} (checkpointing {ckpt})"
                );
            }
        }
    }
}

/// `--dtype bf16` on the CPU: bf16 projection weights under f32 activations. The fused path (the
/// bf16 GEMM) and the composed one (the weights widened to f32) give the same loss and adapter
/// gradients within bf16's rounding of the activations, and both follow the f32 model whose
/// weights are the same bf16 values; no frozen weight gets a gradient.
#[test]
fn bf16_weights_under_f32_activations_match_the_f32_model_within_rounding() {
    let run = |dt: DType, fused: bool| {
        llara::kernels::with_fused(fused, || {
            // Weights rounded to bf16 first, so that every model holds the same values.
            let cfg = Config::tiny(V);
            let w: std::collections::HashMap<String, Tensor> =
                random_weights(&cfg, 7, DType::F32, &Device::Cpu)
                    .unwrap()
                    .into_iter()
                    .map(|(k, t)| {
                        let r = t.to_dtype(DType::BF16).unwrap();
                        (k, r.to_dtype(dt).unwrap())
                    })
                    .collect();
            let mut m = Llama::load(&w, &cfg, 4, dt, &Device::Cpu).unwrap();
            assert_eq!(m.dtype(), DType::F32);
            assert_eq!(m.weight_dtype(), dt);
            let lora = LoraConfig {
                r: 2,
                alpha: 4.0,
                dropout: 0.0,
                targets: Target::ALL.to_vec(),
                rslora: false,
            };
            lora::add_adapters(&mut m, &lora, 3).unwrap();
            for (name, v) in adapter_vars(&m) {
                if name.contains("lora_B") {
                    let vals: Vec<f32> = (0..v.elem_count())
                        .map(|i| ((i * 37 % 19) as f32 - 9.0) / 30.0)
                        .collect();
                    v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                }
            }
            let inject = inject_var(DType::F32);
            let l = loss_with_dropout(&m, &inject, 0.1);
            let grads = m.backward(&l).unwrap();
            for layer in &m.layers {
                for t in Target::ALL {
                    assert!(
                        grads.get(&layer.proj(t).weight.tensor().unwrap()).is_none(),
                        "{t:?}"
                    );
                }
            }
            loss_and_grads(
                &l,
                &grads,
                adapter_vars(&m),
                &format!("{dt:?}, fused {fused}"),
            )
        })
    };
    let f32_model = run(DType::F32, true);
    let fused = run(DType::BF16, true);
    let composed = run(DType::BF16, false);
    // The fused path repeats itself bit for bit.
    assert_eq!(fused, run(DType::BF16, true));
    for (other, what) in [(&fused, "fused bf16"), (&composed, "composed bf16")] {
        assert_eq!(other.len(), f32_model.len());
        for (x, y) in other.iter().zip(&f32_model) {
            let scale = y.iter().fold(0f32, |s, v| s.max(v.abs())).max(1e-3);
            for (p, q) in x.iter().zip(y) {
                assert!((p - q).abs() <= 2e-2 * scale, "{what}: {p} vs {q}");
            }
        }
    }
}

#[test]
fn builtin_random_loads_any_shape_from_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    std::fs::write(
        &cfg,
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 48, "intermediate_size": 96,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 300, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true}"#,
    )
    .unwrap();
    let spec = format!("builtin:random:{}", cfg.display());
    let l = llara::llm::load(&spec, &LlmOptions::cpu()).unwrap();
    assert_eq!(l.model.layers.len(), 3);
    assert_eq!(l.model.embed_tokens.dims(), (300, 48));
    assert_eq!(l.model.layers[0].proj(Target::K).weight.dims(), (24, 48));
    // A forward pass runs; a missing file is an error naming it.
    let x = l.model.embed(&[vec![1, 2, 3]], None).unwrap();
    let h = l.model.forward(&x, Step::padded(&[3], 3), None).unwrap();
    assert_eq!(h.dims(), &[1, 3, 48]);
    let missing = dir.path().join("nope.json");
    let e = llara::llm::load(
        &format!("builtin:random:{}", missing.display()),
        &LlmOptions::cpu(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("nope.json"), "{e}");
}

#[test]
fn qwen2_style_biases_and_tied_embeddings_load_and_train() {
    let cfg = Config {
        qkv_bias: true,
        tie_word_embeddings: true,
        ..Config::tiny(V)
    };
    let w = random_weights(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
    assert!(!w.contains_key("lm_head.weight"));
    let mut m = Llama::load(&w, &cfg, 4, DType::F32, &Device::Cpu).unwrap();
    let lc = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Target::parse_list("q,v").unwrap(),
        rslora: true,
    };
    lora::add_adapters(&mut m, &lc, 1).unwrap();
    let l = loss(&m, &inject_var(DType::F32));
    assert!(l.to_scalar::<f32>().unwrap().is_finite());
    let g = m.backward(&l).unwrap();
    assert_eq!(adapter_vars(&m).len(), 2 * 2 * 2);
    for (name, v) in adapter_vars(&m) {
        assert!(g.get(v.as_tensor()).is_some(), "{name}");
    }
    // A missing bias is reported by name.
    let mut w2 = w.clone();
    w2.remove("model.layers.1.self_attn.k_proj.bias");
    let e = Llama::load(&w2, &cfg, 4, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.layers.1.self_attn.k_proj.bias"), "{e}");
}

#[test]
fn partial_and_regex_targeted_adapters_round_trip() {
    let mut m = with_adapters(DType::F32);
    // Keep q and v of layer 1 only (PEFT's layers_to_transform + a target subset).
    for (i, layer) in m.layers.iter_mut().enumerate() {
        for t in Target::ALL {
            if i == 0 || !matches!(t, Target::Q | Target::V) {
                layer.proj_mut(t).lora = None;
            }
        }
    }
    m.lora.as_mut().unwrap().targets = vec![Target::Q, Target::V];
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a");
    lora::save_adapter(&m, &out, "tiny", false).unwrap();
    let cfg_path = out.join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    assert_eq!(cfg["layers_to_transform"], serde_json::json!([1]));
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    // PEFT also allows a regular expression for target_modules.
    cfg["target_modules"] = serde_json::json!(r".*\.(q_proj|v_proj)");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut fresh = tiny(DType::F32);
    let read = lora::load_adapter(&mut fresh, &out).unwrap();
    assert_eq!(read.targets, vec![Target::Q, Target::V]);
    assert_eq!(adapter_vars(&fresh).len(), 4);
    assert!(fresh.layers[0].q_proj.lora.is_none() && fresh.layers[1].v_proj.lora.is_some());
    let r = vec![rows()[0].clone()];
    assert_eq!(all_logits(&m, &r, &[6]), all_logits(&fresh, &r, &[6]));
    // Loading twice is refused.
    let e = lora::load_adapter(&mut fresh, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already carries adapters"), "{e}");
}

#[test]
fn fresh_adapters_start_as_the_identity() {
    let base = tiny(DType::F32);
    let m = with_adapters(DType::F32);
    let mut fresh = tiny(DType::F32);
    lora::add_adapters(&mut fresh, m.lora.as_ref().unwrap(), 5).unwrap();
    let r = vec![rows()[0].clone()];
    assert_eq!(all_logits(&base, &r, &[6]), all_logits(&fresh, &r, &[6]));
}

#[test]
fn device_auto_says_what_it_chose_and_why() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llara"))
        .args(["llm", "info", "--llm", "builtin:tiny", "--device", "auto"])
        .env("LLARA_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("--device auto:"))
        .unwrap_or_else(|| panic!("no device line in {err}"));
    if candle_core::utils::cuda_is_available() {
        assert!(
            line.contains("cuda:0") || line.contains("did not start"),
            "{line}"
        );
    } else {
        assert!(
            line.contains("cpu (this llara was built without CUDA"),
            "{line}"
        );
    }
}

/// The streaming random source (`builtin:random`) gives the same weights as the all-at-once
/// table, in whatever order the loader asks, and gives each tensor once.
#[test]
fn random_weights_streamed_in_load_order_equal_the_table() {
    use llara::llm::llama::{RandomWeights, WeightSource};
    let cfg = Config {
        tie_word_embeddings: false,
        qkv_bias: true,
        ..Config::tiny(V)
    };
    for dt in [DType::F32, DType::BF16] {
        let table = random_weights(&cfg, 5, dt, &Device::Cpu).unwrap();
        let stream = RandomWeights::new(&cfg, 5, dt, &Device::Cpu);
        // Ahead of the stream's order first (a layer's projections before its second norm).
        let mut names: Vec<&String> = table.keys().collect();
        names.sort_by_key(|n| (n.contains("norm"), n.to_string()));
        for n in names {
            let got = stream.tensor(n).unwrap().expect("present");
            let want = &table[n];
            assert_eq!(got.dims(), want.dims(), "{n}");
            let d = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(d, 0.0, "{n} {dt:?}");
        }
        assert!(stream.tensor("model.norm.weight").unwrap().is_none());
        assert!(stream.tensor("no.such.tensor").unwrap().is_none());
        // Loading from the stream gives the table's model.
        let a = Llama::load(
            &RandomWeights::new(&cfg, 5, dt, &Device::Cpu),
            &cfg,
            2,
            dt,
            &Device::Cpu,
        )
        .unwrap();
        let b = Llama::load(&table, &cfg, 2, dt, &Device::Cpu).unwrap();
        let rows = vec![vec![1u32, 2, 3, 4]];
        let h = |m: &Llama| {
            let x = m.embed(&rows, None).unwrap();
            m.forward(&x, Step::padded(&[4], 4), None)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(h(&a), h(&b), "{dt:?}");
    }
}

/// A backbone whose estimated peak does not fit the memory available is refused before any
/// weight is made, with the estimate, what is available and a setting that fits (or that none
/// does); one that fits runs.
#[test]
fn a_model_that_cannot_fit_is_refused_before_loading_with_a_suggestion() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/llama2-7b.json");
    let run = |limit: &str, extra: &[&str], llm: &str| {
        let mut args = vec![
            "llm",
            "bench",
            "--llm",
            llm,
            "--batch",
            "1",
            "--seq-len",
            "512",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--gen-prompt-len",
            "4",
            "--gen-new-tokens",
            "2",
            "--threads",
            "1",
        ];
        args.extend(extra);
        let started = std::time::Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_llara"))
            .args(&args)
            .env("LLARA_MEMORY_LIMIT", limit)
            .output()
            .unwrap();
        (out, started.elapsed())
    };
    let spec = format!("builtin:random:{cfg}");
    // bf16 weights alone are 14 GB: in 8 GiB only 4-bit blocks with checkpointing fit.
    let (out, took) = run("8G", &["--dtype", "bf16"], &spec);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("estimated peak memory"), "{err}");
    assert!(
        err.contains("exceeds the 8.59 GB available (LLARA_MEMORY_LIMIT=8G)"),
        "{err}"
    );
    assert!(
        err.contains("--dtype q4_k --checkpoint-layers at batch 1 would fit"),
        "{err}"
    );
    // Nothing fits in 3 GiB.
    let (out, _) = run("3G", &["--dtype", "bf16"], &spec);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no setting of --dtype, batch or --checkpoint-layers fits"),
        "{err}"
    );
    // Refused from the config alone: making 6.7 B random weights would take minutes.
    assert!(took.as_secs() < 30, "{took:?}");
    // f32 without checkpointing does not fit in 18 GiB; bf16 with checkpointing does where the
    // CPU multiplies bf16 weights as they are (AVX512-BF16); elsewhere they are widened to f32
    // (4 bytes each) and the 4-bit blocks are the suggestion.
    let (out, _) = run("18G", &["--dtype", "f32"], &spec);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let want = if llara::kernels::bf16::kernel() == llara::kernels::bf16::Kernel::Avx512Bf16 {
        "--dtype bf16 --checkpoint-layers would fit"
    } else {
        "--dtype q4_k would fit"
    };
    assert!(err.contains(want), "{err}");
    // The tiny backbone fits and runs.
    let (out, _) = run("8G", &["--answer-len", "4"], "builtin:tiny");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
