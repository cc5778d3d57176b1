//! GGUF reading on files the tests write themselves: dequantization of each block type by
//! hand-computed values, the Q/K un-permutation, a whole tiny LLaMA round-tripped through
//! GGUF, the tokenizer rebuilt from metadata, and truncated files.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use half::f16;
use lntune::io::gguf::{GgufModel, dequantize, unpermute_qk_rows};
use lntune::io::gguf_write::{encode, permute_qk_rows};
use lntune::io::tokenizer::{ChatMessage, ChatTokenizer};
use lntune::model::batch::Batch;
use lntune::model::mllm::Mllm;

use crate::common::*;

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[test]
fn q4_0_block_by_hand() {
    // d = 0.25; low nibble j, high nibble 15 - j: w[j] = 0.25 (j - 8), w[j+16] = 0.25 (7 - j)
    let mut blk = h(0.25).to_vec();
    blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let w = dequantize(GgmlDType::Q4_0, &blk, 32).unwrap();
    for j in 0..16 {
        assert_eq!(w[j], 0.25 * (j as f32 - 8.0));
        assert_eq!(w[j + 16], 0.25 * (7.0 - j as f32));
    }
}

#[test]
fn q4_1_block_by_hand() {
    // d = 0.5, m = -1: w[j] = 0.5 j - 1, w[j+16] = 0.5 (15 - j) - 1
    let mut blk = h(0.5).to_vec();
    blk.extend(h(-1.0));
    blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let w = dequantize(GgmlDType::Q4_1, &blk, 32).unwrap();
    for j in 0..16 {
        assert_eq!(w[j], 0.5 * j as f32 - 1.0);
        assert_eq!(w[j + 16], 0.5 * (15 - j) as f32 - 1.0);
    }
}

#[test]
fn q8_0_f16_f32_blocks_by_hand() {
    // d = 0.125, q = -16..16: w = 0.125 q
    let mut blk = h(0.125).to_vec();
    blk.extend((0..32i32).map(|i| (i - 16) as i8 as u8));
    let w = dequantize(GgmlDType::Q8_0, &blk, 32).unwrap();
    for (i, x) in w.iter().enumerate() {
        assert_eq!(*x, 0.125 * (i as f32 - 16.0));
    }
    let f16s: Vec<u8> = [1.5f32, -2.25, 1024.0].iter().flat_map(|&x| h(x)).collect();
    assert_eq!(
        dequantize(GgmlDType::F16, &f16s, 3).unwrap(),
        vec![1.5, -2.25, 1024.0]
    );
    let f32s = f32_bytes(&[0.1, -3.5]);
    assert_eq!(
        dequantize(GgmlDType::F32, &f32s, 2).unwrap(),
        vec![0.1, -3.5]
    );
}

#[test]
fn qk_unpermute_inverts_llama_cpp_permutation() {
    // 2 heads of head_dim 4, 3 inputs: rows tagged by their HF index
    let hf: Vec<f32> = (0..8)
        .flat_map(|r| (0..3).map(move |c| (r * 10 + c) as f32))
        .collect();
    let gguf = permute_qk_rows(&hf, 2, 3);
    // llama.cpp interleaves the two halves of each head: rows 0,2,1,3 | 4,6,5,7
    let first_col: Vec<f32> = gguf.chunks(3).map(|r| r[0]).collect();
    assert_eq!(first_col, vec![0., 20., 10., 30., 40., 60., 50., 70.]);
    assert_eq!(unpermute_qk_rows(&gguf, 2, 3), hf);
}

// --- quantizers written from the ggml reference code, used to build test files ---------

fn quant_q8_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    let mut deq = Vec::new();
    for blk in x.chunks(32) {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let dh = f16::from_f32(d);
        bytes.extend(dh.to_le_bytes());
        for v in blk {
            let q = (v * id).round() as i8;
            bytes.push(q as u8);
            deq.push(dh.to_f32() * q as f32);
        }
    }
    (bytes, deq)
}

fn quant_q4_1(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    let mut deq = vec![0f32; x.len()];
    for (b, blk) in x.chunks(32).enumerate() {
        let min = blk.iter().cloned().fold(f32::INFINITY, f32::min);
        let max = blk.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let (dh, mh) = (f16::from_f32(d), f16::from_f32(min));
        bytes.extend(dh.to_le_bytes());
        bytes.extend(mh.to_le_bytes());
        let q: Vec<u8> = blk
            .iter()
            .map(|v| (((v - min) * id + 0.5) as u8).min(15))
            .collect();
        for j in 0..16 {
            bytes.push(q[j] | (q[j + 16] << 4));
        }
        for (j, qj) in q.iter().enumerate() {
            deq[b * 32 + j] = dh.to_f32() * *qj as f32 + mh.to_f32();
        }
    }
    (bytes, deq)
}

