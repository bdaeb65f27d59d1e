//! The linear probe against scikit-learn's StandardScaler + LogisticRegression(C=0.5)
//! on the same embeddings (`fixtures/metrics/probe_reference.json`, written by
//! `scripts/probe_reference.py`): a 3-class and a 2-class problem (scikit-learn fits a
//! single weight vector for two classes). Test-cell probabilities agree within 1e-5,
//! log loss within 1e-6, accuracy exactly.

use exceiver_core::probe::{fit, score_proba, ProbeOptions};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/metrics/probe_reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn probabilities_match_scikit_learn() {
    let f = fixture();
    let dim = f["dim"].as_u64().unwrap() as usize;
    let xtr: Vec<f32> = floats(&f["train_x"]).iter().map(|&v| v as f32).collect();
    let xte: Vec<f32> = floats(&f["test_x"]).iter().map(|&v| v as f32).collect();
    let ytr: Vec<u32> = floats(&f["train_y"]).iter().map(|&v| v as u32).collect();
    let yte: Vec<u32> = floats(&f["test_y"]).iter().map(|&v| v as u32).collect();
    let opts = ProbeOptions {
        c: f["c"].as_f64().unwrap(),
        tol: 1e-9,
        max_iter: 10_000,
        standardize: true,
    };
    for (name, classes, map) in [("three", 3usize, None), ("two", 2, Some(2u32))] {
        let relabel = |y: &[u32]| -> Vec<u32> {
            y.iter()
                .map(|&v| map.map_or(v, |m| u32::from(v == m)))
                .collect()
        };
        let (ytr, yte) = (relabel(&ytr), relabel(&yte));
        let m = fit(&xtr, dim, &ytr, classes, &opts).unwrap();
        assert!(m.converged, "{name}: {} iterations", m.iterations);
        let proba: Vec<f64> = xte.chunks(dim).flat_map(|r| m.proba(r)).collect();
        let theirs = floats(&f[name]["proba"]);
        let worst = proba
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < 1e-5,
            "{name}: largest probability difference {worst}"
        );
        let s = score_proba(&proba, classes, &yte);
        assert!(
            (s.log_loss - f[name]["log_loss"].as_f64().unwrap()).abs() < 1e-6,
            "{name}: {s:?}"
        );
        assert_eq!(s.accuracy, f[name]["accuracy"].as_f64().unwrap(), "{name}");
    }
}
