//! Timing of label transfer's exact neighbour search at the size of the issue's
//! measurement: 2,700 query cells against a 13,576-cell reference (PBMC 3k onto Kang),
//! 1,024-dimensional embeddings (the `small` preset's), k = 15, with the reference's
//! distance calibration on 1,000 of its cells. Random data: the search does the same
//! work whatever the values.
//!
//! ```text
//! cargo run --release -p exceiver-core --example bench_transfer -- [--threads 2] [--dim 1024]
//! ```

use exceiver_core::mapping::{transfer_labels, TransferOptions};
use exceiver_core::model::rng::Rng;
use std::time::Instant;

fn arg(name: &str, default: usize) -> usize {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn main() {
    let (nq, nr, dim) = (2700, 13576, arg("--dim", 1024));
    let threads = arg("--threads", 2);
    let mut rng = Rng::new(1);
    let reference: Vec<f32> = (0..nr * dim).map(|_| rng.normal() as f32).collect();
    let labels: Vec<u32> = (0..nr).map(|i| (i % 8) as u32).collect();
    let queries: Vec<f32> = (0..nq * dim).map(|_| rng.normal() as f32).collect();
    for (what, quantile) in [
        ("with calibration", 0.99),
        ("without (distance_quantile 1)", 1.0),
    ] {
        let opts = TransferOptions {
            threads,
            distance_quantile: quantile,
            ..TransferOptions::default()
        };
        let t0 = Instant::now();
        let t = transfer_labels(&reference, &labels, 8, &queries, dim, &opts, &mut |_, _| {
            Ok(())
        })
        .unwrap();
        println!(
            "{nq} queries x {nr} reference cells x {dim} dims, k 15, {threads} threads, {what}: {:.2} s ({} calls)",
            t0.elapsed().as_secs_f64(),
            t.calls.len()
        );
    }
}
