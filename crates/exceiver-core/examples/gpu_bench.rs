//! Parity and throughput of the batched model (`exceiver_core::accel`) on a device: a
//! standalone program (no PostgreSQL) to carry to a GPU machine.
//!
//! ```text
//! gpu_bench <checkpoint.ckpt|.safetensors> [--device cpu|cuda:N] [--fixtures DIR]
//!           [--batches 16,64,256,1024] [--cells N] [--nnz K] [--repeat R]
//!           [--train-batch B] [--train-steps S] [--mask M] [--mode reference|expressed]
//!           [--skip-parity] [--skip-train] [--native] [--tf32] [--fused]
//! ```
//!
//! 1. Loads the checkpoint (a Lightning `.ckpt` or safetensors; the published ones are
//!    `fixtures/checkpoints/*.ckpt` and `fixtures/*.safetensors`) and opens the device.
//! 2. Parity, when the fixtures folder (default `fixtures/` of the working directory,
//!    else of the source tree) matches the model: encoder latents, embeddings, value
//!    predictions and class logits of the 16 fixture cells in both attention modes, and
//!    the training loss and gradients of the fixtures' training batch, against the
//!    reference outputs with the tolerances of `fixtures/README.md`; also against the
//!    hand-written CPU model. Any failure makes the exit status 1.
//! 3. Embedding throughput at each batch size: synthetic cells of about K expressed
//!    genes (default 1,500), N cells per measurement (default 4,096), median of R runs
//!    (default 3). Times include checking, padding and transfers.
//! 4. Training throughput: steps of B cells (default 64) with M masked genes each
//!    (default 225 = int(0.15·1,500)), as `examples/bench_train.rs`; S steps (default 10)
//!    after one warm-up step.
//!
//! `--tf32` runs the device's f32 matrix products on TF32 tensor cores
//! ([`exceiver_core::device::set_matmul_precision`], `exceiver.gpu_tf32` in SQL): the
//! parity section then measures TF32's error against the fixtures, reported beside the
//! tolerances but not counted as failures.
//!
//! `--fused` runs each process layer as one fused op (`DeviceModel::with_fused_process`;
//! on a GPU the custom kernel of `src/accel/kernels/process_layer.cu`) for parity and
//! embedding; parity is checked at the f32 tolerances as without it.
//!
//! `--native` also times the hand-written CPU model (`Exceiver::embed_batch` on all
//! cores, `train::Trainer`) on the same cells. Build the CUDA variant with `make cuda`
//! (see the README, section GPU).

use candle_core::Device as CDevice;
use exceiver_core::accel::{self, DeviceModel, DeviceTrainer};
use exceiver_core::device::Device;
use exceiver_core::model::rng::Rng;
use exceiver_core::model::{
    load_checkpoint, load_safetensors, AttentionMode, Config, Exceiver, Params,
};
use exceiver_core::train::{mask_positions, TrainCell, TrainOpts, Trainer};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn parse<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> BoxResult<T> {
    match arg(args, name) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| format!("{name}: cannot parse \"{s}\"").into()),
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("gpu_bench: {e}");
        std::process::exit(2);
    }
}

