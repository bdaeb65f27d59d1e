//! Training gradients: parity with the reference's autograd gradients
//! (`fixtures/*_train_grads.safetensors`), finite differences of the f64 dense
//! reference evaluation on tiny random models, and a short Adam run.

use exceiver_core::model::rng::Rng;
use exceiver_core::model::{load_safetensors, AttentionMode, Config, Params};
use exceiver_core::train::{loss_and_grads, mask_positions, TrainCell, TrainOpts, Trainer};

use std::collections::HashMap;

mod common;
use common::dense;
use common::{read_fixture, rel, FIX, T};

/// The reference training batch: 16 cells, 100 masked genes each (draw order).
fn fixture_batch(classifier: bool) -> (Vec<TrainCell>, Vec<f32>, HashMap<String, T>) {
    let t = read_fixture("inputs.safetensors");
    let indptr: Vec<usize> = t["cell_indptr"].v.iter().map(|&x| x as usize).collect();
    let genes: Vec<u32> = t["cell_gene_ids"].v.iter().map(|&x| x as u32).collect();
    let vals: Vec<f32> = t["cell_model_vals"].v.iter().map(|&x| x as f32).collect();
    let zf: Vec<f32> = t["zero_fill_vals"].v.iter().map(|&x| x as f32).collect();
    assert_eq!(t["train_mask_ids"].shape, vec![16, 100]);
    let ids = &t["train_mask_ids"].v;
    let targets = &t["train_mask_vals"].v;
    let labels = &t["class_labels"].v;
    let cells = (0..16)
        .map(|c| {
            let g = &genes[indptr[c]..indptr[c + 1]];
            let v = &vals[indptr[c]..indptr[c + 1]];
            let mask: Vec<usize> = (0..100)
                .map(|j| {
                    let id = ids[c * 100 + j] as u32;
                    let pos = g.binary_search(&id).expect("masked gene is expressed");
                    assert_eq!(v[pos], targets[c * 100 + j] as f32, "target = input value");
                    pos
                })
                .collect();
            TrainCell {
                genes: g.to_vec(),
                values: v.to_vec(),
                mask,
                label: classifier.then(|| labels[c] as usize),
            }
        })
        .collect();
    (cells, zf, t)
}

fn grad_parity(weights: &str, grads_file: &str, outputs_file: &str, classifier: bool) {
    let (cfg, params) =
        load_safetensors(&std::fs::read(format!("{FIX}/{weights}")).unwrap()).unwrap();
    let (cells, zf, _) = fixture_batch(classifier);
    let want = read_fixture(grads_file);
    let out = read_fixture(outputs_file);
    for threads in [1, 2] {
        let t0 = std::time::Instant::now();
        let (stats, grads) = loss_and_grads(&cfg, &params, &zf, &cells, threads).unwrap();
        eprintln!(
            "{weights}, {threads} thread(s): loss and gradients in {:.3} s",
            t0.elapsed().as_secs_f64()
        );
        let loss_ref = out["train_loss"].v[0];
        let mse_ref = out["train_mse"].v[0];
        let rl = (stats.loss - loss_ref).abs() / loss_ref.abs();
        let rm = (stats.mse - mse_ref).abs() / mse_ref.abs();
        eprintln!(
            "train_loss {} (ref {loss_ref}, rel {rl:.2e}); train_mse {} (ref {mse_ref}, rel {rm:.2e})",
            stats.loss, stats.mse
        );
        assert!(rl <= 1e-5, "train_loss relative error {rl:.2e}");
        assert!(rm <= 1e-5, "train_mse relative error {rm:.2e}");
        if classifier {
            let ce_ref = out["train_ce"].v[0];
            let rc = (stats.ce - ce_ref).abs() / ce_ref.abs();
            eprintln!("train_ce {} (ref {ce_ref}, rel {rc:.2e})", stats.ce);
            assert!(rc <= 1e-5, "train_ce relative error {rc:.2e}");
        }
        assert_eq!(stats.masked, 1600);
        let mut worst = (0.0f64, String::new());
        let mut count = 0;
        grads
            .visit(&cfg, |name, shape, g| {
                let w = want
                    .get(&name)
                    .unwrap_or_else(|| panic!("fixture lacks gradient {name}"));
                assert_eq!(w.shape, shape, "{name}");
                let r = rel(g, &w.v);
                if threads == 1 {
                    eprintln!("  {name}: {r:.2e}");
                }
                if r > worst.0 {
                    worst = (r, name.clone());
                }
                assert!(
                    r <= 1e-4,
                    "gradient {name}: normwise relative error {r:.2e}"
                );
                count += 1;
                Ok(())
            })
            .unwrap();
        let g = cfg.seq_len;
        assert!(grads.gene_emb[g * 4..(g + 1) * 4].iter().all(|&x| x == 0.0));
        eprintln!(
            "{count} gradient tensors, worst normwise relative error {:.2e} ({})",
            worst.0, worst.1
        );
        assert_eq!(count, want.len());
    }
}

