//! In `cuda` builds only: compile the fused kernels (src/accel/kernels/*.cu) to PTX with
//! nvcc, for src/accel/fused.rs to load at run time. `make cuda` puts the CUDA
//! toolkit's nvcc on the PATH (or set NVCC); CUDA_COMPUTE_CAP (default 90: H100/H200)
//! picks the virtual architecture. The default build runs nothing here.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/accel/kernels/process_layer.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let out = out_dir.join("process_layer.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-arch"])
        .arg(format!("compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("src/accel/kernels/process_layer.cu")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed ({s}) on src/accel/kernels/process_layer.cu"),
        Err(e) => panic!(
            "{nvcc} could not be run ({e}): the cuda feature needs the CUDA toolkit (make cuda)"
        ),
    }
}
