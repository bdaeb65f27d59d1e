//! Map points to 2-D with UMAP and draw them: writes `<out>.tsv` (cell_id, label, x, y)
//! and `<out>.png`, and prints the time of each stage.
//!
//! ```text
//! cargo run --release -p exceiver-core --example map_demo -- <input> [flags]
//!   input, one of:
//!     --tsv FILE          rows "cell_id<TAB>label<TAB>v1<TAB>...<TAB>vd"; a first line whose
//!                         third field is not a number is a header; an empty label, NULL or
//!                         \N is no label
//!     --synthetic N,D,C   N points in C Gaussian clusters in D dimensions (label = cluster)
//!     --pbmc3k [GENES]    data/pbmc3k: log-normalised counts of the GENES (default 1000)
//!                         most variable genes, z-scored and clipped at 10, labelled by
//!                         seurat_annotations
//!   --out PREFIX (default "map")  --metric cosine|euclidean  --neighbors 15
//!   --min-dist 0.1  --epochs N  --seed 42  --threads 0  --title TEXT
//!   --legend-title TEXT  --width 1200  --height 900  --no-png
//!   --score K   also report leave-one-out kNN-K label accuracy (labelled points only)
//!               in the input space (the metric's distance) and in the map
//! ```

use exceiver_core::data::{tenx, ObsValues};
use exceiver_core::layout::{umap_2d_with_progress, MapOptions, Metric, Progress, Stage};
use exceiver_core::model::rng::Rng;
use exceiver_core::plot::{legend, scatter_png, PlotOptions};
use exceiver_core::preprocess::{log1p32, normalize_count};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data");

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Input {
    ids: Vec<String>,
    labels: Vec<Option<String>>,
    data: Vec<f32>,
    dim: usize,
    what: String,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("map_demo: {e}");
        std::process::exit(1);
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|s| s.as_str())
}

fn parse<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Res<T> {
    match flag(args, name) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| format!("bad value {s:?} for {name}").into()),
    }
}

fn run() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let t0 = Instant::now();
    let input = if let Some(path) = flag(&args, "--tsv") {
        read_tsv(Path::new(path))?
    } else if let Some(spec) = flag(&args, "--synthetic") {
        let v: Vec<usize> = spec
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| format!("--synthetic wants N,D,C, got {spec:?}"))?;
        if v.len() != 3 {
            return Err(format!("--synthetic wants N,D,C, got {spec:?}").into());
        }
        synthetic(v[0], v[1], v[2])
    } else if args.iter().any(|a| a == "--pbmc3k") {
        let genes = match flag(&args, "--pbmc3k") {
            Some(s) if !s.starts_with("--") => {
                s.parse().map_err(|_| format!("bad gene count {s:?}"))?
            }
            _ => 1000,
        };
        pbmc3k(genes)?
    } else {
        return Err("give an input: --tsv FILE, --synthetic N,D,C or --pbmc3k [GENES]".into());
    };
    let n = input.ids.len();
    println!(
        "input: {} ({n} points × {} dimensions) read in {:.2} s",
        input.what,
        input.dim,
        t0.elapsed().as_secs_f64()
    );

    let opts = MapOptions {
        n_neighbors: parse(&args, "--neighbors", 15)?,
        min_dist: parse(&args, "--min-dist", 0.1)?,
        metric: parse(&args, "--metric", Metric::Cosine)?,
        epochs: match flag(&args, "--epochs") {
            Some(_) => Some(parse(&args, "--epochs", 0)?),
            None => None,
        },
        seed: parse(&args, "--seed", 42)?,
        threads: parse(&args, "--threads", 0)?,
    };
    // Each stage reports at its start and after its last unit: first to last call.
    let t = Instant::now();
    let mut spans: Vec<(Stage, Instant, Instant)> = Vec::new();
    let map = umap_2d_with_progress(&input.data, n, input.dim, &opts, &mut |p: Progress| {
        let now = Instant::now();
        match spans.last_mut() {
            Some(s) if s.0 == p.stage => s.2 = now,
            _ => spans.push((p.stage, now, now)),
        }
        Ok(())
    })?;
    let total = t.elapsed().as_secs_f64();
    let mut rest = total;
    print!("umap_2d: {total:.2} s (");
    for (s, a, b) in &spans {
        let secs = (*b - *a).as_secs_f64();
        rest -= secs;
        print!("{}: {secs:.2} s, ", s.name());
    }
    println!("graph, curve and initial layout: {rest:.2} s)");
    println!("  options: {opts:?}");

    if let Some(k) = flag(&args, "--score") {
        let k: usize = k
            .parse()
            .map_err(|_| format!("bad value {k:?} for --score"))?;
        let t = Instant::now();
        let map_flat: Vec<f32> = map.iter().flat_map(|p| [p[0], p[1]]).collect();
        let in_map = knn_accuracy(&map_flat, 2, &input.labels, k, Metric::Euclidean);
        let in_input = knn_accuracy(&input.data, input.dim, &input.labels, k, opts.metric);
        println!(
            "kNN-{k} label accuracy: input space {in_input:.4}, map {in_map:.4} ({:.1} s)",
            t.elapsed().as_secs_f64()
        );
    }

    let prefix = flag(&args, "--out").unwrap_or("map");
    let mut tsv = std::io::BufWriter::new(std::fs::File::create(format!("{prefix}.tsv"))?);
    writeln!(tsv, "cell_id\tlabel\tx\ty")?;
    for ((id, l), p) in input.ids.iter().zip(&input.labels).zip(&map) {
        writeln!(
            tsv,
            "{id}\t{}\t{}\t{}",
            l.as_deref().unwrap_or(""),
            p[0],
            p[1]
        )?;
    }
    tsv.flush()?;
    println!("wrote {prefix}.tsv");

    if !args.iter().any(|a| a == "--no-png") {
        let popts = PlotOptions {
            width: parse(&args, "--width", 1200)?,
            height: parse(&args, "--height", 900)?,
            legend_title: flag(&args, "--legend-title").map(str::to_string),
            ..PlotOptions::default()
        };
        let title = flag(&args, "--title").map_or_else(
            || {
                format!(
                    "{}: UMAP of {n} points ({})",
                    input.what,
                    opts.metric.name()
                )
            },
            str::to_string,
        );
        let t = Instant::now();
        let png = scatter_png(&map, &input.labels, &title, &popts)?;
        std::fs::write(format!("{prefix}.png"), &png)?;
        println!(
            "wrote {prefix}.png ({} bytes) in {:.2} s",
            png.len(),
            t.elapsed().as_secs_f64()
        );
        for e in legend(&input.labels).0 {
            println!(
                "  #{:02x}{:02x}{:02x}  {} ({})",
                e.color[0], e.color[1], e.color[2], e.text, e.count
            );
        }
    }
    Ok(())
}

