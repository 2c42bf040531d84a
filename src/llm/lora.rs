//! LoRA adapters on a [`Llama`] in PEFT's layout (the adapter types themselves are in
//! [`super::adapter`]): `lora_A [r, in]` (Kaiming-uniform), `lora_B [out, r]` (zero),
//! `Δy = (dropout(x) Aᵀ) Bᵀ · alpha/r`, saved as `adapter_config.json` +
//! `adapter_model.safetensors` with PEFT's tensor names, so adapters move between llara and Python.

pub use super::adapter::{Lora, LoraConfig, Target};
use super::llama::Llama;
use super::LlmError;
use candle_core::{DType, Result as CResult, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// PEFT's tensor name prefix of a projection.
pub fn peft_name(layer: usize, t: Target) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}",
        t.parent(),
        t.module()
    )
}

fn adapter_dtype(model: &Llama) -> DType {
    if model.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Adds fresh adapters (PEFT's initialisation, seeded): A ~ U(±1/√in), B = 0.
pub fn add_adapters(model: &mut Llama, cfg: &LoraConfig, seed: u64) -> CResult<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4c6f_5241);
    let dt = adapter_dtype(model);
    let dev = model.device().clone();
    let scale = cfg.scale();
    for layer in model.layers.iter_mut() {
        for &t in &cfg.targets {
            let p = layer.proj_mut(t);
            let (out, inp) = p.weight.dims();
            // kaiming_uniform_(a=√5): bound = √(6 / ((1 + 5)·fan_in)) = 1/√fan_in.
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f64> = (0..cfg.r * inp)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let a = Tensor::from_vec(a, (cfg.r, inp), &dev)?.to_dtype(dt)?;
            let b = Tensor::zeros((out, cfg.r), dt, &dev)?;
            p.lora = Some(Lora {
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
                scale,
            });
        }
    }
    model.lora = Some(cfg.clone());
    Ok(())
}

/// Every adapter tensor with its PEFT name (`….lora_A.weight`), in a fixed order.
pub fn adapter_vars(model: &Llama) -> Vec<(String, Var)> {
    let mut out = vec![];
    for (i, layer) in model.layers.iter().enumerate() {
        for t in Target::ALL {
            if let Some(l) = &layer.proj(t).lora {
                let p = peft_name(i, t);
                out.push((format!("{p}.lora_A.weight"), l.a.clone()));
                out.push((format!("{p}.lora_B.weight"), l.b.clone()));
            }
        }
    }
    out
}

#[derive(Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    #[serde(default)]
    task_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: serde_json::Value,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    init_lora_weights: serde_json::Value,
}

/// Reads `adapter_config.json` into a [`LoraConfig`], rejecting PEFT features llara does not run.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig, LlmError> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| LlmError::io(&path, e))?;
    let bad = |msg: String| LlmError::Adapter {
        path: path.clone(),
        msg,
    };
    let c: PeftConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if c.peft_type != "LORA" {
        return Err(bad(format!(
            "peft_type {:?}, expected \"LORA\"",
            c.peft_type
        )));
    }
    if c.use_dora || c.fan_in_fan_out || !c.rank_pattern.is_empty() || !c.alpha_pattern.is_empty() {
        return Err(bad(
            "DoRA, fan_in_fan_out, rank_pattern and alpha_pattern are not supported".into(),
        ));
    }
    if matches!(c.bias.as_deref(), Some(b) if b != "none") {
        return Err(bad(format!(
            "bias {:?} is not supported (expected \"none\")",
            c.bias
        )));
    }
    if !matches!(&c.modules_to_save, None | Some(serde_json::Value::Null)) {
        return Err(bad("modules_to_save is not supported".into()));
    }
    let targets = match &c.target_modules {
        serde_json::Value::Array(a) => {
            let names: Vec<&str> = a.iter().filter_map(|v| v.as_str()).collect();
            Target::parse_list(&names.join(",")).map_err(|e| bad(e.to_string()))?
        }
        serde_json::Value::String(s) if s == "all-linear" => Target::ALL.to_vec(),
        // A regular expression over module names: the adapter file says which modules it covers.
        serde_json::Value::String(_) => vec![],
        other => return Err(bad(format!("target_modules {other} is not supported"))),
    };
    Ok(LoraConfig {
        r: c.r,
        alpha: c.lora_alpha,
        dropout: c.lora_dropout,
        targets,
        rslora: c.use_rslora,
    })
}

