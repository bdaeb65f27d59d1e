//! Reading and writing weights: the published `.ckpt` and its safetensors conversion
//! agree, safetensors bytes round-trip, and bad files are clean errors.

use exceiver_core::model::{
    load_checkpoint, load_checkpoint_with, load_safetensors, load_safetensors_with,
    save_safetensors, Config, Params,
};
use exceiver_core::Kind;
use std::path::{Path, PathBuf};

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures");

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(format!("{FIX}/{p}"))
}

fn tmp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("exceiver-model-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn ckpt_equals_safetensors_conversion() {
    for (ckpt, st, preset) in [
        (
            "checkpoints/pretrained_TS_exceiver.ckpt",
            "pretrained_TS_exceiver.safetensors",
            Config::published_exceiver(),
        ),
        (
            "checkpoints/pretrained_TS_exceiver_classifier.ckpt",
            "pretrained_TS_exceiver_classifier.safetensors",
            Config::published_classifier(),
        ),
    ] {
        let (c1, p1) = load_checkpoint(&fixture(ckpt)).unwrap();
        let (c2, p2) = load_safetensors(&std::fs::read(fixture(st)).unwrap()).unwrap();
        assert_eq!(c1, preset);
        assert_eq!(c2, preset);
        assert_eq!(p1, p2, "{ckpt} and {st} hold different weights");
        let p3 = load_checkpoint_with(&fixture(ckpt), &preset).unwrap();
        assert_eq!(p1, p3);
        // the mask / padding row is zero
        let g = preset.seq_len;
        assert!(p1.gene_emb[g * 4..(g + 1) * 4].iter().all(|&x| x == 0.0));
        let n = p1.num_parameters(&preset);
        // 243,891 / 114,899 floats in the state dicts, minus the 12 template tensors
        let template = 2048 * 4 * 2 + 2048 + 4 * 5 + 12 * 4 + 12 + 16 + 4;
        assert_eq!(
            n + template,
            if preset.num_classes.is_some() {
                114_899
            } else {
                243_891
            }
        );
    }
}

#[test]
fn safetensors_round_trip() {
    let (cfg, params) = load_safetensors(
        &std::fs::read(fixture("pretrained_TS_exceiver_classifier.safetensors")).unwrap(),
    )
    .unwrap();
    let bytes = save_safetensors(&cfg, &params, &[("trained_by", "test")]).unwrap();
    let (cfg2, params2) = load_safetensors(&bytes).unwrap();
    assert_eq!(cfg, cfg2);
    assert_eq!(params, params2);
    // the template layer is not written
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st
        .names()
        .iter()
        .all(|n| !n.starts_with("process_self_attn.encoder_layer.")));
    let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(md.metadata().as_ref().unwrap()["trained_by"], "test");
    // a non-default config survives (attention mode, head counts)
    let mut small = Config::small(50);
    small.attention = exceiver_core::model::AttentionMode::ExpressedOnly;
    small.num_classes = Some(3);
    let p = Params::init(&small, 1).unwrap();
    let b = save_safetensors(&small, &p, &[]).unwrap();
    let (c3, p3) = load_safetensors(&b).unwrap();
    assert_eq!(c3, small);
    assert_eq!(p3, p);
    assert_eq!(load_safetensors_with(&b, &small).unwrap(), p);
    // a per-gene value embedding: [emb_rows, d], found from its shape without metadata
    small.value_embedding = true;
    small.value_per_gene = true;
    let p = Params::init(&small, 2).unwrap();
    assert_eq!(p.value_emb.len(), small.emb_rows() * small.seq_dim);
    let b = save_safetensors(&small, &p, &[]).unwrap();
    assert_eq!(load_safetensors(&b).unwrap(), (small.clone(), p.clone()));
    let inferred = inferred_config(&b);
    assert!(inferred.value_embedding && inferred.value_per_gene);
    let mut shared = small.clone();
    shared.value_per_gene = false;
    let e = load_safetensors_with(&b, &shared).unwrap_err();
    assert!(e.message.contains("value_emb"), "{}", e.message);
    // the profile path: profile_proj [G, N·d], zeros in a new model, kept through a
    // round trip and found from the tensor's name
    small.profile = true;
    let mut p = Params::init(&small, 3).unwrap();
    assert_eq!(p.profile.len(), 50 * small.embedding_len());
    assert!(p.profile.iter().all(|&x| x == 0.0));
    p.profile
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = i as f32 * 1e-3);
    extension_round_trip(&small, &p, |c| &mut c.profile, "profile_proj");
    // a class head on the embedding: mlp_classify of [C, N·d], found from its shape
    small.profile = false;
    small.num_classes = Some(3);
    small.class_embedding = true;
    let p = Params::init(&small, 4).unwrap();
    extension_round_trip(&small, &p, |c| &mut c.class_embedding, "mlp_classify");
}

/// `p` of `cfg` survives a safetensors round trip, `infer_config` finds the extension
/// `flag` from the shapes alone, and reading the bytes with it off is an error naming
/// `tensor`.
fn extension_round_trip(
    cfg: &Config,
    p: &Params,
    flag: fn(&mut Config) -> &mut bool,
    tensor: &str,
) {
    let b = save_safetensors(cfg, p, &[]).unwrap();
    assert_eq!(load_safetensors(&b).unwrap(), (cfg.clone(), p.clone()));
    assert!(*flag(&mut inferred_config(&b)));
    let mut off = cfg.clone();
    *flag(&mut off) = false;
    let e = load_safetensors_with(&b, &off).unwrap_err();
    assert!(e.message.contains(tensor), "{}", e.message);
}

