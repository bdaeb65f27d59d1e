//! The encoder-attention inspection against the reference: the head-averaged attention
//! mass each latent puts on a cell's expressed genes (`enc_attn_mass_on_expressed`).

use exceiver_core::model::{load_safetensors, Exceiver};

mod common;
use common::{read_fixture, FIX};

#[test]
fn expressed_mass_matches_reference() {
    let inp = read_fixture("inputs.safetensors");
    let out = read_fixture("exceiver_outputs.safetensors");
    let bytes = std::fs::read(format!("{FIX}/pretrained_TS_exceiver.safetensors")).unwrap();
    let (cfg, params) = load_safetensors(&bytes).unwrap();
    let zf: Vec<f32> = inp["zero_fill_vals"].v.iter().map(|&x| x as f32).collect();
    let m = Exceiver::new(cfg, params, zf).unwrap();
    let ptr = &inp["cell_indptr"].v;
    let want = &out["enc_attn_mass_on_expressed"].v;
    for c in [0usize, 3, 15] {
        let (lo, hi) = (ptr[c] as usize, ptr[c + 1] as usize);
        let genes: Vec<u32> = inp["cell_gene_ids"].v[lo..hi]
            .iter()
            .map(|&g| g as u32)
            .collect();
        let vals: Vec<f32> = inp["cell_model_vals"].v[lo..hi]
            .iter()
            .map(|&v| v as f32)
            .collect();
        let a = m.encoder_attention(&genes, &vals).unwrap();
        assert_eq!((a.n_latents, a.n_entries), (128, genes.len()));
        for i in 0..128 {
            let row: f32 = a.weights[i * a.n_entries..(i + 1) * a.n_entries]
                .iter()
                .sum();
            assert!((row - a.expressed_mass[i]).abs() < 1e-5);
            let w = want[c * 128 + i];
            assert!(
                (a.expressed_mass[i] as f64 - w).abs() <= 1e-5 + 1e-4 * w,
                "cell {c} latent {i}: {} vs {w}",
                a.expressed_mass[i]
            );
        }
    }
}