/// Loads a PEFT adapter folder onto `model` (which must not carry adapters yet). The adapted
/// projections are the ones the file holds (so `target_modules` given as a regular expression and
/// `layers_to_transform` work); every `lora_A` needs its `lora_B`, shapes must fit the backbone,
/// and any other tensor is an error.
pub fn load_adapter(model: &mut Llama, dir: &Path) -> Result<LoraConfig, LlmError> {
    let mut cfg = read_adapter_config(dir)?;
    let path = dir.join("adapter_model.safetensors");
    let bad = |msg: String| LlmError::Adapter {
        path: path.clone(),
        msg,
    };
    if model.lora.is_some() {
        return Err(bad("the model already carries adapters".into()));
    }
    if !path.exists() {
        return Err(bad(
            "file not found (adapter_model.bin is not read; convert it to safetensors)".into(),
        ));
    }
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
        .map_err(|e| bad(e.to_string()))?;
    let n_layers = model.layers.len();
    type Pair = (Option<(String, Tensor)>, Option<(String, Tensor)>);
    let mut pairs: std::collections::BTreeMap<(usize, Target), Pair> = Default::default();
    for (name, t) in tensors {
        // PEFT may store the adapter name (`lora_A.default.weight`): accept both.
        let key = name.replace(".default.weight", ".weight");
        let parsed = (|| {
            let rest = key.strip_prefix("base_model.model.model.layers.")?;
            let (layer, rest) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let (parent, rest) = rest.split_once('.')?;
            let (module, kind) = rest.split_once('.')?;
            let t =
                Target::parse(module).filter(|t| t.parent() == parent && module == t.module())?;
            let is_a = match kind {
                "lora_A.weight" => true,
                "lora_B.weight" => false,
                _ => return None,
            };
            Some((layer, t, is_a))
        })();
        let Some((layer, target, is_a)) = parsed else {
            return Err(bad(format!(
                "unexpected tensor {name} (expected base_model.model.model.layers.N.<self_attn|mlp>.<module>.lora_<A|B>.weight)"
            )));
        };
        if layer >= n_layers {
            return Err(bad(format!(
                "tensor {name}: the backbone has {n_layers} layers"
            )));
        }
        let slot = pairs.entry((layer, target)).or_default();
        if is_a {
            slot.0 = Some((name, t));
        } else {
            slot.1 = Some((name, t));
        }
    }
    if pairs.is_empty() {
        return Err(bad("no LoRA tensors".into()));
    }
    let dt = adapter_dtype(model);
    let dev = model.device().clone();
    let mut targets = vec![];
    for ((layer, target), (a, b)) in pairs {
        let prefix = peft_name(layer, target);
        let (Some((an, a)), Some((bn, b))) = (a, b) else {
            return Err(bad(format!(
                "{prefix}: lora_A and lora_B must both be present"
            )));
        };
        let p = model.layers[layer].proj_mut(target);
        let (out, inp) = p.weight.dims();
        let r = a.dim(0).map_err(|e| bad(e.to_string()))?;
        if a.dims() != [r, inp] || b.dims() != [out, r] {
            return Err(bad(format!(
                "tensors {an} {:?} and {bn} {:?} do not fit the projection [{out}, {inp}] (expected [r, {inp}] and [{out}, r])",
                a.dims(),
                b.dims()
            )));
        }
        if r != cfg.r {
            return Err(bad(format!(
                "tensor {an} has rank {r}, adapter_config.json says r = {}",
                cfg.r
            )));
        }
        let conv = |t: Tensor| -> Result<Var, LlmError> {
            let t = t
                .to_dtype(dt)
                .and_then(|t| t.to_device(&dev))
                .map_err(|e| bad(e.to_string()))?;
            Var::from_tensor(&t).map_err(|e| bad(e.to_string()))
        };
        p.lora = Some(Lora {
            a: conv(a)?,
            b: conv(b)?,
            scale: cfg.scale(),
        });
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    targets.sort();
    cfg.targets = targets;
    model.lora = Some(cfg.clone());
    Ok(cfg)
}

/// Writes the model's adapters as a PEFT folder at `dir` (temporary folder renamed at the end).
pub fn save_adapter(
    model: &Llama,
    dir: &Path,
    base_model: &str,
    overwrite: bool,
) -> Result<(), LlmError> {
    let cfg = model.lora.as_ref().ok_or_else(|| LlmError::Adapter {
        path: dir.to_path_buf(),
        msg: "the model carries no adapters".into(),
    })?;
    let staged = crate::fsutil::StagedDir::new(dir, overwrite).map_err(|e| LlmError::io(dir, e))?;
    let mut targets: Vec<&str> = cfg.targets.iter().map(|t| t.module()).collect();
    targets.sort();
    let adapted: Vec<usize> = (0..model.layers.len())
        .filter(|&i| {
            Target::ALL
                .iter()
                .any(|&t| model.layers[i].proj(t).lora.is_some())
        })
        .collect();
    let layers_to_transform =
        (adapted.len() != model.layers.len()).then(|| serde_json::json!(adapted));
    let pc = PeftConfig {
        peft_type: "LORA".into(),
        task_type: Some("CAUSAL_LM".into()),
        r: cfg.r,
        lora_alpha: cfg.alpha,
        lora_dropout: cfg.dropout,
        target_modules: serde_json::json!(targets),
        bias: Some("none".into()),
        fan_in_fan_out: false,
        use_rslora: cfg.rslora,
        use_dora: false,
        rank_pattern: Default::default(),
        alpha_pattern: Default::default(),
        layers_to_transform,
        modules_to_save: None,
        base_model_name_or_path: Some(base_model.to_string()),
        inference_mode: true,
        init_lora_weights: serde_json::Value::Bool(true),
    };
    let cpath = staged.path().join("adapter_config.json");
    let json = serde_json::to_string_pretty(&pc).expect("serialisable");
    std::fs::write(&cpath, json + "\n").map_err(|e| LlmError::io(&cpath, e))?;
    let tensors: HashMap<String, Tensor> = adapter_vars(model)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let wpath = staged.path().join("adapter_model.safetensors");
    candle_core::safetensors::save(&tensors, &wpath).map_err(|e| LlmError::Adapter {
        path: wpath.clone(),
        msg: e.to_string(),
    })?;
    staged.commit().map_err(|e| LlmError::io(dir, e))?;
    Ok(())
}

/// Folds every adapter into its base weight (`W + scale · B A`) and drops the adapters; an
/// adapter on a weight kept in blocks stays unmerged (the sum would be rounded to the blocks).
pub fn merge(model: &mut Llama) -> CResult<()> {
    // Every weight is unpacked, summed and packed again once: give those buffers back as we go.
    crate::kernels::alloc::releasing(|| merge_all(model))
}

fn merge_all(model: &mut Llama) -> CResult<()> {
    for layer in model.layers.iter_mut() {
        for t in Target::ALL {
            let p = layer.proj_mut(t);
            let Some(l) = p.lora.take() else {
                continue;
            };
            match p.weight.merged(l.b.as_tensor(), l.a.as_tensor(), l.scale)? {
                Some(w) => p.weight = w,
                // Blocks would round the adapter's product away: it stays beside the weight.
                None => p.lora = Some(l),
            }
        }
    }
    let kept = model
        .layers
        .iter()
        .any(|l| Target::ALL.iter().any(|&t| l.proj(t).lora.is_some()));
    if !kept {
        model.lora = None;
    }
    Ok(())
}
