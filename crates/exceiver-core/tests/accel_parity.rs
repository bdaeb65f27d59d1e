//! The batched candle model (`exceiver_core::accel::DeviceModel`) on candle's CPU
//! device: parity with the reference fixtures (`fixtures/README.md`, both attention
//! modes, both checkpoints), agreement with the hand-written CPU model on fixture and
//! real cells, padding invariance, and its errors. The same code runs on CUDA devices.

use exceiver_core::accel::DeviceModel;
use exceiver_core::data::tenx;
use exceiver_core::model::rng::Rng;
use exceiver_core::model::{AttentionMode, Config, Exceiver, Params};
use exceiver_core::preprocess::{self, Scaler};

use candle_core::Device;
use std::collections::HashMap;
use std::sync::OnceLock;

mod common;
use common::{check, read_fixture, rel32, weights, T};

const B: usize = 16;

struct Inputs {
    t: HashMap<String, T>,
    indptr: Vec<usize>,
    genes: Vec<u32>,
    vals: Vec<f32>,
    zero_fill: Vec<f32>,
    query_ids: Vec<u32>,
}

impl Inputs {
    fn cell(&self, c: usize) -> (&[u32], &[f32]) {
        let r = self.indptr[c]..self.indptr[c + 1];
        (&self.genes[r.clone()], &self.vals[r])
    }
    fn cells(&self) -> Vec<(&[u32], &[f32])> {
        (0..B).map(|c| self.cell(c)).collect()
    }
    fn queries(&self) -> Vec<&[u32]> {
        (0..B)
            .map(|c| &self.query_ids[c * 50..(c + 1) * 50])
            .collect()
    }
}

fn inputs() -> &'static Inputs {
    static I: OnceLock<Inputs> = OnceLock::new();
    I.get_or_init(|| {
        let t = read_fixture("inputs.safetensors");
        let indptr = t["cell_indptr"].v.iter().map(|&x| x as usize).collect();
        let genes = t["cell_gene_ids"].u32();
        let vals = t["cell_model_vals"].f32();
        let zero_fill = t["zero_fill_vals"].f32();
        let query_ids = t["query_ids"].u32();
        Inputs {
            t,
            indptr,
            genes,
            vals,
            zero_fill,
            query_ids,
        }
    })
}

fn fixture_parity(wname: &str, oname: &str) {
    let inp = inputs();
    let out = read_fixture(oname);
    let (cfg, params) = weights(wname);
    let dev = Device::Cpu;
    let m = DeviceModel::new(cfg.clone(), &params, &inp.zero_fill, &dev).unwrap();
    let cells = inp.cells();
    let t0 = std::time::Instant::now();
    let enc = m.encode_batch(&cells).unwrap();
    check(
        &format!("{wname} enc_latent"),
        &enc,
        &out["enc_latent"].v,
        1e-5,
    );
    let o = m.forward_batch(&cells, &inp.queries()).unwrap();
    eprintln!(
        "{wname}: 16 cells encoded and run forward in {:.2} s (candle CPU)",
        t0.elapsed().as_secs_f64()
    );
    check(
        &format!("{wname} embedding"),
        &o.embedding,
        &out["embedding"].v,
        1e-5,
    );
    let pred: Vec<f32> = o.pred.concat();
    check(&format!("{wname} pred"), &pred, &out["pred"].v, 5e-5);
    assert_eq!(
        m.embed_batch(&cells).unwrap(),
        o.embedding,
        "embed = forward's embedding"
    );
    if cfg.num_classes.is_some() {
        let l = o.class_logits.as_ref().unwrap();
        check(
            &format!("{wname} class_logits"),
            l,
            &out["class_logits"].v,
            5e-5,
        );
        let l2 = m.classify_logits_batch(&cells).unwrap();
        check(
            &format!("{wname} classify_logits_batch"),
            &l2,
            &out["class_logits"].v,
            5e-5,
        );
    } else {
        assert!(o.class_logits.is_none());
        assert!(m.classify_logits_batch(&cells).is_err());
    }

    // expressed genes only: the reference modules with a bool mask
    let mut c2 = cfg.clone();
    c2.attention = AttentionMode::ExpressedOnly;
    let m2 = DeviceModel::new(c2, &params, &inp.zero_fill, &dev).unwrap();
    let enc = m2.encode_batch(&cells).unwrap();
    check(
        &format!("{wname} boolmask_enc_latent"),
        &enc,
        &out["boolmask_enc_latent"].v,
        1e-5,
    );
    let o = m2.forward_batch(&cells, &inp.queries()).unwrap();
    check(
        &format!("{wname} boolmask_embedding"),
        &o.embedding,
        &out["boolmask_embedding"].v,
        1e-5,
    );
    check(
        &format!("{wname} boolmask_pred"),
        &o.pred.concat(),
        &out["boolmask_pred"].v,
        5e-5,
    );
    if let Some(l) = &o.class_logits {
        check(
            &format!("{wname} boolmask_class_logits"),
            l,
            &out["boolmask_class_logits"].v,
            5e-5,
        );
    }
}

