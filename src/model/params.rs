//! Every parameter of a model, from its configs alone: checkpoint key, shape, role and
//! decoder layer. Methods decide trainability over this list, `plan` counts it without
//! weights, and gradients, adapters and fingerprints name tensors by these keys, exactly as
//! the user's checkpoint files do.

use serde::{Deserialize, Serialize};

use super::config::{LlmConfig, ProjectorConfig, VisionConfig};

/// Checkpoint-key prefixes of the model's parts, so that gradients, adapters and plans can
/// name tensors exactly as the user's files do. A part's key is `<prefix>.<name in part>`.
#[derive(Debug, Clone)]
pub struct KeyPrefixes {
    /// holds `embed_tokens`, `layers.{i}`, `norm`
    pub llm_body: String,
    /// the full key of the output head (`…lm_head.weight`)
    pub lm_head: String,
    pub vision: String,
    pub projector: String,
}

impl KeyPrefixes {
    /// llava-hf checkpoints of transformers <= 5.24: `language_model.model.*`,
    /// `language_model.lm_head.weight`, `vision_tower.*`, `multi_modal_projector.*`.
    pub fn llava_legacy() -> Self {
        Self {
            llm_body: "language_model.model".into(),
            lm_head: "language_model.lm_head.weight".into(),
            vision: "vision_tower".into(),
            projector: "multi_modal_projector".into(),
        }
    }

    /// A text-only HF or GGUF LLM: `model.*` and `lm_head.weight`, no vision side.
    pub fn llm_only() -> Self {
        Self {
            llm_body: "model".into(),
            lm_head: "lm_head.weight".into(),
            vision: String::new(),
            projector: String::new(),
        }
    }
}

/// What a parameter is, read off its checkpoint name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Embed,
    Head,
    InputNorm,
    PostAttnNorm,
    FinalNorm,
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    Projector,
    Vision,
    LoraA,
    LoraB,
}

impl Role {
    pub fn is_decoder_norm(self) -> bool {
        matches!(self, Role::InputNorm | Role::PostAttnNorm | Role::FinalNorm)
    }
    pub fn is_attention(self) -> bool {
        matches!(self, Role::Q | Role::K | Role::V | Role::O)
    }
    pub fn is_mlp(self) -> bool {
        matches!(self, Role::Gate | Role::Up | Role::Down)
    }
    /// The group name printed by `plan`.
    pub fn group(self) -> &'static str {
        match self {
            Role::Embed => "embed_tokens",
            Role::Head => "lm_head",
            Role::InputNorm | Role::PostAttnNorm => "block norms",
            Role::FinalNorm => "final norm",
            Role::Q | Role::K | Role::V | Role::O => "attention q/k/v/o",
            Role::Gate | Role::Up | Role::Down => "mlp gate/up/down",
            Role::Projector => "projector",
            Role::Vision => "vision tower",
            Role::LoraA | Role::LoraB => "lora adapters",
        }
    }
}

/// One parameter: checkpoint key, shape, role, decoder layer (if any).
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: Role,
    pub layer: Option<usize>,
    /// the LoRA'd linear's weight key, for adapters
    pub base: Option<String>,
    /// the input embeddings double as the output head (tied)
    pub tied_head: bool,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The parameters of a decoder under `keys.llm_body` / `keys.lm_head`.
pub fn llm_specs(cfg: &LlmConfig, keys: &KeyPrefixes) -> Vec<ParamSpec> {
    let (v, c, i, hd) = (
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.head_dim,
    );
    let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let b = &keys.llm_body;
    let mut out = vec![spec(
        format!("{b}.embed_tokens.weight"),
        &[v, c],
        Role::Embed,
        None,
    )];
    out[0].tied_head = cfg.tie_word_embeddings;
    for l in 0..cfg.num_layers {
        let p = format!("{b}.layers.{l}");
        let mut lin = |module: &str, role: Role, o: usize, inp: usize, bias: bool| {
            out.push(spec(
                format!("{p}.{module}.weight"),
                &[o, inp],
                role,
                Some(l),
            ));
            if bias {
                out.push(spec(format!("{p}.{module}.bias"), &[o], role, Some(l)));
            }
        };
        lin("self_attn.q_proj", Role::Q, q_out, c, cfg.qkv_bias);
        lin("self_attn.k_proj", Role::K, kv_out, c, cfg.qkv_bias);
        lin("self_attn.v_proj", Role::V, kv_out, c, cfg.qkv_bias);
        lin("self_attn.o_proj", Role::O, c, q_out, cfg.o_bias);
        lin("mlp.gate_proj", Role::Gate, i, c, cfg.mlp_bias);
        lin("mlp.up_proj", Role::Up, i, c, cfg.mlp_bias);
        lin("mlp.down_proj", Role::Down, c, i, cfg.mlp_bias);
        out.push(spec(
            format!("{p}.input_layernorm.weight"),
            &[c],
            Role::InputNorm,
            Some(l),
        ));
        out.push(spec(
            format!("{p}.post_attention_layernorm.weight"),
            &[c],
            Role::PostAttnNorm,
            Some(l),
        ));
    }
    out.push(spec(
        format!("{b}.norm.weight"),
        &[c],
        Role::FinalNorm,
        None,
    ));
    if !cfg.tie_word_embeddings {
        out.push(spec(keys.lm_head.clone(), &[v, c], Role::Head, None));
    }
    out
}