#[test]
fn exceiver_gradients_match_reference() {
    grad_parity(
        "pretrained_TS_exceiver.safetensors",
        "exceiver_train_grads.safetensors",
        "exceiver_outputs.safetensors",
        false,
    );
}

#[test]
fn classifier_gradients_match_reference() {
    grad_parity(
        "pretrained_TS_exceiver_classifier.safetensors",
        "classifier_train_grads.safetensors",
        "classifier_outputs.safetensors",
        true,
    );
}

#[test]
fn gradients_are_deterministic_per_thread_count() {
    let (cfg, params) = load_safetensors(
        &std::fs::read(format!(
            "{FIX}/pretrained_TS_exceiver_classifier.safetensors"
        ))
        .unwrap(),
    )
    .unwrap();
    let (cells, zf, _) = fixture_batch(true);
    let (s1, g1) = loss_and_grads(&cfg, &params, &zf, &cells, 2).unwrap();
    let (s2, g2) = loss_and_grads(&cfg, &params, &zf, &cells, 2).unwrap();
    assert_eq!(s1, s2);
    assert_eq!(g1, g2);
}

// ------------------------------------------------------------ finite differences

fn tiny_config(mode: AttentionMode, heads: usize, d: usize, classes: Option<usize>) -> Config {
    Config {
        seq_len: 37,
        seq_dim: d,
        query_len: 6,
        query_dim: d,
        num_layers: 2,
        nhead: heads,
        cross_heads: heads,
        dim_feedforward: 20,
        dropout: 0.0,
        num_classes: classes,
        attention: mode,
        value_embedding: false,
        value_per_gene: false,
        profile: false,
        class_embedding: false,
    }
}

fn random_cells(cfg: &Config, rng: &mut Rng, n: usize) -> Vec<TrainCell> {
    (0..n)
        .map(|_| {
            let nnz = 5 + rng.below(12);
            let mut all: Vec<u32> = (0..cfg.seq_len as u32).collect();
            for k in 0..nnz {
                let j = k + rng.below(all.len() - k);
                all.swap(k, j);
            }
            let genes: Vec<u32> = all[..nnz].to_vec();
            let values: Vec<f32> = (0..nnz)
                .map(|_| rng.uniform_range(-1.0, 3.0) as f32)
                .collect();
            let mask = mask_positions(nnz, 3, rng).unwrap();
            TrainCell {
                genes,
                values,
                mask,
                label: cfg.num_classes.map(|c| rng.below(c)),
            }
        })
        .collect()
}

/// The loss in f64 by the dense reference evaluation.
fn dense_loss(cfg: &Config, p: &Params, zf: &[f32], cells: &[TrainCell]) -> f64 {
    let g = cfg.seq_len as u32;
    let (mut sse, mut ce, mut cnt) = (0.0f64, 0.0f64, 0usize);
    for c in cells {
        let mut tokens = c.genes.clone();
        let mut vals = c.values.clone();
        for &m in &c.mask {
            tokens[m] = g;
            vals[m] = 1.0;
        }
        let q: Vec<u32> = c.mask.iter().map(|&m| c.genes[m]).collect();
        let o = dense::dense_forward(cfg, p, zf, &c.genes, Some(&tokens), &vals, &q).unwrap();
        for (j, &m) in c.mask.iter().enumerate() {
            let e = o.pred[j] as f64 - c.values[m] as f64;
            sse += e * e;
            cnt += 1;
        }
        if let (Some(l), Some(lg)) = (c.label, &o.class_logits) {
            let mx = lg.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let s: f64 = lg.iter().map(|&v| (v as f64 - mx).exp()).sum();
            ce += mx + s.ln() - lg[l] as f64;
        }
    }
    sse / cnt as f64 + ce / cells.len() as f64
}