#[test]
fn exceiver_matches_reference_fixtures() {
    fixture_parity(
        "pretrained_TS_exceiver.safetensors",
        "exceiver_outputs.safetensors",
    );
}

#[test]
fn classifier_matches_reference_fixtures() {
    fixture_parity(
        "pretrained_TS_exceiver_classifier.safetensors",
        "classifier_outputs.safetensors",
    );
}

/// Real cells (pbmc3k): counts → model values with the fixtures' scaler, gene i of the
/// file taken as vocabulary index i (the published vocabulary is unknown; any mapping
/// serves for numerical agreement).
fn pbmc_cells(n: usize) -> Vec<(Vec<u32>, Vec<f32>)> {
    let inp = inputs();
    let m = tenx::read(&std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/pbmc3k"
    )))
    .unwrap();
    let scaler = Scaler::new(
        inp.t["scaler_mean_f32"].f32(),
        inp.t["scaler_scale_f32"].f32(),
    )
    .unwrap();
    let g = scaler.len() as u32;
    (0..n)
        .map(|k| {
            let (idx, cnt) = m.cell(k * 97 % m.n_cells());
            let total = preprocess::library_size(cnt).unwrap();
            let (gs, cs): (Vec<u32>, Vec<f32>) = idx
                .iter()
                .zip(cnt)
                .filter(|(&gi, _)| gi < g)
                .map(|(&gi, &c)| (gi, c))
                .unzip();
            preprocess::normalize_cell(&gs, &cs, Some(total), &scaler).unwrap()
        })
        .collect()
}

/// The batched model agrees with `Exceiver::embed` (the hand-written CPU model) for
/// fixture cells and real cells, in both attention modes.
#[test]
fn matches_the_cpu_model() {
    let inp = inputs();
    let real = pbmc_cells(6);
    let mut cells: Vec<(&[u32], &[f32])> = (0..4).map(|c| inp.cell(c * 5)).collect();
    cells.extend(real.iter().map(|(g, v)| (g.as_slice(), v.as_slice())));
    eprintln!(
        "cells with {:?} expressed genes",
        cells.iter().map(|c| c.0.len()).collect::<Vec<_>>()
    );
    for wname in [
        "pretrained_TS_exceiver.safetensors",
        "pretrained_TS_exceiver_classifier.safetensors",
    ] {
        let (cfg, params) = weights(wname);
        for mode in [AttentionMode::Reference, AttentionMode::ExpressedOnly] {
            let mut c = cfg.clone();
            c.attention = mode;
            let cpu = Exceiver::new(c.clone(), params.clone(), inp.zero_fill.clone()).unwrap();
            let dm = DeviceModel::from_exceiver(&cpu, &Device::Cpu).unwrap();
            let got = dm.embed_batch(&cells).unwrap();
            let nd = dm.embedding_len();
            let mut worst = 0.0f64;
            for (k, (g, v)) in cells.iter().enumerate() {
                let want = cpu.embed(g, v).unwrap();
                let r = rel32(&got[k * nd..(k + 1) * nd], &want);
                worst = worst.max(r);
                assert!(r <= 1e-5, "{wname} {mode:?} cell {k}: {r:.3e}");
            }
            eprintln!("{wname} {mode:?}: worst normwise relative difference to Exceiver::embed {worst:.3e}");
            if c.num_classes.is_some() {
                let l = dm.classify_logits_batch(&cells).unwrap();
                let nc = 24;
                for (k, (g, v)) in cells.iter().enumerate() {
                    let want = cpu.classify_logits(g, v).unwrap();
                    let r = rel32(&l[k * nc..(k + 1) * nc], &want);
                    assert!(r <= 5e-5, "{wname} {mode:?} logits of cell {k}: {r:.3e}");
                }
            }
        }
    }
}