fn quant_q4_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    let mut deq = vec![0f32; x.len()];
    for (b, blk) in x.chunks(32).enumerate() {
        let max = blk
            .iter()
            .cloned()
            .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let dh = f16::from_f32(d);
        bytes.extend(dh.to_le_bytes());
        let q: Vec<u8> = blk
            .iter()
            .map(|v| ((v * id + 8.5) as i32).clamp(0, 15) as u8)
            .collect();
        for j in 0..16 {
            bytes.push(q[j] | (q[j + 16] << 4));
        }
        for (j, qj) in q.iter().enumerate() {
            deq[b * 32 + j] = dh.to_f32() * (*qj as f32 - 8.0);
        }
    }
    (bytes, deq)
}

/// Writes tiny-dinov2-llama's LLaMA as a GGUF (Q/K permuted as llama.cpp does; matrices
/// quantized with `quant` when given) and, next to it, an HF directory holding exactly the
/// values the GGUF decodes to. Returns (gguf path, hf dir).
fn write_tiny_llama_gguf(dir: &Path, quantize: bool) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = fixture("tiny-dinov2-llama/llm");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let hf = load_all(&src.join("model.safetensors"));
    let (nh, nkv) = (4usize, 2usize);
    let mut tensors = Vec::new();
    let mut decoded: HashMap<String, Tensor> = HashMap::new();
    let names = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    let mut map: Vec<(String, String)> = names
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    for l in 0..2 {
        for (hfn, gn) in [
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ] {
            map.push((
                format!("model.layers.{l}.{hfn}.weight"),
                format!("blk.{l}.{gn}.weight"),
            ));
        }
    }
    for (i, (hfn, gn)) in map.iter().enumerate() {
        let t = &hf[hfn];
        let dims = t.dims().to_vec();
        let vals = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n_in = *dims.last().unwrap();
        let permuted = if gn.contains("attn_q") {
            permute_qk_rows(&vals, nh, n_in)
        } else if gn.contains("attn_k") {
            permute_qk_rows(&vals, nkv, n_in)
        } else {
            vals.clone()
        };
        let (ggml_type, data, deq_perm) = if gn == "token_embd.weight" && quantize {
            let halves: Vec<f16> = permuted.iter().map(|&x| f16::from_f32(x)).collect();
            (
                GGML_F16,
                halves.iter().flat_map(|x| x.to_le_bytes()).collect(),
                halves.iter().map(|x| x.to_f32()).collect(),
            )
        } else if dims.len() == 2 && quantize {
            let (b, d) = match i % 3 {
                0 => quant_q8_0(&permuted),
                1 => quant_q4_0(&permuted),
                _ => quant_q4_1(&permuted),
            };
            ([GGML_Q8_0, GGML_Q4_0, GGML_Q4_1][i % 3], b, d)
        } else {
            (GGML_F32, f32_bytes(&permuted), permuted.clone())
        };
        // what the GGUF decodes to, back in HF row order
        let deq = if gn.contains("attn_q") {
            lntune::io::gguf::unpermute_qk_rows(&deq_perm, nh, n_in)
        } else if gn.contains("attn_k") {
            lntune::io::gguf::unpermute_qk_rows(&deq_perm, nkv, n_in)
        } else {
            deq_perm
        };
        decoded.insert(
            hfn.clone(),
            Tensor::from_vec(deq, dims.clone(), &Device::Cpu).unwrap(),
        );
        tensors.push(GgufTensor {
            name: gn.clone(),
            dims,
            ggml_type,
            data,
        });
    }
    let meta = vec![
        ("general.architecture", GgufValue::Str("llama".into())),
        ("llama.block_count", GgufValue::U32(2)),
        ("llama.context_length", GgufValue::U32(128)),
        ("llama.embedding_length", GgufValue::U32(64)),
        ("llama.feed_forward_length", GgufValue::U32(128)),
        ("llama.attention.head_count", GgufValue::U32(4)),
        ("llama.attention.head_count_kv", GgufValue::U32(2)),
        ("llama.rope.freq_base", GgufValue::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-5),
        ),
    ];
    let gguf = dir.join("tiny.gguf");
    write_gguf(&gguf, &meta, &tensors);
    let hf_dir = dir.join("hf");
    std::fs::create_dir_all(&hf_dir).unwrap();
    save_all(&decoded, &hf_dir.join("model.safetensors"));
    std::fs::write(hf_dir.join("config.json"), cfg.to_string()).unwrap();
    (gguf, hf_dir)
}

