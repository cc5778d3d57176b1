//! The two engine choices a command makes once at the top and passes down: the device the
//! tensors live on, and the storage dtype of the frozen weights.

use anyhow::{Result, bail};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// Where tensors live (`--device cpu|cuda|cuda:N`). Written as that same text in saved
/// configs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    /// The CUDA card with this ordinal.
    Cuda(usize),
}

impl DeviceChoice {
    /// The candle device; CUDA needs a binary built with the `cuda` feature.
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(ordinal) => {
                if !candle_core::utils::cuda_is_available() {
                    bail!(
                        "--device {self}: this binary was built without the `cuda` feature \
                         (see the README, \"Building for CUDA\")"
                    );
                }
                // candle's CUDA errors carry a backtrace after the first line
                Device::new_cuda(ordinal).map_err(|e| {
                    let e = e.to_string();
                    let first = e.lines().next().unwrap_or("");
                    anyhow::anyhow!("--device {self}: cannot open the CUDA device: {first}")
                })
            }
        }
    }

    /// The text `--device` takes, for child processes and saved configs.
    pub fn name(self) -> String {
        self.to_string()
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(0) => write!(f, "cuda"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("`{s}` is not a device: expected cpu, cuda or cuda:N");
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                // a card ordinal is small; a huge one is a typo, not a device
                match n.parse::<usize>() {
                    Ok(n) if n < 1024 => Ok(DeviceChoice::Cuda(n)),
                    _ => Err(bad()),
                }
            }
        }
    }
}

impl Serialize for DeviceChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for DeviceChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_text_round_trips() {
        for (text, d) in [
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>().unwrap(), d);
            assert_eq!(d.to_string(), text);
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(serde_json::from_str::<DeviceChoice>(&json).unwrap(), d);
        }
        assert_eq!(
            "cuda:0".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        for bad in [
            "gpu",
            "cuda:",
            "cuda:x",
            "cuda:-1",
            "cuda:99999999999",
            "CPU",
            "",
        ] {
            let e = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        }
    }

    #[test]
    fn cuda_without_the_feature_names_the_flag() {
        if candle_core::utils::cuda_is_available() {
            return; // a cuda build: opening the device is the device check's business
        }
        let e = DeviceChoice::Cuda(1).device().unwrap_err().to_string();
        assert!(
            e.contains("--device cuda:1") && e.contains("`cuda` feature"),
            "{e}"
        );
    }
}