fn read_tsv(path: &Path) -> Res<Input> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut input = Input {
        ids: Vec::new(),
        labels: Vec::new(),
        data: Vec::new(),
        dim: 0,
        what: path.display().to_string(),
    };
    for (ln, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 3 {
            return Err(format!("line {}: expected cell_id, label and values", ln + 1).into());
        }
        if ln == 0 && f[2].trim().parse::<f32>().is_err() {
            continue; // header
        }
        let d = f.len() - 2;
        if input.dim == 0 {
            input.dim = d;
        } else if d != input.dim {
            return Err(format!("line {}: {d} values, earlier lines {}", ln + 1, input.dim).into());
        }
        input.ids.push(f[0].to_string());
        let l = f[1].trim();
        input.labels.push(match l {
            "" | "NULL" | "\\N" => None,
            _ => Some(l.to_string()),
        });
        for v in &f[2..] {
            input.data.push(
                v.trim()
                    .parse()
                    .map_err(|_| format!("line {}: bad value {v:?}", ln + 1))?,
            );
        }
    }
    Ok(input)
}

fn synthetic(n: usize, dim: usize, clusters: usize) -> Input {
    let mut rng = Rng::new(1);
    let clusters = clusters.max(1);
    let centres: Vec<Vec<f64>> = (0..clusters)
        .map(|_| (0..dim).map(|_| 3.0 * rng.normal()).collect())
        .collect();
    let mut input = Input {
        ids: Vec::with_capacity(n),
        labels: Vec::with_capacity(n),
        data: Vec::with_capacity(n * dim),
        dim,
        what: format!("{clusters} Gaussian clusters"),
    };
    for i in 0..n {
        let c = i % clusters;
        input.ids.push(format!("p{i}"));
        input.labels.push(Some(format!("cluster {c}")));
        input
            .data
            .extend(centres[c].iter().map(|&m| (m + rng.normal()) as f32));
    }
    input
}