fn text_batch() -> Batch {
    let ids: Vec<Vec<u32>> = vec![
        (0..20).map(|i| (i * 37 % 250 + 3) as u32).collect(),
        (0..20).map(|i| (i * 11 % 250 + 3) as u32).collect(),
    ];
    let mut mask = vec![vec![true; 20]; 2];
    for m in mask[1].iter_mut().skip(15) {
        *m = false;
    }
    Batch {
        input_ids: ids,
        attention_mask: mask,
        labels: None,
        pixel_values: None,
        vision_features: None,
    }
}

#[test]
fn tiny_llama_f32_gguf_equals_hf_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (gguf, _) = write_tiny_llama_gguf(tmp.path(), false);
    let from_gguf = Mllm::load(&gguf, DType::F32, &Device::Cpu).unwrap();
    assert!(from_gguf.tokenizer.is_none());
    let from_hf = Mllm::load(&fixture("tiny-dinov2-llama/llm"), DType::F32, &Device::Cpu).unwrap();
    let b = text_batch();
    let d = max_abs(
        &from_gguf.forward(&b).unwrap(),
        &from_hf.forward(&b).unwrap(),
    );
    assert_eq!(d, 0.0, "GGUF (un-permuted) and HF logits differ by {d}");
}

#[test]
fn tiny_llama_quantized_gguf_decodes_like_ggml() {
    let tmp = tempfile::tempdir().unwrap();
    let (gguf, hf_dir) = write_tiny_llama_gguf(tmp.path(), true);
    let from_gguf = Mllm::load(&gguf, DType::F32, &Device::Cpu).unwrap();
    let from_hf = Mllm::load(&hf_dir, DType::F32, &Device::Cpu).unwrap();
    let b = text_batch();
    let d = max_abs(
        &from_gguf.forward(&b).unwrap(),
        &from_hf.forward(&b).unwrap(),
    );
    assert_eq!(
        d, 0.0,
        "F16/Q8_0/Q4_0/Q4_1 GGUF and its decoded copy differ by {d}"
    );
    // and the quantization really changed the weights
    let orig = Mllm::load(&fixture("tiny-dinov2-llama/llm"), DType::F32, &Device::Cpu).unwrap();
    assert!(max_abs(&from_gguf.forward(&b).unwrap(), &orig.forward(&b).unwrap()) > 1e-4);
}

#[test]
fn truncated_gguf_names_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let (gguf, _) = write_tiny_llama_gguf(tmp.path(), false);
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&gguf, &bytes[..bytes.len() - 100]).unwrap();
    let err = format!(
        "{:#}",
        Mllm::load(&gguf, DType::F32, &Device::Cpu).err().unwrap()
    );
    assert!(err.contains("tiny.gguf"), "{err}");
    assert!(err.contains("truncated"), "{err}");
    assert!(err.contains('`'), "names a tensor: {err}");
    // a header cut short is refused too
    std::fs::write(&gguf, &bytes[..40]).unwrap();
    let err = format!(
        "{:#}",
        Mllm::load(&gguf, DType::F32, &Device::Cpu).err().unwrap()
    );
    assert!(
        err.contains("tiny.gguf") && err.contains("not a valid GGUF"),
        "{err}"
    );
}

/// GPT-2's byte -> printable char map.
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    bs.extend(0xA1..=0xAC);
    bs.extend(0xAE..=0xFF);
    let mut map = vec!['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        if bs.contains(&b) {
            map[b as usize] = char::from_u32(b).unwrap();
        } else {
            map[b as usize] = char::from_u32(256 + n).unwrap();
            n += 1;
        }
    }
    map
}

