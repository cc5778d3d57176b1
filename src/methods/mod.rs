//! Finetuning methods. A method is data: a rule that marks parameters trainable (and, for
//! LoRA, adds adapters), applied to the model's parameter list, which is derived from the
//! configs alone so that `lntune plan` works without weights.
//!
//! Every parameter is named by its checkpoint key and carries a `Role` read off that key's
//! structure (`<body>.layers.{i}.self_attn.q_proj.weight` is `Role::Q` of layer i). A method's
//! rule is over roles; `--include` / `--exclude` regexes over names refine it. The vision
//! tower is always frozen.

pub mod adapter;
pub mod peft;
pub mod setup;
pub mod swap;

use anyhow::{Result, bail};
use clap::ValueEnum;
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::model::params::{KeyPrefixes, ParamSpec, Role};

/// The methods of the paper's comparison, as CLI values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// the paper's LayerNorm tuning: block norms + final norm, projector, embed_tokens, lm_head
    Ln,
    /// only the decoder's norm weights
    LnSimple,
    /// every decoder weight + projector
    Full,
    /// LoRA adapters on chosen decoder linears + projector, embed_tokens, lm_head
    Lora,
    /// q_proj, v_proj + projector, embed_tokens, lm_head
    AttnQv,
    /// gate/up/down + projector, embed_tokens, lm_head
    Mlp,
    /// the projector only (stage-1 pretraining)
    Projector,
    /// nothing by rule: exactly what --include matches
    Custom,
}

impl Method {
    /// The paper recipe's learning rate for the method: 2e-3 to pretrain the projector, 2e-5
    /// for full finetuning, 2e-4 for LoRA, 5e-4 for the norm and partial methods.
    pub fn default_lr(self) -> f64 {
        match self {
            Method::Projector => 2e-3,
            Method::Full => 2e-5,
            Method::Lora => 2e-4,
            _ => 5e-4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Ln => "ln",
            Method::LnSimple => "ln-simple",
            Method::Full => "full",
            Method::Lora => "lora",
            Method::AttnQv => "attn-qv",
            Method::Mlp => "mlp",
            Method::Projector => "projector",
            Method::Custom => "custom",
        }
    }
}

/// LoRA settings (PEFT semantics: y = x·Wᵀ + (alpha/r)·(dropout(x)·Aᵀ)·Bᵀ, A kaiming-uniform
/// with a = √5, B zero).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// targeted linears among q, k, v, o, gate, up, down
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: ["q", "k", "v", "o", "gate", "up", "down"]
                .map(String::from)
                .to_vec(),
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    fn targets_role(&self, role: Role) -> bool {
        let name = match role {
            Role::Q => "q",
            Role::K => "k",
            Role::V => "v",
            Role::O => "o",
            Role::Gate => "gate",
            Role::Up => "up",
            Role::Down => "down",
            _ => return false,
        };
        self.targets.iter().any(|t| t == name)
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("lora: `r` must be positive, got 0");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!(
                "lora: `alpha` must be a finite number above 0, got {}",
                self.alpha
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("lora: `dropout` must be in [0, 1), got {}", self.dropout);
        }
        for t in &self.targets {
            if !["q", "k", "v", "o", "gate", "up", "down"].contains(&t.as_str()) {
                bail!("lora: unknown target `{t}` (q, k, v, o, gate, up, down)");
            }
        }
        if self.targets.is_empty() {
            bail!("lora: no target linears");
        }
        Ok(())
    }
}

/// A method with its flags: everything needed to decide trainability. In a run config
/// either the method's name (`"ln"`) or an object whose fields left out keep the method's
/// defaults (`{"method": "lora", "lora": {"r": 16}}`).
#[derive(Debug, Clone, Serialize)]
pub struct MethodConfig {
    pub method: Method,
    /// ln: train the final `norm` too (PEFT includes it)
    pub final_norm: bool,
    pub train_projector: bool,
    pub train_embed: bool,
    pub train_head: bool,
    pub lora: LoraConfig,
    /// extra trainable names (full regex match), applied after the method's rule
    pub include: Option<String>,
    /// names never trained (full regex match), applied last
    pub exclude: Option<String>,
}

impl<'de> Deserialize<'de> for MethodConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            method: Method,
            final_norm: Option<bool>,
            train_projector: Option<bool>,
            train_embed: Option<bool>,
            train_head: Option<bool>,
            lora: Option<LoraConfig>,
            include: Option<String>,
            exclude: Option<String>,
        }
        let v = serde_json::Value::deserialize(d)?;
        if v.is_string() {
            let m: Method = serde_json::from_value(v).map_err(D::Error::custom)?;
            return Ok(Self::new(m));
        }
        let f: Fields = serde_json::from_value(v).map_err(D::Error::custom)?;
        let mut m = Self::new(f.method);
        m.final_norm = f.final_norm.unwrap_or(m.final_norm);
        m.train_projector = f.train_projector.unwrap_or(m.train_projector);
        m.train_embed = f.train_embed.unwrap_or(m.train_embed);
        m.train_head = f.train_head.unwrap_or(m.train_head);
        m.lora = f.lora.unwrap_or(m.lora);
        m.include = f.include;
        m.exclude = f.exclude;
        Ok(m)
    }
}