/// Padding does not change a cell's result: each cell alone, in one mixed batch of
/// 396 to 2,319 expressed genes, shuffled, and split into chunks of one or a few
/// cells, gives the same embedding up to the f32 rounding of sums of another length
/// (GEMM blocking depends on the padded length; the classifier with expressed genes
/// only is the most sensitive model here, about 5e-6). A cell padded beside a
/// 5,000-gene cell of large values shows that padding keys get no weight.
#[test]
fn padding_and_chunking_do_not_change_results() {
    let inp = inputs();
    let (cfg, params) = weights("pretrained_TS_exceiver_classifier.safetensors");
    for mode in [AttentionMode::Reference, AttentionMode::ExpressedOnly] {
        let mut c = cfg.clone();
        c.attention = mode;
        let m = DeviceModel::new(c, &params, &inp.zero_fill, &Device::Cpu).unwrap();
        let nd = m.embedding_len();
        let cells = inp.cells();
        let batch = m.embed_batch(&cells).unwrap();
        // shuffled order
        let perm: Vec<usize> = (0..B).map(|k| (k * 7 + 3) % B).collect();
        let shuffled: Vec<(&[u32], &[f32])> = perm.iter().map(|&k| cells[k]).collect();
        let sb = m.embed_batch(&shuffled).unwrap();
        // chunks of about 3 cells: a budget that fits 3 cells of the median length
        let small = DeviceModel::new(
            {
                let mut c = cfg.clone();
                c.attention = mode;
                c
            },
            &params,
            &inp.zero_fill,
            &Device::Cpu,
        )
        .unwrap()
        .with_batch_elements(3 * 4 * 128 * 1300);
        let chunked = small.embed_batch(&cells).unwrap();
        let mut worst = 0.0f64;
        for k in 0..B {
            let alone = m.embed_batch(&[cells[k]]).unwrap();
            let b = &batch[k * nd..(k + 1) * nd];
            let j = perm.iter().position(|&p| p == k).unwrap();
            for other in [b, &sb[j * nd..(j + 1) * nd], &chunked[k * nd..(k + 1) * nd]] {
                let r = rel32(other, &alone);
                worst = worst.max(r);
                assert!(r <= 1e-5, "{mode:?} cell {k}: batched vs alone {r:.3e}");
            }
        }
        eprintln!("{mode:?}: worst normwise relative difference alone vs batched/shuffled/chunked {worst:.3e}");
        // a padding entry with a huge value would change the result if padding leaked
        // into the attention: feed a cell together with a much longer one
        let (g0, v0) = cells[11]; // 396 genes
        let long: Vec<u32> = (0..5000u32).collect();
        let vals = vec![11.0f32; 5000];
        let pair = m.embed_batch(&[(g0, v0), (&long, &vals)]).unwrap();
        let alone = m.embed_batch(&[(g0, v0)]).unwrap();
        let r = rel32(&pair[..nd], &alone);
        assert!(r <= 1e-5, "{mode:?}: padded beside a long cell {r:.3e}");
    }
}

