//! Writes N realistic synthetic cells as a Cell Ranger folder (`matrix.mtx.gz`,
//! `features.tsv.gz`, `barcodes.tsv.gz`) for `make scale`: real cells of PBMC 3k and
//! Kang resampled and thinned by [`exceiver_core::synth::Resampler`] (deterministic for a
//! seed). Prints the cells, genes, non-zeros and the raw non-zeros' size (4-byte gene
//! index + 4-byte count per non-zero).
//!
//! ```text
//! cargo run --release -p exceiver-core --example scale_cells -- --cells 1000000 --out /tmp/scale [--data data] [--seed 1] [--min-keep 0.5]
//! ```

use exceiver_core::data::{h5ad, tenx};
use exceiver_core::synth::Resampler;
use flate2::write::GzEncoder;
use flate2::Compression;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

fn arg(name: &str) -> Option<String> {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1))
        .cloned()
}

fn gz(path: &PathBuf) -> std::io::Result<GzEncoder<BufWriter<std::fs::File>>> {
    Ok(GzEncoder::new(
        BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?),
        Compression::fast(),
    ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = arg("--cells").map_or(Ok(1_000_000), |s| s.parse())?;
    let out = PathBuf::from(arg("--out").ok_or("--out DIR is required")?);
    let data = PathBuf::from(arg("--data").unwrap_or_else(|| "data".into()));
    let seed: u64 = arg("--seed").map_or(Ok(1), |s| s.parse())?;
    let min_keep: f64 = arg("--min-keep").map_or(Ok(0.5), |s| s.parse())?;
    let t0 = Instant::now();
    let pbmc = tenx::read(&data.join("pbmc3k"))?;
    let kang = h5ad::read(&data.join("kang_ifnb/kang_ifnb.h5ad"))?;
    let r = Resampler::new(vec![&pbmc, &kang], seed, min_keep)?;
    std::fs::create_dir_all(&out)?;
    // pass 1: the number of non-zeros, which the Matrix Market header states first
    let nnz: u64 = (0..n).map(|i| r.cell(i).genes.len() as u64).sum();
    let mut m = gz(&out.join("matrix.mtx.gz"))?;
    writeln!(m, "%%MatrixMarket matrix coordinate integer general")?;
    writeln!(
        m,
        "% exceiver scale_cells: seed {seed}, min_keep {min_keep}, from PBMC 3k and Kang"
    )?;
    writeln!(m, "{} {} {}", r.genes.len(), n, nnz)?;
    let mut b = gz(&out.join("barcodes.tsv.gz"))?;
    let mut written = 0u64;
    let mut depth = 0u64;
    for i in 0..n {
        let c = r.cell(i);
        writeln!(b, "s{i:08}-{}", c.source.0)?;
        for (g, x) in c.genes.iter().zip(&c.counts) {
            writeln!(m, "{} {} {}", g + 1, i + 1, x)?;
            depth += *x as u64;
        }
        written += c.genes.len() as u64;
    }
    assert_eq!(written, nnz, "the two passes agree");
    m.finish()?.flush()?;
    b.finish()?.flush()?;
    let mut f = gz(&out.join("features.tsv.gz"))?;
    for (id, g) in r.gene_ids.iter().zip(&r.genes) {
        writeln!(f, "{id}\t{g}\tGene Expression")?;
    }
    f.finish()?.flush()?;
    let bytes: u64 = ["matrix.mtx.gz", "barcodes.tsv.gz", "features.tsv.gz"]
        .iter()
        .map(|f| std::fs::metadata(out.join(f)).map(|m| m.len()).unwrap_or(0))
        .sum();
    println!(
        "cells {n} genes {} nonzeros {nnz} mean_nonzeros {:.1} mean_depth {:.1} raw_nonzero_bytes {} file_bytes {bytes} seconds {:.1}",
        r.genes.len(),
        nnz as f64 / n.max(1) as f64,
        depth as f64 / n.max(1) as f64,
        nnz * 8,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
