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
}