fn run() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(ckpt) = args.get(1).filter(|a| !a.starts_with("--")) else {
        return Err("usage: gpu_bench <checkpoint.ckpt|.safetensors> [--device cpu|cuda:N] [options] (see the source header)".into());
    };
    let default_device = if cfg!(feature = "cuda") {
        "cuda:0"
    } else {
        "cpu"
    };
    let device = Device::parse(&arg(&args, "--device").unwrap_or(default_device.into()))?;
    let batches: Vec<usize> = arg(&args, "--batches")
        .unwrap_or_else(|| "16,64,256,1024".into())
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| "--batches: a comma-separated list of positive integers")?;
    let n_cells: usize = parse(&args, "--cells", 4096)?;
    let nnz: usize = parse(&args, "--nnz", 1500)?;
    let repeat: usize = parse(&args, "--repeat", 3)?;
    let train_batch: usize = parse(&args, "--train-batch", 64)?;
    let train_steps: usize = parse(&args, "--train-steps", 10)?;
    let n_mask: usize = parse(&args, "--mask", 225)?;
    let mode = match arg(&args, "--mode").as_deref() {
        None | Some("reference") => AttentionMode::Reference,
        Some("expressed") => AttentionMode::ExpressedOnly,
        Some(m) => return Err(format!("unknown --mode {m} (reference or expressed)").into()),
    };
    let flag = |f: &str| args.iter().any(|a| a == f);

    let tf32 = flag("--tf32");
    let fused = flag("--fused");
    let dev = open_device(device, tf32)?;
    let (cfg, params) = load_model(ckpt)?;
    let fixtures = fixtures_dir(arg(&args, "--fixtures"));
    let inputs = fixtures
        .as_ref()
        .and_then(|d| read_st(&d.join("inputs.safetensors")).ok())
        .filter(|t| {
            t.get("zero_fill_vals")
                .is_some_and(|z| z.v.len() == cfg.seq_len)
        });
    let zero_fill: Vec<f32> = match &inputs {
        Some(t) => t["zero_fill_vals"].f32(),
        None => vec![1.0; cfg.seq_len],
    };

    let mut failed = 0;
    if !flag("--skip-parity") {
        match (&fixtures, &inputs) {
            (Some(dir), Some(inp)) => {
                let f = parity(dir, inp, &cfg, &params, &zero_fill, &dev, fused)?;
                if tf32 && f > 0 {
                    println!(
                        "  (TF32: {f} check(s) past the f32 tolerances, reported, not failed)"
                    );
                } else {
                    failed += f;
                }
            }
            _ => println!(
                "parity: skipped (no fixtures folder with inputs for {} genes; --fixtures DIR)",
                cfg.seq_len
            ),
        }
    }

    let batches: Vec<usize> = batches.into_iter().filter(|&b| b > 0).collect();
    let training = !flag("--skip-train") && train_steps > 0 && train_batch > 0;
    if batches.is_empty() && !training {
        return finish(failed);
    }
    let mut cfg_b = cfg.clone();
    cfg_b.attention = mode;
    let mut rng = Rng::new(20240611);
    let cells = synthetic_cells(cfg.seq_len, n_cells.max(1), nnz, &mut rng);
    let mean_nnz = cells.iter().map(|c| c.0.len()).sum::<usize>() as f64 / cells.len() as f64;
    if !batches.is_empty() {
        println!(
            "\nembedding: {} synthetic cells, mean {mean_nnz:.0} expressed genes, attention {mode:?}, process layers {}, median of {repeat} runs",
            cells.len(),
            if fused { "fused" } else { "unfused" }
        );
    }
    let native = (flag("--native") && !batches.is_empty()).then(|| {
        Exceiver::new(cfg_b.clone(), params.clone(), zero_fill.clone()).inspect(|m| m.warm_up())
    });
    for &bs in &batches {
        // room for the whole batch in one chunk
        let longest = cells.iter().map(|c| c.0.len()).max().unwrap_or(1);
        let budget = bs * cfg.cross_heads * cfg.query_len * (longest + 2);
        let model = DeviceModel::new(cfg_b.clone(), &params, &zero_fill, &dev)?
            .with_batch_elements(budget.max(accel::DEFAULT_BATCH_ELEMENTS))
            .with_fused_process(fused)?;
        match time_embed(&model, &cells, bs, repeat) {
            Ok((rate, ms)) => {
                println!("  batch {bs:>5}: {rate:>10.0} cells/s ({ms:.2} ms per batch)")
            }
            Err(e) => println!("  batch {bs:>5}: failed: {e}"),
        }
    }
    if let Some(m) = native {
        time_native(&m?, &cells)?;
    }
    if training {
        let tb = TrainBench {
            batch: train_batch,
            steps: train_steps,
            mask: n_mask,
            native: flag("--native"),
        };
        time_training(&cfg, cfg_b, params, zero_fill, &dev, &cells, &mut rng, &tb)?;
    }
    finish(failed)
}

