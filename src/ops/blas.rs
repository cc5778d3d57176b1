//! f32 matrix products through OpenBLAS's `cblas_sgemm` (the `openblas` feature). At the
//! shapes of a training step (N = B·T rows against the model's linears) it runs at about
//! the CPU's f32 peak, where the gemm crate behind candle reaches 55 to 65% of it (see
//! `lntune bench --profile`). Only 2-D f32 CPU operands that are row-major or transposed
//! views of row-major data are taken; everything else stays with candle.

use std::sync::Once;

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};

#[link(name = "openblas")]
unsafe extern "C" {
    fn cblas_sgemm(
        order: i32,
        trans_a: i32,
        trans_b: i32,
        m: i32,
        n: i32,
        k: i32,
        alpha: f32,
        a: *const f32,
        lda: i32,
        b: *const f32,
        ldb: i32,
        beta: f32,
        c: *mut f32,
        ldc: i32,
    );
    fn openblas_set_num_threads(n: i32);
}

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// OpenBLAS uses as many threads as candle's kernels do (rayon's count: `--threads`).
fn set_threads() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let n = rayon::current_num_threads().clamp(1, 1024) as i32;
        // SAFETY: sets a count in OpenBLAS's global state before any product runs here.
        unsafe { openblas_set_num_threads(n) };
    });
}

/// How a 2-D tensor of `rows` x `cols` lies in memory: (transposed, leading dimension), for a
/// row-major matrix or the transposed view of one.
fn operand_layout(t: &Tensor) -> Option<(bool, usize)> {
    let (rows, cols) = t.dims2().ok()?;
    let st = t.layout().stride();
    if st[1] == 1 && st[0] >= cols.max(1) {
        Some((false, st[0]))
    } else if st[0] == 1 && st[1] >= rows.max(1) {
        Some((true, st[1]))
    } else {
        None
    }
}

/// `a @ b` for 2-D f32 CPU tensors, or `None` when the operands are not of that kind (the
/// caller then uses candle's matmul).
pub fn sgemm(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let both_f32_cpu = [a, b]
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu() && t.rank() == 2);
    if !both_f32_cpu {
        return Ok(None);
    }
    let ((m, k), (k2, n)) = (a.dims2()?, b.dims2()?);
    if k != k2 {
        candle_core::bail!("matmul: {:?} @ {:?}", a.dims(), b.dims());
    }
    let fits = |x: usize| x > 0 && x <= i32::MAX as usize;
    if !(fits(m) && fits(n) && fits(k)) {
        return Ok(None);
    }
    let a = match operand_layout(a) {
        Some(_) => a.clone(),
        None => a.contiguous()?,
    };
    let b = match operand_layout(b) {
        Some(_) => b.clone(),
        None => b.contiguous()?,
    };
    let (Some((ta, lda)), Some((tb, ldb))) = (operand_layout(&a), operand_layout(&b)) else {
        return Ok(None);
    };
    if !(fits(lda) && fits(ldb)) {
        return Ok(None);
    }
    set_threads();
    let mut c = vec![0f32; m * n];
    {
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(va)), Storage::Cpu(CpuStorage::F32(vb))) = (&*sa, &*sb)
        else {
            return Ok(None);
        };
        let (pa, pb) = (&va[la.start_offset()..], &vb[lb.start_offset()..]);
        // the last element each operand's strides reach must lie inside its buffer
        let reach = |rows: usize, cols: usize, t: bool, ld: usize| {
            if t {
                (cols - 1) * ld + rows
            } else {
                (rows - 1) * ld + cols
            }
        };
        if reach(m, k, ta, lda) > pa.len() || reach(k, n, tb, ldb) > pb.len() {
            return Ok(None);
        }
        let flag = |t: bool| if t { TRANS } else { NO_TRANS };
        // SAFETY: pointers to live buffers whose extents were checked above for these
        // dimensions and leading dimensions; `c` holds m·n values with ldc = n.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                flag(ta),
                flag(tb),
                m as i32,
                n as i32,
                k as i32,
                1.0,
                pa.as_ptr(),
                lda as i32,
                pb.as_ptr(),
                ldb as i32,
                0.0,
                c.as_mut_ptr(),
                n as i32,
            )
        };
    }
    Ok(Some(Tensor::from_vec(c, (m, n), &Device::Cpu)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_equals_candles_matmul() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (37, 19), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (19, 23), &dev).unwrap();
        let at = Tensor::randn(0f32, 1.0, (19, 37), &dev).unwrap();
        let bt = Tensor::randn(0f32, 1.0, (23, 19), &dev).unwrap();
        let wide = Tensor::randn(0f32, 1.0, (37, 40), &dev).unwrap();
        let cases: Vec<(Tensor, Tensor)> = vec![
            (a.clone(), b.clone()),
            (at.t().unwrap(), b.clone()),
            (a.clone(), bt.t().unwrap()),
            (at.t().unwrap(), bt.t().unwrap()),
            // a view with a leading dimension larger than its width
            (wide.narrow(1, 3, 19).unwrap(), b.clone()),
        ];
        for (i, (x, y)) in cases.iter().enumerate() {
            let want = x
                .contiguous()
                .unwrap()
                .matmul(&y.contiguous().unwrap())
                .unwrap();
            let got = sgemm(x, y).unwrap().expect("f32 CPU operands");
            let d = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-4, "case {i}: max abs difference {d}");
        }
        // other dtypes are not taken
        let a64 = a.to_dtype(DType::F64).unwrap();
        let b64 = b.to_dtype(DType::F64).unwrap();
        assert!(sgemm(&a64, &b64).unwrap().is_none());
    }
}
