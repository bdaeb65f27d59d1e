//! The readers on the real datasets vendored in `data/` (figures from data/README.md,
//! one cell checked against an independent Python read of the same file).

use exceiver_core::data::{h5ad, tenx, CellMatrix, ObsValues};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn data(p: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data")).join(p)
}

fn label_counts(m: &CellMatrix, col: &str) -> BTreeMap<String, usize> {
    let c = m
        .obs
        .iter()
        .find(|c| c.name == col)
        .unwrap_or_else(|| panic!("no column {col}"));
    let ObsValues::Text(v) = &c.values else {
        panic!("{col} is not text")
    };
    let mut out = BTreeMap::new();
    for x in v {
        *out.entry(x.clone().unwrap_or_else(|| "<null>".into()))
            .or_default() += 1;
    }
    out
}

fn cell_counts(m: &CellMatrix, barcode: &str) -> BTreeMap<String, f32> {
    let c = m
        .barcodes
        .iter()
        .position(|b| b == barcode)
        .expect("barcode");
    let (idx, val) = m.cell(c);
    idx.iter()
        .zip(val)
        .map(|(&g, &v)| (m.genes[g as usize].clone(), v))
        .collect()
}

/// The streaming read `load_10x` uses gives PBMC 3k exactly as the whole-file read,
/// without falling back (Cell Ranger writes the matrix grouped by cell).
#[test]
fn pbmc3k_streams() {
    let whole = tenx::read(&data("pbmc3k")).unwrap();
    let s = tenx::stream(&data("pbmc3k"))
        .unwrap()
        .expect("a Matrix Market folder");
    let mut m = s.head.clone();
    let r = tenx::pipeline(s, 512, |b| {
        for i in 0..b.len() {
            let (g, v) = b.cell(i);
            m.indices.extend_from_slice(g);
            m.data.extend_from_slice(v);
            m.indptr.push(m.indices.len());
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(
        r,
        tenx::Streamed::Done {
            cells: 2700,
            nonzeros: 2_286_884
        }
    );
    assert_eq!(
        (&m.barcodes, &m.genes, &m.gene_ids, &m.obs),
        (&whole.barcodes, &whole.genes, &whole.gene_ids, &whole.obs)
    );
    assert!(m.indptr == whole.indptr && m.indices == whole.indices && m.data == whole.data);
}

#[test]
fn pbmc3k_folder() {
    let m = tenx::read(&data("pbmc3k")).unwrap();
    assert_eq!(
        (m.n_cells(), m.n_genes(), m.nnz()),
        (2700, 32738, 2_286_884)
    );
    // the Ensembl ids of genes.tsv's first column are kept beside the symbols
    assert_eq!(m.gene_ids.len(), m.n_genes());
    assert_eq!(
        (m.gene_ids[0].as_str(), m.genes[0].as_str()),
        ("ENSG00000243485", "MIR1302-10")
    );
    assert!(m.gene_ids.iter().all(|g| g.starts_with("ENSG")));
    // The file spells the scanpy tutorial's labels out in full ("CD4 T cells").
    let l = label_counts(&m, "louvain_scanpy");
    let want = [
        ("CD4 T cells", 1144),
        ("CD14+ Monocytes", 480),
        ("B cells", 342),
        ("CD8 T cells", 316),
        ("NK cells", 154),
        ("FCGR3A+ Monocytes", 150),
        ("Dendritic cells", 37),
        ("Megakaryocytes", 15),
        ("<null>", 62),
    ];
    for (k, v) in want {
        assert_eq!(l[k], v, "{k}");
    }
    let s = label_counts(&m, "seurat_annotations");
    assert_eq!(s.len(), 10); // 9 types + null
    assert_eq!(
        (
            s["Naive CD4 T"],
            s["Memory CD4 T"],
            s["Platelet"],
            s["<null>"]
        ),
        (697, 483, 14, 62)
    );
    // One known cell, checked against a plain Python parse of matrix.mtx.gz.
    let c = cell_counts(&m, "AAACATACAACCAC-1");
    assert_eq!(c.len(), 781);
    assert_eq!(c.values().map(|&v| v as f64).sum::<f64>(), 2421.0);
    assert_eq!(
        (c["MALAT1"], c["CD3E"], c["LYZ"], c["RPS27A"], c["FTL"]),
        (49.0, 2.0, 1.0, 22.0, 12.0)
    );
}

#[test]
fn kang_h5ad() {
    let m = h5ad::read(&data("kang_ifnb/kang_ifnb.h5ad")).unwrap();
    assert_eq!(
        (m.n_cells(), m.n_genes(), m.nnz()),
        (13_576, 14_053, 9_456_694)
    );
    let s = label_counts(&m, "stim");
    assert_eq!((s["CTRL"], s["STIM"]), (6359, 7217));
    let a = label_counts(&m, "seurat_annotations");
    let want = [
        ("CD14 Mono", 4362),
        ("CD4 Naive T", 2504),
        ("CD4 Memory T", 1762),
        ("CD16 Mono", 1044),
        ("B", 978),
        ("CD8 T", 814),
        ("T activated", 633),
        ("NK", 619),
        ("DC", 472),
        ("B Activated", 388),
    ];
    for (k, v) in want {
        assert_eq!(a[k], v, "{k}");
    }
    assert_eq!(label_counts(&m, "cell_type").len(), 8);
    let names: Vec<&str> = m.obs.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["stim", "seurat_annotations", "cell_type"]);
    let c = cell_counts(&m, "AAACATACATTTCC.1");
    assert_eq!(c.len(), 877);
    assert_eq!(c.values().map(|&v| v as f64).sum::<f64>(), 3017.0);
    assert_eq!((c["MALAT1"], c["LYZ"], c["FTL"]), (67.0, 6.0, 279.0));
    assert!(!c.contains_key("ISG15"));
}
