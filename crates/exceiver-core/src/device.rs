//! Where the heavy maths runs: the `exceiver.device` setting's values.
//!
//! `cpu` (the default) or `cuda` / `cuda:N`. This build runs on the CPU only: asking for
//! a GPU is a clear error naming the setting, never a crash, and a CPU-only server never
//! loads a library that links the CUDA driver.

use crate::error::{Error, Result};
use std::fmt;

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

    /// Check that this build can run on the device.
    pub fn check_supported(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(_) => Err(Error::invalid(format!(
                "exceiver.device is \"{self}\" but this build of exceiver runs on the CPU only"
            ))
            .with_hint("SET exceiver.device = 'cpu'; GPU support (the cuda build) is not available in this build.")),
        }
    }
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
        let e = Device::Cuda(1).check_supported().unwrap_err();
        assert!(
            e.message.contains("\"cuda:1\"") && e.message.contains("CPU only"),
            "{e}"
        );
    }
}
