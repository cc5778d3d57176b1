//! Writing GGUF (v3) files, tensor by tensor, and encoding f32 values in the ggml types
//! lntune writes: F32, F16, BF16, Q8_0, Q4_0, Q4_1.
//!
//! Quantizers follow ggml's reference rows (`quantize_row_*_ref` in `ggml-quants.c`), block
//! size 32, so a file decodes in llama.cpp to what `io::gguf::dequantize` gives here:
//! - Q8_0: `d = amax/127`, `q = round(x/d)`
//! - Q4_0: `d = m/−8` with `m` the value of largest magnitude, `q = min(15, (int)(x/d + 8.5))`
//! - Q4_1: `d = (max−min)/15`, `m = min`, `q = min(15, (int)((x−min)/d + 0.5))`
//!
//! Layout: header, metadata, tensor infos (dims fastest first), padding to the alignment,
//! then each tensor's bytes padded to the alignment. The file is written under a temporary
//! name beside `path` and renamed when complete.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;
use half::{bf16, f16};

/// GGUF's default (and llama.cpp's) data alignment.
pub const ALIGNMENT: usize = 32;

/// One tensor to write: GGUF name, row-major dims (`[out, in]`, as the reader gives them)
/// and ggml type.
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
}

impl OutTensor {
    /// Bytes of this tensor in its type.
    pub fn nbytes(&self) -> Result<usize> {
        let n: usize = self.dims.iter().product();
        let bs = self.dtype.block_size();
        if !n.is_multiple_of(bs) {
            bail!(
                "tensor `{}`: {n} values are not whole {:?} blocks of {bs}",
                self.name,
                self.dtype
            );
        }
        Ok(n / bs * self.dtype.type_size())
    }
}

/// ggml's numeric id of a type (`enum ggml_type`).
pub fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Whether `encode` can write this type.
pub fn can_encode(t: GgmlDType) -> bool {
    matches!(
        t,
        GgmlDType::F32
            | GgmlDType::F16
            | GgmlDType::BF16
            | GgmlDType::Q8_0
            | GgmlDType::Q4_0
            | GgmlDType::Q4_1
    )
}

/// `x` in ggml type `t` (whole blocks of 32 for the quantized types).
pub fn encode(t: GgmlDType, x: &[f32]) -> Result<Vec<u8>> {
    let blocks = |bytes_per_block: usize| -> Result<Vec<u8>> {
        if !x.len().is_multiple_of(32) {
            bail!("{} values are not whole {t:?} blocks of 32", x.len());
        }
        Ok(Vec::with_capacity(x.len() / 32 * bytes_per_block))
    };
    Ok(match t {
        GgmlDType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlDType::F16 => x
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlDType::BF16 => x
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlDType::Q8_0 => {
            let mut out = blocks(34)?;
            for blk in x.chunks_exact(32) {
                let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
            }
            out
        }
        GgmlDType::Q4_0 => {
            let mut out = blocks(18)?;
            for blk in x.chunks_exact(32) {
                let m = blk
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = m / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(blk[j]) | (q(blk[j + 16]) << 4)));
            }
            out
        }
        GgmlDType::Q4_1 => {
            let mut out = blocks(20)?;
            for blk in x.chunks_exact(32) {
                let min = blk.iter().cloned().fold(f32::INFINITY, f32::min);
                let max = blk.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(blk[j]) | (q(blk[j + 16]) << 4)));
            }
            out
        }
        other => {
            bail!("writing {other:?} tensors is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1)")
        }
    })
}

/// llama.cpp's Q/K row permutation for the `llama` architecture (`convert_hf_to_gguf`'s
/// `permute`), the inverse of `io::gguf::unpermute_qk_rows`:
/// `gguf = hf.reshape(n_head, 2, hd/2, n_in).swapaxes(1, 2)`.
pub fn permute_qk_rows(w: &[f32], n_head: usize, n_in: usize) -> Vec<f32> {
    let n_out = w.len() / n_in;
    let hd = n_out / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for t in 0..2 {
            for j in 0..hd / 2 {
                let src = h * hd + t * hd / 2 + j;
                let dst = h * hd + 2 * j + t;
                out[dst * n_in..(dst + 1) * n_in].copy_from_slice(&w[src * n_in..(src + 1) * n_in]);
            }
        }
    }
    out
}

