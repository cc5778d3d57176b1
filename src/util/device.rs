//! The two engine choices a command makes once at the top and passes down: the device the
//! tensors live on, and the storage dtype of the frozen weights.

use anyhow::{Result, bail};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// Where tensors live (`--device`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda,
}

impl DeviceChoice {
    /// The candle device; CUDA needs a binary built with the `cuda` feature.
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda => {
                if !candle_core::utils::cuda_is_available() {
                    bail!("--device cuda: this binary was built without the `cuda` feature");
                }
                Ok(Device::new_cuda(0)?)
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        }
    }
}

/// Storage and matmul dtype of the frozen weights (`--dtype`); trainable tensors, their
/// gradients and optimizer state are f32 either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    #[default]
    F32,
    Bf16,
}

impl WeightDtype {
    pub fn dtype(self) -> DType {
        match self {
            WeightDtype::F32 => DType::F32,
            WeightDtype::Bf16 => DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
        }
    }
}
