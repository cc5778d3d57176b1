//! Token embedding lookup; its gradient (issue: training engine) is a scatter-add of dY rows.

use candle_core::{DType, Result, Tensor};

/// ids (N) u32, table (V, C) -> (N, C) f32.
pub fn embedding_forward(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    let rows = table.index_select(ids, 0)?;
    if rows.dtype() == DType::F32 {
        Ok(rows)
    } else {
        rows.to_dtype(DType::F32)
    }
}
