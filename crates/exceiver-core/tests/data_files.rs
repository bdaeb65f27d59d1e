//! The readers on small files written here in every layout they accept, and on broken
//! files: each must give a clear error of the right kind, never a panic.

use exceiver_core::data::{h5ad, tenx, ObsValues};
use exceiver_core::Kind;
use hdf5::types::VarLenUnicode;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The readers run the HDF5 library in a forked child (data::isolated): tests that
/// write HDF5 files on other threads meanwhile would leave the child a lock with
/// waiters, so these tests take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("exceiver-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn vs(s: &str) -> VarLenUnicode {
    s.parse().unwrap()
}

fn str_attr(loc: &hdf5::Location, name: &str, v: &str) {
    loc.new_attr::<VarLenUnicode>()
        .create(name)
        .unwrap()
        .write_scalar(&vs(v))
        .unwrap();
}

fn str_ds(g: &hdf5::Group, name: &str, v: &[&str]) -> hdf5::Dataset {
    let data: Vec<VarLenUnicode> = v.iter().map(|s| vs(s)).collect();
    g.new_dataset_builder()
        .with_data(&data)
        .create(name)
        .unwrap()
}

// 3 cells × 4 genes:
//   c0: g0=1, g2=2     c1: (none)     c2: g1=3.5, g3=4
const CELLS: [&str; 3] = ["c0", "c1", "c2"];
const GENES: [&str; 4] = ["A", "B", "A", "D"]; // duplicate symbol on purpose
const IDS: [&str; 4] = ["ENSG1", "ENSG2", "ENSG3", "ENSG4"];
const DENSE: [[f32; 4]; 3] = [[1.0, 0.0, 2.0, 0.0], [0.0; 4], [0.0, 3.5, 0.0, 4.0]];

#[derive(Clone, Copy, PartialEq)]
enum XLayout {
    Csr,
    Csc,
    Dense,
    OldCsr,
}

fn write_h5ad(path: &Path, layout: XLayout, old_obs: bool, gzip: bool) {
    let f = hdf5::File::create(path).unwrap();
    // obs
    let obs = f.create_group("obs").unwrap();
    str_attr(&obs, "_index", "_index");
    str_ds(&obs, "_index", &CELLS);
    if old_obs {
        let cats = obs.create_group("__categories").unwrap();
        str_ds(&cats, "kind", &["T", "B"]);
        obs.new_dataset_builder()
            .with_data(&[0i8, -1, 1])
            .create("kind")
            .unwrap();
    } else {
        str_attr(&obs, "encoding-type", "dataframe");
        let col_order: Vec<VarLenUnicode> = vec![vs("kind"), vs("n_counts")];
        obs.new_attr_builder()
            .with_data(&col_order)
            .create("column-order")
            .unwrap();
        let g = obs.create_group("kind").unwrap();
        str_attr(&g, "encoding-type", "categorical");
        str_ds(&g, "categories", &["T", "B"]);
        g.new_dataset_builder()
            .with_data(&[0i8, -1, 1])
            .create("codes")
            .unwrap();
    }
    obs.new_dataset_builder()
        .with_data(&[3.0f64, 0.0, 7.5])
        .create("n_counts")
        .unwrap();
    // var
    let var = f.create_group("var").unwrap();
    str_attr(&var, "_index", "_index");
    str_ds(&var, "_index", &GENES);
    str_ds(&var, "gene_ids", &IDS);
    // X
    match layout {
        XLayout::Dense => {
            let flat: Vec<f32> = DENSE.iter().flatten().copied().collect();
            let arr = ndarray_like(&flat);
            let b = f.new_dataset::<f32>().shape((3, 4));
            let b = if gzip { b.chunk((2, 4)).deflate(4) } else { b };
            let ds = b.create("X").unwrap();
            ds.write_raw(&arr).unwrap();
        }
        _ => {
            let x = f.create_group("X").unwrap();
            let (ptr, idx, val): (Vec<i32>, Vec<i32>, Vec<f32>) = if layout == XLayout::Csc {
                (
                    vec![0, 1, 2, 3, 4],
                    vec![0, 2, 0, 2],
                    vec![1.0, 3.5, 2.0, 4.0],
                )
            } else {
                (vec![0, 2, 2, 4], vec![0, 2, 1, 3], vec![1.0, 2.0, 3.5, 4.0])
            };
            let enc = match layout {
                XLayout::Csc => "csc_matrix",
                _ => "csr_matrix",
            };
            if layout == XLayout::OldCsr {
                str_attr(&x, "h5sparse_format", "csr");
                x.new_attr_builder()
                    .with_data(&[3i64, 4])
                    .create("h5sparse_shape")
                    .unwrap();
            } else {
                str_attr(&x, "encoding-type", enc);
                x.new_attr_builder()
                    .with_data(&[3i64, 4])
                    .create("shape")
                    .unwrap();
            }
            let w = |name: &str, d: &[f32]| {
                let b = x.new_dataset::<f32>().shape(d.len());
                let b = if gzip { b.chunk(2).deflate(4) } else { b };
                b.create(name).unwrap().write_raw(d).unwrap();
            };
            w("data", &val);
            x.new_dataset_builder()
                .with_data(&idx)
                .create("indices")
                .unwrap();
            x.new_dataset_builder()
                .with_data(&ptr)
                .create("indptr")
                .unwrap();
        }
    }
}

