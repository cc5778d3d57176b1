//! PEFT's adapter format (`adapter_config.json` + `adapter_model.safetensors`) for LN
//! tuning and LoRA: what `lntune export peft` writes and what `--adapter` reads when a
//! directory holds a PEFT adapter. LoRA factors are `base_model.model.<linear>.lora_A.weight`
//! and the modules it saves whole are under their plain paths. Keys of an `LN_TUNING`
//! model of transformers 5 are `base_model.model.<module>.ln_tuning_layers.weight` for a norm, the
//! embeddings and the head (whose untouched base weight PEFT also saves, as
//! `<module>.base_layer.weight`), and `…multi_modal_projector.ln_tuning_layers.default.<sub>`
//! for the projector's tensors (PEFT keeps the adapter name inside container modules).
//! Module paths are transformers 5's, whatever layout the checkpoint's keys use.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor};
use serde_json::json;

use super::{Method, MethodConfig};
use crate::model::mllm::Mllm;
use crate::model::params::{KeyPrefixes, ParamSpec, Role};
use crate::util::files::read_json;

/// The PEFT version whose saved format this module writes and reads.
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

const WRAP: &str = "base_model.model.";

/// Module-path prefixes of the model in transformers 5: the decoder body, the head's
/// parameter, the projector (None for a text-only model).
struct HfPaths {
    body: &'static str,
    head: &'static str,
    projector: Option<&'static str>,
}

fn hf_paths(keys: &KeyPrefixes) -> Option<HfPaths> {
    if keys.projector.ends_with("multi_modal_projector") {
        // llava-hf in either key layout
        Some(HfPaths {
            body: "model.language_model",
            head: "lm_head.weight",
            projector: Some("model.multi_modal_projector"),
        })
    } else if keys.projector.is_empty() && keys.llm_body == "model" {
        Some(HfPaths {
            body: "model",
            head: "lm_head.weight",
            projector: None,
        })
    } else {
        None
    }
}

/// The transformers 5 parameter path of checkpoint key `name`.
fn hf_param(keys: &KeyPrefixes, p: &HfPaths, name: &str) -> Option<String> {
    if name == keys.lm_head {
        return Some(p.head.to_string());
    }
    if let Some(rest) = name.strip_prefix(&format!("{}.", keys.llm_body)) {
        return Some(format!("{}.{rest}", p.body));
    }
    let rest = name.strip_prefix(&format!("{}.", keys.projector))?;
    Some(format!("{}.{rest}", p.projector?))
}

/// The PEFT module name of a role (its `target_modules` entry).
fn target_name(role: Role) -> Option<&'static str> {
    Some(match role {
        Role::InputNorm => "input_layernorm",
        Role::PostAttnNorm => "post_attention_layernorm",
        Role::FinalNorm => "norm",
        Role::Embed => "embed_tokens",
        Role::Head => "lm_head",
        Role::Projector => "multi_modal_projector",
        _ => return None,
    })
}

/// The key PEFT saves a trained tensor under, given its transformers path and role.
fn ln_tuning_key(role: Role, hf: &str) -> String {
    match role {
        Role::Projector => {
            let (module, sub) = hf
                .split_once("multi_modal_projector.")
                .map(|(a, b)| (format!("{a}multi_modal_projector"), b.to_string()))
                .unwrap_or_else(|| (hf.to_string(), String::new()));
            format!("{WRAP}{module}.ln_tuning_layers.default.{sub}")
        }
        _ => {
            let module = hf.strip_suffix(".weight").unwrap_or(hf);
            format!("{WRAP}{module}.ln_tuning_layers.weight")
        }
    }
}

/// A PEFT adapter directory: config and tensors, ready to write.
pub struct PeftAdapter {
    pub config: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
}