fn finite_difference_check(cfg: Config, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut params = Params::init(&cfg, seed).unwrap();
    if cfg.value_per_gene {
        // rows start equal; make them differ so a row mix-up shows
        for x in params.value_emb.iter_mut() {
            *x = rng.normal() as f32;
        }
    }
    // the profile path starts at zero; give it weight so that its terms count
    for x in params.profile.iter_mut() {
        *x = 0.1 * rng.normal() as f32;
    }
    let zf: Vec<f32> = (0..cfg.seq_len)
        .map(|_| rng.uniform_range(-0.5, 0.8) as f32)
        .collect();
    let cells = random_cells(&cfg, &mut rng, 4);
    let (stats, grads) = loss_and_grads(&cfg, &params, &zf, &cells, 2).unwrap();
    let l0 = dense_loss(&cfg, &params, &zf, &cells);
    // f64 dense and f32 fast evaluation of the same maths
    assert!(
        (stats.loss - l0).abs() <= 1e-5 * l0.abs().max(1.0),
        "loss {} vs dense {l0}",
        stats.loss
    );
    // flatten gradients in visit order
    let mut names = Vec::new();
    let mut an: Vec<Vec<f32>> = Vec::new();
    grads
        .visit(&cfg, |name, _, v| {
            names.push(name);
            an.push(v.clone());
            Ok(())
        })
        .unwrap();
    // Per tensor, a random direction u (±1 per entry, 0 on the mask token's row):
    // L(p + h·u) − L(p − h·u) against Σ_k g_k·Δp_k. One direction over a whole tensor
    // gives a signal far above the f32 rounding of the dense evaluation's outputs.
    let h: f32 = std::env::var("FD_H")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2e-3);
    let mut worst = 0.0f64;
    let mut checked = 0;
    for (ti, name) in names.iter().enumerate() {
        let len = an[ti].len();
        let u: Vec<f32> = (0..len)
            .map(|k| {
                if name == "gene_emb.weight" && k / cfg.seq_dim == cfg.seq_len {
                    assert_eq!(an[ti][k], 0.0, "mask row gradient");
                    0.0
                } else if rng.below(2) == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        let eval = |step: f32| -> f64 {
            let mut p = params.clone();
            let mut idx = 0;
            p.visit_mut(&cfg, |_, _, v| {
                if idx == ti {
                    for (x, d) in v.iter_mut().zip(&u) {
                        *x += step * d;
                    }
                }
                idx += 1;
                Ok(())
            })
            .unwrap();
            dense_loss(&cfg, &p, &zf, &cells)
        };
        // central differences at h and h/2, Richardson-extrapolated (error O(h⁴))
        let d1 = (eval(h) - eval(-h)) / (2.0 * h as f64);
        let d2 = (eval(h / 2.0) - eval(-h / 2.0)) / (h as f64);
        let fd = (4.0 * d2 - d1) / 3.0;
        let a: f64 = (0..len).map(|k| an[ti][k] as f64 * u[k] as f64).sum();
        // the dense evaluation rounds its outputs to f32: ~1e-7·L noise per loss,
        // divided by the step
        let floor = 5e-7 * l0.abs().max(1.0) / h as f64;
        assert!(
            (fd - a).abs() <= 1e-3 * a.abs() + floor,
            "{name}: directional derivative, analytic {a:.6e} vs finite difference {fd:.6e} (h-differences {d1:.6e}, {d2:.6e})"
        );
        if a.abs() > 100.0 * floor {
            worst = worst.max((fd - a).abs() / a.abs());
            checked += 1;
        }
    }
    eprintln!(
        "{cfg:?}: {} tensors, {checked} with signal > 100× noise floor, worst relative mismatch among those {worst:.2e}",
        names.len()
    );
}

#[test]
fn finite_differences_reference_mode_head_width_1() {
    finite_difference_check(tiny_config(AttentionMode::Reference, 4, 4, None), 1);
}

#[test]
fn finite_differences_reference_mode_head_width_2_classifier() {
    finite_difference_check(tiny_config(AttentionMode::Reference, 2, 4, Some(3)), 2);
}

#[test]
fn finite_differences_expressed_only() {
    finite_difference_check(tiny_config(AttentionMode::ExpressedOnly, 4, 4, None), 3);
    finite_difference_check(tiny_config(AttentionMode::ExpressedOnly, 2, 4, Some(3)), 4);
}

#[test]
fn finite_differences_odd_widths() {
    // d = 6 with heads of width 3 and 2: the scalar kernel paths
    finite_difference_check(tiny_config(AttentionMode::Reference, 2, 6, None), 5);
    let mut c = tiny_config(AttentionMode::Reference, 3, 6, Some(4));
    c.cross_heads = 2;
    finite_difference_check(c, 6);
}

#[test]
fn finite_differences_value_embedding() {
    // the token LN(v·E[g]) + v·u: u's gradient, and E's through both terms; per gene,
    // LN(v·E[g]) + v·U[g]: each row of U gets its own genes' gradient
    for (seed, per_gene) in [(7u64, false), (11, true)] {
        for (k, mode) in [AttentionMode::Reference, AttentionMode::ExpressedOnly]
            .into_iter()
            .enumerate()
        {
            let mut c = tiny_config(mode, 4, 4, None);
            c.value_embedding = true;
            c.value_per_gene = per_gene;
            finite_difference_check(c.clone(), seed + k as u64);
            c.num_classes = Some(3);
            c.cross_heads = 2;
            finite_difference_check(c, seed + 2 + k as u64);
        }
    }
}

#[test]
fn finite_differences_profile_path() {
    // the encoder output plus Σ (v − zero fill)·P[g] over unmasked genes: P's rows get
    // their genes' gradient, masked genes' rows none, and the rest of the model sees
    // the sum through the process layers and the decoder
    for (k, mode) in [AttentionMode::Reference, AttentionMode::ExpressedOnly]
        .into_iter()
        .enumerate()
    {
        let mut c = tiny_config(mode, 4, 4, None);
        c.profile = true;
        finite_difference_check(c.clone(), 21 + k as u64);
        c.value_embedding = true;
        c.num_classes = Some(3);
        finite_difference_check(c, 23 + k as u64);
    }
}

#[test]
fn finite_differences_class_head_on_the_embedding() {
    // the class head reads the processed latent (N·d) instead of a class token's
    // decoder row: its gradient enters the embedding beside the decoder's
    for (k, mode) in [AttentionMode::Reference, AttentionMode::ExpressedOnly]
        .into_iter()
        .enumerate()
    {
        let mut c = tiny_config(mode, 2, 4, Some(3));
        c.class_embedding = true;
        finite_difference_check(c.clone(), 31 + k as u64);
        c.profile = true;
        finite_difference_check(c, 33 + k as u64);
    }
}

// ------------------------------------------------------------ training reduces the loss

#[test]
fn adam_learns_a_synthetic_problem() {
    let g = 40;
    let cfg = Config {
        seq_len: g,
        seq_dim: 8,
        query_len: 8,
        query_dim: 8,
        num_layers: 1,
        nhead: 2,
        cross_heads: 4,
        dim_feedforward: 32,
        dropout: 0.0,
        num_classes: None,
        attention: AttentionMode::Reference,
        value_embedding: false,
        value_per_gene: false,
        profile: false,
        class_embedding: false,
    };
    let mut rng = Rng::new(11);
    // two cell types with their own gene profiles
    let mu: Vec<f32> = (0..g).map(|_| rng.normal() as f32).collect();
    let base: Vec<Vec<f32>> = (0..2)
        .map(|_| (0..g).map(|k| mu[k] + 0.7 * rng.normal() as f32).collect())
        .collect();
    let zf = vec![0.0f32; g];
    let make = |rng: &mut Rng| -> TrainCell {
        let t = rng.below(2);
        let nnz = 16;
        let mut all: Vec<u32> = (0..g as u32).collect();
        for k in 0..nnz {
            let j = k + rng.below(g - k);
            all.swap(k, j);
        }
        let genes = all[..nnz].to_vec();
        let values = genes
            .iter()
            .map(|&gi| base[t][gi as usize] + 0.1 * rng.normal() as f32)
            .collect();
        let mask = mask_positions(nnz, 4, rng).unwrap();
        TrainCell {
            genes,
            values,
            mask,
            label: None,
        }
    };
    let val: Vec<TrainCell> = (0..64).map(|_| make(&mut rng)).collect();
    // baseline: predict the mean of the targets
    let ys: Vec<f64> = val
        .iter()
        .flat_map(|c| c.mask.iter().map(|&m| c.values[m] as f64))
        .collect();
    let mean = ys.iter().sum::<f64>() / ys.len() as f64;
    let baseline = ys.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / ys.len() as f64;
    let params = Params::init(&cfg, 3).unwrap();
    let opts = TrainOpts {
        lr: std::env::var("T_LR")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1e-2),
        weight_decay: 1e-5,
        warmup_steps: 20,
        threads: 2,
        ..TrainOpts::default()
    };
    let mut tr = Trainer::new(cfg.clone(), params, zf, opts).unwrap();
    let before = tr.eval_loss(&val).unwrap();
    for _ in 0..400 {
        let batch: Vec<TrainCell> = (0..32).map(|_| make(&mut rng)).collect();
        let st = tr.train_step(&batch).unwrap();
        if tr.steps_done().is_multiple_of(50) {
            eprintln!(
                "step {}: batch loss {:.4}, validation {:.4}",
                tr.steps_done(),
                st.loss,
                tr.eval_loss(&val).unwrap()
            );
        }
    }
    let after = tr.eval_loss(&val).unwrap();
    eprintln!("baseline (mean) {baseline:.4}, before {before:.4}, after 400 steps {after:.4}");
    assert!(
        after < 0.5 * baseline,
        "loss {after} not well below the mean predictor's {baseline}"
    );
    assert_eq!(tr.steps_done(), 400);
    let p = tr.into_params();
    assert!(p.gene_emb[g * 8..(g + 1) * 8].iter().all(|&x| x == 0.0));
}