fn ndarray_like(v: &[f32]) -> Vec<f32> {
    v.to_vec()
}

fn check_small(m: &exceiver_core::data::CellMatrix) {
    assert_eq!(m.barcodes, CELLS);
    assert_eq!(m.genes, ["A", "B", "A-1", "D"]);
    assert_eq!(m.renamed_genes, 1);
    assert_eq!(m.indptr, [0, 2, 2, 4]);
    assert_eq!(m.indices, [0, 2, 1, 3]);
    assert_eq!(m.data, [1.0, 2.0, 3.5, 4.0]);
    let kind = m.obs.iter().find(|c| c.name == "kind").unwrap();
    assert_eq!(
        kind.values,
        ObsValues::Text(vec![Some("T".into()), None, Some("B".into())])
    );
    let n = m.obs.iter().find(|c| c.name == "n_counts").unwrap();
    assert_eq!(
        n.values,
        ObsValues::Float(vec![Some(3.0), Some(0.0), Some(7.5)])
    );
}

#[test]
fn h5ad_every_layout() {
    let _turn = serial();
    let d = tmp("layouts");
    for (i, (layout, old, gz)) in [
        (XLayout::Csr, false, false),
        (XLayout::Csr, false, true),
        (XLayout::Csc, false, true),
        (XLayout::Dense, false, false),
        (XLayout::Dense, false, true),
        (XLayout::OldCsr, true, false),
    ]
    .into_iter()
    .enumerate()
    {
        let p = d.join(format!("f{i}.h5ad"));
        write_h5ad(&p, layout, old, gz);
        let m = h5ad::read(&p).unwrap_or_else(|e| panic!("layout {i}: {e}"));
        check_small(&m);
        // var["gene_ids"] is kept beside the symbols
        assert_eq!(m.gene_ids, IDS, "layout {i}");
    }
}

