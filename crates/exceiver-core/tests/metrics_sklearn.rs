//! The embedding metrics against scikit-learn and scipy on the same embeddings:
//! `fixtures/metrics/sklearn_reference.json`, written by `scripts/metrics_reference.py`
//! (600 cells, 16 dimensions, 5 overlapping cell types, 3 batches, one type in a single
//! batch). Tolerances: NMI, ARI, kNN accuracy, macro-F1 and graph connectivity are
//! counts and exact in f64 (1e-12); the silhouettes sum f32 distances in f64 (1e-5); the
//! best clustering's NMI is compared with networkx's Louvain loosely (0.05).

use exceiver_core::metrics::{evaluate, scores, EvalOptions};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/metrics/sklearn_reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn ints(v: &Value, key: &str) -> Vec<u32> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn close(what: &str, ours: f64, theirs: f64, tol: f64) {
    assert!(
        (ours - theirs).abs() <= tol,
        "{what}: ours {ours}, scikit-learn {theirs} (tolerance {tol})"
    );
}

#[test]
fn nmi_and_ari_match_scikit_learn() {
    let f = fixture();
    let (labels, clustering) = (ints(&f, "labels"), ints(&f, "clustering"));
    close(
        "nmi",
        scores::nmi(&labels, &clustering),
        f["nmi"].as_f64().unwrap(),
        1e-12,
    );
    close(
        "ari",
        scores::ari(&labels, &clustering),
        f["ari"].as_f64().unwrap(),
        1e-12,
    );
}

#[test]
fn evaluation_matches_scikit_learn() {
    let f = fixture();
    let dim = f["dim"].as_u64().unwrap() as usize;
    let data: Vec<f32> = f["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let (labels, batches) = (ints(&f, "labels"), ints(&f, "batches"));
    for threads in [1, 3] {
        let opts = EvalOptions {
            k: 15,
            seed: 0,
            threads,
        };
        let e = evaluate(
            &data,
            dim,
            &labels,
            5,
            Some(&batches),
            &opts,
            &mut |_, _, _| Ok(()),
        )
        .unwrap();
        let get = |k: &str| f[k].as_f64().unwrap();
        assert_eq!((e.cells, e.classes), (600, 5));
        close("knn accuracy", e.accuracy, get("knn_accuracy"), 1e-12);
        close("macro-F1", e.macro_f1, get("knn_macro_f1"), 1e-12);
        close("asw", e.asw, get("asw"), 1e-5);
        close("batch asw", e.batch_asw.unwrap(), get("batch_asw"), 1e-5);
        close(
            "graph connectivity",
            e.graph_connectivity.unwrap(),
            get("graph_connectivity"),
            1e-12,
        );
        // the clustering: another Louvain (networkx's, on the unweighted graph) finds as
        // good a partition within 0.05 NMI; the ARI is that of a real partition
        close("best nmi", e.nmi, get("louvain_best_nmi"), 0.05);
        assert!(e.ari > 0.1 && e.ari <= 1.0, "{e:?}");
        assert!(
            e.clusters >= 2 && (0.1..=2.0).contains(&e.resolution),
            "{e:?}"
        );
    }
}

#[test]
fn same_inputs_same_metrics_for_any_thread_count() {
    let f = fixture();
    let dim = f["dim"].as_u64().unwrap() as usize;
    let data: Vec<f32> = f["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let labels = ints(&f, "labels");
    let run = |threads| {
        let opts = EvalOptions {
            k: 15,
            seed: 4,
            threads,
        };
        evaluate(&data, dim, &labels, 5, None, &opts, &mut |_, _, _| Ok(())).unwrap()
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!((one.batch_asw, one.graph_connectivity), (None, None));
}

#[test]
fn bad_inputs_are_errors_and_progress_can_stop() {
    let data = vec![0.5f32; 40];
    let labels = vec![0u32, 1, 0, 1, 0, 1, 0, 1, 0, 1];
    let opts = EvalOptions {
        k: 10,
        ..Default::default()
    };
    let err = evaluate(&data, 4, &labels, 2, None, &opts, &mut |_, _, _| Ok(())).unwrap_err();
    assert!(
        err.to_string().contains("below the number of cells, 10"),
        "{err}"
    );
    let one_label = vec![0u32; 10];
    let opts = EvalOptions {
        k: 3,
        ..Default::default()
    };
    let err = evaluate(&data, 4, &one_label, 2, None, &opts, &mut |_, _, _| Ok(())).unwrap_err();
    assert!(err.to_string().contains("1 distinct"), "{err}");
    let err = evaluate(&data[..39], 4, &labels, 2, None, &opts, &mut |_, _, _| {
        Ok(())
    })
    .unwrap_err();
    assert!(err.to_string().contains("39 values"), "{err}");
    let err = evaluate(&data, 4, &labels, 2, None, &opts, &mut |_, _, _| {
        Err(exceiver_core::Error::invalid("cancelled"))
    })
    .unwrap_err();
    assert!(err.to_string().contains("cancelled"));
}