/// An lntune adapter (its method, and its tensors set on `model`) in PEFT's format:
/// `LN_TUNING` for ln and ln-simple, `LORA` for lora (the projector, embeddings and head it
/// trains as PEFT's `modules_to_save`).
pub fn to_peft(
    model: &mut Mllm,
    method: &MethodConfig,
    specs: &[ParamSpec],
    trained: &[String],
    base_name: &str,
) -> Result<PeftAdapter> {
    let lora = match method.method {
        Method::Ln | Method::LnSimple => false,
        Method::Lora => true,
        other => bail!(
            "export peft: method `{}` has no PEFT counterpart here (ln, ln-simple and lora do)",
            other.name()
        ),
    };
    let keys = model.keys.clone();
    let Some(paths) = hf_paths(&keys) else {
        bail!(
            "export peft: {} is a composed model that transformers cannot load, so PEFT cannot apply an adapter to it",
            model.source.display()
        );
    };
    let roles: HashMap<&str, Role> = specs.iter().map(|s| (s.name.as_str(), s.role)).collect();
    let mut tensors = HashMap::new();
    let mut targets: Vec<&str> = Vec::new();
    for name in trained {
        let role = *roles
            .get(name.as_str())
            .with_context(|| format!("export peft: `{name}` is not a parameter of the model"))?;
        let hf = hf_param(&keys, &paths, name)
            .with_context(|| format!("export peft: `{name}` has no transformers path"))?;
        let value = model
            .param(name)
            .with_context(|| format!("export peft: `{name}` is missing from the model"))?
            .to_dtype(DType::F32)?;
        let target = target_name(role);
        let key = match (lora, role) {
            (_, Role::LoraA | Role::LoraB) => format!("{WRAP}{hf}"),
            (true, _) => format!("{WRAP}{hf}"),
            (false, _) => ln_tuning_key(role, &hf),
        };
        if let Some(t) = target
            && !targets.contains(&t)
        {
            targets.push(t);
        } else if target.is_none() && !matches!(role, Role::LoraA | Role::LoraB) {
            bail!("export peft: `{name}` ({role:?}) has no PEFT module to save it in");
        }
        tensors.insert(key, value);
    }
    let config = if lora {
        lora_config(method, base_name, &targets, &paths)
    } else {
        json!({
            "auto_mapping": null,
            "base_model_name_or_path": base_name,
            "exclude_modules": null,
            "inference_mode": true,
            "modules_to_save": null,
            "peft_type": "LN_TUNING",
            "peft_version": PEFT_FORMAT_VERSION,
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
        })
    };
    Ok(PeftAdapter { config, tensors })
}

/// The linear names PEFT's module paths use for lntune's LoRA targets.
const LORA_MODULES: [(&str, &str); 7] = [
    ("q", "self_attn.q_proj"),
    ("k", "self_attn.k_proj"),
    ("v", "self_attn.v_proj"),
    ("o", "self_attn.o_proj"),
    ("gate", "mlp.gate_proj"),
    ("up", "mlp.up_proj"),
    ("down", "mlp.down_proj"),
];

/// PEFT's LoRA config: target_modules as a regex over the decoder's layers (a list of
/// names would also match the vision tower's q/k/v projections).
fn lora_config(
    method: &MethodConfig,
    base_name: &str,
    saved: &[&str],
    paths: &HfPaths,
) -> serde_json::Value {
    let alts: Vec<String> = LORA_MODULES
        .iter()
        .filter(|(t, _)| method.lora.targets.iter().any(|x| x == t))
        .map(|(_, m)| regex::escape(m))
        .collect();
    let regex = format!(
        r".*{}\.layers\.\d+\.({})",
        regex::escape(paths.body.rsplit('.').next().unwrap_or("model")),
        alts.join("|")
    );
    let saved: Vec<&str> = saved.to_vec();
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_name,
        "bias": "none",
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": method.lora.alpha,
        "lora_bias": false,
        "lora_dropout": method.lora.dropout,
        "modules_to_save": if saved.is_empty() { serde_json::Value::Null } else { json!(saved) },
        "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION,
        "r": method.lora.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": regex,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": false,
    })
}

/// The `base_layer` keys PEFT saves beside a trained embedding or head, with the checkpoint
/// names whose base values go there.
pub fn base_layer_keys(model: &Mllm, trained: &[String]) -> Result<Vec<(String, String)>> {
    let keys = &model.keys;
    let Some(paths) = hf_paths(keys) else {
        return Ok(vec![]);
    };
    let roles: HashMap<String, Role> = model
        .param_specs()
        .into_iter()
        .map(|s| (s.name, s.role))
        .collect();
    let mut out = Vec::new();
    for name in trained {
        if matches!(roles.get(name), Some(Role::Embed | Role::Head)) {
            let hf = hf_param(keys, &paths, name).context("no transformers path")?;
            let module = hf.strip_suffix(".weight").unwrap_or(&hf).to_string();
            out.push((format!("{WRAP}{module}.base_layer.weight"), name.clone()));
        }
    }
    Ok(out)
}

/// Whether `dir` holds a PEFT adapter (and not an lntune one).
pub fn is_peft_dir(dir: &Path) -> bool {
    dir.join("adapter_config.json").is_file() && !dir.join("adapter.json").exists()
}