/// Embedding throughput of the hand-written CPU model on all cores.
fn time_native(m: &Exceiver, cells: &[(Vec<u32>, Vec<f32>)]) -> BoxResult<()> {
    let refs: Vec<(&[u32], &[f32])> = cells
        .iter()
        .map(|(g, v)| (g.as_slice(), v.as_slice()))
        .collect();
    let t = Instant::now();
    m.embed_batch(&refs, 0)?;
    let s = t.elapsed().as_secs_f64();
    println!(
        "  hand-written CPU model ({} threads, kernels {}): {:.0} cells/s",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        Exceiver::kernel_name(),
        refs.len() as f64 / s
    );
    Ok(())
}

/// What to time in training: batch size, steps, masked genes per cell, and whether the
/// hand-written CPU trainer runs too.
struct TrainBench {
    batch: usize,
    steps: usize,
    mask: usize,
    native: bool,
}

/// Training throughput on the device (and, with `native`, of the CPU trainer).
#[allow(clippy::too_many_arguments)]
fn time_training(
    cfg: &Config,
    cfg_b: Config,
    params: Params,
    zero_fill: Vec<f32>,
    dev: &CDevice,
    cells: &[(Vec<u32>, Vec<f32>)],
    rng: &mut Rng,
    tb: &TrainBench,
) -> BoxResult<()> {
    let mode = cfg_b.attention;
    let (train_batch, train_steps) = (tb.batch, tb.steps);
    let batches: Vec<Vec<TrainCell>> = (0..=tb.steps)
        .map(|_| train_cells(cells, tb.batch, tb.mask, rng))
        .collect::<Result<_, _>>()?;
    let masked = batches[0].iter().map(|c| c.mask.len()).sum::<usize>();
    println!(
            "\ntraining: batch {train_batch} cells, {masked} masked genes per batch, attention {mode:?}, {train_steps} steps after 1 warm-up step"
        );
    let longest = batches
        .iter()
        .flatten()
        .map(|c| c.genes.len())
        .max()
        .unwrap_or(1);
    let budget = tb.batch * cfg.cross_heads * cfg.query_len * (longest + 2);
    let mut tr = DeviceTrainer::new(
        cfg_b.clone(),
        params.clone(),
        zero_fill.clone(),
        TrainOpts::default(),
        dev,
    )?
    .with_batch_elements(budget.max(accel::DEFAULT_BATCH_ELEMENTS));
    tr.train_step(&batches[0])?;
    dev.synchronize()?;
    let t = Instant::now();
    let mut last = 0.0;
    for b in &batches[1..] {
        last = tr.train_step(b)?.loss;
    }
    dev.synchronize()?;
    let s = t.elapsed().as_secs_f64();
    println!(
        "  device: {:.0} cells/s ({:.1} ms per step; last loss {last:.4})",
        (tb.steps * tb.batch) as f64 / s,
        1e3 * s / tb.steps as f64
    );
    if tb.native {
        let mut cpu = Trainer::new(cfg_b, params, zero_fill, TrainOpts::default())?;
        cpu.train_step(&batches[0])?;
        let t = Instant::now();
        for b in &batches[1..] {
            cpu.train_step(b)?;
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "  hand-written CPU trainer (all cores): {:.0} cells/s",
            (tb.steps * tb.batch) as f64 / s
        );
    }
    Ok(())
}

/// Open the device (TF32 matrix products when asked) and say so.
fn open_device(device: Device, tf32: bool) -> BoxResult<CDevice> {
    if tf32 {
        exceiver_core::device::set_matmul_precision(exceiver_core::device::MatmulPrecision::Tf32);
    }
    let t0 = Instant::now();
    let dev = device.open()?;
    println!(
        "device {device} opened in {:.2} s ({dev:?}); exceiver-core built {} CUDA; matrix products {:?}",
        t0.elapsed().as_secs_f64(),
        if cfg!(feature = "cuda") {
            "with"
        } else {
            "without"
        },
        exceiver_core::device::matmul_precision()
    );
    Ok(dev)
}

