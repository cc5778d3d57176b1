//! Adapters swapped in and out of one loaded base, so that one copy of the base serves many
//! finetunes (`lntune serve`). An adapter's patch is what applying it changes: the tensors
//! it sets (norm scales, projector, ... in the model's dtype, as `apply_adapter` leaves
//! them) and the LoRA slots it attaches. Swapping is moving reference-counted tensors, not
//! copying them.

use std::path::Path;

use anyhow::Result;

use super::adapter::apply_adapter;
use crate::model::Lora;
use crate::model::mllm::Mllm;

/// The tensors and LoRA slots one state of the model has where another differs.
#[derive(Clone)]
pub struct Patch {
    params: Vec<(String, candle_core::Tensor)>,
    loras: Vec<(String, Option<Lora>)>,
}

impl Patch {
    /// Bytes of the tensors the patch holds (what keeping it in a cache costs).
    pub fn bytes(&self) -> usize {
        let lora = self
            .loras
            .iter()
            .filter_map(|(_, l)| l.as_ref())
            .map(|l| l.a.elem_count() * 4 + l.b.elem_count() * 4);
        self.params
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .chain(lora)
            .sum()
    }
}

/// Every parameter of the model and the LoRA slot of every decoder linear (cheap: the
/// tensors are shared, not copied).
fn snapshot(model: &mut Mllm) -> Patch {
    let mut params = Vec::new();
    let mut loras = Vec::new();
    for s in model.param_specs() {
        if let Some(t) = model.param(&s.name) {
            params.push((s.name.clone(), t));
        }
        if let Some(stem) = s.name.strip_suffix(".weight")
            && let Some(lin) = model.linear_mut(stem)
        {
            loras.push((stem.to_string(), lin.lora.clone()));
        }
    }
    Patch { params, loras }
}

/// Sets the patch's tensors and slots into `model`; returns the patch that undoes it.
pub fn swap_in(model: &mut Mllm, patch: &Patch) -> Patch {
    let mut undo = Patch {
        params: Vec::with_capacity(patch.params.len()),
        loras: Vec::with_capacity(patch.loras.len()),
    };
    for (name, t) in &patch.params {
        if let Some(slot) = model.param_mut(name) {
            undo.params
                .push((name.clone(), std::mem::replace(slot, t.clone())));
        }
    }
    for (stem, l) in &patch.loras {
        if let Some(lin) = model.linear_mut(stem) {
            undo.loras
                .push((stem.clone(), std::mem::replace(&mut lin.lora, l.clone())));
        }
    }
    model.llm.sync_tied_head();
    undo
}

/// What the adapter in `dir` changes in `model` (checked as `apply_adapter` checks it);
/// `model` is left as it was.
pub fn adapter_patch(model: &mut Mllm, dir: &Path) -> Result<Patch> {
    let before = snapshot(model);
    let applied = apply_adapter(dir, model);
    let after = snapshot(model);
    // back to the base whatever happened
    swap_in(model, &before);
    applied?;
    let same_param = |name: &str, t: &candle_core::Tensor| {
        before
            .params
            .iter()
            .any(|(n, b)| n == name && b.id() == t.id())
    };
    let params = after
        .params
        .into_iter()
        .filter(|(n, t)| !same_param(n, t))
        .collect();
    let loras = after
        .loras
        .into_iter()
        .filter(|(_, l)| l.is_some())
        .collect();
    Ok(Patch { params, loras })
}
