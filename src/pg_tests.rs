//! In-database tests (`#[pg_test]`): each runs inside a real PostgreSQL with the
//! extension and pgvector installed.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn repo(p: &str) -> String {
        format!("{}/{}", env!("CARGO_MANIFEST_DIR"), p)
    }

    #[pg_test]
    fn load_pbmc3k_folder() {
        let (cells, nnz) = Spi::get_two::<i64, i64>(&format!(
            "SELECT cells, nonzeros FROM exceiver.load_10x('{}', 'pbmc')",
            repo("data/pbmc3k")
        ))
        .unwrap();
        assert_eq!((cells, nnz), (Some(2700), Some(2_286_884)));
        let n =
            Spi::get_one::<i64>("SELECT count(*) FROM pbmc WHERE louvain_scanpy = 'CD4 T cells'")
                .unwrap();
        assert_eq!(n, Some(1144));
        let s = Spi::get_one::<f64>(
            "SELECT sum(c)::float8 FROM pbmc, unnest(counts) c WHERE cell_id = 'AAACATACAACCAC-1'",
        )
        .unwrap();
        assert_eq!(s, Some(2421.0));
        let c = Spi::get_one::<f32>(
            "SELECT counts[array_position(genes, 'MALAT1')] FROM pbmc WHERE cell_id = 'AAACATACAACCAC-1'",
        )
        .unwrap();
        assert_eq!(c, Some(49.0));
    }

    #[pg_test]
    fn load_kang_h5ad() {
        let (cells, genes) = Spi::get_two::<i64, i64>(&format!(
            "SELECT cells, genes FROM exceiver.load_h5ad('{}', 'public.kang')",
            repo("data/kang_ifnb/kang_ifnb.h5ad")
        ))
        .unwrap();
        assert_eq!((cells, genes), (Some(13_576), Some(14_053)));
        let nnz = Spi::get_one::<i64>("SELECT sum(cardinality(genes))::int8 FROM kang").unwrap();
        assert_eq!(nnz, Some(9_456_694));
        let stim = Spi::get_one::<i64>("SELECT count(*) FROM kang WHERE stim = 'STIM'").unwrap();
        assert_eq!(stim, Some(7217));
    }

    #[pg_test(error = "relation \"dup\" already exists")]
    fn load_into_existing_table_fails() {
        Spi::run("CREATE TABLE dup (x int)").unwrap();
        Spi::run(&format!(
            "SELECT * FROM exceiver.load_10x('{}', 'dup')",
            repo("data/pbmc3k")
        ))
        .unwrap();
    }

    #[pg_test(error = "could not open file \"/nonexistent/x.h5ad\": no such file")]
    fn load_missing_file_fails() {
        Spi::run("SELECT * FROM exceiver.load_h5ad('/nonexistent/x.h5ad', 't')").unwrap();
    }
    fn gene_names(n: usize) -> String {
        format!(
            "ARRAY(SELECT 'G' || i FROM generate_series(0, {}) i)",
            n - 1
        )
    }

    /// Import the published checkpoint as `name`. Tests run concurrently in one database
    /// and a model name being created is locked: each test uses its own name.
    fn import_published(name: &str) {
        let inp = crate::pg_tests::fixtures::read("inputs.safetensors");
        let f = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:e}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        Spi::run(&format!(
            "SELECT * FROM exceiver.import_checkpoint('{name}', '{}', {}, '{{{}}}'::real[], '{{{}}}'::real[])",
            repo("fixtures/checkpoints/pretrained_TS_exceiver.ckpt"),
            gene_names(19067),
            f(&inp["scaler_mean_f32"].f),
            f(&inp["scaler_scale_f32"].f),
        ))
        .unwrap();
    }

    #[pg_test]
    fn import_and_embed_matches_reference() {
        import_published("ts");
        let row = Spi::get_two::<String, i64>(
            "SELECT kind, n_genes FROM exceiver.models WHERE name = 'ts'",
        )
        .unwrap();
        assert_eq!(row, (Some("exceiver".to_string()), Some(19067)));
        let inp = crate::pg_tests::fixtures::read("inputs.safetensors");
        let out = crate::pg_tests::fixtures::read("exceiver_outputs.safetensors");
        let ptr = &inp["cell_indptr"].f;
        let ids = &inp["cell_gene_ids"].f;
        let counts = &inp["cell_counts"].f;
        let want = &out["embedding"];
        assert_eq!(want.shape, vec![16, 512]);
        for c in 0..16 {
            let (lo, hi) = (ptr[c] as usize, ptr[c + 1] as usize);
            let genes: Vec<String> = ids[lo..hi]
                .iter()
                .map(|&g| format!("'G{}'", g as usize))
                .collect();
            let cnt: Vec<String> = counts[lo..hi].iter().map(|x| format!("{x}")).collect();
            // raw counts in, through preprocessing and the model, as pgvector's vector
            let got = Spi::get_one::<String>(&format!(
                "SELECT exceiver.embed('ts', ARRAY[{}], ARRAY[{}]::real[])::text",
                genes.join(","),
                cnt.join(",")
            ))
            .unwrap()
            .unwrap();
            let got: Vec<f64> = got
                .trim_matches(|ch| ch == '[' || ch == ']')
                .split(',')
                .map(|x| x.parse().unwrap())
                .collect();
            let e = crate::pg_tests::fixtures::rel_err(&got, &want.f[c * 512..(c + 1) * 512]);
            assert!(e <= 1e-5, "cell {c}: normwise relative error {e}");
        }
        // the column type is pgvector's vector(512)
        let dims = Spi::get_one::<i32>(&format!(
            "SELECT vector_dims(exceiver.embed('ts', ARRAY['G{}'], ARRAY[3]::real[]))",
            ids[0] as usize
        ))
        .unwrap();
        assert_eq!(dims, Some(512));
    }

    #[pg_test(error = "genes has 2 elements but counts has 1")]
    fn embed_length_mismatch() {
        import_published("ts_shape");
        Spi::run("SELECT exceiver.embed('ts_shape', ARRAY['G1','G2'], ARRAY[1]::real[])").unwrap();
    }

    #[pg_test(error = "model \"nope\" does not exist")]
    fn embed_unknown_model() {
        Spi::run("SELECT exceiver.embed('nope', ARRAY['G1'], ARRAY[1]::real[])").unwrap();
    }

    #[pg_test(error = "genes has 3 symbols but the checkpoint's vocabulary has 19067 genes")]
    fn import_wrong_gene_count() {
        Spi::run(&format!(
            "SELECT * FROM exceiver.import_checkpoint('x', '{}', ARRAY['a','b','c'])",
            repo("fixtures/checkpoints/pretrained_TS_exceiver.ckpt")
        ))
        .unwrap();
    }
}

/// Fixture tensors for the model tests, read with the safetensors crate.
#[cfg(any(test, feature = "pg_test"))]
pub mod fixtures {
    use std::collections::HashMap;

    pub struct T {
        pub shape: Vec<usize>,
        pub f: Vec<f64>,
    }

    pub fn read(file: &str) -> HashMap<String, T> {
        let path = format!("{}/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut out = HashMap::new();
        for (name, v) in st.tensors() {
            let d = v.data();
            let f: Vec<f64> = match v.dtype() {
                safetensors::Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::F64 => d
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::I64 => d
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::U8 => d.iter().map(|&b| b as f64).collect(),
                _ => continue,
            };
            out.insert(
                name,
                T {
                    shape: v.shape().to_vec(),
                    f,
                },
            );
        }
        out
    }

    pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
        let num: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            .sqrt();
        let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
        num / den
    }
}
