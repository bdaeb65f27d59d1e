//! The fast O(expressed genes) forward pass equals the dense f64 evaluation over all
//! genes, on small random models of several shapes, in both attention modes; and the
//! invariances that make the sparse evaluation legitimate.

use exceiver_core::model::kernels::Kernels;
use exceiver_core::model::rng::Rng;
use exceiver_core::model::{AttentionMode, Config, Exceiver, Params};

mod common;
use common::dense;

fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Random weights with every parameter non-trivial (LayerNorm gains and biases too)
/// and attention projections large enough that softmaxes are far from uniform.
fn random_params(cfg: &Config, seed: u64) -> Params {
    let mut p = Params::init(cfg, seed).unwrap();
    let mut rng = Rng::new(seed ^ 0xABCDEF);
    let d = cfg.seq_dim;
    p.visit_mut(cfg, |name, _shape, v| {
        let (base, sd) = if name.contains("norm") && name.ends_with("weight")
            || name.ends_with("mlp.0.weight")
        {
            (1.0, 0.3)
        } else if name.contains("in_proj_weight") {
            // logits with a standard deviation of ~6 whatever d: far from uniform,
            // yet not so peaked that f32 rounding is amplified beyond the tolerance
            (0.0, 1.2 / (d as f64 / 4.0).sqrt())
        } else if name == "gene_emb.weight" || name == "query_emb" {
            (0.0, 1.0)
        } else {
            (0.0, 0.5)
        };
        for x in v.iter_mut() {
            *x = (base + sd * rng.normal()) as f32;
        }
        if name == "gene_emb.weight" {
            let g = cfg.seq_len;
            v[g * d..(g + 1) * d].iter_mut().for_each(|x| *x = 0.0);
        }
        if name == "value_emb" && v.len() > d {
            // per gene: rows start equal in training and part from there, so one
            // shared row plus a per-gene deviation (independent rows of this scale,
            // times values up to 11, make every latent attend to the same gene and
            // leave the process layers ill-conditioned: 4.8e-3 end to end in f32)
            let (first, rest) = v.split_at_mut(d);
            for row in rest.chunks_exact_mut(d) {
                for (x, &f) in row.iter_mut().zip(first.iter()) {
                    *x = f + (0.2 * rng.normal()) as f32;
                }
            }
        }
        Ok(())
    })
    .unwrap();
    p
}

struct Cell {
    genes: Vec<u32>,
    vals: Vec<f32>,
    queries: Vec<u32>,
}

fn random_cell(rng: &mut Rng, g: usize, nnz: usize) -> Cell {
    let nnz = nnz.min(g);
    let mut genes: Vec<u32> = Vec::new();
    let mut taken = vec![false; g];
    while genes.len() < nnz {
        let x = rng.below(g);
        if !taken[x] {
            taken[x] = true;
            genes.push(x as u32);
        }
    }
    let vals = genes
        .iter()
        .map(|_| rng.uniform_range(-3.0, 11.0) as f32)
        .collect();
    let queries = (0..7).map(|_| rng.below(g) as u32).collect();
    Cell {
        genes,
        vals,
        queries,
    }
}

fn shapes() -> Vec<Config> {
    let base = Config {
        seq_len: 300,
        seq_dim: 4,
        query_len: 20, // not a multiple of the 16 lanes
        query_dim: 4,
        num_layers: 2,
        nhead: 4,
        cross_heads: 4,
        dim_feedforward: 40, // not a multiple of 16 either
        dropout: 0.0,
        num_classes: Some(5),
        attention: AttentionMode::Reference,
        value_embedding: false,
        value_per_gene: false,
        profile: false,
        class_embedding: false,
    };
    vec![
        base.clone(),
        // head width 2 in cross-attention, 4 in the process layers, general d
        Config {
            seq_dim: 8,
            query_dim: 8,
            nhead: 2,
            num_classes: None,
            query_len: 33,
            ..base.clone()
        },
        // the `small` preset shape, shrunk
        Config {
            query_len: 16,
            dim_feedforward: 32,
            ..Config::small(250)
        },
        // d = 4 with one process head of width 4
        Config {
            nhead: 1,
            num_layers: 1,
            ..base.clone()
        },
        // head width 3 everywhere (the kernels' generic head-width path)
        Config {
            seq_dim: 12,
            query_dim: 12,
            query_len: 17,
            num_classes: None,
            ..base
        },
    ]
}