/// pbmc3k as scanpy's basic recipe sees it: normalise to 1e4, log1p, keep the most
/// variable genes, z-score each gene and clip at 10.
fn pbmc3k(n_genes: usize) -> Res<Input> {
    let m = tenx::read(&Path::new(DATA).join("pbmc3k"))?;
    let (cells, genes) = (m.n_cells(), m.n_genes());
    let mut values: Vec<Vec<(u32, f32)>> = Vec::with_capacity(cells);
    let (mut sum, mut sum2) = (vec![0f64; genes], vec![0f64; genes]);
    for c in 0..cells {
        let (g, k) = m.cell(c);
        let total: f64 = k.iter().map(|&x| x as f64).sum();
        let row: Vec<(u32, f32)> = g
            .iter()
            .zip(k)
            .map(|(&g, &k)| (g, log1p32(normalize_count(k, total))))
            .collect();
        for &(g, y) in &row {
            sum[g as usize] += y as f64;
            sum2[g as usize] += y as f64 * y as f64;
        }
        values.push(row);
    }
    let nc = cells as f64;
    let var: Vec<f64> = (0..genes)
        .map(|g| sum2[g] / nc - (sum[g] / nc).powi(2))
        .collect();
    let mut order: Vec<usize> = (0..genes).collect();
    order.sort_by(|&a, &b| var[b].total_cmp(&var[a]).then(a.cmp(&b)));
    let keep = &order[..n_genes.min(genes)];
    let mut col = vec![usize::MAX; genes];
    for (j, &g) in keep.iter().enumerate() {
        col[g] = j;
    }
    let dim = keep.len();
    let mean: Vec<f64> = keep.iter().map(|&g| sum[g] / nc).collect();
    let sd: Vec<f64> = keep.iter().map(|&g| var[g].sqrt().max(1e-12)).collect();
    let mut data = vec![0f32; cells * dim];
    for (c, row) in values.iter().enumerate() {
        let out = &mut data[c * dim..(c + 1) * dim];
        for (j, o) in out.iter_mut().enumerate() {
            *o = ((0.0 - mean[j]) / sd[j]).min(10.0) as f32;
        }
        for &(g, y) in row {
            let j = col[g as usize];
            if j != usize::MAX {
                out[j] = ((y as f64 - mean[j]) / sd[j]).min(10.0) as f32;
            }
        }
    }
    let labels = match m.obs.iter().find(|c| c.name == "seurat_annotations") {
        Some(c) => match &c.values {
            ObsValues::Text(v) => v.clone(),
            _ => vec![None; cells],
        },
        None => vec![None; cells],
    };
    Ok(Input {
        ids: m.barcodes.clone(),
        labels,
        data,
        dim,
        what: format!("pbmc3k, {dim} most variable genes"),
    })
}

/// Leave-one-out kNN label accuracy over the labelled points (majority vote, ties to
/// the smallest label), by brute force.
fn knn_accuracy(
    data: &[f32],
    dim: usize,
    labels: &[Option<String>],
    k: usize,
    metric: Metric,
) -> f64 {
    let idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i].is_some()).collect();
    let rows: Vec<&[f32]> = idx.iter().map(|&i| &data[i * dim..(i + 1) * dim]).collect();
    let norms: Vec<f32> = rows
        .iter()
        .map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt())
        .collect();
    let dist = |a: usize, b: usize| -> f32 {
        match metric {
            Metric::Cosine => {
                let d: f32 = rows[a].iter().zip(rows[b]).map(|(x, y)| x * y).sum();
                1.0 - d / (norms[a] * norms[b])
            }
            Metric::Euclidean => rows[a]
                .iter()
                .zip(rows[b])
                .map(|(x, y)| (x - y) * (x - y))
                .sum(),
        }
    };
    let mut right = 0;
    for a in 0..rows.len() {
        let mut d: Vec<(f32, usize)> = (0..rows.len())
            .filter(|&b| b != a)
            .map(|b| (dist(a, b), b))
            .collect();
        let k = k.min(d.len());
        d.select_nth_unstable_by(k.saturating_sub(1), |x, y| {
            x.0.total_cmp(&y.0).then(x.1.cmp(&y.1))
        });
        let mut votes: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
        for &(_, b) in &d[..k] {
            *votes
                .entry(labels[idx[b]].as_deref().unwrap_or(""))
                .or_insert(0) += 1;
        }
        let best = votes
            .iter()
            .max_by(|x, y| x.1.cmp(y.1).then(y.0.cmp(x.0)))
            .map(|v| *v.0);
        if best == labels[idx[a]].as_deref() {
            right += 1;
        }
    }
    right as f64 / rows.len().max(1) as f64
}
