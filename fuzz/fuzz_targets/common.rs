//! A scratch folder of this fuzzing process (the readers take paths).
use std::path::PathBuf;

pub fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("exceiver-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch folder");
    d
}
