//! PEFT's adapter format (`adapter_config.json` + `adapter_model.safetensors`), for LN
//! tuning: what `lntune export peft` writes and what `--adapter` reads when a directory
//! holds a PEFT adapter. Keys are PEFT 0.21's as it saves an `LN_TUNING` model of
//! transformers 5: `base_model.model.<module>.ln_tuning_layers.weight` for a norm, the
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
use crate::model::params::{KeyPrefixes, Role};
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

/// An lntune LN-tuning adapter (its method and tensors, set on `model`) in PEFT's format.
pub fn to_peft(
    model: &mut Mllm,
    method: &MethodConfig,
    trained: &[String],
    base_name: &str,
) -> Result<PeftAdapter> {
    if !matches!(method.method, Method::Ln | Method::LnSimple) {
        bail!(
            "export peft: method `{}` is not exported yet (ln and ln-simple are)",
            method.method.name()
        );
    }
    let keys = model.keys.clone();
    let Some(paths) = hf_paths(&keys) else {
        bail!(
            "export peft: {} is a composed model that transformers cannot load, so PEFT cannot apply an adapter to it",
            model.source.display()
        );
    };
    let roles: HashMap<String, Role> = model
        .param_specs()
        .into_iter()
        .map(|s| (s.name, s.role))
        .collect();
    let mut tensors = HashMap::new();
    let mut targets: Vec<&str> = Vec::new();
    for name in trained {
        let role = *roles
            .get(name)
            .with_context(|| format!("export peft: `{name}` is not a parameter of the model"))?;
        let target = target_name(role).with_context(|| {
            format!("export peft: `{name}` ({role:?}) is not a tensor LN tuning trains")
        })?;
        if !targets.contains(&target) {
            targets.push(target);
        }
        let hf = hf_param(&keys, &paths, name)
            .with_context(|| format!("export peft: `{name}` has no transformers path"))?;
        let value = model
            .param(name)
            .with_context(|| format!("export peft: `{name}` is missing from the model"))?
            .to_dtype(DType::F32)?;
        tensors.insert(ln_tuning_key(role, &hf), value);
    }
    // PEFT saves the base weight of a wrapped embedding or head too; those are the base
    // model's values, which `trained` replaced on `model`: read them from the checkpoint
    // when writing (see `jobs`), here only the keys are named
    let config = json!({
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
    });
    Ok(PeftAdapter { config, tensors })
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

/// Reads a PEFT `LN_TUNING` adapter for `model`: the method it amounts to and its tensors
/// under the model's checkpoint names (base-layer copies skipped).
pub fn read_peft(dir: &Path, model: &Mllm) -> Result<(MethodConfig, Vec<(String, Tensor)>)> {
    let cfg_path = dir.join("adapter_config.json");
    let cfg: serde_json::Value = read_json(&cfg_path)?;
    let kind = cfg["peft_type"].as_str().unwrap_or("");
    if kind != "LN_TUNING" {
        bail!(
            "{}: field `peft_type` is `{kind}`; lntune reads PEFT adapters of type LN_TUNING",
            cfg_path.display()
        );
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
        let hf = if let Some((module, sub)) = rest.split_once(".ln_tuning_layers.default.") {
            format!("{module}.{sub}")
        } else if let Some((module, sub)) = rest.split_once(".ln_tuning_layers.") {
            format!("{module}.{sub}")
        } else {
            bail!(
                "{}: tensor `{key}` is not an LN-tuning tensor",
                file.display()
            );
        };
        let Some((name, role)) = by_hf.get(&hf) else {
            bail!(
                "{}: tensor `{key}` has no place in {}",
                file.display(),
                model.source.display()
            );
        };
        let value = store.load_any(&key)?.to_dtype(DType::F32)?;
        let values = value.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = values.iter().find(|x| !x.is_finite()) {
            bail!(
                "{}: tensor `{key}` holds {bad}; an adapter must hold finite values",
                file.display()
            );
        }
        roles.push(*role);
        tensors.push((name.clone(), value));
    }
    let has = |r: Role| roles.contains(&r);
    let mut method = MethodConfig::new(
        if has(Role::Embed) || has(Role::Head) || has(Role::Projector) {
            Method::Ln
        } else {
            Method::LnSimple
        },
    );
    method.final_norm = has(Role::FinalNorm);
    method.train_embed = has(Role::Embed);
    method.train_head = has(Role::Head);
    method.train_projector = has(Role::Projector);
    Ok((method, tensors))
}
