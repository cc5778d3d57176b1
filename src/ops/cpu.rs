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