#[test]
fn h5ad_errors() {
    let _turn = serial();
    let d = tmp("h5ad-errors");
    // missing file
    let e = h5ad::read(&d.join("nope.h5ad")).unwrap_err();
    assert_eq!(e.kind, Kind::FileNotFound, "{e}");
    // not HDF5
    std::fs::write(d.join("text.h5ad"), b"hello").unwrap();
    let e = h5ad::read(&d.join("text.h5ad")).unwrap_err();
    assert_eq!(e.kind, Kind::FileFormat, "{e}");
    // truncated: half of a real file
    let p = d.join("good.h5ad");
    write_h5ad(&p, XLayout::Csr, false, true);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(d.join("trunc.h5ad"), &bytes[..bytes.len() / 2]).unwrap();
    let e = h5ad::read(&d.join("trunc.h5ad")).unwrap_err();
    assert_eq!(e.kind, Kind::FileFormat, "{e}");
    // no X
    let p = d.join("nox.h5ad");
    {
        let f = hdf5::File::create(&p).unwrap();
        f.create_group("obs").unwrap();
        f.create_group("var").unwrap();
    }
    let e = h5ad::read(&p).unwrap_err();
    assert!(e.message.contains("no X"), "{e}");
    // negative, NaN and infinite counts; non-integer counts are fine
    for (bad, want) in [
        (-1.0f32, "negative count"),
        (f32::NAN, "not finite"),
        (f32::INFINITY, "not finite"),
    ] {
        let p = d.join("bad.h5ad");
        write_h5ad(&p, XLayout::Csr, false, false);
        {
            let f = hdf5::File::open_rw(&p).unwrap();
            f.dataset("X/data")
                .unwrap()
                .write_raw(&[1.0f32, bad, 3.5, 4.0])
                .unwrap();
        }
        let e = h5ad::read(&p).unwrap_err();
        assert_eq!(e.kind, Kind::Data, "{e}");
        assert!(e.message.contains(want), "{e}");
    }
    // shape disagrees with var
    let p = d.join("shape.h5ad");
    write_h5ad(&p, XLayout::Csr, false, false);
    {
        let f = hdf5::File::open_rw(&p).unwrap();
        let x = f.group("X").unwrap();
        x.delete_attr("shape").unwrap();
        x.new_attr_builder()
            .with_data(&[3i64, 5])
            .create("shape")
            .unwrap();
    }
    let e = h5ad::read(&p).unwrap_err();
    assert!(e.message.contains("X has shape [3, 5]"), "{e}");
    // index out of range
    let p = d.join("range.h5ad");
    write_h5ad(&p, XLayout::Csr, false, false);
    {
        let f = hdf5::File::open_rw(&p).unwrap();
        f.dataset("X/indices")
            .unwrap()
            .write_raw(&[0i32, 2, 1, 9])
            .unwrap();
    }
    let e = h5ad::read(&p).unwrap_err();
    assert!(
        e.message.contains("gene index 9 out of range for 4 genes"),
        "{e}"
    );
    // duplicate barcodes
    let p = d.join("dup.h5ad");
    write_h5ad(&p, XLayout::Csr, false, false);
    {
        let f = hdf5::File::open_rw(&p).unwrap();
        let obs = f.group("obs").unwrap();
        obs.unlink("_index").unwrap();
        str_ds(&obs, "_index", &["c0", "c1", "c0"]);
    }
    let e = h5ad::read(&p).unwrap_err();
    assert!(e.message.contains("duplicate cell barcode \"c0\""), "{e}");
}

fn gz(path: &Path, text: &str) {
    let f = std::fs::File::create(path).unwrap();
    let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    e.write_all(text.as_bytes()).unwrap();
    e.finish().unwrap();
}

fn write_10x(dir: &Path, v3: bool, mtx: &str) {
    if v3 {
        gz(
            &dir.join("features.tsv.gz"),
            "E1\tA\tGene Expression\nE2\tB\tGene Expression\nAB1\tCD3_TotalSeq\tAntibody Capture\nE3\tA\tGene Expression\nE4\tD\tGene Expression\n",
        );
    } else {
        gz(&dir.join("genes.tsv.gz"), "E1\tA\nE2\tB\nE3\tA\nE4\tD\n");
    }
    gz(&dir.join("barcodes.tsv.gz"), "c0\nc1\nc2\n");
    gz(&dir.join("matrix.mtx.gz"), mtx);
}

/// A folder read the streaming way (`tenx::stream` + `tenx::pipeline`, as `load_10x`
/// does), falling back to `tenx::read` where the stream says the file is not grouped by
/// cell. Also says whether it fell back.
fn streamed(d: &Path) -> exceiver_core::Result<(exceiver_core::data::CellMatrix, bool)> {
    let Some(s) = tenx::stream(d)? else {
        return Ok((tenx::read(d)?, true));
    };
    let mut m = s.head.clone();
    let r = tenx::pipeline(s, 2, |b| {
        assert_eq!(b.first, m.indptr.len() - 1);
        for i in 0..b.len() {
            let (g, v) = b.cell(i);
            m.indices.extend_from_slice(g);
            m.data.extend_from_slice(v);
            m.indptr.push(m.indices.len());
        }
        Ok(())
    })?;
    match r {
        tenx::Streamed::Done { cells, nonzeros } => {
            assert_eq!((cells, nonzeros), (m.n_cells(), m.nnz()));
            m.validate()?;
            Ok((m, false))
        }
        tenx::Streamed::NotGrouped { .. } => Ok((tenx::read(d)?, true)),
    }
}

