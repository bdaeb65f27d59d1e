//! A scratch folder of this fuzzing process (the readers take paths).
use std::path::PathBuf;

pub fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("exceiver-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch folder");
    d
}

/// A reader's result as a fuzz verdict: errors are expected (malformed input), but an
/// internal error means the reader panicked, which the HDF5 readers catch in their
/// child process (so libFuzzer would not see it): make it a finding here.
pub fn no_internal_error<T>(r: exceiver_core::error::Result<T>) {
    if let Err(e) = r {
        assert!(
            e.kind != exceiver_core::error::Kind::Internal,
            "internal error: {e}"
        );
    }
}
