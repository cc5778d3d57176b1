//! Finite-difference gradient checks in f64 for the op tests.
//!
//! Every backward is checked the same way: pick a random dY (`r`), define the scalar
//! L = Σ f(x) ⊙ r, so dL/dY = r; the backward's dX must equal the central difference
//! (L(x + h·e_i) − L(x − h·e_i)) / 2h for every element i.

use candle_core::{DType, Device, Result, Tensor};

use crate::util::rng::Rng;

pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    Rng::new(seed)
        .normal_tensor(shape, 1.0, DType::F64, &Device::Cpu)
        .unwrap()
}

/// Σ a ⊙ b as f64.
pub fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Central-difference gradient of `f` at `x` (f64), h = 1e-6.
pub fn fd_grad(x: &Tensor, f: impl Fn(&Tensor) -> Result<f64>) -> Tensor {
    let h = 1e-6;
    let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let mut g = vec![0f64; base.len()];
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += h;
        let fp = f(&Tensor::from_vec(p.clone(), x.shape(), &Device::Cpu).unwrap()).unwrap();
        p[i] -= 2.0 * h;
        let fm = f(&Tensor::from_vec(p, x.shape(), &Device::Cpu).unwrap()).unwrap();
        g[i] = (fp - fm) / (2.0 * h);
    }
    Tensor::from_vec(g, x.shape(), &Device::Cpu).unwrap()
}

/// Asserts max |a − b| <= tol · max(1, max |b|).
pub fn assert_close(name: &str, a: &Tensor, b: &Tensor, tol: f64) {
    assert_eq!(a.dims(), b.dims(), "{name}: shapes");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let d = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let s = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1.0);
    assert!(d <= tol * s, "{name}: max abs diff {d} (scale {s})");
}