/// Both ways of reading a folder give the same matrix, or the same error.
fn read_both(d: &Path) -> exceiver_core::Result<exceiver_core::data::CellMatrix> {
    let whole = tenx::read(d);
    let stream = streamed(d).map(|(m, _)| m);
    match (&whole, &stream) {
        (Ok(a), Ok(b)) => {
            assert_eq!(
                (
                    &a.barcodes,
                    &a.genes,
                    &a.gene_ids,
                    &a.indptr,
                    &a.indices,
                    &a.data,
                    &a.obs,
                    a.renamed_genes
                ),
                (
                    &b.barcodes,
                    &b.genes,
                    &b.gene_ids,
                    &b.indptr,
                    &b.indices,
                    &b.data,
                    &b.obs,
                    b.renamed_genes
                )
            );
        }
        (Err(a), Err(b)) => assert_eq!((a.kind, &a.message), (b.kind, &b.message)),
        _ => panic!("read: {whole:?}\nstream: {stream:?}"),
    }
    whole
}

/// Files grouped by cell stream; others (entries of a cell split up) fall back to the
/// whole-matrix read, with the same result.
#[test]
fn tenx_stream_or_fall_back() {
    let _turn = serial();
    let d = tmp("cr-ungrouped");
    write_10x(
        &d,
        false,
        "%%MatrixMarket matrix coordinate integer general\n4 3 4\n2 3 3\n1 1 1\n4 3 4\n3 1 2\n",
    );
    let (m, fell_back) = streamed(&d).unwrap();
    assert!(fell_back);
    assert_eq!(
        (m.indptr.clone(), m.indices.clone(), m.data.clone()),
        (vec![0, 2, 2, 4], vec![0, 2, 1, 3], vec![1.0, 2.0, 3.0, 4.0])
    );
    read_both(&d).unwrap();
    // grouped but unsorted within a cell, and a cell listed before an empty one
    let d = tmp("cr-grouped");
    write_10x(
        &d,
        false,
        "%%MatrixMarket matrix coordinate integer general\n4 3 4\n3 1 2\n1 1 1\n4 3 4\n2 3 3\n",
    );
    let (m, fell_back) = streamed(&d).unwrap();
    assert!(!fell_back);
    assert_eq!(m.indptr, [0, 2, 2, 4]);
    read_both(&d).unwrap();
    // a gene twice in one cell, and an error after some cells were streamed
    write_10x(
        &d,
        false,
        "%%MatrixMarket matrix coordinate integer general\n4 3 4\n1 1 1\n2 2 1\n3 3 1\n3 3 2\n",
    );
    assert!(read_both(&d)
        .unwrap_err()
        .message
        .contains("appears more than once"));
    write_10x(
        &d,
        false,
        "%%MatrixMarket matrix coordinate integer general\n4 3 4\n1 1 1\n2 2 1\n3 3 1\n",
    );
    assert!(read_both(&d)
        .unwrap_err()
        .message
        .contains("truncated: 3 of 4"));
    write_10x(
        &d,
        false,
        "%%MatrixMarket matrix coordinate integer general\n4 3 3\n1 1 1\n2 2 1\n3 3 1\n4 3 1\n",
    );
    assert!(read_both(&d).unwrap_err().message.contains("more entries"));
}