#[test]
fn bad_cells_are_errors() {
    let cfg = tiny_config(AttentionMode::Reference, 4, 4, None);
    let params = Params::init(&cfg, 1).unwrap();
    let zf = vec![0.5f32; cfg.seq_len];
    let good = TrainCell {
        genes: vec![1, 2, 3],
        values: vec![1.0, 2.0, 3.0],
        mask: vec![0],
        label: None,
    };
    let mut tr = Trainer::new(
        cfg.clone(),
        params.clone(),
        zf.clone(),
        TrainOpts::default(),
    )
    .unwrap();
    let cases = [
        (
            TrainCell {
                genes: vec![1, 2],
                ..good.clone()
            },
            "gene indices but",
        ),
        (
            TrainCell {
                genes: vec![1, 2, 99],
                ..good.clone()
            },
            "out of range",
        ),
        (
            TrainCell {
                genes: vec![1, 2, 2],
                ..good.clone()
            },
            "more than once",
        ),
        (
            TrainCell {
                values: vec![1.0, f32::NAN, 3.0],
                ..good.clone()
            },
            "not finite",
        ),
        (
            TrainCell {
                mask: vec![5],
                ..good.clone()
            },
            "mask position",
        ),
        (
            TrainCell {
                label: Some(1),
                ..good.clone()
            },
            "not a classifier",
        ),
    ];
    for (cell, msg) in cases {
        let e = tr.train_step(&[good.clone(), cell]).unwrap_err();
        assert!(e.message.contains(msg), "{}", e.message);
        assert!(e.message.starts_with("cell 1"), "{}", e.message);
    }
    assert_eq!(
        tr.params(),
        &params,
        "failed steps leave the weights unchanged"
    );
    assert!(tr.train_step(&[]).is_err());
    assert!(mask_positions(3, 4, &mut Rng::new(1)).is_err());
}

/// A fresh model's value head output bias is set to the mean target; NaN is refused.
#[test]
fn value_bias_init_moves_the_starting_prediction() {
    let cfg = Config::small(40);
    let mut p = Params::init(&cfg, 7).unwrap();
    exceiver_core::train::init_value_bias(&mut p, 3.6).unwrap();
    // the hidden unit starts in GELU's linear range, the output near the mean target
    assert_eq!(p.value_head.linear1.bias, vec![2.0f32]);
    assert_eq!(p.value_head.linear2.weight, vec![1.0f32]);
    let m = exceiver_core::model::Exceiver::new(cfg.clone(), p.clone(), vec![-0.5; 40]).unwrap();
    let genes: Vec<u32> = (0..20).collect();
    let pred = m.predict(&genes, &[1.0; 20], &genes).unwrap();
    let mean = pred.iter().sum::<f32>() / pred.len() as f32;
    assert!((mean - 3.6).abs() < 1.0, "mean starting prediction {mean}");
    assert!(exceiver_core::train::init_value_bias(&mut p, f64::NAN).is_err());
}