/// The projector's parameters under `keys.projector`.
pub fn projector_specs(cfg: &ProjectorConfig, keys: &KeyPrefixes) -> Vec<ParamSpec> {
    let mut out = Vec::new();
    for k in 0..cfg.num_linears {
        let inp = if k == 0 {
            cfg.in_features
        } else {
            cfg.out_features
        };
        let n = format!("{}.linear_{}", keys.projector, k + 1);
        out.push(spec(
            format!("{n}.weight"),
            &[cfg.out_features, inp],
            Role::Projector,
            None,
        ));
        if cfg.bias {
            out.push(spec(
                format!("{n}.bias"),
                &[cfg.out_features],
                Role::Projector,
                None,
            ));
        }
    }
    out
}

/// The vision tower's tensors under `prefix`: (checkpoint key, shape). They are never
/// trained; `plan` counts them and benchmarks initialise them.
pub fn vision_specs(cfg: &VisionConfig, prefix: &str) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add =
        |name: String, shape: &[usize]| out.push((format!("{prefix}.{name}"), shape.to_vec()));
    match cfg {
        VisionConfig::Clip(c) => {
            let (d, i) = (c.hidden_size, c.intermediate_size);
            let g = c.image_size / c.patch_size;
            add(
                "embeddings.patch_embedding.weight".into(),
                &[d, c.num_channels, c.patch_size, c.patch_size],
            );
            add("embeddings.class_embedding".into(), &[d]);
            add(
                "embeddings.position_embedding.weight".into(),
                &[1 + g * g, d],
            );
            for n in ["pre_layrnorm", "post_layernorm"] {
                add(format!("{n}.weight"), &[d]);
                add(format!("{n}.bias"), &[d]);
            }
            for l in 0..c.num_layers {
                let p = format!("encoder.layers.{l}");
                for m in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    add(format!("{p}.self_attn.{m}.weight"), &[d, d]);
                    add(format!("{p}.self_attn.{m}.bias"), &[d]);
                }
                for n in ["layer_norm1", "layer_norm2"] {
                    add(format!("{p}.{n}.weight"), &[d]);
                    add(format!("{p}.{n}.bias"), &[d]);
                }
                add(format!("{p}.mlp.fc1.weight"), &[i, d]);
                add(format!("{p}.mlp.fc1.bias"), &[i]);
                add(format!("{p}.mlp.fc2.weight"), &[d, i]);
                add(format!("{p}.mlp.fc2.bias"), &[d]);
            }
        }
        VisionConfig::Dinov2(c) => {
            let d = c.hidden_size;
            let g = c.image_size / c.patch_size;
            add("embeddings.cls_token".into(), &[1, 1, d]);
            add("embeddings.mask_token".into(), &[1, d]);
            add("embeddings.position_embeddings".into(), &[1, 1 + g * g, d]);
            add(
                "embeddings.patch_embeddings.projection.weight".into(),
                &[d, c.num_channels, c.patch_size, c.patch_size],
            );
            add("embeddings.patch_embeddings.projection.bias".into(), &[d]);
            for l in 0..c.num_layers {
                let p = format!("encoder.layer.{l}");
                for m in ["query", "key", "value"] {
                    add(format!("{p}.attention.attention.{m}.weight"), &[d, d]);
                    if c.qkv_bias {
                        add(format!("{p}.attention.attention.{m}.bias"), &[d]);
                    }
                }
                add(format!("{p}.attention.output.dense.weight"), &[d, d]);
                add(format!("{p}.attention.output.dense.bias"), &[d]);
                for n in ["norm1", "norm2"] {
                    add(format!("{p}.{n}.weight"), &[d]);
                    add(format!("{p}.{n}.bias"), &[d]);
                }
                add(format!("{p}.layer_scale1.lambda1"), &[d]);
                add(format!("{p}.layer_scale2.lambda1"), &[d]);
                if c.use_swiglu_ffn {
                    let h = (c.mlp_hidden * 2 / 3).div_ceil(8) * 8;
                    add(format!("{p}.mlp.weights_in.weight"), &[2 * h, d]);
                    add(format!("{p}.mlp.weights_in.bias"), &[2 * h]);
                    add(format!("{p}.mlp.weights_out.weight"), &[d, h]);
                    add(format!("{p}.mlp.weights_out.bias"), &[d]);
                } else {
                    add(format!("{p}.mlp.fc1.weight"), &[c.mlp_hidden, d]);
                    add(format!("{p}.mlp.fc1.bias"), &[c.mlp_hidden]);
                    add(format!("{p}.mlp.fc2.weight"), &[d, c.mlp_hidden]);
                    add(format!("{p}.mlp.fc2.bias"), &[d]);
                }
            }
            add("layernorm.weight".into(), &[d]);
            add("layernorm.bias".into(), &[d]);
        }
    }
    out
}

/// The vision tower's parameter count.
pub fn vision_param_count(cfg: &VisionConfig) -> usize {
    vision_specs(cfg, "v")
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

fn spec(name: String, shape: &[usize], role: Role, layer: Option<usize>) -> ParamSpec {
    ParamSpec {
        name,
        shape: shape.to_vec(),
        role,
        layer,
        base: None,
        tied_head: false,
    }
}