#[test]
fn tenx_folders() {
    let _turn = serial();
    // Cell Ranger 2: genes.tsv, 4 genes
    let d = tmp("cr2");
    write_10x(&d, false, "%%MatrixMarket matrix coordinate integer general\n%\n4 3 4\n1 1 1\n3 1 2\n2 3 3.5\n4 3 4\n");
    std::fs::write(
        d.join("annotations.tsv"),
        "barcode\tkind\tscore\nc2\tB\t2\nc0\tT\t1\n",
    )
    .unwrap();
    let m = read_both(&d).unwrap();
    assert_eq!(m.genes, ["A", "B", "A-1", "D"]);
    assert_eq!(
        (m.indptr.clone(), m.indices.clone(), m.data.clone()),
        (vec![0, 2, 2, 4], vec![0, 2, 1, 3], vec![1.0, 2.0, 3.5, 4.0])
    );
    assert_eq!(
        m.obs[0].values,
        ObsValues::Text(vec![Some("T".into()), None, Some("B".into())])
    );
    assert_eq!(
        m.obs[1].values,
        ObsValues::Int(vec![Some(1), None, Some(2)])
    );
    // Cell Ranger 3: features.tsv with an antibody row that must be dropped
    let d = tmp("cr3");
    write_10x(&d, true, "%%MatrixMarket matrix coordinate integer general\n5 3 5\n1 1 1\n4 1 2\n3 1 99\n2 3 3.5\n5 3 4\n");
    let m = read_both(&d).unwrap();
    assert_eq!(m.genes, ["A", "B", "A-1", "D"]);
    assert_eq!(m.data, [1.0, 2.0, 3.5, 4.0]);
}

#[test]
fn tenx_errors() {
    let _turn = serial();
    let d = tmp("cr-missing");
    let e = tenx::read(&d.join("nope")).unwrap_err();
    assert_eq!(e.kind, Kind::FileNotFound, "{e}");
    let e = read_both(&d).unwrap_err();
    assert_eq!(e.kind, Kind::FileNotFound, "{e}");
    // rows disagree with genes.tsv
    let d = tmp("cr-dims");
    write_10x(
        &d,
        false,
        "%%MatrixMarket matrix coordinate integer general\n5 3 1\n1 1 1\n",
    );
    let e = read_both(&d).unwrap_err();
    assert!(
        e.message.contains("has 5 rows but") && e.message.contains("lists 4 features"),
        "{e}"
    );
    // columns disagree with barcodes
    let d = tmp("cr-cols");
    write_10x(
        &d,
        false,
        "%%MatrixMarket matrix coordinate integer general\n4 2 1\n1 1 1\n",
    );
    let e = read_both(&d).unwrap_err();
    assert!(
        e.message.contains("has 2 columns but") && e.message.contains("lists 3 barcodes"),
        "{e}"
    );
    // truncated gzip stream
    let d = tmp("cr-trunc");
    write_10x(
        &d,
        false,
        &format!(
            "%%MatrixMarket matrix coordinate integer general\n4 3 300\n{}",
            "1 1 1\n".repeat(300)
        ),
    );
    let b = std::fs::read(d.join("matrix.mtx.gz")).unwrap();
    std::fs::write(d.join("matrix.mtx.gz"), &b[..b.len() / 2]).unwrap();
    let e = read_both(&d).unwrap_err();
    assert_eq!(e.kind, Kind::FileFormat, "{e}");
    // duplicate barcodes
    let d = tmp("cr-dup");
    write_10x(
        &d,
        false,
        "%%MatrixMarket matrix coordinate integer general\n4 3 1\n1 1 1\n",
    );
    gz(&d.join("barcodes.tsv.gz"), "c0\nc1\nc0\n");
    let e = read_both(&d).unwrap_err();
    assert!(e.message.contains("duplicate cell barcode"), "{e}");
    // negative count
    let d = tmp("cr-neg");
    write_10x(
        &d,
        false,
        "%%MatrixMarket matrix coordinate real general\n4 3 1\n1 1 -3\n",
    );
    let e = read_both(&d).unwrap_err();
    assert_eq!(e.kind, Kind::Data);
}