#[test]
fn tokenizer_and_chat_template_from_gguf_metadata() {
    let byte_chars = bytes_to_unicode();
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    tokens.extend(byte_chars.iter().map(|c| c.to_string()));
    let merges = ["h e", "Ġ t", "Ġt he", "t he", "1 2"];
    tokens.extend(
        ["he", "Ġt", "Ġthe", "the", "12"]
            .iter()
            .map(|s| s.to_string()),
    );
    let mut types = vec![3i32, 3, 3];
    types.extend(std::iter::repeat_n(1, tokens.len() - 3));
    let template = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'].strip() + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let meta = vec![
        ("general.architecture", GgufValue::Str("llama".into())),
        ("tokenizer.ggml.model", GgufValue::Str("gpt2".into())),
        ("tokenizer.ggml.pre", GgufValue::Str("smollm".into())),
        ("tokenizer.ggml.tokens", GgufValue::StrArray(tokens.clone())),
        ("tokenizer.ggml.token_type", GgufValue::I32Array(types)),
        (
            "tokenizer.ggml.merges",
            GgufValue::StrArray(merges.iter().map(|s| s.to_string()).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
        ("tokenizer.ggml.add_bos_token", GgufValue::Bool(false)),
        ("tokenizer.chat_template", GgufValue::Str(template.into())),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tok.gguf");
    write_gguf(&path, &meta, &[]);
    let g = GgufModel::open(&path).unwrap();
    let tools = ChatTokenizer::from_gguf(&g).unwrap().unwrap();
    let id = |s: &str| tokens.iter().position(|t| t == s).unwrap() as u32;
    // "the the": first word without a space prefix, second with (byte-level Ġ)
    assert_eq!(
        tools.encode("the the", true).unwrap(),
        vec![id("the"), id("Ġthe")]
    );
    // digits are split one by one before BPE (smollm pre-tokenizer), so "12" never merges
    assert_eq!(tools.encode("12", false).unwrap(), vec![id("1"), id("2")]);
    // special tokens are single ids inside text
    let ids = tools.encode("<|im_start|>the<|im_end|>", false).unwrap();
    assert_eq!(ids, vec![1, id("the"), 2]);
    assert_eq!(tools.decode(&ids).unwrap(), "<|im_start|>the<|im_end|>");
    let text = tools
        .render_chat(&[ChatMessage::new("user", " hi ")], true)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(tools.eos_token.as_deref(), Some("<|im_end|>"));
}

#[test]
fn unsupported_gguf_tokenizer_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("spm.gguf");
    let meta = vec![
        ("general.architecture", GgufValue::Str("llama".into())),
        ("tokenizer.ggml.model", GgufValue::Str("bert".into())),
    ];
    write_gguf(&path, &meta, &[]);
    let g = GgufModel::open(&path).unwrap();
    let err = format!("{:#}", ChatTokenizer::from_gguf(&g).err().unwrap());
    assert!(
        err.contains("spm.gguf") && err.contains("tokenizer.ggml.model"),
        "{err}"
    );
}

// --- export gguf ------------------------------------------------------------------------

use candle_core::quantized::gguf_file::Value;
use lntune::jobs::export_gguf::{GgufExport, GgufType, export_gguf};
use lntune::methods::Method;
use lntune::methods::adapter::load_model;

#[test]
fn encode_matches_the_ggml_reference_quantizers() {
    // values of both signs, one block of zeros, one block with a single large value
    let mut x: Vec<f32> = (0..192)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
        .collect();
    x.extend([0.0; 32]);
    x.extend((0..32).map(|i| if i == 7 { -3.5 } else { 0.01 * i as f32 }));
    assert_eq!(encode(GgmlDType::Q8_0, &x).unwrap(), quant_q8_0(&x).0);
    assert_eq!(encode(GgmlDType::Q4_0, &x).unwrap(), quant_q4_0(&x).0);
    assert_eq!(encode(GgmlDType::Q4_1, &x).unwrap(), quant_q4_1(&x).0);
    let f16s = encode(GgmlDType::F16, &x).unwrap();
    let back = dequantize(GgmlDType::F16, &f16s, x.len()).unwrap();
    assert!(
        x.iter()
            .zip(&back)
            .all(|(a, b)| (a - b).abs() <= 1e-3 * a.abs().max(1e-3))
    );
    assert_eq!(
        dequantize(
            GgmlDType::F32,
            &encode(GgmlDType::F32, &x).unwrap(),
            x.len()
        )
        .unwrap(),
        x
    );
    assert!(encode(GgmlDType::Q8_0, &x[..31]).is_err());
    // and the row permutation written is the one read back
    let w: Vec<f32> = (0..8 * 3).map(|i| i as f32).collect();
    assert_eq!(unpermute_qk_rows(&permute_qk_rows(&w, 2, 3), 2, 3), w);
}

fn export(model: &Path, adapter: Option<&Path>, out: &Path, ty: GgufType) -> GgufExport {
    export_gguf(model, adapter, out, ty).unwrap()
}

fn logits_of(model: &Path, adapter: Option<&Path>) -> Tensor {
    load_model(model, adapter, DType::F32, &Device::Cpu)
        .unwrap()
        .forward(&text_batch())
        .unwrap()
}

fn tensor_types(path: &Path) -> HashMap<String, GgmlDType> {
    let g = GgufModel::open(path).unwrap();
    g.content
        .tensor_infos
        .iter()
        .map(|(n, i)| (n.clone(), i.ggml_dtype))
        .collect()
}

#[test]
fn gguf_export_of_an_hf_llm_reloads_with_the_adapters_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("tiny-dinov2-llama/llm");
    let base_logits = logits_of(&base, None);
    for method in [Method::Ln, Method::Lora] {
        let adapter = tmp.path().join(format!("{}-adapter", method.name()));
        pattern_adapter(&base, method, &adapter);
        let want = logits_of(&base, Some(&adapter));
        let keep = tmp.path().join(format!("{}-keep.gguf", method.name()));
        let r = export(&base, Some(&adapter), &keep, GgufType::Keep);
        // both: embeddings and head; ln: 2 norms in each of 2 layers + the final one;
        // lora: the 7 linears of each layer
        let changed = if method == Method::Ln { 7 } else { 16 };
        assert_eq!((r.tensors, r.merged), (21, changed), "{}", method.name());
        let got = logits_of(&keep, None);
        let gap = max_abs(&got, &want);
        eprintln!("{}: keep (f32) export, logits gap {gap:.2e}", method.name());
        assert!(
            gap < 1e-5,
            "{}: keep export differs by {gap}",
            method.name()
        );
        assert!(max_abs(&got, &base_logits) > 1e-3);
        assert!(
            tensor_types(&keep).values().all(|t| *t == GgmlDType::F32),
            "an f32 checkpoint stays f32 under keep"
        );
        let q8 = tmp.path().join(format!("{}-q8.gguf", method.name()));
        export(&base, Some(&adapter), &q8, GgufType::Q8_0);
        for (n, t) in tensor_types(&q8) {
            let want_t = if n.contains("norm") {
                GgmlDType::F32
            } else {
                GgmlDType::Q8_0
            };
            assert_eq!(t, want_t, "{n}");
        }
        let gap = max_abs(&logits_of(&q8, None), &want);
        eprintln!("{}: q8_0 export, logits gap {gap:.2e}", method.name());
        assert!(
            gap < 2e-2,
            "{}: q8_0 export differs by {gap}",
            method.name()
        );
    }
}