impl Default for MethodConfig {
    fn default() -> Self {
        Self::new(Method::Ln)
    }
}

impl MethodConfig {
    /// The method's defaults: projector, embeddings and head trainable where the paper has
    /// them trainable.
    pub fn new(method: Method) -> Self {
        let extras = !matches!(method, Method::LnSimple | Method::Custom);
        Self {
            method,
            final_norm: true,
            train_projector: extras,
            train_embed: extras && method != Method::Projector,
            train_head: extras && method != Method::Projector,
            lora: LoraConfig::default(),
            include: None,
            exclude: None,
        }
    }

    fn rule(&self, s: &ParamSpec) -> bool {
        let extra = match s.role {
            Role::Projector => return self.train_projector,
            Role::Embed => return self.train_embed || (s.tied_head && self.train_head),
            Role::Head => return self.train_head,
            Role::Vision => return false,
            Role::LoraA | Role::LoraB => return self.method == Method::Lora,
            _ => false,
        };
        extra
            || match self.method {
                Method::Ln => match s.role {
                    Role::InputNorm | Role::PostAttnNorm => true,
                    Role::FinalNorm => self.final_norm,
                    _ => false,
                },
                Method::LnSimple => s.role.is_decoder_norm(),
                Method::Full => true,
                Method::Lora | Method::Projector | Method::Custom => false,
                Method::AttnQv => matches!(s.role, Role::Q | Role::V),
                Method::Mlp => s.role.is_mlp(),
            }
    }

    /// Adds LoRA adapter specs (for `lora`) and returns the trainable flag of every spec.
    /// Errors when nothing is trainable or a regex is invalid.
    pub fn apply(&self, specs: &mut Vec<ParamSpec>) -> Result<Vec<bool>> {
        if self.method == Method::Lora {
            self.lora.validate()?;
            let mut adapters = Vec::new();
            for s in specs.iter() {
                if s.name.ends_with(".weight") && self.lora.targets_role(s.role) {
                    let stem = s.name.trim_end_matches(".weight");
                    let (o, i) = (s.shape[0], s.shape[1]);
                    // a rank above a side adds nothing a full-rank update lacks, and would
                    // let a number claim any amount of memory
                    if self.lora.r > o.min(i) {
                        bail!(
                            "lora: `r` = {} is above the rank of {} ({o}x{i}); at most {}",
                            self.lora.r,
                            s.name,
                            o.min(i)
                        );
                    }
                    for (suffix, shape, role) in [
                        ("lora_A", [self.lora.r, i], Role::LoraA),
                        ("lora_B", [o, self.lora.r], Role::LoraB),
                    ] {
                        adapters.push(ParamSpec {
                            name: format!("{stem}.{suffix}.weight"),
                            shape: shape.to_vec(),
                            role,
                            layer: s.layer,
                            base: Some(s.name.clone()),
                            tied_head: false,
                        });
                    }
                }
            }
            specs.extend(adapters);
        }
        let full = |p: &Option<String>, what: &str| -> Result<Option<Regex>> {
            p.as_ref()
                .map(|p| {
                    Regex::new(&format!("^(?:{p})$"))
                        .map_err(|e| anyhow::anyhow!("--{what} `{p}` is not a valid regex: {e}"))
                })
                .transpose()
        };
        let include = full(&self.include, "include")?;
        let exclude = full(&self.exclude, "exclude")?;
        if let Some(re) = &include
            && !specs.iter().any(|s| re.is_match(&s.name))
        {
            bail!(
                "--include `{}` matches no parameter name (names look like `{}`)",
                self.include.as_deref().unwrap_or(""),
                specs.get(1).map(|s| s.name.as_str()).unwrap_or("")
            );
        }
        let flags: Vec<bool> = specs
            .iter()
            .map(|s| {
                let on = self.rule(s) || include.as_ref().is_some_and(|r| r.is_match(&s.name));
                on && s.role != Role::Vision
                    && !exclude.as_ref().is_some_and(|r| r.is_match(&s.name))
            })
            .collect();
        if !flags.iter().any(|&f| f) {
            bail!(
                "method `{}` with these flags leaves no trainable parameter",
                self.method.name()
            );
        }
        Ok(flags)
    }
}

