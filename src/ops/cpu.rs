//! Helpers for the fused CPU kernels some ops use (as candle custom ops): contiguous f32
//! access to a storage. Each op keeps a composed-tensor-op path for other devices.

use candle_core::{CpuStorage, Layout, Result};

/// The f32 data of a contiguous CPU tensor.
pub fn f32_data<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: input is not contiguous");
    };
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: input must be f32"),
    }
}

/// Rows per rayon task: enough work to amortise scheduling.
pub fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

/// A contiguous bf16 CPU tensor widened to f32 on the rayon threads (exact; candle's own
/// conversion runs on one thread). `None` for anything else.
pub fn widen_bf16(t: &candle_core::Tensor) -> Result<Option<candle_core::Tensor>> {
    use rayon::prelude::*;
    if t.dtype() != candle_core::DType::BF16 || !t.device().is_cpu() {
        return Ok(None);
    }
    let out = {
        let (storage, layout) = t.storage_and_layout();
        let (candle_core::Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        let src = &v[a..b];
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(o, s)| {
                for (o, s) in o.iter_mut().zip(s) {
                    *o = s.to_f32();
                }
            });
        out
    };
    Ok(Some(candle_core::Tensor::from_vec(
        out,
        t.shape(),
        t.device(),
    )?))
}