/// The config `infer_config` finds from the tensor shapes of safetensors bytes.
fn inferred_config(b: &[u8]) -> Config {
    let st = safetensors::SafeTensors::deserialize(b).unwrap();
    let shapes = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.shape().to_vec()))
        .collect();
    exceiver_core::model::weights::infer_config(&shapes).unwrap()
}

/// The same weights always give the same bytes: the metadata (a HashMap inside the
/// safetensors crate, in a new order each time) is written with sorted keys. Stored
/// models are compared byte for byte (training reproducibility).
#[test]
fn safetensors_bytes_are_deterministic() {
    let cfg = Config::small(30);
    let p = Params::init(&cfg, 7).unwrap();
    let extra = [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")];
    let first = save_safetensors(&cfg, &p, &extra).unwrap();
    for _ in 0..20 {
        assert_eq!(save_safetensors(&cfg, &p, &extra).unwrap(), first);
    }
    let n = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0, "header keeps the data 8-byte aligned");
    let (c2, p2) = load_safetensors(&first).unwrap();
    assert_eq!((c2, p2), (cfg, p));
    let (_, md) = safetensors::SafeTensors::read_metadata(&first).unwrap();
    assert_eq!(md.metadata().as_ref().unwrap()["c"], "3");
}

fn truncated_copy(src: &Path, name: &str) -> PathBuf {
    let bytes = std::fs::read(src).unwrap();
    let dst = tmp_path(name);
    std::fs::write(&dst, &bytes[..bytes.len() / 2]).unwrap();
    dst
}

#[test]
fn corrupt_files_are_format_errors() {
    for ckpt in [
        "pretrained_TS_exceiver.ckpt",
        "pretrained_TS_exceiver_classifier.ckpt",
    ] {
        let t = truncated_copy(&fixture(&format!("checkpoints/{ckpt}")), ckpt);
        let e = load_checkpoint(&t).unwrap_err();
        assert_eq!(e.kind, Kind::FileFormat, "{e}");
        assert!(e.message.contains(ckpt), "{e}");
        let e = load_checkpoint_with(&t, &Config::published_exceiver()).unwrap_err();
        assert_eq!(e.kind, Kind::FileFormat, "{e}");
        std::fs::remove_file(&t).ok();
    }
    // garbage and empty files
    let g = tmp_path("garbage.ckpt");
    std::fs::write(&g, b"this is not a checkpoint at all").unwrap();
    assert_eq!(load_checkpoint(&g).unwrap_err().kind, Kind::FileFormat);
    std::fs::write(&g, b"").unwrap();
    assert_eq!(load_checkpoint(&g).unwrap_err().kind, Kind::FileFormat);
    std::fs::remove_file(&g).ok();
    // missing file
    let e = load_checkpoint(&tmp_path("does-not-exist.ckpt")).unwrap_err();
    assert_eq!(e.kind, Kind::FileNotFound);

    let bytes = std::fs::read(fixture("pretrained_TS_exceiver.safetensors")).unwrap();
    for cut in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
        let e = load_safetensors(&bytes[..cut]).unwrap_err();
        assert_eq!(e.kind, Kind::FileFormat, "cut at {cut}: {e}");
    }
    let mut flipped = bytes.clone();
    flipped[8..40].copy_from_slice(&[b'#'; 32]);
    assert_eq!(
        load_safetensors(&flipped).unwrap_err().kind,
        Kind::FileFormat
    );
}

#[test]
fn shape_mismatches_name_the_tensor() {
    let bytes = std::fs::read(fixture("pretrained_TS_exceiver.safetensors")).unwrap();
    let e = load_safetensors_with(&bytes, &Config::published_classifier()).unwrap_err();
    assert_eq!(e.kind, Kind::ArrayShape);
    assert!(
        e.message.contains("gene_emb.weight")
            && e.message.contains("[19068, 4]")
            && e.message.contains("[19069, 4]"),
        "{e}"
    );
    let mut cfg = Config::published_exceiver();
    cfg.dim_feedforward = 1024;
    let e = load_safetensors_with(&bytes, &cfg).unwrap_err();
    assert!(
        e.message.contains("linear1.weight")
            && e.message.contains("[2048, 4]")
            && e.message.contains("[1024, 4]"),
        "{e}"
    );
    // a config that asks for more layers than the file has
    let mut cfg = Config::published_exceiver();
    cfg.num_layers = 9;
    let e = load_safetensors_with(&bytes, &cfg).unwrap_err();
    assert!(e.message.contains("layers.8"), "{e}");
    let e = load_checkpoint_with(
        &fixture("checkpoints/pretrained_TS_exceiver.ckpt"),
        &Config::published_classifier(),
    )
    .unwrap_err();
    assert!(e.message.contains("gene_emb.weight"), "{e}");
}

#[test]
fn non_finite_weights_are_rejected() {
    let cfg = Config::small(20);
    let mut p = Params::init(&cfg, 3).unwrap();
    p.layers[1].linear2.bias[0] = f32::NAN;
    let e = save_safetensors(&cfg, &p, &[]).unwrap_err();
    assert!(e.message.contains("layers.1.linear2.bias"), "{e}");
    assert!(exceiver_core::model::Exceiver::new(cfg.clone(), p, vec![1.0; 20]).is_err());
}
