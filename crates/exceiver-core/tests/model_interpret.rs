//! The encoder-attention inspection against the reference: the head-averaged attention
//! mass each latent puts on a cell's expressed genes (`enc_attn_mass_on_expressed`).

use exceiver_core::model::{load_safetensors, Exceiver};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures");

fn read(name: &str) -> HashMap<String, Vec<f64>> {
    let bytes = std::fs::read(format!("{FIX}/{name}")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter_map(|(k, t)| {
            let b = t.data();
            let v: Vec<f64> = match t.dtype() {
                Dtype::F32 => b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::I64 => b
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                _ => return None,
            };
            Some((k, v))
        })
        .collect()
}

#[test]
fn expressed_mass_matches_reference() {
    let inp = read("inputs.safetensors");
    let out = read("exceiver_outputs.safetensors");
    let bytes = std::fs::read(format!("{FIX}/pretrained_TS_exceiver.safetensors")).unwrap();
    let (cfg, params) = load_safetensors(&bytes).unwrap();
    let zf: Vec<f32> = inp["zero_fill_vals"].iter().map(|&x| x as f32).collect();
    let m = Exceiver::new(cfg, params, zf).unwrap();
    let ptr = &inp["cell_indptr"];
    let want = &out["enc_attn_mass_on_expressed"];
    for c in [0usize, 3, 15] {
        let (lo, hi) = (ptr[c] as usize, ptr[c + 1] as usize);
        let genes: Vec<u32> = inp["cell_gene_ids"][lo..hi]
            .iter()
            .map(|&g| g as u32)
            .collect();
        let vals: Vec<f32> = inp["cell_model_vals"][lo..hi]
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
