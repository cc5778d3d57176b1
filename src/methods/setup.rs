//! Applying a method to a loaded model: LoRA adapters are added (initialised as PEFT does),
//! trainable tensors are widened to f32 (they are their own master copies), and per-block
//! flags are derived that the training step consults, so that no gradient is ever computed
//! for a frozen tensor.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

use super::MethodConfig;
use crate::model::Lora;
use crate::model::mllm::Mllm;
use crate::model::params::{ParamSpec, Role};
use crate::util::rng::Rng;

/// Which tensors of one linear are trainable.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinFlags {
    pub weight: bool,
    pub bias: bool,
    pub lora: bool,
}

impl LinFlags {
    pub fn any(&self) -> bool {
        self.weight || self.bias || self.lora
    }
}

/// Trainable tensors of one decoder block.
#[derive(Debug, Default, Clone)]
pub struct BlockFlags {
    pub input_norm: bool,
    pub post_norm: bool,
    pub q: LinFlags,
    pub k: LinFlags,
    pub v: LinFlags,
    pub o: LinFlags,
    pub gate: LinFlags,
    pub up: LinFlags,
    pub down: LinFlags,
}

impl BlockFlags {
    pub fn any(&self) -> bool {
        self.input_norm
            || self.post_norm
            || [
                self.q, self.k, self.v, self.o, self.gate, self.up, self.down,
            ]
            .iter()
            .any(|f| f.any())
    }

    fn lin_mut(&mut self, role: Role) -> Option<&mut LinFlags> {
        Some(match role {
            Role::Q => &mut self.q,
            Role::K => &mut self.k,
            Role::V => &mut self.v,
            Role::O => &mut self.o,
            Role::Gate => &mut self.gate,
            Role::Up => &mut self.up,
            Role::Down => &mut self.down,
            _ => return None,
        })
    }
}

/// Trainability of the whole model, as the step needs it.
#[derive(Debug, Clone, Default)]
pub struct TrainFlags {
    /// the input embedding table (also the head when tied)
    pub embed: bool,
    /// an untied lm_head
    pub head: bool,
    pub final_norm: bool,
    pub projector: bool,
    pub blocks: Vec<BlockFlags>,
}

impl TrainFlags {
    /// The lowest decoder layer whose backward must run, or None if the backward can stop at
    /// the final norm.
    pub fn first_block_needed(&self) -> Option<usize> {
        if self.embed || self.projector {
            return Some(0);
        }
        self.blocks.iter().position(|b| b.any())
    }

    /// Whether the backward of layer `l` must produce the gradient of its input.
    pub fn needs_dx_below(&self, l: usize) -> bool {
        self.embed || self.projector || self.blocks[..l].iter().any(|b| b.any())
    }
}

/// The result of applying a method to a model.
pub struct TrainSetup {
    pub method: MethodConfig,
    /// every decoder/projector parameter (LoRA adapters included)
    pub specs: Vec<ParamSpec>,
    /// trainable flag per spec
    pub trainable: Vec<bool>,
    pub flags: TrainFlags,
}

impl TrainSetup {
    /// Names and specs of the trainable tensors, in spec order.
    pub fn trainable_specs(&self) -> impl Iterator<Item = &ParamSpec> {
        self.specs
            .iter()
            .zip(&self.trainable)
            .filter(|(_, t)| **t)
            .map(|(s, _)| s)
    }

    pub fn n_trainable(&self) -> usize {
        self.trainable_specs().map(|s| s.numel()).sum()
    }
}

/// Per-block trainability from the specs and their flags.
pub fn train_flags(specs: &[ParamSpec], trainable: &[bool], num_layers: usize) -> TrainFlags {
    let by_name: HashMap<&str, &ParamSpec> = specs.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut flags = TrainFlags {
        blocks: vec![BlockFlags::default(); num_layers],
        ..Default::default()
    };
    for (s, _) in specs.iter().zip(trainable).filter(|(_, t)| **t) {
        match s.role {
            Role::Embed => flags.embed = true,
            Role::Head => flags.head = true,
            Role::FinalNorm => flags.final_norm = true,
            Role::Projector => flags.projector = true,
            Role::InputNorm => flags.blocks[s.layer.expect("layer")].input_norm = true,
            Role::PostAttnNorm => flags.blocks[s.layer.expect("layer")].post_norm = true,
            Role::LoraA | Role::LoraB => {
                let base_role = by_name[s.base.as_deref().expect("base")].role;
                let b = &mut flags.blocks[s.layer.expect("layer")];
                b.lin_mut(base_role).expect("linear role").lora = true;
            }
            Role::Vision => unreachable!("vision tensors are never trainable"),
            role => {
                let b = &mut flags.blocks[s.layer.expect("layer")];
                let lf = b.lin_mut(role).expect("linear role");
                if s.name.ends_with(".bias") {
                    lf.bias = true;
                } else {
                    lf.weight = true;
                }
            }
        }
    }
    flags
}

/// Applies `method` to `model`: LoRA adapters initialised as PEFT does (A kaiming-uniform
/// with a = √5, i.e. U(±1/√IC); B zero) from `seed`, trainable tensors widened to f32.
pub fn setup(model: &mut Mllm, method: &MethodConfig, seed: u64) -> Result<TrainSetup> {
    let mut specs = model.param_specs();
    let trainable = method.apply(&mut specs)?;
    let by_name: HashMap<&str, &ParamSpec> = specs.iter().map(|s| (s.name.as_str(), s)).collect();

    // LoRA adapters
    let mut rng = Rng::new(seed);
    let dev = model.llm.embed_tokens.device().clone();
    for s in specs.iter().filter(|s| s.role == Role::LoraA) {
        let base = s.base.as_deref().expect("adapter has a base");
        let stem = base.trim_end_matches(".weight");
        let (r, ic) = (s.shape[0], s.shape[1]);
        let oc = by_name[base].shape[0];
        let bound = 1.0 / (ic as f64).sqrt();
        let lin = model
            .linear_mut(stem)
            .with_context(|| format!("LoRA target `{stem}` is not a decoder linear"))?;
        lin.lora = Some(Lora {
            a: rng.uniform_tensor(&[r, ic], -bound, bound, DType::F32, &dev)?,
            b: Tensor::zeros((oc, r), DType::F32, &dev)?,
            scale: method.lora.scale(),
            dropout: method.lora.dropout,
        });
    }

    for (s, _) in specs.iter().zip(&trainable).filter(|(_, t)| **t) {
        // the trainable tensor is its own f32 master copy
        let t = model
            .param_mut(&s.name)
            .with_context(|| format!("trainable tensor `{}` is not in the model", s.name))?;
        if t.dtype() != DType::F32 {
            *t = t.to_dtype(DType::F32)?;
        }
    }
    let flags = train_flags(&specs, &trainable, model.llm.cfg.num_layers);
    model.llm.sync_tied_head();
    Ok(TrainSetup {
        method: method.clone(),
        specs,
        trainable,
        flags,
    })
}
