//! What a CUDA device holds: the high-water mark of the memory candle allocated on it.
//! cudarc allocates from the device's stream-ordered pool (cuMemAllocAsync) and candle
//! keeps no cache of its own, so the pool's USED_MEM_HIGH is the peak of live tensors, the
//! counterpart of PyTorch's `torch.cuda.max_memory_allocated` (cuBLAS's own workspace and
//! the CUDA context are outside both).

use candle_core::Device;

/// Peak MiB allocated on `dev` since the process opened it; None on the CPU, in a build
/// without the `cuda` feature, or where the driver has no memory pools.
pub fn peak_memory_mib(dev: &Device) -> Option<f64> {
    imp::used_high(dev).map(|b| b as f64 / (1u64 << 20) as f64)
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::Device;
    use candle_core::cuda_backend::cudarc::driver::{result, sys};

    /// The default pool's USED_MEM_HIGH, after the device's queued work has finished.
    pub fn used_high(dev: &Device) -> Option<u64> {
        let Device::Cuda(d) = dev else {
            return None;
        };
        let stream = d.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().ok()?;
        stream.synchronize().ok()?;
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        let mut value: u64 = 0;
        // SAFETY: the device comes from a live context; the attribute is a u64 (cuuint64_t),
        // as the driver API documents.
        unsafe {
            let pool = result::device::get_default_mem_pool(ctx.cu_device()).ok()?;
            let ptr = &mut value as *mut u64 as *mut core::ffi::c_void;
            result::mem_pool::get_attribute(pool, attr, ptr).ok()?;
        }
        Some(value)
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    pub fn used_high(_: &candle_core::Device) -> Option<u64> {
        None
    }
}
