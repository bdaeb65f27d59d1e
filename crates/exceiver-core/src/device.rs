//! Where the heavy maths runs: the `exceiver.device` setting's values.
//!
//! `cpu` (the default) or `cuda` / `cuda:N`. The default build runs on the CPU only:
//! asking for a GPU is a clear error naming the setting, never a crash, and a CPU-only
//! server never loads a library that links the CUDA driver. A build with the `cuda`
//! feature opens CUDA devices through candle ([`Device::open`]); the batched model and
//! trainer that run there live in [`crate::accel`].

use crate::error::{Error, Result};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

/// How f32 matrix products run on a GPU: in full f32 (the default, within the
/// fixtures' tolerances) or on TF32 tensor cores (10-bit mantissa inputs, f32
/// accumulation: faster, less exact; its error against the fixtures is what
/// `gpu_bench --tf32` prints). The CPU always computes in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulPrecision {
    F32,
    Tf32,
}

static TF32: AtomicBool = AtomicBool::new(false);

/// Set the GPU matrix-product precision for this process (candle's cuBLAS setting is
/// process-wide). Takes effect for devices already open and opened later.
pub fn set_matmul_precision(p: MatmulPrecision) {
    let tf32 = p == MatmulPrecision::Tf32;
    TF32.store(tf32, Ordering::Relaxed);
    #[cfg(feature = "cuda")]
    candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
}

/// The GPU matrix-product precision in force.
pub fn matmul_precision() -> MatmulPrecision {
    if TF32.load(Ordering::Relaxed) {
        MatmulPrecision::Tf32
    } else {
        MatmulPrecision::F32
    }
}

/// A compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Highest device index accepted by the parser.
pub const MAX_DEVICE_INDEX: usize = 1023;

impl Device {
    /// Parse `cpu`, `cuda` (= `cuda:0`) or `cuda:N` (case-insensitive, surrounding
    /// blanks ignored).
    pub fn parse(s: &str) -> Result<Device> {
        let t = s.trim().to_ascii_lowercase();
        let bad = || {
            Error::invalid(format!("\"{s}\" is not a device"))
                .with_hint("Use cpu, cuda or cuda:N (N a device index).")
        };
        match t.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => {
                let n = t.strip_prefix("cuda:").ok_or_else(bad)?;
                let n: usize = n.parse().map_err(|_| bad())?;
                if n > MAX_DEVICE_INDEX {
                    return Err(Error::invalid(format!(
                        "device index {n} is out of range 0..{MAX_DEVICE_INDEX}"
                    )));
                }
                Ok(Device::Cuda(n))
            }
        }
    }

    /// Check that this build can run on the device: always for the CPU; for a GPU, in
    /// a `cuda` build, the device is opened (see [`Device::open`]).
    pub fn check_supported(self) -> Result<()> {
        self.open().map(|_| ())
    }

    /// The candle device to compute on. `cpu` always works. `cuda:N` needs a build
    /// with the `cuda` feature, a CUDA driver and a device N; each failure is a clear
    /// error with the numbers in it. Devices are opened once per process and shared
    /// (the CUDA context, cuBLAS handle and kernels are reused). f32 matrix products
    /// on the GPU use full f32 precision unless [`set_matmul_precision`] asked for TF32.
    pub fn open(self) -> Result<candle_core::Device> {
        match self {
            Device::Cpu => Ok(candle_core::Device::Cpu),
            Device::Cuda(n) => open_cuda(n),
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> Result<candle_core::Device> {
    Err(Error::invalid(format!(
        "exceiver.device is \"cuda:{n}\" but this build of exceiver runs on the CPU only"
    ))
    .with_hint(
        "SET exceiver.device = 'cpu'; GPU support (the cuda build) is not available in this build.",
    ))
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<candle_core::Device> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static OPEN: OnceLock<Mutex<HashMap<usize, candle_core::Device>>> = OnceLock::new();
    let cache = OPEN.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache
        .lock()
        .map_err(|_| Error::internal("the CUDA device cache is poisoned"))?;
    if let Some(d) = cache.get(&n) {
        return Ok(d.clone());
    }
    let hint = "SET exceiver.device = 'cpu' to compute on the CPU.";
    let code = |e: cudarc::driver::DriverError| format!("{:?}, code {}", e.0, e.0 as u32);
    cudarc::driver::result::init().map_err(|e| {
        Error::invalid(format!(
            "exceiver.device is \"cuda:{n}\" but no usable CUDA driver was found (cuInit failed: {})",
            code(e)
        ))
        .with_hint(hint)
    })?;
    let count = cudarc::driver::result::device::get_count().map_err(|e| {
        Error::invalid(format!(
            "exceiver.device is \"cuda:{n}\" but the CUDA devices could not be counted ({})",
            code(e)
        ))
        .with_hint(hint)
    })?;
    let count = usize::try_from(count).unwrap_or(0);
    if count == 0 {
        return Err(Error::invalid(format!(
            "exceiver.device is \"cuda:{n}\" but this machine has no CUDA device"
        ))
        .with_hint(hint));
    }
    if n >= count {
        return Err(Error::invalid(format!(
            "exceiver.device is \"cuda:{n}\" but this machine has {count} CUDA device(s): cuda:0 to cuda:{}",
            count - 1
        ))
        .with_hint(hint));
    }
    // catch_unwind: a failure deep in the backend must be an error, not a crash.
    let dev = std::panic::catch_unwind(|| candle_core::Device::new_cuda(n))
        .map_err(|_| Error::internal(format!("opening CUDA device {n} panicked")))?
        .map_err(|e| {
            Error::invalid(format!("could not open CUDA device {n} of {count}: {e}"))
                .with_hint(hint)
        })?;
    candle_core::cuda::set_gemm_reduced_precision_f32(matmul_precision() == MatmulPrecision::Tf32);
    cache.insert(n, dev.clone());
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        assert_eq!(Device::parse(" CUDA ").unwrap(), Device::Cuda(0));
        assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
        for bad in [
            "",
            "gpu",
            "cuda:",
            "cuda:-1",
            "cuda:x",
            "cuda:99999",
            "cpu:0",
        ] {
            assert!(Device::parse(bad).is_err(), "{bad}");
        }
        assert!(Device::Cpu.check_supported().is_ok());
        assert!(Device::Cpu.open().unwrap().is_cpu());
    }

    #[test]
    fn matmul_precision_round_trips() {
        assert_eq!(matmul_precision(), MatmulPrecision::F32);
        set_matmul_precision(MatmulPrecision::Tf32);
        assert_eq!(matmul_precision(), MatmulPrecision::Tf32);
        set_matmul_precision(MatmulPrecision::F32);
        assert_eq!(matmul_precision(), MatmulPrecision::F32);
    }

    /// The default build refuses a GPU with a clear error naming the device.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cpu_only_build_refuses_gpus() {
        for d in [Device::Cuda(1), Device::Cuda(0)] {
            let e = d.check_supported().unwrap_err();
            assert!(
                e.message.contains(&format!("\"{d}\"")) && e.message.contains("CPU only"),
                "{e}"
            );
            assert_eq!(e.kind, crate::Kind::InvalidParameter);
            assert!(d.open().is_err());
        }
    }
}