/// A `.ckpt` or `.safetensors` checkpoint, described.
fn load_model(ckpt: &str) -> BoxResult<(Config, Params)> {
    let path = Path::new(ckpt);
    let t0 = Instant::now();
    let (cfg, params) = if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
        load_safetensors(&std::fs::read(path).map_err(|e| format!("{ckpt}: {e}"))?)?
    } else {
        load_checkpoint(path)?
    };
    println!(
        "model {ckpt}: {} genes, d {}, {} latents, {} layers, feed-forward {}, classes {:?}; loaded in {:.2} s",
        cfg.seq_len,
        cfg.seq_dim,
        cfg.query_len,
        cfg.num_layers,
        cfg.dim_feedforward,
        cfg.num_classes,
        t0.elapsed().as_secs_f64()
    );
    Ok((cfg, params))
}

fn finish(failed: usize) -> BoxResult<()> {
    if failed > 0 {
        println!("\n{failed} parity check(s) FAILED");
        std::process::exit(1);
    }
    Ok(())
}

/// Embed `cells` in batches of `bs`, `repeat` times (after one warm-up batch); the
/// median run's cells per second and milliseconds per batch.
fn time_embed(
    m: &DeviceModel,
    cells: &[(Vec<u32>, Vec<f32>)],
    bs: usize,
    repeat: usize,
) -> BoxResult<(f64, f64)> {
    let refs: Vec<(&[u32], &[f32])> = cells
        .iter()
        .map(|(g, v)| (g.as_slice(), v.as_slice()))
        .collect();
    let n = refs.len().max(bs);
    let refs: Vec<(&[u32], &[f32])> = refs.iter().cycle().take(n).copied().collect();
    m.embed_batch(&refs[..bs])?;
    let mut runs = Vec::new();
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        for chunk in refs.chunks(bs) {
            m.embed_batch(chunk)?;
        }
        runs.push(t.elapsed().as_secs_f64());
    }
    runs.sort_by(f64::total_cmp);
    let s = runs[runs.len() / 2];
    let batches = n.div_ceil(bs);
    Ok((n as f64 / s, 1e3 * s / batches as f64))
}

/// Synthetic cells: genes with skewed popularity, about `nnz` (±20%) each, values
/// like z-scores (as `examples/bench_embed.rs`).
fn synthetic_cells(g: usize, n: usize, nnz: usize, rng: &mut Rng) -> Vec<(Vec<u32>, Vec<f32>)> {
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
    (0..n)
        .map(|_| {
            let k = ((nnz as f64 * rng.uniform_range(0.8, 1.2)) as usize).clamp(1, g);
            let mut genes = Vec::with_capacity(k);
            while genes.len() < k {
                let gi = cdf.partition_point(|&c| c < rng.uniform()).min(g - 1);
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
            (genes, values)
        })
        .collect()
}

fn train_cells(
    cells: &[(Vec<u32>, Vec<f32>)],
    batch: usize,
    n_mask: usize,
    rng: &mut Rng,
) -> BoxResult<Vec<TrainCell>> {
    (0..batch)
        .map(|_| {
            let (g, v) = &cells[rng.below(cells.len())];
            Ok(TrainCell {
                genes: g.clone(),
                values: v.clone(),
                mask: mask_positions(g.len(), n_mask.min(g.len()), rng)?,
                label: None,
            })
        })
        .collect()
}

// ------------------------------------------------------------------ parity

fn fixtures_dir(given: Option<String>) -> Option<PathBuf> {
    let candidates = match given {
        Some(d) => vec![PathBuf::from(d)],
        None => vec![
            PathBuf::from("fixtures"),
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures")),
        ],
    };
    candidates
        .into_iter()
        .find(|d| d.join("inputs.safetensors").is_file())
}

struct T {
    shape: Vec<usize>,
    v: Vec<f64>,
}

impl T {
    fn f32(&self) -> Vec<f32> {
        self.v.iter().map(|&x| x as f32).collect()
    }
    fn u32(&self) -> Vec<u32> {
        self.v.iter().map(|&x| x as u32).collect()
    }
}

fn read_st(path: &Path) -> BoxResult<HashMap<String, T>> {
    use safetensors::Dtype;
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut out = HashMap::new();
    for (k, t) in st.tensors() {
        let b = t.data();
        let v: Vec<f64> = match t.dtype() {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            Dtype::I64 => b
                .chunks_exact(8)
                .map(|c| {
                    i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64
                })
                .collect(),
            Dtype::U8 => b.iter().map(|&x| x as f64).collect(),
            _ => continue,
        };
        out.insert(
            k,
            T {
                shape: t.shape().to_vec(),
                v,
            },
        );
    }
    Ok(out)
}

/// A fixture tensor, or an error naming it.
fn get<'a>(m: &'a HashMap<String, T>, name: &str) -> BoxResult<&'a T> {
    m.get(name)
        .ok_or_else(|| format!("the fixtures lack tensor \"{name}\"").into())
}