fn write_10x_h5(path: &Path, v3: bool) {
    let f = hdf5::File::create(path).unwrap();
    let g = f.create_group(if v3 { "matrix" } else { "hg19" }).unwrap();
    let bc: Vec<hdf5::types::FixedAscii<18>> = CELLS
        .iter()
        .map(|s| hdf5::types::FixedAscii::from_ascii(s).unwrap())
        .collect();
    g.new_dataset_builder()
        .with_data(&bc)
        .create("barcodes")
        .unwrap();
    let names: Vec<hdf5::types::FixedAscii<8>> = GENES
        .iter()
        .map(|s| hdf5::types::FixedAscii::from_ascii(s).unwrap())
        .collect();
    let ids: Vec<hdf5::types::FixedAscii<8>> = IDS
        .iter()
        .map(|s| hdf5::types::FixedAscii::from_ascii(s).unwrap())
        .collect();
    if v3 {
        let fg = g.create_group("features").unwrap();
        fg.new_dataset_builder()
            .with_data(&names)
            .create("name")
            .unwrap();
        fg.new_dataset_builder()
            .with_data(&ids)
            .create("id")
            .unwrap();
        let t: Vec<hdf5::types::FixedAscii<16>> = (0..4)
            .map(|_| hdf5::types::FixedAscii::from_ascii("Gene Expression").unwrap())
            .collect();
        fg.new_dataset_builder()
            .with_data(&t)
            .create("feature_type")
            .unwrap();
    } else {
        g.new_dataset_builder()
            .with_data(&names)
            .create("gene_names")
            .unwrap();
        g.new_dataset_builder()
            .with_data(&ids)
            .create("genes")
            .unwrap();
    }
    g.new_dataset_builder()
        .with_data(&[4i64, 3])
        .create("shape")
        .unwrap();
    g.new_dataset_builder()
        .with_data(&[1i32, 2, 3, 4])
        .create("data")
        .unwrap();
    g.new_dataset_builder()
        .with_data(&[0i64, 2, 1, 3])
        .create("indices")
        .unwrap();
    g.new_dataset_builder()
        .with_data(&[0i64, 2, 2, 4])
        .create("indptr")
        .unwrap();
}

#[test]
fn tenx_h5_both_layouts() {
    let _turn = serial();
    let d = tmp("cr-h5");
    for v3 in [true, false] {
        let p = d.join(format!("m{v3}.h5"));
        write_10x_h5(&p, v3);
        let m = tenx::read(&p).unwrap_or_else(|e| panic!("v3={v3}: {e}"));
        assert_eq!(m.barcodes, CELLS);
        assert_eq!(m.genes, ["A", "B", "A-1", "D"]);
        assert_eq!(m.gene_ids, IDS, "v3={v3}");
        assert_eq!(m.data, [1.0, 2.0, 3.0, 4.0]);
    }
    // a folder holding only the .h5 is read too
    let d2 = tmp("cr-h5-folder");
    write_10x_h5(&d2.join("filtered_feature_bc_matrix.h5"), true);
    assert_eq!(tenx::read(&d2).unwrap().n_cells(), 3);
}

/// Text from files must be valid UTF-8 without NUL: an HDF5 string with a byte that is
/// not UTF-8, a TSV line with a NUL, a TSV that is not UTF-8; each a file-format error
/// naming where it is, never an unchecked `&str`.
#[test]
fn text_from_files_is_checked() {
    let _turn = serial();
    let d = tmp("text");
    let p = d.join("bad-utf8.h5ad");
    write_h5ad(&p, XLayout::Csr, false, false);
    {
        let f = hdf5::File::open_rw(&p).unwrap();
        let obs = f.group("obs").unwrap();
        obs.unlink("_index").unwrap();
        // SAFETY: from_ascii_unchecked only skips the ASCII check; the bytes are plain bytes.
        let bad: Vec<hdf5::types::FixedAscii<8>> = [&b"c0"[..], b"c\xff1", b"c2"]
            .iter()
            .map(|b| unsafe { hdf5::types::FixedAscii::from_ascii_unchecked(b) })
            .collect();
        obs.new_dataset_builder()
            .with_data(&bad)
            .create("_index")
            .unwrap();
    }
    let e = h5ad::read(&p).unwrap_err();
    assert_eq!(e.kind, Kind::FileFormat, "{e}");
    assert!(e.message.contains("element 1 is not valid UTF-8"), "{e}");

    let d2 = tmp("text-nul");
    write_10x(
        &d2,
        false,
        "%%MatrixMarket matrix coordinate integer general\n4 3 1\n1 1 3\n",
    );
    gz(&d2.join("barcodes.tsv.gz"), "c0\nc\u{0}1\nc2\n");
    let e = tenx::read(&d2).unwrap_err();
    assert_eq!(e.kind, Kind::FileFormat, "{e}");
    assert!(e.message.contains("line 2 contains a NUL byte"), "{e}");
    std::fs::remove_file(d2.join("barcodes.tsv.gz")).unwrap();
    std::fs::write(d2.join("barcodes.tsv"), b"c0\nc\xff1\nc2\n").unwrap();
    let e = tenx::read(&d2).unwrap_err();
    assert_eq!(e.kind, Kind::FileFormat, "{e}");
    assert!(e.message.contains("not valid UTF-8"), "{e}");
}

