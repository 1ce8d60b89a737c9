//! Where the model runs and in which element type: `--device` and `--dtype`,
//! and the one mapping between model dtypes and cache file dtypes.
//!
//! A GPU is used when kv-validate is built with the `cuda` feature and one
//! opens; asked for explicitly (`--device cuda:N`) but unavailable, it is an
//! error, never a silent CPU run. The default dtype follows the device:
//! bf16 on a GPU (what models are served in), f32 on the CPU (where candle's
//! half-precision matmuls widen to f32 anyway and only cost rounding).

use std::str::FromStr;

use candle_core::{DType, Device};
use kvformat::CacheDtype;

/// The device the user asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceRequest {
    /// GPU 0 when the build has CUDA and it opens, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// A CUDA GPU by ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let ordinal = |digits: &str| {
            digits
                .parse::<usize>()
                .map_err(|_| format!("{text:?}: expected cuda:N with N a GPU number"))
        };
        match text {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match text.strip_prefix("cuda:") {
                Some(digits) => Ok(Self::Cuda(ordinal(digits)?)),
                None => Err(format!("{text:?}: expected auto, cpu, cuda or cuda:N")),
            },
        }
    }
}

/// Why the requested device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "--device cuda:{0} needs a kv-validate built with CUDA \
         (`cargo xtask build-cuda`); this one runs on the CPU only (use --device cpu)"
    )]
    NotBuiltWithCuda(usize),
    #[error("cannot open GPU cuda:{ordinal}: {message} (use --device cpu to run on the CPU)")]
    Open { ordinal: usize, message: String },
}

/// An opened device and what to call it in reports.
#[derive(Clone, Debug)]
pub struct OpenedDevice {
    pub device: Device,
    /// `cuda:0 (NVIDIA H200)`, `cpu (AMD EPYC 7B13, 2 threads)`.
    pub name: String,
    /// Why `Auto` fell back to the CPU, for a status line.
    pub fallback_reason: Option<String>,
}

impl OpenedDevice {
    /// The dtype a model runs in when the user does not say: bf16 on a GPU, f32 on the CPU.
    pub fn default_dtype(&self) -> DType {
        if self.device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        }
    }
}

/// Opens the device `request` names.
pub fn open_device(request: DeviceRequest) -> Result<OpenedDevice, DeviceError> {
    match request {
        DeviceRequest::Cpu => Ok(cpu(None)),
        DeviceRequest::Cuda(ordinal) => open_cuda(ordinal),
        DeviceRequest::Auto if !candle_core::utils::cuda_is_available() => Ok(cpu(None)),
        DeviceRequest::Auto => {
            open_cuda(0).or_else(|error| Ok(cpu(Some(format!("{error}; running on the CPU")))))
        }
    }
}

fn open_cuda(ordinal: usize) -> Result<OpenedDevice, DeviceError> {
    if !candle_core::utils::cuda_is_available() {
        return Err(DeviceError::NotBuiltWithCuda(ordinal));
    }
    let device = Device::new_cuda(ordinal).map_err(|error| DeviceError::Open {
        ordinal,
        message: first_line(&error.to_string()),
    })?;
    Ok(OpenedDevice {
        name: format!("cuda:{ordinal} ({})", gpu_name(&device)),
        device,
        fallback_reason: None,
    })
}

fn cpu(fallback_reason: Option<String>) -> OpenedDevice {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    OpenedDevice {
        device: Device::Cpu,
        name: format!("cpu ({model}, {} threads)", rayon::current_num_threads()),
        fallback_reason,
    }
}

#[cfg(feature = "cuda")]
fn gpu_name(device: &Device) -> String {
    device
        .as_cuda_device()
        .ok()
        .and_then(|cuda| cuda.cuda_stream().context().name().ok())
        .unwrap_or_else(|| "unknown GPU".to_string())
}

#[cfg(not(feature = "cuda"))]
fn gpu_name(_device: &Device) -> String {
    "unknown GPU".to_string()
}

/// candle errors can carry a backtrace after their first line.
fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

/// `--dtype`: the element types a model runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelDtype {
    F32,
    F16,
    Bf16,
}

impl From<ModelDtype> for DType {
    fn from(dtype: ModelDtype) -> Self {
        match dtype {
            ModelDtype::F32 => DType::F32,
            ModelDtype::F16 => DType::F16,
            ModelDtype::Bf16 => DType::BF16,
        }
    }
}

/// The cache file dtype that stores a model dtype exactly.
pub fn cache_dtype_storing(dtype: DType) -> CacheDtype {
    match dtype {
        DType::F16 => CacheDtype::F16,
        DType::BF16 => CacheDtype::BF16,
        _ => CacheDtype::F32,
    }
}

/// The model dtype whose values a cache file of `dtype` holds.
pub fn dtype_of_cache(dtype: CacheDtype) -> DType {
    match dtype {
        CacheDtype::F32 => DType::F32,
        CacheDtype::F16 => DType::F16,
        CacheDtype::BF16 => DType::BF16,
    }
}

/// The spelling of a model dtype in reports: `f32`, `f16`, `bf16`.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "f32",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spellings_parse() {
        assert_eq!("auto".parse(), Ok(DeviceRequest::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceRequest::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceRequest::Cuda(3)));
        assert!("cuda:x".parse::<DeviceRequest>().is_err());
        assert!("gpu".parse::<DeviceRequest>().is_err());
        assert!("cuda:-1".parse::<DeviceRequest>().is_err());
    }

    #[test]
    fn every_cache_dtype_stores_its_model_dtype_exactly() {
        for dtype in [CacheDtype::F32, CacheDtype::F16, CacheDtype::BF16] {
            assert_eq!(cache_dtype_storing(dtype_of_cache(dtype)), dtype);
        }
        assert_eq!(cache_dtype_storing(DType::F64), CacheDtype::F32);
        assert_eq!(DType::from(ModelDtype::Bf16), DType::BF16);
    }

    #[test]
    fn the_cpu_opens_and_defaults_to_f32() {
        let opened = open_device(DeviceRequest::Cpu).unwrap();
        assert!(opened.device.is_cpu());
        assert!(opened.name.starts_with("cpu ("), "{}", opened.name);
        assert_eq!(opened.default_dtype(), DType::F32);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_asked_of_a_cpu_build_is_an_error_and_auto_is_the_cpu() {
        let error = open_device(DeviceRequest::Cuda(1)).unwrap_err().to_string();
        assert!(
            error.contains("cuda:1") && error.contains("build-cuda"),
            "{error}"
        );
        assert!(open_device(DeviceRequest::Auto).unwrap().device.is_cpu());
    }
}