/// A PEFT adapter key (`base_model.model.<module path>.lora_A.weight`) as our checkpoint
/// key. transformers ≥ 4.52 module paths (`model.language_model.…`) map to the decoder body
/// prefix; older paths are the checkpoint keys already.
pub fn peft_to_checkpoint(peft_key: &str, keys: &KeyPrefixes) -> String {
    let k = peft_key
        .strip_prefix("base_model.model.")
        .unwrap_or(peft_key);
    if let Some(rest) = k.strip_prefix("model.language_model.") {
        return format!("{}.{rest}", keys.llm_body);
    }
    k.to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::config::{LlmArch, LlmConfig, ProjectorConfig, RopeConfig, RopeScaling};
    use crate::model::params::{llm_specs, projector_specs};

    fn keys() -> KeyPrefixes {
        KeyPrefixes {
            llm_body: "language_model.model".into(),
            lm_head: "language_model.lm_head.weight".into(),
            vision: "vision_tower".into(),
            projector: "multi_modal_projector".into(),
        }
    }

    fn llama(layers: usize, tie: bool) -> LlmConfig {
        LlmConfig {
            arch: LlmArch::Llama,
            vocab_size: 100,
            hidden_size: 8,
            intermediate_size: 16,
            num_layers: layers,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope: RopeConfig {
                theta: 1e4,
                scaling: RopeScaling::Default,
            },
            max_position_embeddings: 64,
            tie_word_embeddings: tie,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![],
            sliding_window: None,
        }
    }

    /// The names `m` trains in a 2-layer LLaMA (tied head or not) with a projector.
    pub(crate) fn trained(m: &MethodConfig, tie: bool) -> Vec<String> {
        let mut specs = llm_specs(&llama(2, tie), &keys());
        let p = ProjectorConfig {
            num_linears: 2,
            act: crate::ops::act::Act::GeluErf,
            bias: true,
            in_features: 4,
            out_features: 8,
            standardize: false,
        };
        specs.extend(projector_specs(&p, &keys()));
        let flags = m.apply(&mut specs).unwrap();
        specs
            .iter()
            .zip(flags)
            .filter(|(_, f)| *f)
            .map(|(s, _)| s.name.clone())
            .collect()
    }

    #[test]
    fn ln_rule() {
        let names = trained(&MethodConfig::new(Method::Ln), false);
        assert_eq!(names.len(), 2 * 2 + 1 + 4 + 2); // block norms, final norm, projector, embed+head
        assert!(names.contains(&"language_model.model.norm.weight".to_string()));
        assert!(names.contains(&"language_model.lm_head.weight".to_string()));
        let mut no_final = MethodConfig::new(Method::Ln);
        no_final.final_norm = false;
        no_final.train_embed = false;
        no_final.train_head = false;
        let names = trained(&no_final, false);
        assert_eq!(names.len(), 4 + 4);
        // ln-simple: norms only
        let names = trained(&MethodConfig::new(Method::LnSimple), false);
        assert!(names.iter().all(|n| n.ends_with("norm.weight")) && names.len() == 5);
    }

    #[test]
    fn baselines_and_lora() {
        let qv = trained(&MethodConfig::new(Method::AttnQv), true);
        // tied: the head is the embedding, trained once
        assert_eq!(
            qv.iter()
                .filter(|n| n.contains("q_proj") || n.contains("v_proj"))
                .count(),
            4
        );
        assert!(qv.contains(&"language_model.model.embed_tokens.weight".to_string()));
        assert!(!qv.iter().any(|n| n.contains("lm_head")));
        let mlp = trained(&MethodConfig::new(Method::Mlp), false);
        assert_eq!(mlp.iter().filter(|n| n.contains("mlp.")).count(), 6);
        let full = trained(&MethodConfig::new(Method::Full), false);
        assert_eq!(full.len(), llm_specs(&llama(2, false), &keys()).len() + 4);
        let mut lora = MethodConfig::new(Method::Lora);
        lora.lora.targets = vec!["q".into(), "down".into()];
        lora.train_embed = false;
        lora.train_head = false;
        lora.train_projector = false;
        let names = trained(&lora, false);
        assert_eq!(names.len(), 2 * 2 * 2);
        assert!(
            names
                .contains(&"language_model.model.layers.1.mlp.down_proj.lora_B.weight".to_string())
        );
        let p = trained(&MethodConfig::new(Method::Projector), false);
        assert!(p.iter().all(|n| n.starts_with("multi_modal_projector.")) && p.len() == 4);
    }

    #[test]
    fn include_exclude_and_empty_sets() {
        let mut m = MethodConfig::new(Method::Custom);
        m.include = Some(r".*layers\.1\..*_proj\.weight".into());
        m.exclude = Some(r".*k_proj.*".into());
        let names = trained(&m, false);
        assert_eq!(names.len(), 6);
        m.include = Some("nothing".into());
        let mut specs = llm_specs(&llama(1, false), &keys());
        let err = m.apply(&mut specs).unwrap_err().to_string();
        assert!(err.contains("matches no parameter"), "{err}");
        let mut m = MethodConfig::new(Method::Projector);
        m.train_projector = false;
        let err = m
            .apply(&mut llm_specs(&llama(1, false), &keys()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no trainable"), "{err}");
    }

    #[test]
    fn peft_keys() {
        let k = keys();
        assert_eq!(
            peft_to_checkpoint(
                "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
                &k
            ),
            "language_model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            peft_to_checkpoint(
                "base_model.model.language_model.model.layers.3.mlp.up_proj.lora_B.weight",
                &k
            ),
            "language_model.model.layers.3.mlp.up_proj.lora_B.weight"
        );
    }
}