#[test]
fn gguf_export_from_a_quantized_gguf_copies_what_the_adapter_leaves() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, _) = write_tiny_llama_gguf(tmp.path(), true);
    let src = GgufModel::open(&base).unwrap();
    for method in [Method::LnSimple, Method::Lora] {
        let adapter = tmp.path().join(format!("{}-adapter", method.name()));
        pattern_adapter(&base, method, &adapter);
        let out = tmp.path().join(format!("{}.gguf", method.name()));
        let r = export(&base, Some(&adapter), &out, GgufType::Keep);
        assert_eq!(
            r.retyped, 0,
            "F16, Q8_0, Q4_0 and Q4_1 are all re-encoded in kind"
        );
        assert_eq!(r.copied + r.merged, r.tensors);
        let dst = GgufModel::open(&out).unwrap();
        assert_eq!(
            dst.tensor_names(),
            src.tensor_names(),
            "same tensors, same order"
        );
        for n in src.tensor_names() {
            let (a, ta, da) = src.tensor_bytes(&n).unwrap();
            let (b, tb, db) = dst.tensor_bytes(&n).unwrap();
            assert_eq!((ta, &da), (tb, &db), "{n}: type and shape kept");
            let touched = match method {
                Method::LnSimple => n.contains("norm"),
                // every matrix (LoRA on all 7 linears, embeddings and head trained)
                _ => !n.contains("norm"),
            };
            assert_eq!(
                a != b,
                touched,
                "{}: {n} changed = {touched}",
                method.name()
            );
        }
        for k in [
            "general.architecture",
            "llama.block_count",
            "llama.rope.freq_base",
        ] {
            assert_eq!(
                format!("{:?}", dst.meta(k)),
                format!("{:?}", src.meta(k)),
                "{k}"
            );
        }
        let want = logits_of(&base, Some(&adapter));
        let gap = max_abs(&logits_of(&out, None), &want);
        eprintln!(
            "{}: keep export of a quantized GGUF, logits gap {gap:.2e}",
            method.name()
        );
        if method == Method::LnSimple {
            // norms travel in F32: nothing is re-quantized
            assert!(gap < 1e-6, "ln-simple keep export differs by {gap}");
        } else {
            // merged matrices are re-quantized to Q8_0/Q4_0/Q4_1: the error is of the size
            // quantizing the base itself made (the GGUF against the f32 weights it came from)
            let base_err = max_abs(
                &logits_of(&base, None),
                &logits_of(&fixture("tiny-dinov2-llama/llm"), None),
            );
            eprintln!("quantizing the base moved its logits by {base_err:.2e}");
            assert!(gap < 2.0 * base_err, "lora keep export differs by {gap}");
        }
    }
    // --type f16 re-types the matrices and says so in general.file_type
    let f16 = tmp.path().join("f16.gguf");
    export(&base, None, &f16, GgufType::F16);
    let g = GgufModel::open(&f16).unwrap();
    assert!(matches!(g.meta("general.file_type"), Some(Value::U32(1))));
    for (n, t) in tensor_types(&f16) {
        let want = if n.contains("norm") {
            GgmlDType::F32
        } else {
            GgmlDType::F16
        };
        assert_eq!(t, want, "{n}");
    }
    let gap = max_abs(&logits_of(&f16, None), &logits_of(&base, None));
    assert!(gap < 1e-3, "f16 of a dequantized base differs by {gap}");
}

