//! Token embedding lookup and its gradient, a scatter-add of dY rows into the table.

use candle_core::{DType, Result, Tensor};

/// ids (N) u32, table (V, C) -> (N, C), half precision widened to f32.
pub fn embedding_forward(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    let _span = crate::util::profile::span(crate::util::profile::Kind::Elementwise);
    super::widen(table.index_select(ids, 0)?)
}

/// dy (N, C), ids (N) -> dtable (V, C): row v = Σ of dy rows whose id is v.
pub fn embedding_backward(dy: &Tensor, ids: &Tensor, vocab: usize) -> Result<Tensor> {
    let _span = crate::util::profile::span(crate::util::profile::Kind::Elementwise);
    let c = dy.dim(1)?;
    Tensor::zeros((vocab, c), dy.dtype(), dy.device())?.index_add(ids, dy, 0)
}

/// Unused id type guard: ids must be u32 for index_select / index_add.
pub fn check_ids(ids: &Tensor) -> Result<()> {
    if ids.dtype() != DType::U32 {
        candle_core::bail!("embedding ids must be u32, got {:?}", ids.dtype());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;
    use candle_core::Device;

    #[test]
    fn backward_matches_finite_differences() {
        // repeated id 2 accumulates two rows
        let ids = Tensor::new(&[2u32, 0, 2, 3], &Device::Cpu).unwrap();
        let (table, r) = (randn(&[5, 3], 1), randn(&[4, 3], 2));
        let d = embedding_backward(&r, &ids, 5).unwrap();
        let fd = fd_grad(&table, |t| Ok(dot(&embedding_forward(&ids, t)?, &r)));
        assert_close("dtable", &d, &fd, 1e-7);
        check_ids(&ids).unwrap();
    }
}
