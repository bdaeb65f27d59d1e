//! Cell-embedding throughput of the published Exceiver on synthetic cells.
//!
//! ```text
//! cargo run --release -p exceiver-core --example bench_embed -- [--cells N] [--threads T] [--nnz K] [--mode reference|expressed] [--repeat R] [--small]
//! ```
//!
//! `--small` benchmarks a randomly initialised [`Config::small`] model over the same
//! 19,067-gene vocabulary instead of the published one.
//!
//! Loads `fixtures/pretrained_TS_exceiver.safetensors` (19,067 genes, d = 4, 128
//! latents, 8 layers, feed-forward 2048) with the fixtures' zero-fill values, makes N
//! synthetic cells with about K expressed genes each (default 2,000 cells, 1,500
//! genes: the shape of the PyTorch figure), embeds them on T threads and prints
//! cells per second. The figure to beat: the PyTorch reference modules, 2 threads,
//! 19.7 cells/s (`shared/PRODUCT.md`). `EXCEIVER_KERNELS=avx2|portable` restricts the
//! kernel set.

use exceiver_core::model::rng::Rng;
use exceiver_core::model::{load_safetensors, AttentionMode, Config, Exceiver, Params};
use std::time::Instant;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures");

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n_cells: usize = arg(&args, "--cells").map_or(Ok(2000), |s| s.parse())?;
    let threads: usize = arg(&args, "--threads").map_or(Ok(1), |s| s.parse())?;
    let repeat: usize = arg(&args, "--repeat").map_or(Ok(3), |s| s.parse())?;
    let nnz: usize = arg(&args, "--nnz").map_or(Ok(1500), |s| s.parse())?;
    let mode = match arg(&args, "--mode").as_deref() {
        None | Some("reference") => AttentionMode::Reference,
        Some("expressed") => AttentionMode::ExpressedOnly,
        Some(m) => return Err(format!("unknown --mode {m}").into()),
    };
    let weights = arg(&args, "--weights")
        .unwrap_or_else(|| format!("{FIX}/pretrained_TS_exceiver.safetensors"));

    let t0 = Instant::now();
    let small = args.iter().any(|a| a == "--small");
    let (cfg, params) = if small {
        let cfg = Config::small(19067);
        let p = Params::init(&cfg, 1)?;
        (cfg, p)
    } else {
        load_safetensors(&std::fs::read(&weights)?)?
    };
    let g = cfg.seq_len;
    // Zero-fill values of the fixtures' scaler when available, else identity (1.0).
    let zero_fill = read_zero_fill(g).unwrap_or_else(|| vec![1.0; g]);
    let model = Exceiver::new(cfg, params, zero_fill)?.with_attention(mode);
    model.warm_up();
    let t_load = t0.elapsed();

    // Synthetic cells: genes drawn with skewed popularity, values like z-scores.
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
    let mut cells: Vec<(Vec<u32>, Vec<f32>)> = Vec::with_capacity(n_cells);
    let mut taken = vec![false; g];
    for _ in 0..n_cells {
        let k = (nnz as f64 * rng.uniform_range(0.8, 1.2)) as usize;
        let k = k.clamp(1, g);
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
        let vals = genes
            .iter()
            .map(|_| rng.uniform_range(-0.5, 11.0) as f32)
            .collect();
        cells.push((genes, vals));
    }
    let refs: Vec<(&[u32], &[f32])> = cells.iter().map(|(a, b)| (&a[..], &b[..])).collect();
    let mean_nnz = cells.iter().map(|c| c.0.len()).sum::<usize>() as f64 / n_cells as f64;

    // Warm-up pass on a few cells (page in, thread-local scratch).
    model.embed_batch(&refs[..refs.len().min(8)], threads)?;
    // Best and median of `repeat` runs: the best is the figure for a quiet machine.
    let mut times = Vec::new();
    let mut checksum = 0.0;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let out = model.embed_batch(&refs, threads)?;
        times.push(t.elapsed().as_secs_f64());
        checksum = out.iter().map(|&v| v as f64).sum();
    }
    times.sort_by(f64::total_cmp);
    let secs = times[0];
    let median = times[times.len() / 2];
    let rate = n_cells as f64 / secs;
    println!(
        "model: {}\nkernels: {}, attention: {mode:?}, model load + precompute {:.0} ms",
        if small {
            "Config::small(19067), random weights".to_string()
        } else {
            weights.clone()
        },
        Exceiver::kernel_name(),
        t_load.as_secs_f64() * 1e3
    );
    println!(
        "embedded {n_cells} cells (mean {mean_nnz:.0} expressed genes) on {threads} thread(s) in {secs:.2} s (best of {}; median {median:.2} s = {:.1} cells/s): {rate:.1} cells/s ({:.2} ms/cell/thread)",
        times.len(),
        n_cells as f64 / median,
        secs * 1e3 * threads as f64 / n_cells as f64
    );
    println!(
        "figure to beat: 19.7 cells/s (PyTorch reference modules, 2 threads, batch 64): {:.1}x; checksum {checksum:.6e}",
        rate / 19.7
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