fn put_string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// GGUF's id of a metadata value's type.
fn value_type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(w: &mut impl Write, key: &str, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x])?,
        Value::I8(x) => w.write_all(&x.to_le_bytes())?,
        Value::U16(x) => w.write_all(&x.to_le_bytes())?,
        Value::I16(x) => w.write_all(&x.to_le_bytes())?,
        Value::U32(x) => w.write_all(&x.to_le_bytes())?,
        Value::I32(x) => w.write_all(&x.to_le_bytes())?,
        Value::U64(x) => w.write_all(&x.to_le_bytes())?,
        Value::I64(x) => w.write_all(&x.to_le_bytes())?,
        Value::F32(x) => w.write_all(&x.to_le_bytes())?,
        Value::F64(x) => w.write_all(&x.to_le_bytes())?,
        Value::Bool(x) => w.write_all(&[*x as u8])?,
        Value::String(s) => put_string(w, s)?,
        Value::Array(items) => {
            // an empty array still needs an element type: u32, as llama.cpp's writer uses
            let elem = items.first().map(value_type_id).unwrap_or(4);
            if items.iter().any(|i| value_type_id(i) != elem) {
                bail!("metadata `{key}`: an array mixes element types");
            }
            w.write_all(&elem.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for i in items {
                put_value(w, key, i)?;
            }
        }
    }
    Ok(())
}

fn pad(w: &mut impl Write, written: usize) -> std::io::Result<usize> {
    let p = written.next_multiple_of(ALIGNMENT) - written;
    w.write_all(&[0u8; ALIGNMENT][..p])?;
    Ok(p)
}

/// Writes `path`: `meta` in the given order, then `tensors`, whose bytes `data(i)` gives
/// one at a time (so memory holds one tensor, not the model). `general.alignment` in `meta`
/// must be absent or 32.
pub fn write_gguf(
    path: &Path,
    meta: &[(String, Value)],
    tensors: &[OutTensor],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    if let Some((_, v)) = meta.iter().find(|(k, _)| k == "general.alignment")
        && !matches!(v, Value::U32(32))
    {
        bail!("metadata `general.alignment` is {v:?}; lntune writes 32-byte aligned files");
    }
    let sizes: Vec<usize> = tensors.iter().map(|t| t.nbytes()).collect::<Result<_>>()?;
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?
        .to_string_lossy();
    // a name of this process's own, so that two writers never share a temporary file
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = write_to(&tmp, meta, tensors, &sizes, &mut data).and_then(|()| {
        std::fs::rename(&tmp, path)
            .with_context(|| format!("{}: cannot rename into place", path.display()))
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn write_to(
    path: &Path,
    meta: &[(String, Value)],
    tensors: &[OutTensor],
    sizes: &[usize],
    data: &mut impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let file = std::fs::File::create(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
    let io = |e: std::io::Error| anyhow::anyhow!("{}: cannot write: {e}", path.display());
    let mut head = Vec::new();
    head.extend(0x4655_4747u32.to_le_bytes()); // "GGUF"
    head.extend(3u32.to_le_bytes());
    head.extend((tensors.len() as u64).to_le_bytes());
    head.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_string(&mut head, k)?;
        head.extend(value_type_id(v).to_le_bytes());
        put_value(&mut head, k, v)?;
    }
    let mut offset = 0usize;
    for (t, size) in tensors.iter().zip(sizes) {
        put_string(&mut head, &t.name)?;
        head.extend((t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            head.extend((*d as u64).to_le_bytes());
        }
        head.extend(ggml_type_id(t.dtype).to_le_bytes());
        head.extend((offset as u64).to_le_bytes());
        offset += size.next_multiple_of(ALIGNMENT);
    }
    w.write_all(&head).map_err(io)?;
    pad(&mut w, head.len()).map_err(io)?;
    for (i, (t, size)) in tensors.iter().zip(sizes).enumerate() {
        let bytes = data(i)?;
        if bytes.len() != *size {
            bail!(
                "tensor `{}`: {} bytes for {:?} {:?}, expected {size}",
                t.name,
                bytes.len(),
                t.dtype,
                t.dims
            );
        }
        w.write_all(&bytes).map_err(io)?;
        pad(&mut w, bytes.len()).map_err(io)?;
    }
    w.flush().map_err(io)?;
    drop(w);
    file.sync_all().map_err(io)
}
