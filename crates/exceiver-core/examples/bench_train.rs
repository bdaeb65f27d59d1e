//! Training throughput (forward, MSE, backward, Adam) of the published Exceiver shape.
//!
//! ```text
//! cargo run --release -p exceiver-core --example bench_train -- [--steps N] [--threads T] [--batch B] [--nnz K] [--mask M] [--mode reference|expressed]
//! ```
//!
//! Starts from `fixtures/pretrained_TS_exceiver.safetensors` (19,067 genes, d = 4,
//! 128 latents, 8 layers, feed-forward 2048) with the fixtures' zero-fill values,
//! makes synthetic cells of about K expressed genes (default 1,500), masks M of them
//! per cell (default 225 = int(0.15·1,500)), and runs N training steps (default 10)
//! of B cells (default 64) on T threads (default 2). Prints cells per second beside
//! the PyTorch reference's 7.6 cells/s (2 threads, batch 64, `shared/PRODUCT.md`).

use exceiver_core::model::rng::Rng;
use exceiver_core::model::{load_safetensors, AttentionMode, Exceiver};
use exceiver_core::train::{mask_positions, TrainCell, TrainOpts, Trainer};
use std::time::Instant;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures");

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = arg(&args, "--steps").map_or(Ok(10), |s| s.parse())?;
    let threads: usize = arg(&args, "--threads").map_or(Ok(2), |s| s.parse())?;
    let batch: usize = arg(&args, "--batch").map_or(Ok(64), |s| s.parse())?;
    let nnz: usize = arg(&args, "--nnz").map_or(Ok(1500), |s| s.parse())?;
    let n_mask: usize = arg(&args, "--mask").map_or(Ok(225), |s| s.parse())?;
    let mode = match arg(&args, "--mode").as_deref() {
        None | Some("reference") => AttentionMode::Reference,
        Some("expressed") => AttentionMode::ExpressedOnly,
        Some(m) => return Err(format!("unknown --mode {m}").into()),
    };
    let (mut cfg, params) = load_safetensors(&std::fs::read(format!(
        "{FIX}/pretrained_TS_exceiver.safetensors"
    ))?)?;
    cfg.attention = mode;
    let g = cfg.seq_len;
    let zero_fill = read_zero_fill(g).unwrap_or_else(|| vec![1.0; g]);

    // Synthetic cells: genes with skewed popularity, values like z-scores.
    let mut rng = Rng::new(20240611);
    let weight: Vec<f64> = (0..g).map(|_| (1.5 * rng.normal()).exp()).collect();
    let total: f64 = weight.iter().sum();
    let cdf: Vec<f64> = weight
        .iter()
        .scan(0.0, |s, w| {
            *s += w / total;
            Some(*s)
        })
        .collect();
    let mut taken = vec![false; g];
    let mut make_cell = |rng: &mut Rng| -> Result<TrainCell, Box<dyn std::error::Error>> {
        let k = ((nnz as f64 * rng.uniform_range(0.8, 1.2)) as usize).clamp(n_mask.max(1), g);
        let mut genes = Vec::with_capacity(k);
        while genes.len() < k {
            let u = rng.uniform();
            let gi = cdf.partition_point(|&c| c < u).min(g - 1);
            if !taken[gi] {
                taken[gi] = true;
                genes.push(gi as u32);
            }
        }
        for &gi in &genes {
            taken[gi as usize] = false;
        }
        let values = genes
            .iter()
            .map(|_| rng.uniform_range(-0.5, 11.0) as f32)
            .collect();
        let mask = mask_positions(k, n_mask, rng)?;
        Ok(TrainCell {
            genes,
            values,
            mask,
            label: None,
        })
    };
    let batches: Vec<Vec<TrainCell>> = (0..steps.max(1) + 1)
        .map(|_| (0..batch).map(|_| make_cell(&mut rng)).collect())
        .collect::<Result<_, _>>()?;
    let mean_nnz = batches
        .iter()
        .flatten()
        .map(|c| c.genes.len())
        .sum::<usize>() as f64
        / (batches.len() * batch) as f64;

    let opts = TrainOpts {
        threads,
        ..TrainOpts::default()
    };
    let mut tr = Trainer::new(cfg, params, zero_fill, opts)?;
    // one warm-up step (allocations, page-in)
    tr.train_step(&batches[0])?;
    let mut times = Vec::new();
    let mut last = None;
    for b in &batches[1..] {
        let t = Instant::now();
        let st = tr.train_step(b)?;
        times.push(t.elapsed().as_secs_f64());
        last = Some(st);
    }
    let total: f64 = times.iter().sum();
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let rate = (times.len() * batch) as f64 / total;
    println!(
        "kernels: {}, attention: {mode:?}; batch {batch} cells (mean {mean_nnz:.0} expressed genes, {n_mask} masked), {threads} thread(s)",
        Exceiver::kernel_name()
    );
    println!(
        "{} steps in {total:.2} s: {:.3} s/step (fastest {:.3}, slowest {:.3}); last loss {:.4}",
        times.len(),
        total / times.len() as f64,
        sorted[0],
        sorted[sorted.len() - 1],
        last.map_or(f64::NAN, |s| s.loss)
    );
    println!(
        "training throughput: {rate:.1} cells/s; PyTorch reference 7.6 cells/s: {:.1}x",
        rate / 7.6
    );
    Ok(())
}

fn read_zero_fill(g: usize) -> Option<Vec<f32>> {
    let bytes = std::fs::read(format!("{FIX}/inputs.safetensors")).ok()?;
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let t = st.tensor("zero_fill_vals").ok()?;
    let v: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (v.len() == g).then_some(v)
}