/// Stage by stage (each stage fed the dense result of the one before) the fast pass
/// must match to f32 rounding: 1e-5 normwise (5e-5 for the heads). End to end, random
/// models with peaked attention amplify rounding through the layers, so the
/// end-to-end bound is looser; parity with the real checkpoints is in model_parity.rs.
fn compare(model: &Exceiver, cell: &Cell, tokens: Option<&[u32]>, vals: &[f32], tag: &str) {
    let cfg = model.config();
    let d = dense::dense_forward(
        cfg,
        model.params(),
        model.zero_fill(),
        &cell.genes,
        tokens,
        vals,
        &cell.queries,
    )
    .unwrap();
    let verbose = std::env::var("EXCEIVER_TEST_VERBOSE").is_ok();
    // encoder
    let enc = model.encode_tokens(&cell.genes, tokens, vals).unwrap();
    let r_enc = rel(&enc, &d.enc_latent);
    assert!(r_enc < 1e-5, "{tag}: enc_latent normwise error {r_enc:.2e}");
    // process stack, from the dense encoder output
    let layers = model.process(&d.enc_latent).unwrap();
    let r_layers: Vec<f64> = layers
        .iter()
        .zip(&d.layers)
        .map(|(a, b)| rel(a, b))
        .collect();
    // decoder, from the dense processed latent
    let nd = model.embedding_len();
    let last = d
        .layers
        .last()
        .cloned()
        .unwrap_or_else(|| d.enc_latent.clone());
    assert_eq!(last.len(), nd);
    let mut rows = cell.queries.clone();
    if cfg.num_classes.is_some() {
        rows.push(cfg.seq_len as u32 + 1);
    }
    let dec = model.decode(&last, &rows).unwrap();
    let r_dec = rel(&dec, &d.decoder_out);
    // end to end
    let o = model
        .forward_tokens(&cell.genes, tokens, vals, &cell.queries, true)
        .unwrap();
    let r_emb = rel(&o.embedding, &last);
    let r_pred = rel(&o.pred, &d.pred);
    let r_cls = match (&o.class_logits, &d.class_logits) {
        (Some(a), Some(b)) => rel(a, b),
        _ => 0.0,
    };
    if verbose {
        eprintln!("{tag}: enc {r_enc:.1e} layers {:?} decoder {r_dec:.1e} | end to end: embedding {r_emb:.1e} pred {r_pred:.1e} logits {r_cls:.1e}", r_layers.iter().map(|r| format!("{r:.1e}")).collect::<Vec<_>>());
    }
    for (l, r) in r_layers.iter().enumerate() {
        assert!(*r < 1e-5, "{tag}: layer {l} normwise error {r:.2e}");
    }
    assert!(r_dec < 1e-5, "{tag}: decoder normwise error {r_dec:.2e}");
    assert!(
        r_emb < 1e-4,
        "{tag}: end-to-end embedding normwise error {r_emb:.2e}"
    );
    assert!(
        r_pred < 2e-4,
        "{tag}: end-to-end pred normwise error {r_pred:.2e}"
    );
    assert!(
        r_cls < 2e-4,
        "{tag}: end-to-end logits normwise error {r_cls:.2e}"
    );
}