/// The fused process layer (one op per layer, `accel/fused.rs`; the CPU form of its
/// CUDA kernel) against the reference fixtures and the unfused candle ops, both
/// published checkpoints.
#[test]
fn fused_process_layer_matches_the_fixtures_and_the_unfused_ops() {
    let inp = inputs();
    for (wname, oname) in [
        (
            "pretrained_TS_exceiver.safetensors",
            "exceiver_outputs.safetensors",
        ),
        (
            "pretrained_TS_exceiver_classifier.safetensors",
            "classifier_outputs.safetensors",
        ),
    ] {
        let out = read_fixture(oname);
        let (cfg, params) = weights(wname);
        let plain = DeviceModel::new(cfg.clone(), &params, &inp.zero_fill, &Device::Cpu).unwrap();
        let fused = DeviceModel::new(cfg.clone(), &params, &inp.zero_fill, &Device::Cpu)
            .unwrap()
            .with_fused_process(true)
            .unwrap();
        assert!(fused.fused_process() && !plain.fused_process());
        let cells = inp.cells();
        let a = plain.forward_batch(&cells, &inp.queries()).unwrap();
        let b = fused.forward_batch(&cells, &inp.queries()).unwrap();
        check(
            &format!("{wname} fused embedding"),
            &b.embedding,
            &out["embedding"].v,
            1e-5,
        );
        let e = rel32(&b.embedding, &a.embedding);
        assert!(e <= 1e-5, "{wname}: fused vs unfused embedding {e:.2e}");
        let pred: Vec<f32> = b.pred.concat();
        check(&format!("{wname} fused pred"), &pred, &out["pred"].v, 5e-5);
        if let Some(l) = &b.class_logits {
            check(
                &format!("{wname} fused class_logits"),
                l,
                &out["class_logits"].v,
                5e-5,
            );
        }
        // switching it off again gives the unfused path back
        let off = fused.with_fused_process(false).unwrap();
        assert!(!off.fused_process());
        assert_eq!(
            off.embed_batch(&cells).unwrap(),
            plain.embed_batch(&cells).unwrap()
        );
    }
}

/// The fused process layer on random models of every supported width and head count,
/// against the unfused ops; shapes without a kernel are refused with the reason.
#[test]
fn fused_process_layer_random_shapes() {
    for (seed, d, heads, n, ff) in [
        (11u64, 1, 1, 5, 7),
        (12, 2, 1, 9, 16),
        (13, 2, 2, 33, 3),
        (14, 4, 4, 12, 24),
        (15, 4, 2, 64, 50),
        (16, 8, 2, 17, 40),
        (17, 8, 8, 3, 9),
        (18, 8, 1, 128, 64),
    ] {
        let cfg = process_cfg(120, d, heads, n, ff, 2);
        let params = Params::init(&cfg, seed).unwrap();
        let zf = vec![0.3f32; cfg.seq_len];
        let plain = DeviceModel::new(cfg.clone(), &params, &zf, &Device::Cpu).unwrap();
        let fused = DeviceModel::new(cfg.clone(), &params, &zf, &Device::Cpu)
            .unwrap()
            .with_fused_process(true)
            .unwrap();
        let mut rng = Rng::new(seed);
        let owned: Vec<(Vec<u32>, Vec<f32>)> = (0..5)
            .map(|k| {
                let genes: Vec<u32> = (0..(3 + 7 * k) as u32).map(|g| g * 3 % 120).collect();
                let vals = genes
                    .iter()
                    .map(|_| rng.uniform_range(-1.0, 9.0) as f32)
                    .collect();
                (genes, vals)
            })
            .collect();
        let cells: Vec<(&[u32], &[f32])> = owned
            .iter()
            .map(|(g, v)| (g.as_slice(), v.as_slice()))
            .collect();
        let a = plain.embed_batch(&cells).unwrap();
        let b = fused.embed_batch(&cells).unwrap();
        let e = rel32(&b, &a);
        assert!(
            e <= 1e-5,
            "d {d} heads {heads} n {n} ff {ff}: fused vs unfused {e:.2e}"
        );
    }
    for (d, heads, n) in [(16, 4, 8), (3, 1, 8), (4, 4, 1025), (8, 2, 769)] {
        let cfg = process_cfg(20, d, heads, n, 8, 1);
        let params = Params::init(&cfg, 1).unwrap();
        let e = DeviceModel::new(cfg, &params, &[0.5; 20], &Device::Cpu)
            .unwrap()
            .with_fused_process(true)
            .unwrap_err();
        assert!(
            e.message
                .contains(&format!("width {d}, {heads} heads, {n} latents")),
            "{e}"
        );
    }
}

/// A model config for the fused-layer tests: `g` genes, width `d`, `heads` process
/// heads, `n` latents, feed-forward `ff`, `layers` process layers.
fn process_cfg(g: usize, d: usize, heads: usize, n: usize, ff: usize, layers: usize) -> Config {
    Config {
        seq_len: g,
        seq_dim: d,
        query_len: n,
        query_dim: d,
        num_layers: layers,
        nhead: heads,
        cross_heads: 1,
        dim_feedforward: ff,
        dropout: 0.0,
        num_classes: None,
        attention: AttentionMode::Reference,
        value_embedding: false,
        value_per_gene: false,
        profile: false,
        class_embedding: false,
    }
}