/// A dataset may declare far more elements than the file stores (unwritten chunks read
/// as fill values): the reader refuses before allocating what the header claims.
#[test]
fn declared_sizes_beyond_the_file_are_refused() {
    let _turn = serial();
    let d = tmp("declared");
    let p = d.join("huge.h5ad");
    write_h5ad(&p, XLayout::Csr, false, false);
    {
        let f = hdf5::File::open_rw(&p).unwrap();
        let x = f.group("X").unwrap();
        x.unlink("data").unwrap();
        // 2^31 floats (8 GiB) declared, nothing written
        x.new_dataset::<f32>()
            .chunk(1 << 16)
            .shape(1usize << 31)
            .create("data")
            .unwrap();
    }
    let e = h5ad::read(&p).unwrap_err();
    assert_eq!(e.kind, Kind::FileFormat, "{e}");
    assert!(e.message.contains("declares 2147483648 elements"), "{e}");
}

/// Seeds for the fuzz targets (`make fuzz`): small valid files of every format. Run on
/// purpose: `cargo test -p exceiver-core --test data_files -- --ignored write_fuzz_seeds`.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let _turn = serial();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds");
    for t in ["h5ad", "tenx_h5"] {
        std::fs::create_dir_all(root.join(t)).unwrap();
    }
    write_h5ad(&root.join("h5ad/csr.h5ad"), XLayout::Csr, false, false);
    write_h5ad(&root.join("h5ad/csc_gzip.h5ad"), XLayout::Csc, false, true);
    write_h5ad(
        &root.join("h5ad/dense_old_obs.h5ad"),
        XLayout::Dense,
        true,
        false,
    );
    write_10x_h5(&root.join("tenx_h5/v3.h5"), true);
    write_10x_h5(&root.join("tenx_h5/v2.h5"), false);
    // a tiny model's weights, as the catalog stores them
    use exceiver_core::model::{weights, Config};
    let mut cfg = Config::small(12);
    (
        cfg.seq_dim,
        cfg.query_dim,
        cfg.query_len,
        cfg.num_layers,
        cfg.dim_feedforward,
    ) = (4, 4, 2, 1, 8);
    cfg.nhead = 1;
    let params = weights::Params::init(&cfg, 1).unwrap();
    let bytes = weights::save_safetensors(&cfg, &params, &[]).unwrap();
    std::fs::create_dir_all(root.join("safetensors")).unwrap();
    std::fs::write(root.join("safetensors/tiny.safetensors"), bytes).unwrap();
    std::fs::create_dir_all(root.join("config_json")).unwrap();
    std::fs::write(
        root.join("config_json/tiny.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    std::fs::write(
        root.join("config_json/published_hparams.json"),
        Config::published_exceiver().to_hyper_parameters(),
    )
    .unwrap();
}

/// Findings of `make fuzz`, kept as regression inputs: a file on which the HDF5 C library
/// itself crashes (segmentation fault in H5HG_read) and one on which it leaks. Read as
/// exceiver reads them (the library in a child process), each is a file-format error,
/// and this test process survives.
#[test]
fn fuzz_findings_are_errors() {
    let _turn = serial();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions");
    let e = h5ad::read(&dir.join("h5ad-libhdf5-segv-H5HG_read.h5ad")).unwrap_err();
    assert_eq!(e.kind, Kind::FileFormat, "{e}");
    let e = tenx::read(&dir.join("tenx_h5-libhdf5-leak.h5")).unwrap_err();
    assert!(matches!(e.kind, Kind::FileFormat | Kind::Limit), "{e}");
    // fuzz run 5: fewer features than matrix genes (was a panic in the reader's child)
    let e = tenx::read(&dir.join("tenx_h5-features-shorter-than-matrix.h5")).unwrap_err();
    assert_eq!(e.kind, Kind::FileFormat, "{e}");
    assert!(e.message.contains("features but its matrix has"), "{e}");
}
