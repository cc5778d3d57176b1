//! KV-cache generation against full recomputation on the tiny fixtures (images included,
//! batched with left padding).

use candle_core::{DType, Device, Tensor};
use lntune::eval::generate::{GenConfig, Prompt, generate};
use lntune::model::batch::Batch;
use lntune::model::mllm::Mllm;

use crate::common::*;

/// Greedy continuation by recomputing the whole sequence at every step (no cache).
fn greedy_recompute(model: &Mllm, ids: &[u32], images: &[Tensor], n: usize) -> Vec<u32> {
    let mut seq = ids.to_vec();
    let feats = if images.is_empty() {
        None
    } else {
        Some(Tensor::stack(images, 0).unwrap())
    };
    for _ in 0..n {
        let b = Batch {
            input_ids: vec![seq.clone()],
            attention_mask: vec![vec![true; seq.len()]],
            labels: None,
            pixel_values: None,
            vision_features: feats.clone(),
        };
        let logits = model.forward(&b).unwrap();
        let t = seq.len();
        let next = logits
            .narrow(1, t - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        seq.push(next);
    }
    seq[ids.len()..].to_vec()
}

#[test]
fn cached_batched_generation_equals_recompute() {
    let dir = fixture("tiny-llava");
    let model = Mllm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let batch = Batch::from_safetensors(&dir.join("ref/batch.safetensors"), &Device::Cpu).unwrap();
    let v = model.vision.as_ref().unwrap();
    let feats = v
        .tower
        .features(batch.pixel_values.as_ref().unwrap(), &v.select)
        .unwrap();
    // two prompts of different lengths: the prompt part of each sample (before the answer)
    let p0: Vec<u32> = batch.input_ids[0][..26].to_vec();
    let p1: Vec<u32> = batch.input_ids[1][..20].to_vec();
    let prompts = vec![
        Prompt {
            ids: p0.clone(),
            images: vec![feats.get(0).unwrap()],
            seed: None,
        },
        Prompt {
            ids: p1.clone(),
            images: vec![feats.get(1).unwrap()],
            seed: None,
        },
        Prompt {
            ids: vec![1, 5, 9, 13],
            images: vec![],
            seed: None,
        },
    ];
    // a tokenizer is needed for decoding: a byte-level one over the tiny vocabulary
    let tools = tiny_tokenizer();
    let out = generate(&model, &tools, &prompts, &GenConfig::greedy(8), |_, _| {}).unwrap();
    assert_eq!(
        out[0].ids,
        greedy_recompute(&model, &p0, &[feats.get(0).unwrap()], 8)
    );
    assert_eq!(
        out[1].ids,
        greedy_recompute(&model, &p1, &[feats.get(1).unwrap()], 8)
    );
    assert_eq!(out[2].ids, greedy_recompute(&model, &[1, 5, 9, 13], &[], 8));
}

#[test]
fn base_plus_lora_adapter_generates_like_the_merged_model() {
    use lntune::methods::{Method, MethodConfig};
    let dir = fixture("tiny-llava");
    let batch = Batch::from_safetensors(&dir.join("ref/batch.safetensors"), &Device::Cpu).unwrap();
    let mut method = MethodConfig::new(Method::Lora);
    method.lora.r = 4;
    let lora_model = || {
        let mut m = Mllm::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let setup = lntune::methods::setup::setup(&mut m, &method, 3).unwrap();
        // B is zero after setup; give every B values so that the adapter changes outputs
        let mut rng = lntune::util::rng::Rng::new(9);
        let mut n = 0;
        for s in setup
            .specs
            .iter()
            .filter(|s| s.name.ends_with("lora_B.weight"))
        {
            *m.param_mut(&s.name).unwrap() = rng
                .normal_tensor(&s.shape, 0.5, DType::F32, &Device::Cpu)
                .unwrap();
            n += 1;
        }
        (m, n)
    };
    let base = Mllm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let (unmerged, n) = lora_model();
    let (mut merged, _) = lora_model();
    assert!(n > 0);
    assert_eq!(merged.llm.merge_lora().unwrap(), n);
    assert!(
        merged
            .llm
            .layers
            .iter()
            .all(|b| b.self_attn.q_proj.lora.is_none() && b.self_attn.v_proj.lora.is_none())
    );
    let v = base.vision.as_ref().unwrap();
    let feats = v
        .tower
        .features(batch.pixel_values.as_ref().unwrap(), &v.select)
        .unwrap();
    let prompts: Vec<Prompt> = (0..2)
        .map(|i| Prompt {
            ids: batch.input_ids[i][..20 + 4 * i].to_vec(),
            images: vec![feats.get(i).unwrap()],
            seed: None,
        })
        .collect();
    let tools = tiny_tokenizer();
    let g = |m: &Mllm| {
        generate(m, &tools, &prompts, &GenConfig::greedy(10), |_, _| {})
            .unwrap()
            .into_iter()
            .map(|g| g.ids)
            .collect::<Vec<_>>()
    };
    let (a, b) = (g(&unmerged), g(&merged));
    assert_eq!(a, b);
    assert_ne!(
        a,
        g(&base),
        "the adapter must change the output for this test to mean anything"
    );
    // logits agree to float rounding
    let full = Batch {
        input_ids: batch.input_ids.clone(),
        attention_mask: batch.attention_mask.clone(),
        labels: None,
        pixel_values: None,
        vision_features: Some(feats.clone()),
    };
    let d = max_abs(
        &unmerged.forward(&full).unwrap(),
        &merged.forward(&full).unwrap(),
    );
    assert!(d < 1e-4, "logits differ by {d}");
}

/// Rows with their own settings in one batch: each row gets what it gets alone; a cancelled
/// row stops where it was cancelled, the others go on.
#[test]
fn rows_with_their_own_settings_and_cancellation() {
    use lntune::eval::generate::{Finish, generate_rows};
    let model = Mllm::load(&fixture("tiny-llava"), DType::F32, &Device::Cpu).unwrap();
    let tools = tiny_tokenizer();
    let prompt = |ids: &[u32]| Prompt {
        ids: ids.to_vec(),
        images: vec![],
        seed: None,
    };
    let rows = [vec![1u32, 5, 9, 13], vec![2, 4, 6], vec![3, 3, 7, 7, 1]];
    let short = GenConfig::greedy(3);
    let long = GenConfig::greedy(9);
    let mut sampled = GenConfig::greedy(6);
    sampled.temperature = 1.0;
    sampled.seed = 11;
    let cfgs = [&short, &long, &sampled];
    let prompts: Vec<Prompt> = rows.iter().map(|r| prompt(r)).collect();
    let mut pieces = vec![String::new(); 3];
    let together = generate_rows(
        &model,
        &tools,
        &prompts,
        &cfgs,
        |r, p| pieces[r].push_str(p),
        |_| false,
    )
    .unwrap();
    // the streamed pieces add up to the final text (characters split across tokens are
    // held back until complete)
    for (r, g) in together.iter().enumerate() {
        assert_eq!(pieces[r], g.text, "row {r}");
    }
    for (r, cfg) in cfgs.iter().enumerate() {
        // alone, with the seed the row had in the batch
        let mut p = prompt(&rows[r]);
        p.seed = Some(cfg.seed ^ ((r as u64) << 16));
        let alone = generate(&model, &tools, &[p], cfg, |_, _| {}).unwrap();
        assert_eq!(together[r].ids, alone[0].ids, "row {r}");
        assert_eq!(together[r].ids.len(), cfg.max_new_tokens, "row {r}");
        assert_eq!(together[r].finish, Finish::Length);
    }
    // row 1 cancelled after its fourth token
    let mut seen = [0usize; 3];
    let cancelled_run = {
        let seen = std::cell::RefCell::new(&mut seen);
        generate_rows(
            &model,
            &tools,
            &prompts,
            &cfgs,
            |r, _| seen.borrow_mut()[r] += 1,
            |r| r == 1 && seen.borrow()[1] >= 4,
        )
        .unwrap()
    };
    assert_eq!(cancelled_run[1].finish, Finish::Cancelled);
    assert_eq!(cancelled_run[1].ids, together[1].ids[..4]);
    assert_eq!(cancelled_run[0].ids, together[0].ids);
    assert_eq!(cancelled_run[2].ids, together[2].ids);
}

/// Adapters swapped in and out of one loaded base give what the base with each adapter
/// loaded on its own gives, and swapping back restores the base exactly.
#[test]
fn adapters_swap_in_and_out_of_one_base() {
    use lntune::methods::Method;
    use lntune::methods::adapter::load_model;
    use lntune::methods::swap::{adapter_patch, swap_in};
    let dir = fixture("tiny-llava");
    let batch = Batch::from_safetensors(&dir.join("ref/batch.safetensors"), &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let methods = [Method::Ln, Method::Lora, Method::LnSimple, Method::Full];
    for m in methods {
        pattern_adapter(&dir, m, &tmp.path().join(m.name()));
    }
    let mut base = Mllm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let base_logits = base.forward(&batch).unwrap();
    let patches: Vec<_> = methods
        .iter()
        .map(|m| adapter_patch(&mut base, &tmp.path().join(m.name())).unwrap())
        .collect();
    // building the patches left the base as it was
    assert_eq!(max_abs(&base.forward(&batch).unwrap(), &base_logits), 0.0);
    for round in 0..2 {
        for (m, patch) in methods.iter().zip(&patches) {
            let alone = load_model(
                &dir,
                Some(&tmp.path().join(m.name())),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap()
            .forward(&batch)
            .unwrap();
            assert!(
                max_abs(&alone, &base_logits) > 1e-4,
                "{m:?} changes nothing"
            );
            let undo = swap_in(&mut base, patch);
            let got = base.forward(&batch).unwrap();
            assert_eq!(max_abs(&got, &alone), 0.0, "{m:?}, round {round}");
            swap_in(&mut base, &undo);
            assert_eq!(max_abs(&base.forward(&batch).unwrap(), &base_logits), 0.0);
        }
    }
    // ln-simple holds the norm vectors only (ln adds projector, embeddings and head); full
    // finetuning every decoder matrix
    assert!(patches[2].bytes() < patches[0].bytes());
    assert!(patches[3].bytes() > 10 * patches[2].bytes());
}