/// Random small models with head width 1, 2 and 4 (the general attention path) and a
/// classifier, against the hand-written CPU model.
#[test]
fn random_models_match_the_cpu_model() {
    for (seed, d, heads, cross, classes) in [
        (1u64, 4, 4, 4, None),
        (2, 4, 2, 2, Some(3)),
        (3, 16, 4, 4, None),
        (4, 8, 2, 4, Some(5)),
    ] {
        for mode in [AttentionMode::Reference, AttentionMode::ExpressedOnly] {
            let cfg = Config {
                seq_len: 300,
                seq_dim: d,
                query_len: 12,
                query_dim: d,
                num_layers: 2,
                nhead: heads,
                cross_heads: cross,
                dim_feedforward: 24,
                dropout: 0.0,
                num_classes: classes,
                attention: mode,
                // odd seeds: the value embedding (a term v·u in every token), one
                // per gene for seed 3
                value_embedding: seed % 2 == 1,
                value_per_gene: seed == 3,
                // seeds 2 and 3: the profile path (started non-zero so that it counts)
                profile: seed == 2 || seed == 3,
                // seed 4: the class head reads the embedding
                class_embedding: seed == 4,
            };
            let mut params = Params::init(&cfg, seed).unwrap();
            let mut rng = Rng::new(seed + 100);
            if cfg.value_per_gene {
                // rows start equal; make them differ so a row mix-up shows
                for x in params.value_emb.iter_mut() {
                    *x = rng.normal() as f32;
                }
            }
            for x in params.profile.iter_mut() {
                *x = 0.1 * rng.normal() as f32;
            }
            let zf: Vec<f32> = (0..cfg.seq_len)
                .map(|_| rng.uniform_range(-0.8, 1.2) as f32)
                .collect();
            let cpu = Exceiver::new(cfg.clone(), params.clone(), zf.clone()).unwrap();
            let dm = DeviceModel::from_exceiver(&cpu, &Device::Cpu).unwrap();
            let mut owned = Vec::new();
            for k in 0..9 {
                let nnz = 1 + rng.below(40 + 20 * k);
                let mut all: Vec<u32> = (0..cfg.seq_len as u32).collect();
                for i in 0..nnz {
                    let j = i + rng.below(all.len() - i);
                    all.swap(i, j);
                }
                let genes = all[..nnz].to_vec();
                let vals: Vec<f32> = (0..nnz)
                    .map(|_| rng.uniform_range(-1.0, 11.0) as f32)
                    .collect();
                let queries: Vec<u32> = (0..(1 + k % 4)).map(|i| (i * 37 + k) as u32).collect();
                owned.push((genes, vals, queries));
            }
            let cells: Vec<(&[u32], &[f32])> = owned
                .iter()
                .map(|(g, v, _)| (g.as_slice(), v.as_slice()))
                .collect();
            let queries: Vec<&[u32]> = owned.iter().map(|(_, _, q)| q.as_slice()).collect();
            let o = dm.forward_batch(&cells, &queries).unwrap();
            let nd = dm.embedding_len();
            for (k, (g, v, q)) in owned.iter().enumerate() {
                let want = cpu.forward(g, v, q).unwrap();
                let re = rel32(&o.embedding[k * nd..(k + 1) * nd], &want.embedding);
                let rp = rel32(&o.pred[k], &want.pred);
                assert!(
                    re <= 1e-5 && rp <= 5e-5,
                    "d {d} heads {heads}/{cross} {mode:?} cell {k}: embedding {re:.2e}, pred {rp:.2e}"
                );
                if let (Some(c), Some(l)) = (classes, &o.class_logits) {
                    let rl = rel32(&l[k * c..(k + 1) * c], &want.class_logits.unwrap());
                    assert!(rl <= 5e-5, "logits of cell {k}: {rl:.2e}");
                }
            }
        }
    }
}

