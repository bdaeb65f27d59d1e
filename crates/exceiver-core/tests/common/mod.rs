//! Shared by the core's integration tests: reading the reference fixtures.
#![allow(dead_code)]

pub mod dense;

use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;

/// The vendored fixtures folder (`fixtures/` at the repository root).
pub const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures");

/// A fixture tensor: its shape and values widened to f64.
pub struct T {
    pub shape: Vec<usize>,
    pub v: Vec<f64>,
}

impl T {
    pub fn f32(&self) -> Vec<f32> {
        self.v.iter().map(|&x| x as f32).collect()
    }
    pub fn u32(&self) -> Vec<u32> {
        self.v.iter().map(|&x| x as u32).collect()
    }
}

/// Every tensor of `fixtures/<name>` (F32, F64, I64 and U8 tensors).
pub fn read_fixture(name: &str) -> HashMap<String, T> {
    let bytes = std::fs::read(format!("{FIX}/{name}")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, t)| {
            let b = t.data();
            let v: Vec<f64> = match t.dtype() {
                Dtype::F32 => b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::F64 => b
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::I64 => b
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::U8 => b.iter().map(|&x| x as f64).collect(),
                d => panic!("unexpected dtype {d:?}"),
            };
            (
                k,
                T {
                    shape: t.shape().to_vec(),
                    v,
                },
            )
        })
        .collect()
}

/// Normwise relative error ||a − b|| / ||b||.
pub fn rel(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

/// [`rel`] against an f32 reference.
pub fn rel32(a: &[f32], b: &[f32]) -> f64 {
    rel(a, &b.iter().map(|&x| x as f64).collect::<Vec<_>>())
}

/// Assert a normwise relative error within `tol`, printing it.
pub fn check(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let r = rel(got, want);
    eprintln!("{what}: normwise relative error {r:.3e}");
    assert!(
        r <= tol,
        "{what}: normwise relative error {r:.3e} exceeds {tol:.0e}"
    );
}

/// A fixtures safetensors model (config and weights).
pub fn weights(name: &str) -> (exceiver_core::model::Config, exceiver_core::model::Params) {
    exceiver_core::model::load_safetensors(&std::fs::read(format!("{FIX}/{name}")).unwrap())
        .unwrap()
}