#[test]
fn fast_equals_dense_on_random_models() {
    let mut rng = Rng::new(42);
    // the per-gene cases draw from a stream of their own, so that adding them left the
    // other cases' cells as they were
    let mut rng_per_gene = Rng::new(43);
    for (s, cfg) in shapes().into_iter().enumerate() {
        for (mode, value_embedding, value_per_gene) in [
            (AttentionMode::Reference, false, false),
            (AttentionMode::ExpressedOnly, false, false),
            (AttentionMode::Reference, true, false),
            (AttentionMode::ExpressedOnly, true, false),
            (AttentionMode::Reference, true, true),
            (AttentionMode::ExpressedOnly, true, true),
        ] {
            let cfg = Config {
                attention: mode,
                value_embedding,
                value_per_gene,
                ..cfg.clone()
            };
            let params = random_params(&cfg, 1000 + s as u64);
            let rng = if value_per_gene {
                &mut rng_per_gene
            } else {
                &mut rng
            };
            let zero_fill: Vec<f32> = (0..cfg.seq_len)
                .map(|_| rng.uniform_range(-2.0, 2.0) as f32)
                .collect();
            let model = Exceiver::new(cfg.clone(), params, zero_fill).unwrap();
            for (k, nnz) in [1usize, 17, 120, 300].into_iter().enumerate() {
                let cell = random_cell(rng, cfg.seq_len, nnz);
                compare(
                    &model,
                    &cell,
                    None,
                    &cell.vals,
                    &format!(
                        "shape {s} {mode:?} value_embedding {value_embedding} per gene {value_per_gene} cell {k} (nnz {nnz})"
                    ),
                );
            }
            if mode == AttentionMode::Reference {
                // an empty cell is well defined in the reference semantics
                let cell = Cell {
                    genes: vec![],
                    vals: vec![],
                    queries: vec![0, 1],
                };
                compare(&model, &cell, None, &[], &format!("shape {s} empty cell"));
            } else {
                assert!(model.embed(&[], &[]).is_err());
            }
        }
    }
}

/// Masked-training input (mask token rows) matches the dense evaluation too.
#[test]
fn mask_tokens_match_dense() {
    let cfg = shapes().remove(1);
    let params = random_params(&cfg, 7);
    let mut rng = Rng::new(3);
    let zero_fill: Vec<f32> = (0..cfg.seq_len)
        .map(|_| rng.uniform_range(-1.0, 1.5) as f32)
        .collect();
    let model = Exceiver::new(cfg.clone(), params, zero_fill).unwrap();
    let cell = random_cell(&mut rng, cfg.seq_len, 60);
    let mut tokens = cell.genes.clone();
    let mut vals = cell.vals.clone();
    for e in (0..60).step_by(5) {
        tokens[e] = cfg.seq_len as u32;
        vals[e] = 1.0;
    }
    compare(&model, &cell, Some(&tokens), &vals, "masked input");
}

/// The profile path (`Σ (v − zero fill)·P[g]` added to the encoder output), in both
/// attention modes, with and without masked entries (which it leaves out).
#[test]
fn profile_path_matches_dense() {
    let mut rng = Rng::new(44);
    for (s, cfg) in shapes().into_iter().enumerate().take(2) {
        for mode in [AttentionMode::Reference, AttentionMode::ExpressedOnly] {
            let cfg = Config {
                attention: mode,
                profile: true,
                ..cfg.clone()
            };
            let params = random_params(&cfg, 2000 + s as u64);
            assert!(params.profile.iter().any(|&x| x != 0.0));
            let zero_fill: Vec<f32> = (0..cfg.seq_len)
                .map(|_| rng.uniform_range(-1.0, 1.5) as f32)
                .collect();
            let model = Exceiver::new(cfg.clone(), params, zero_fill).unwrap();
            for nnz in [1usize, 17, 120] {
                let cell = random_cell(&mut rng, cfg.seq_len, nnz);
                let tag = format!("shape {s} {mode:?} profile (nnz {nnz})");
                compare(&model, &cell, None, &cell.vals, &tag);
                let mut tokens = cell.genes.clone();
                let mut vals = cell.vals.clone();
                for e in (0..nnz).step_by(4) {
                    tokens[e] = cfg.seq_len as u32;
                    vals[e] = 1.0;
                }
                compare(
                    &model,
                    &cell,
                    Some(&tokens),
                    &vals,
                    &format!("{tag}, masked"),
                );
            }
        }
    }
}