/// Reads a PEFT adapter (`LN_TUNING` or `LORA`) for `model`: the method it amounts to and
/// its tensors under the model's checkpoint names (PEFT's copies of base weights skipped).
pub fn read_peft(dir: &Path, model: &Mllm) -> Result<(MethodConfig, Vec<(String, Tensor)>)> {
    let cfg_path = dir.join("adapter_config.json");
    let cfg: serde_json::Value = read_json(&cfg_path)?;
    let kind = cfg["peft_type"].as_str().unwrap_or("");
    let lora = match kind {
        "LN_TUNING" => false,
        "LORA" => true,
        _ => bail!(
            "{}: field `peft_type` is `{kind}`; lntune reads PEFT adapters of type LN_TUNING and LORA",
            cfg_path.display()
        ),
    };
    if lora {
        for (field, plain) in [
            ("use_dora", json!(false)),
            ("use_rslora", json!(false)),
            ("bias", json!("none")),
        ] {
            if cfg.get(field).is_some_and(|v| *v != plain && !v.is_null()) {
                bail!(
                    "{}: field `{field}` is {}; lntune's LoRA is plain LoRA ({field} {plain})",
                    cfg_path.display(),
                    cfg[field]
                );
            }
        }
    }
    let keys = &model.keys;
    let Some(paths) = hf_paths(keys) else {
        bail!(
            "{}: a PEFT adapter applies to a transformers model; {} is a composed model",
            dir.display(),
            model.source.display()
        );
    };
    // transformers path -> (checkpoint name, role)
    let mut by_hf: HashMap<String, (String, Role)> = HashMap::new();
    for s in model.param_specs() {
        if let Some(hf) = hf_param(keys, &paths, &s.name) {
            by_hf.insert(hf, (s.name, s.role));
        }
    }
    let file = dir.join("adapter_model.safetensors");
    let mut store = crate::io::store::Store::new(&candle_core::Device::Cpu);
    store.add_safetensors(&file)?;
    let mut tensors = Vec::new();
    let mut roles = Vec::new();
    let mut lora_targets: Vec<String> = Vec::new();
    for key in store.keys() {
        if key.contains(".base_layer.") {
            continue;
        }
        let Some(rest) = key.strip_prefix(WRAP) else {
            bail!(
                "{}: tensor `{key}` does not start with `{WRAP}`",
                file.display()
            );
        };
        let unplaced = || {
            anyhow::anyhow!(
                "{}: tensor `{key}` has no place in {}",
                file.display(),
                model.source.display()
            )
        };
        let (name, role) = if let Some((module, ab)) = rest
            .strip_suffix(".weight")
            .and_then(|r| r.rsplit_once('.'))
            .filter(|(_, ab)| lora && (*ab == "lora_A" || *ab == "lora_B"))
        {
            // a LoRA factor of the decoder linear `module`
            let (base, role) = by_hf
                .get(&format!("{module}.weight"))
                .ok_or_else(unplaced)?;
            let target = LORA_MODULES
                .iter()
                .find(|(_, m)| module.ends_with(m))
                .map(|(t, _)| *t)
                .filter(|_| role.is_attention() || role.is_mlp())
                .ok_or_else(unplaced)?;
            if !lora_targets.iter().any(|t| t == target) {
                lora_targets.push(target.to_string());
            }
            let stem = base.strip_suffix(".weight").unwrap_or(base);
            let r = if ab == "lora_A" {
                Role::LoraA
            } else {
                Role::LoraB
            };
            (format!("{stem}.{ab}.weight"), r)
        } else {
            let hf = if lora {
                rest.to_string()
            } else if let Some((module, sub)) = rest.split_once(".ln_tuning_layers.default.") {
                format!("{module}.{sub}")
            } else if let Some((module, sub)) = rest.split_once(".ln_tuning_layers.") {
                format!("{module}.{sub}")
            } else {
                bail!(
                    "{}: tensor `{key}` is not an LN-tuning tensor",
                    file.display()
                );
            };
            let (name, role) = by_hf.get(&hf).ok_or_else(unplaced)?;
            (name.clone(), *role)
        };
        let value = store.load_any(&key)?.to_dtype(DType::F32)?;
        let values = value.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = values.iter().find(|x| !x.is_finite()) {
            bail!(
                "{}: tensor `{key}` holds {bad}; an adapter must hold finite values",
                file.display()
            );
        }
        roles.push(role);
        tensors.push((name, value));
    }
    let has = |r: Role| roles.contains(&r);
    let mut method = if lora {
        let mut m = MethodConfig::new(Method::Lora);
        let number = |field: &str| {
            cfg[field].as_f64().ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: field `{field}` is missing or not a number",
                    cfg_path.display()
                )
            })
        };
        let r = number("r")?;
        if r < 1.0 || r.fract() != 0.0 {
            bail!(
                "{}: field `r` is {r}, not a positive integer",
                cfg_path.display()
            );
        }
        m.lora.r = r as usize;
        m.lora.alpha = number("lora_alpha")?;
        if !(m.lora.alpha.is_finite() && m.lora.alpha > 0.0) {
            bail!(
                "{}: field `lora_alpha` must be a positive number",
                cfg_path.display()
            );
        }
        m.lora.dropout = cfg["lora_dropout"].as_f64().unwrap_or(0.0);
        m.lora.targets = lora_targets;
        m
    } else if has(Role::Embed) || has(Role::Head) || has(Role::Projector) {
        MethodConfig::new(Method::Ln)
    } else {
        MethodConfig::new(Method::LnSimple)
    };
    method.final_norm = has(Role::FinalNorm);
    method.train_embed = has(Role::Embed);
    method.train_head = has(Role::Head);
    method.train_projector = has(Role::Projector);
    Ok((method, tensors))
}
