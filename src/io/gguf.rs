//! GGUF (llama.cpp) LLM files: typed metadata access and tensors dequantized to f32 under HF
//! checkpoint names (the decoder config is read from the metadata in `model::config`, the
//! tokenizer in `io::tokenizer`).
//!
//! Dequantization follows ggml (`ggml-quants.c`), block size 32:
//! - Q4_0: f16 d, 16 bytes qs: `w[j] = d·((qs[j] & 0xF) − 8)`, `w[j+16] = d·((qs[j] >> 4) − 8)`
//! - Q4_1: f16 d, f16 m, 16 bytes qs: `w[j] = d·(qs[j] & 0xF) + m`, `w[j+16] = d·(qs[j] >> 4) + m`
//! - Q8_0: f16 d, 32 × i8 q: `w = d·q`
//!
//! plus F32, F16 and BF16; other types go through candle's dequantizer.
//! llama.cpp permutes the rows of `attn_q`/`attn_k` for the `llama` architecture so that
//! RoPE pairs adjacent dims; `unpermute_qk_rows` undoes it for HF's rotate-half RoPE.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;

use super::store::Store;

pub struct GgufModel {
    pub path: PathBuf,
    pub content: Content,
    mmap: Mmap,
}

/// ggml block sizes in bytes for the types dequantized here.
const Q4_0_BYTES: usize = 18;
const Q4_1_BYTES: usize = 20;
const Q8_0_BYTES: usize = 34;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `n` values of ggml type `dtype` from `bytes`.
pub fn dequantize(dtype: GgmlDType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let bs = dtype.block_size();
    let need = (n / bs).checked_mul(dtype.type_size());
    if !n.is_multiple_of(bs) || need.is_none_or(|need| bytes.len() < need) {
        bail!(
            "{n} {dtype:?} values need {} bytes in whole blocks of {bs}, got {}",
            need.map(|x| x.to_string()).unwrap_or("more".into()),
            bytes.len()
        );
    }
    let mut out = Vec::with_capacity(n);
    match dtype {
        GgmlDType::F32 => out.extend(
            bytes[..4 * n]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlDType::F16 => out.extend(bytes[..2 * n].chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlDType::BF16 => out.extend(
            bytes[..2 * n]
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlDType::Q4_0 => {
            for blk in bytes[..n / 32 * Q4_0_BYTES].chunks_exact(Q4_0_BYTES) {
                let d = f16_at(blk, 0);
                let qs = &blk[2..18];
                out.extend(qs.iter().map(|&q| d * ((q & 0xF) as i32 - 8) as f32));
                out.extend(qs.iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
            }
        }
        GgmlDType::Q4_1 => {
            for blk in bytes[..n / 32 * Q4_1_BYTES].chunks_exact(Q4_1_BYTES) {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                let qs = &blk[4..20];
                out.extend(qs.iter().map(|&q| d * (q & 0xF) as f32 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
        }
        GgmlDType::Q8_0 => {
            for blk in bytes[..n / 32 * Q8_0_BYTES].chunks_exact(Q8_0_BYTES) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..34].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        other => {
            let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                other,
                bytes,
                vec![n],
                &Device::Cpu,
            )?;
            out = q.dequantize(&Device::Cpu)?.to_vec1::<f32>()?;
        }
    }
    Ok(out)
}

/// Undoes llama.cpp's Q/K row permutation: rows of a (n_head·hd, n_in) matrix, stored as
/// `hf.reshape(n_head, 2, hd/2, n_in).swapaxes(1, 2)`, back to HF order:
/// `hf_row[h·hd + t·hd/2 + j] = gguf_row[h·hd + 2j + t]`.
pub fn unpermute_qk_rows(w: &[f32], n_head: usize, n_in: usize) -> Vec<f32> {
    let n_out = w.len() / n_in;
    let hd = n_out / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for t in 0..2 {
            for j in 0..hd / 2 {
                let dst = h * hd + t * hd / 2 + j;
                let src = h * hd + 2 * j + t;
                out[dst * n_in..(dst + 1) * n_in].copy_from_slice(&w[src * n_in..(src + 1) * n_in]);
            }
        }
    }
    out
}

/// GGUF block module names and their HF LLaMA counterparts.
const BLOCK_MODULES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// HF LLaMA checkpoint name -> GGUF tensor name (the inverse of `hf_name`).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    let (g, _) = BLOCK_MODULES.iter().find(|(_, h)| *h == module)?;
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// GGUF tensor name -> HF LLaMA checkpoint name.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    let (_, hf) = BLOCK_MODULES.iter().find(|(g, _)| *g == module)?;
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

impl GgufModel {
    pub fn open(path: &Path) -> Result<Self> {
        crate::util::files::regular_file(path)?;
        let mut file =
            File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let content = Content::read(&mut file)
            .map_err(|e| anyhow::anyhow!("{}: not a valid GGUF file: {e}", path.display()))?;
        // SAFETY: read-only mapping of a file we do not modify.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot memory-map", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            mmap,
        })
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => {
                let x = match v {
                    Value::U8(x) => *x as u64,
                    Value::U16(x) => *x as u64,
                    Value::U32(x) => *x as u64,
                    Value::U64(x) => *x,
                    Value::I32(x) if *x >= 0 => *x as u64,
                    Value::I64(x) if *x >= 0 => *x as u64,
                    other => bail!(
                        "{}: metadata `{key}` is {other:?}, expected an unsigned integer",
                        self.path.display()
                    ),
                };
                Ok(Some(x as usize))
            }
        }
    }

    pub fn need_usize(&self, key: &str) -> Result<usize> {
        self.meta_usize(key)?
            .with_context(|| format!("{}: missing metadata `{key}`", self.path.display()))
    }

    pub fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        Ok(match self.meta(key) {
            None => None,
            Some(Value::F32(x)) => Some(*x as f64),
            Some(Value::F64(x)) => Some(*x),
            Some(other) => bail!(
                "{}: metadata `{key}` is {other:?}, expected a float",
                self.path.display()
            ),
        })
    }

    pub fn meta_string(&self, key: &str) -> Result<Option<String>> {
        Ok(match self.meta(key) {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => bail!(
                "{}: metadata `{key}` is {other:?}, expected a string",
                self.path.display()
            ),
        })
    }

    pub fn meta_string_array(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => bail!(
                        "{}: metadata `{key}` holds {other:?}, expected strings",
                        self.path.display()
                    ),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(other) => bail!(
                "{}: metadata `{key}` is {other:?}, expected an array",
                self.path.display()
            ),
        }
    }

    pub fn meta_int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(*x as i64),
                    Value::U32(x) => Ok(*x as i64),
                    Value::I8(x) => Ok(*x as i64),
                    Value::U8(x) => Ok(*x as i64),
                    Value::I64(x) => Ok(*x),
                    other => bail!(
                        "{}: metadata `{key}` holds {other:?}, expected integers",
                        self.path.display()
                    ),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(other) => bail!(
                "{}: metadata `{key}` is {other:?}, expected an array",
                self.path.display()
            ),
        }
    }

    pub fn meta_u32(&self, key: &str) -> Result<Option<u32>> {
        Ok(self.meta_usize(key)?.map(|x| x as u32))
    }

    pub fn meta_bool(&self, key: &str) -> Option<bool> {
        match self.meta(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    pub fn architecture(&self) -> Result<String> {
        self.meta_string("general.architecture")?.with_context(|| {
            format!(
                "{}: missing metadata `general.architecture`",
                self.path.display()
            )
        })
    }

    /// Tensor names in the order of their data in the file.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<(&String, u64)> = self
            .content
            .tensor_infos
            .iter()
            .map(|(n, i)| (n, i.offset))
            .collect();
        names.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(b.0)));
        names.into_iter().map(|(n, _)| n.clone()).collect()
    }

    /// The raw bytes of a tensor, bounds-checked against the file, with its type and
    /// row-major dims.
    pub fn tensor_bytes(&self, name: &str) -> Result<(&[u8], GgmlDType, Vec<usize>)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .with_context(|| format!("{}: missing tensor `{name}`", self.path.display()))?;
        let dims = info.shape.dims().to_vec();
        let n = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .with_context(|| {
                format!(
                    "{}: tensor `{name}` has shape {dims:?}, more values than memory can index",
                    self.path.display()
                )
            })?;
        let bs = info.ggml_dtype.block_size();
        if !n.is_multiple_of(bs) {
            bail!(
                "{}: tensor `{name}` has {n} values, not a multiple of the {:?} block size {bs}",
                self.path.display(),
                info.ggml_dtype
            );
        }
        let size = (n / bs).checked_mul(info.ggml_dtype.type_size());
        let start = usize::try_from(self.content.tensor_data_offset)
            .ok()
            .zip(usize::try_from(info.offset).ok())
            .and_then(|(a, b)| a.checked_add(b));
        let (Some(size), Some(start)) = (size, start) else {
            bail!(
                "{}: tensor `{name}`: its offset or size does not fit in the file",
                self.path.display()
            );
        };
        let end = start.saturating_add(size);
        if end > self.mmap.len() {
            bail!(
                "{}: tensor `{name}` needs bytes {start}..{end} but the file has {} bytes; truncated?",
                self.path.display(),
                self.mmap.len()
            );
        }
        Ok((&self.mmap[start..end], info.ggml_dtype, dims))
    }

    /// Dequantizes one tensor by its GGUF name to f32 with its row-major (out, in) shape.
    pub fn dequantize_tensor(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (bytes, dtype, dims) = self.tensor_bytes(name)?;
        let n = dims.iter().product();
        let data = dequantize(dtype, bytes, n)
            .with_context(|| format!("{}: tensor `{name}`", self.path.display()))?;
        Ok((data, dims))
    }

    /// Every tensor, dequantized to f32 under HF names. `qk_heads` (query heads, key/value
    /// heads) un-permutes the Q and K rows of llama.cpp's `llama` conversion.
    pub fn hf_store(&self, qk_heads: Option<(usize, usize)>, device: &Device) -> Result<Store> {
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        let mut tensors = Vec::with_capacity(names.len());
        for name in names {
            let Some(hf) = hf_name(name) else {
                if name == "rope_freqs.weight" {
                    continue;
                }
                bail!(
                    "{}: tensor `{name}` has no HF LLaMA equivalent",
                    self.path.display()
                );
            };
            let (mut data, dims) = self.dequantize_tensor(name)?;
            if let Some((heads, kv_heads)) = qk_heads {
                let n_in = if dims.len() == 2 { dims[1] } else { 1 };
                if name.contains(".attn_q.") {
                    data = unpermute_qk_rows(&data, heads, n_in);
                } else if name.contains(".attn_k.") {
                    data = unpermute_qk_rows(&data, kv_heads, n_in);
                }
            }
            tensors.push((hf, Tensor::from_vec(data, dims, device)?));
        }
        let mut store = Store::new(device);
        store.add_owned(&self.path, tensors)?;
        Ok(store)
    }
}