fn rel(a: &[f32], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

struct Checks {
    failed: usize,
}

impl Checks {
    fn check(&mut self, what: &str, err: f64, tol: f64) {
        let ok = err <= tol;
        if !ok {
            self.failed += 1;
        }
        println!(
            "  {:<52} {err:>10.3e}  (tolerance {tol:.0e})  {}",
            what,
            if ok { "ok" } else { "FAILED" }
        );
    }
}

/// Parity with the fixtures on the device; returns the number of failed checks.
fn parity(
    dir: &Path,
    inp: &HashMap<String, T>,
    cfg: &Config,
    params: &Params,
    zero_fill: &[f32],
    dev: &CDevice,
    fused: bool,
) -> BoxResult<usize> {
    let classifier = cfg.num_classes.is_some();
    let (outputs, grads) = if classifier {
        (
            "classifier_outputs.safetensors",
            "classifier_train_grads.safetensors",
        )
    } else {
        (
            "exceiver_outputs.safetensors",
            "exceiver_train_grads.safetensors",
        )
    };
    let out = read_st(&dir.join(outputs))?;
    let nd = cfg.embedding_len();
    let b = get(inp, "cell_indptr")?.v.len().saturating_sub(1);
    if out.get("embedding").is_none_or(|e| e.v.len() != b * nd)
        || out
            .get("process_layer_outputs")
            .is_none_or(|p| p.shape.first() != Some(&cfg.num_layers))
    {
        println!("parity: skipped ({outputs} is not for this model's shape)");
        return Ok(0);
    }
    println!(
        "\nparity with {} (normwise relative errors):",
        dir.join(outputs).display()
    );
    let indptr: Vec<usize> = get(inp, "cell_indptr")?
        .v
        .iter()
        .map(|&x| x as usize)
        .collect();
    let genes = get(inp, "cell_gene_ids")?.u32();
    let vals = get(inp, "cell_model_vals")?.f32();
    let q = get(inp, "query_ids")?.u32();
    let qn = get(inp, "query_ids")?.v.len() / b.max(1);
    let cells: Vec<(&[u32], &[f32])> = (0..b)
        .map(|c| {
            (
                &genes[indptr[c]..indptr[c + 1]],
                &vals[indptr[c]..indptr[c + 1]],
            )
        })
        .collect();
    let queries: Vec<&[u32]> = (0..b).map(|c| &q[c * qn..(c + 1) * qn]).collect();
    let mut ck = Checks { failed: 0 };
    for (mode, pre) in [
        (AttentionMode::Reference, ""),
        (AttentionMode::ExpressedOnly, "boolmask_"),
    ] {
        let mut c = cfg.clone();
        c.attention = mode;
        let t = Instant::now();
        let m = DeviceModel::new(c.clone(), params, zero_fill, dev)?.with_fused_process(fused)?;
        let enc = m.encode_batch(&cells)?;
        let o = m.forward_batch(&cells, &queries)?;
        let s = t.elapsed().as_secs_f64();
        ck.check(
            &format!("{pre}enc_latent"),
            rel(&enc, &get(&out, &format!("{pre}enc_latent"))?.v),
            1e-5,
        );
        ck.check(
            &format!("{pre}embedding"),
            rel(&o.embedding, &get(&out, &format!("{pre}embedding"))?.v),
            1e-5,
        );
        ck.check(
            &format!("{pre}pred"),
            rel(&o.pred.concat(), &get(&out, &format!("{pre}pred"))?.v),
            5e-5,
        );
        if let Some(l) = &o.class_logits {
            ck.check(
                &format!("{pre}class_logits"),
                rel(l, &get(&out, &format!("{pre}class_logits"))?.v),
                5e-5,
            );
        }
        let cpu = Exceiver::new(c, params.clone(), zero_fill.to_vec())?;
        let want: Vec<f64> = cpu
            .embed_batch(&cells, 0)?
            .into_iter()
            .map(f64::from)
            .collect();
        ck.check(
            &format!("{mode:?}: embedding vs hand-written CPU model"),
            rel(&o.embedding, &want),
            1e-5,
        );
        println!("  ({mode:?}: model set-up and 16 cells in {s:.2} s)");
    }
    check_training(
        dir, inp, cfg, params, zero_fill, dev, &cells, &out, grads, &mut ck,
    )?;
    Ok(ck.failed)
}

/// Parity of the training loss and gradients of the fixtures' training batch.
#[allow(clippy::too_many_arguments)]
fn check_training(
    dir: &Path,
    inp: &HashMap<String, T>,
    cfg: &Config,
    params: &Params,
    zero_fill: &[f32],
    dev: &CDevice,
    cells: &[(&[u32], &[f32])],
    out: &HashMap<String, T>,
    grads: &str,
    ck: &mut Checks,
) -> BoxResult<()> {
    let b = cells.len();
    let classifier = cfg.num_classes.is_some();
    // training batch: 100 masked genes per cell, the reference's draws
    let ids = get(inp, "train_mask_ids")?.u32();
    let nm = get(inp, "train_mask_ids")?.v.len() / b.max(1);
    let labels = &get(inp, "class_labels")?.v;
    let batch: Vec<TrainCell> = (0..b)
        .map(|c| {
            let (g, v) = cells[c];
            let mask = ids[c * nm..(c + 1) * nm]
                .iter()
                .map(|id| {
                    g.binary_search(id)
                        .map_err(|_| "a masked gene is not expressed")
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(TrainCell {
                genes: g.to_vec(),
                values: v.to_vec(),
                mask,
                label: classifier.then(|| labels[c] as usize),
            })
        })
        .collect::<BoxResult<_>>()?;
    let want = read_st(&dir.join(grads))?;
    let t = Instant::now();
    let (stats, g) = accel::loss_and_grads(cfg, params, zero_fill, &batch, dev)?;
    let s = t.elapsed().as_secs_f64();
    let loss_ref = get(out, "train_loss")?
        .v
        .first()
        .copied()
        .ok_or("train_loss is empty")?;
    ck.check(
        "train_loss (relative)",
        (stats.loss - loss_ref).abs() / loss_ref.abs(),
        1e-5,
    );
    let mut worst = (0.0f64, String::new());
    let mut count = 0;
    g.visit(cfg, |name, _, v| {
        let r = want.get(&name).map_or(f64::INFINITY, |w| rel(v, &w.v));
        if r > worst.0 {
            worst = (r, name);
        }
        count += 1;
        Ok(())
    })?;
    ck.check(
        &format!("gradients, worst of {count} ({})", worst.1),
        worst.0,
        1e-4,
    );
    println!("  (loss and gradients in {s:.2} s)");
    Ok(())
}