/// The output depends only on the expressed genes (as a set) and the zero-fill
/// values of the others: order does not matter, the zero-fill value of an expressed
/// gene does not matter, and in ExpressedOnly mode no zero-fill value matters.
#[test]
fn invariances() {
    let cfg = shapes().remove(0);
    let params = random_params(&cfg, 11);
    let mut rng = Rng::new(5);
    let zero_fill: Vec<f32> = (0..cfg.seq_len)
        .map(|_| rng.uniform_range(-2.0, 2.0) as f32)
        .collect();
    let cell = random_cell(&mut rng, cfg.seq_len, 50);
    let model = Exceiver::new(cfg.clone(), params.clone(), zero_fill.clone()).unwrap();
    let base = model.embed(&cell.genes, &cell.vals).unwrap();

    // permutation of the entries
    let mut idx: Vec<usize> = (0..50).collect();
    for i in (1..50).rev() {
        idx.swap(i, rng.below(i + 1));
    }
    let g2: Vec<u32> = idx.iter().map(|&i| cell.genes[i]).collect();
    let v2: Vec<f32> = idx.iter().map(|&i| cell.vals[i]).collect();
    assert!(rel(&model.embed(&g2, &v2).unwrap(), &base) < 1e-6);

    // changing the zero-fill value of expressed genes changes nothing
    let mut zf = zero_fill.clone();
    for &g in &cell.genes {
        zf[g as usize] += 3.0;
    }
    let m2 = Exceiver::new(cfg.clone(), params.clone(), zf).unwrap();
    assert!(rel(&m2.embed(&cell.genes, &cell.vals).unwrap(), &base) < 1e-6);

    // changing the zero-fill value of an unexpressed gene does change the output
    let other = (0..cfg.seq_len as u32)
        .find(|g| !cell.genes.contains(g))
        .unwrap();
    let mut zf = zero_fill.clone();
    zf[other as usize] += 3.0;
    let m3 = Exceiver::new(cfg.clone(), params.clone(), zf).unwrap();
    assert!(rel(&m3.embed(&cell.genes, &cell.vals).unwrap(), &base) > 1e-6);

    // ExpressedOnly ignores every zero-fill value
    let eo = Exceiver::new(cfg.clone(), params.clone(), zero_fill.clone())
        .unwrap()
        .with_attention(AttentionMode::ExpressedOnly);
    let zf: Vec<f32> = zero_fill.iter().map(|v| v * -2.0 + 0.5).collect();
    let eo2 = Exceiver::new(cfg.clone(), params, zf)
        .unwrap()
        .with_attention(AttentionMode::ExpressedOnly);
    assert_eq!(
        eo.embed(&cell.genes, &cell.vals).unwrap(),
        eo2.embed(&cell.genes, &cell.vals).unwrap()
    );
}

#[test]
fn bad_cells_are_errors() {
    let cfg = shapes().remove(0);
    let model = Exceiver::new(cfg.clone(), random_params(&cfg, 1), vec![1.0; cfg.seq_len]).unwrap();
    let e = model.embed(&[1, 2], &[1.0]).unwrap_err();
    assert_eq!(e.kind, exceiver_core::Kind::ArrayShape);
    let e = model.embed(&[1, 300], &[1.0, 2.0]).unwrap_err();
    assert!(
        e.message.contains("gene index 300") && e.message.contains("300 genes"),
        "{}",
        e.message
    );
    let e = model.embed(&[1, 2], &[1.0, f32::NAN]).unwrap_err();
    assert_eq!(e.kind, exceiver_core::Kind::Data);
    let e = model.embed(&[4, 2, 4], &[1.0, 2.0, 3.0]).unwrap_err();
    assert!(e.message.contains("more than once"), "{}", e.message);
    let e = model.predict(&[1], &[1.0], &[300]).unwrap_err();
    assert!(e.message.contains("query gene index 300"), "{}", e.message);
    let mut out = vec![0.0; 3];
    assert!(model.embed_into(&[1], &[1.0], &mut out).is_err());
    // a cell after a failed one is fine (the duplicate check state is per call)
    assert!(model.embed(&[4, 2], &[1.0, 2.0]).is_ok());
    // wrong zero-fill length
    assert!(Exceiver::new(cfg.clone(), random_params(&cfg, 1), vec![1.0; 3]).is_err());
    // not a classifier
    let cfg2 = shapes().remove(1);
    let m2 = Exceiver::new(
        cfg2.clone(),
        random_params(&cfg2, 1),
        vec![1.0; cfg2.seq_len],
    )
    .unwrap();
    assert!(m2.classify_logits(&[1], &[1.0]).is_err());
}