#[test]
fn gguf_export_of_a_composed_model_reports_the_projector_it_leaves_out() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("tiny-dinov2-llama");
    let adapter = tmp.path().join("adapter");
    pattern_adapter(&base, Method::Ln, &adapter);
    let out = tmp.path().join("llm.gguf");
    let r = export(&base, Some(&adapter), &out, GgufType::Keep);
    assert!(!r.left_out.is_empty());
    assert!(
        r.left_out.iter().all(|k| k.starts_with("projector.")),
        "{:?}",
        r.left_out
    );
    assert_eq!(r.merged, 7, "5 norms, embeddings, head");
    // text only: the LLM alone answers as the composed model does
    let gap = max_abs(&logits_of(&out, None), &logits_of(&base, Some(&adapter)));
    assert!(gap < 1e-5, "composed model's LLM export differs by {gap}");
}

#[test]
fn gguf_export_refuses_to_write_over_its_base_and_names_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, _) = write_tiny_llama_gguf(tmp.path(), true);
    let before = std::fs::read(&base).unwrap();
    for out in [base.clone(), tmp.path().to_path_buf()] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lntune"))
            .args(["export", "gguf", "--model"])
            .arg(&base)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--out"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert_eq!(std::fs::read(&base).unwrap(), before);
}

#[test]
fn gguf_export_carries_a_byte_level_bpe_tokenizer_and_chat_template() {
    use lntune::io::tokenizer::ChatTokenizer;
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("tiny-llava");
    copy_dir(&fixture("tiny-llava"), &base);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tiny-llava-tokenizer").join(f), base.join(f)).unwrap();
    }
    let out = tmp.path().join("llm.gguf");
    let r = export(&base, None, &out, GgufType::Keep);
    assert!(r.no_tokenizer.is_none(), "{:?}", r.no_tokenizer);
    let hf = ChatTokenizer::from_hf_dir(&base).unwrap().unwrap();
    let from_gguf = Mllm::load(&out, DType::F32, &Device::Cpu)
        .unwrap()
        .tokenizer
        .expect("a tokenizer rebuilt from the GGUF's metadata");
    for text in [
        "hello world",
        " two  spaces\nand a newline",
        "<|im_start|>user\nhi<|im_end|>",
    ] {
        assert_eq!(
            from_gguf.encode(text, false).unwrap(),
            hf.encode(text, false).unwrap(),
            "{text:?}"
        );
    }
    let chat = [ChatMessage::new("user", "what is this?")];
    assert_eq!(
        from_gguf.render_chat(&chat, true).unwrap(),
        hf.render_chat(&chat, true).unwrap()
    );
    // without tokenizer.json the export says why it wrote none
    let r = export(
        &fixture("tiny-llava"),
        None,
        &tmp.path().join("bare.gguf"),
        GgufType::Keep,
    );
    assert!(r.no_tokenizer.unwrap().contains("tokenizer.json"));
}