#[test]
fn bad_input_is_an_error() {
    let inp = inputs();
    let (cfg, params) = weights("pretrained_TS_exceiver.safetensors");
    let dev = Device::Cpu;
    let m = DeviceModel::new(cfg.clone(), &params, &inp.zero_fill, &dev).unwrap();
    let good = inp.cell(0);
    type Case = ((Vec<u32>, Vec<f32>), &'static str);
    let cases: Vec<Case> = vec![
        ((vec![1, 2], vec![1.0]), "gene indices but"),
        ((vec![1, 19067], vec![1.0, 2.0]), "out of range"),
        ((vec![5, 5], vec![1.0, 2.0]), "more than once"),
        ((vec![5, 6], vec![1.0, f32::NAN]), "not finite"),
    ];
    for ((g, v), msg) in &cases {
        let e = m.embed_batch(&[good, (g, v)]).unwrap_err();
        assert!(
            e.message.starts_with("cell 1") && e.message.contains(msg),
            "{}",
            e.message
        );
    }
    // an empty cell: fine in the reference mode (every gene at its zero-fill value),
    // refused when only expressed genes are keys
    let empty: (&[u32], &[f32]) = (&[], &[]);
    let e = m.embed_batch(&[empty]).unwrap();
    let cpu = Exceiver::new(cfg.clone(), params.clone(), inp.zero_fill.clone()).unwrap();
    assert!(rel32(&e, &cpu.embed(&[], &[]).unwrap()) <= 1e-5);
    let mut c2 = cfg.clone();
    c2.attention = AttentionMode::ExpressedOnly;
    let m2 = DeviceModel::new(c2, &params, &inp.zero_fill, &dev).unwrap();
    assert!(m2
        .embed_batch(&[empty])
        .unwrap_err()
        .message
        .contains("at least one"));
    // queries
    let e = m.forward_batch(&[good], &[&[19067u32][..]]).unwrap_err();
    assert!(
        e.message.contains("query gene index 19067"),
        "{}",
        e.message
    );
    assert!(m.forward_batch(&[good], &[]).is_err());
    // construction
    assert!(DeviceModel::new(cfg.clone(), &params, &inp.zero_fill[..10], &dev).is_err());
    let mut zf = inp.zero_fill.clone();
    zf[7] = f32::INFINITY;
    assert!(DeviceModel::new(cfg.clone(), &params, &zf, &dev).is_err());
    let mut c3 = cfg.clone();
    c3.num_layers = 2;
    assert!(DeviceModel::new(c3, &params, &inp.zero_fill, &dev).is_err());
    // no cells: no work
    assert!(m.embed_batch(&[]).unwrap().is_empty());
}

/// A class head on the cell embedding (`class_embedding`): the device model's logits,
/// from `classify_logits_batch` and from `forward_batch` with and without query genes,
/// agree with `Exceiver::classify_logits`.
#[test]
fn class_head_on_the_embedding_matches_the_cpu_model() {
    let inp = inputs();
    let cells: Vec<(&[u32], &[f32])> = (0..4).map(|c| inp.cell(c * 5)).collect();
    let (mut cfg, mut params) = weights("pretrained_TS_exceiver_classifier.safetensors");
    cfg.class_embedding = true;
    params.class_head = Params::init(&cfg, 7).unwrap().class_head;
    let cpu = Exceiver::new(cfg.clone(), params, inp.zero_fill.clone()).unwrap();
    let dm = DeviceModel::from_exceiver(&cpu, &Device::Cpu).unwrap();
    let nc = cfg.num_classes.unwrap();
    let want: Vec<Vec<f32>> = cells
        .iter()
        .map(|(g, v)| cpu.classify_logits(g, v).unwrap())
        .collect();
    let batch = dm.classify_logits_batch(&cells).unwrap();
    let no_queries: Vec<&[u32]> = vec![&[]; cells.len()];
    let queries: Vec<&[u32]> = cells.iter().map(|c| &c.0[..2]).collect();
    for qs in [&no_queries, &queries] {
        let o = dm.forward_batch(&cells, qs).unwrap();
        let l = o.class_logits.unwrap();
        for (k, w) in want.iter().enumerate() {
            let r = rel32(&batch[k * nc..(k + 1) * nc], w);
            assert!(r <= 5e-5, "classify_logits_batch cell {k}: {r:.3e}");
            let r = rel32(&l[k * nc..(k + 1) * nc], w);
            assert!(r <= 5e-5, "forward_batch cell {k}: {r:.3e}");
        }
    }
}