/// Every compiled kernel copy (portable, AVX2, AVX-512) gives the same model output
/// to rounding, checked through the kernels directly.
#[test]
fn kernel_copies_agree() {
    let mut rng = Rng::new(9);
    let q: Vec<f32> = (0..32).map(|_| rng.normal() as f32).collect();
    let k: Vec<f32> = (0..500).map(|_| rng.normal() as f32 * 3.0).collect();
    let v: Vec<f32> = (0..500).map(|_| rng.normal() as f32).collect();
    let m: Vec<f32> = q
        .iter()
        .map(|qi| k.iter().map(|kn| qi * kn).fold(f32::MIN, f32::max))
        .collect();
    let f = 64;
    let x: Vec<f32> = (0..12).map(|_| rng.normal() as f32).collect();
    let w1t: Vec<f32> = (0..4 * f).map(|_| rng.normal() as f32).collect();
    let b1: Vec<f32> = (0..f).map(|_| rng.normal() as f32).collect();
    let w2: Vec<f32> = (0..4 * f).map(|_| rng.normal() as f32).collect();
    let mut results = Vec::new();
    for kern in Kernels::all_available() {
        let (mut z, mut a) = (vec![0f64; 32], vec![0f64; 32]);
        kern.attn_h1(&q, &m, &k, &v, &mut z, &mut a);
        let mut o1 = vec![0f32; 12];
        kern.ffn_d4(&x, &w1t, &b1, &w2, &mut o1);
        let mut o2 = vec![0f32; 12];
        let mut s = vec![0f32; 5 * 16];
        kern.ffn_gen(4, &x, &w1t, &b1, &w2, &mut o2, &mut s);
        results.push((kern.name, z, a, o1, o2));
    }
    // exact f64 reference
    for (name, z, a, o1, o2) in &results {
        for i in 0..32 {
            let (mut zr, mut ar) = (0f64, 0f64);
            for n in 0..500 {
                let e = ((q[i] as f64) * (k[n] as f64) - m[i] as f64).exp();
                zr += e;
                ar += e * v[n] as f64;
            }
            assert!(
                (z[i] - zr).abs() / zr < 2e-6,
                "{name}: z[{i}] {} vs {zr}",
                z[i]
            );
            assert!(
                (a[i] - ar).abs() / zr < 2e-6,
                "{name}: a[{i}] {} vs {ar}",
                a[i]
            );
        }
        for i in 0..3 {
            for r in 0..4 {
                let mut s = 0f64;
                for j in 0..f {
                    let mut h = b1[j] as f64;
                    for c in 0..4 {
                        h += w1t[c * f + j] as f64 * x[c * 3 + i] as f64;
                    }
                    // the kernels evaluate g(u) = u·(1 + erf(u)) (GELU's constants are
                    // folded into the weights by the caller)
                    let g = h * (1.0 + libm::erf(h));
                    s += w2[r * f + j] as f64 * g;
                }
                assert!(
                    (o1[r * 3 + i] as f64 - s).abs() < 1e-4,
                    "{name}: ffn_d4 {} vs {s}",
                    o1[r * 3 + i]
                );
                assert!(
                    (o2[r * 3 + i] as f64 - s).abs() < 1e-4,
                    "{name}: ffn_gen {} vs {s}",
                    o2[r * 3 + i]
                );
            }
        }
    }
    eprintln!(
        "kernel copies checked: {:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
}

#[test]
fn batch_equals_single() {
    let cfg = shapes().remove(2);
    let model = Exceiver::new(cfg.clone(), random_params(&cfg, 2), vec![0.5; cfg.seq_len]).unwrap();
    let mut rng = Rng::new(1);
    let cells: Vec<Cell> = (0..9)
        .map(|_| random_cell(&mut rng, cfg.seq_len, 40))
        .collect();
    let refs: Vec<(&[u32], &[f32])> = cells.iter().map(|c| (&c.genes[..], &c.vals[..])).collect();
    let batch = model.embed_batch(&refs, 2).unwrap();
    let nd = model.embedding_len();
    for (i, c) in cells.iter().enumerate() {
        assert_eq!(
            &batch[i * nd..(i + 1) * nd],
            &model.embed(&c.genes, &c.vals).unwrap()[..]
        );
    }
    // an error names the cell
    let mut bad = refs.clone();
    let nan = [f32::NAN];
    let g0 = [0u32];
    bad[5] = (&g0, &nan);
    let e = model.embed_batch(&bad, 2).unwrap_err();
    assert!(e.message.starts_with("cell 5"), "{}", e.message);
}
