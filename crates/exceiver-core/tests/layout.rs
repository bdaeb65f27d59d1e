//! UMAP maps (`exceiver_core::layout`): clusters stay apart, the map is reproducible,
//! bad input gets the right error kind, progress is reported and can cancel.

use exceiver_core::layout::{
    fit_ab, umap_2d, umap_2d_with_progress, MapOptions, Metric, Progress, Stage, MAX_POINTS,
};
use exceiver_core::model::rng::Rng;
use exceiver_core::{Error, Kind};

/// `clusters` Gaussian clusters of `per` points each in `dim` dimensions: centres with
/// N(0, spread²) coordinates, points N(centre, 1). Returns (row-major data, labels).
fn blobs(
    clusters: usize,
    per: usize,
    dim: usize,
    spread: f64,
    seed: u64,
) -> (Vec<f32>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let centres: Vec<Vec<f64>> = (0..clusters)
        .map(|_| (0..dim).map(|_| spread * rng.normal()).collect())
        .collect();
    let mut data = Vec::with_capacity(clusters * per * dim);
    let mut labels = Vec::with_capacity(clusters * per);
    // Interleave the clusters so that input order carries no label information.
    for _ in 0..per {
        for (c, centre) in centres.iter().enumerate() {
            data.extend(centre.iter().map(|&m| (m + rng.normal()) as f32));
            labels.push(c);
        }
    }
    (data, labels)
}

/// Fraction of points whose `k` nearest other points in the map mostly share their label
/// (ties in distance by index, ties in votes to the smallest label).
fn knn_label_accuracy(map: &[[f32; 2]], labels: &[usize], k: usize) -> f64 {
    let n_labels = labels.iter().max().map_or(0, |m| m + 1);
    let mut right = 0;
    for (i, p) in map.iter().enumerate() {
        let mut d: Vec<(f32, usize)> = map
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(j, q)| ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2), j))
            .collect();
        d.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut votes = vec![0usize; n_labels];
        for &(_, j) in &d[..k] {
            votes[labels[j]] += 1;
        }
        // Ties go to the smallest label, whatever the point's own.
        let best = (0..n_labels)
            .max_by_key(|&l| (votes[l], std::cmp::Reverse(l)))
            .unwrap_or(0);
        if best == labels[i] {
            right += 1;
        }
    }
    right as f64 / map.len() as f64
}

fn opts() -> MapOptions {
    MapOptions {
        threads: 2,
        ..MapOptions::default()
    }
}

#[test]
fn separated_clusters_stay_separated_cosine() {
    let (data, labels) = blobs(6, 100, 32, 3.0, 1);
    let map = umap_2d(&data, 600, 32, &opts()).unwrap();
    assert_eq!(map.len(), 600);
    assert!(map.iter().all(|p| p[0].is_finite() && p[1].is_finite()));
    let acc = knn_label_accuracy(&map, &labels, 5);
    assert!(acc >= 0.95, "kNN-5 label accuracy in the map {acc}");
}

#[test]
fn separated_clusters_stay_separated_euclidean() {
    let (data, labels) = blobs(6, 100, 32, 3.0, 2);
    let o = MapOptions {
        metric: Metric::Euclidean,
        ..opts()
    };
    let map = umap_2d(&data, 600, 32, &o).unwrap();
    let acc = knn_label_accuracy(&map, &labels, 5);
    assert!(acc >= 0.95, "kNN-5 label accuracy in the map {acc}");
}

/// The map must show clusters as clusters: the spread inside a cluster is small
/// against the distances between cluster centres.
#[test]
fn clusters_are_compact_and_apart() {
    let (data, labels) = blobs(6, 100, 32, 3.0, 3);
    let map = umap_2d(&data, 600, 32, &opts()).unwrap();
    let mut centre = [[0f64; 2]; 6];
    for (p, &l) in map.iter().zip(&labels) {
        centre[l][0] += p[0] as f64 / 100.0;
        centre[l][1] += p[1] as f64 / 100.0;
    }
    let within = map
        .iter()
        .zip(&labels)
        .map(|(p, &l)| {
            ((p[0] as f64 - centre[l][0]).powi(2) + (p[1] as f64 - centre[l][1]).powi(2)).sqrt()
        })
        .sum::<f64>()
        / 600.0;
    let mut nearest_between = f64::INFINITY;
    for a in 0..6 {
        for b in a + 1..6 {
            let d = ((centre[a][0] - centre[b][0]).powi(2) + (centre[a][1] - centre[b][1]).powi(2))
                .sqrt();
            nearest_between = nearest_between.min(d);
        }
    }
    assert!(
        nearest_between > 3.0 * within,
        "closest clusters {nearest_between} apart, mean spread {within}"
    );
}

#[test]
fn same_seed_same_map_for_any_thread_count() {
    let (data, _) = blobs(4, 60, 24, 3.0, 4);
    let base = MapOptions {
        epochs: Some(120),
        seed: 7,
        ..MapOptions::default()
    };
    let one = umap_2d(
        &data,
        240,
        24,
        &MapOptions {
            threads: 1,
            ..base.clone()
        },
    )
    .unwrap();
    let again = umap_2d(
        &data,
        240,
        24,
        &MapOptions {
            threads: 1,
            ..base.clone()
        },
    )
    .unwrap();
    let three = umap_2d(
        &data,
        240,
        24,
        &MapOptions {
            threads: 3,
            ..base.clone()
        },
    )
    .unwrap();
    assert_eq!(one, again);
    assert_eq!(one, three);
    let other_seed = umap_2d(&data, 240, 24, &MapOptions { seed: 8, ..base }).unwrap();
    assert_ne!(one, other_seed);
}

/// Duplicate points (distance 0 to each other) and a one-dimensional input are valid.
#[test]
fn duplicates_and_one_dimension() {
    let mut data = Vec::new();
    for i in 0..50 {
        let v = if i < 25 { 1.0 } else { 2.0 } + (i % 5) as f32 * 0.01;
        data.push(v);
    }
    let o = MapOptions {
        metric: Metric::Euclidean,
        n_neighbors: 10,
        epochs: Some(100),
        ..opts()
    };
    let map = umap_2d(&data, 50, 1, &o).unwrap();
    assert!(map.iter().all(|p| p[0].is_finite() && p[1].is_finite()));
    let labels: Vec<usize> = (0..50).map(|i| usize::from(i >= 25)).collect();
    assert!(knn_label_accuracy(&map, &labels, 5) >= 0.95);

    // All points identical: still a finite map.
    let same = vec![0.5f32; 20 * 3];
    let map = umap_2d(
        &same,
        20,
        3,
        &MapOptions {
            n_neighbors: 5,
            ..o
        },
    )
    .unwrap();
    assert!(map.iter().all(|p| p[0].is_finite() && p[1].is_finite()));
}

/// Euclidean maps do not change when all points are scaled alike, even to values whose
/// squares overflow f32 (scaled by 2^80, exactly, so the maps are identical).
#[test]
fn euclidean_is_scale_free() {
    let (data, _) = blobs(3, 30, 8, 3.0, 5);
    let o = MapOptions {
        metric: Metric::Euclidean,
        epochs: Some(50),
        ..opts()
    };
    let big: Vec<f32> = data.iter().map(|v| v * 2f32.powi(80)).collect();
    assert!(big.iter().any(|v| (v * v).is_infinite()));
    let a = umap_2d(&data, 90, 8, &o).unwrap();
    let b = umap_2d(&big, 90, 8, &o).unwrap();
    assert_eq!(a, b);
}

fn err(data: &[f32], n: usize, dim: usize, o: &MapOptions) -> Error {
    match umap_2d(data, n, dim, o) {
        Ok(_) => panic!("expected an error for n={n} dim={dim} {o:?}"),
        Err(e) => e,
    }
}

#[test]
fn bad_input_errors() {
    let (data, _) = blobs(2, 10, 4, 3.0, 6);
    let o = opts();

    let e = err(&data[..8], 2, 4, &o);
    assert_eq!(e.kind, Kind::Data);
    assert_eq!(e.message, "a map needs at least 3 points, got 2");
    assert_eq!(err(&data[..4], 1, 4, &o).kind, Kind::Data);
    assert_eq!(err(&[], 0, 4, &o).kind, Kind::Data);

    let e = err(&data, 20, 0, &o);
    assert_eq!(e.kind, Kind::InvalidParameter);
    assert!(e.message.contains("at least 1 dimension"), "{}", e.message);

    let e = err(&data[..79], 20, 4, &o);
    assert_eq!(e.kind, Kind::ArrayShape);
    assert_eq!(
        e.message,
        "data has 79 values, expected 20 points × 4 dimensions = 80"
    );
    assert_eq!(err(&data, usize::MAX / 2, 4, &o).kind, Kind::Limit);
    assert_eq!(err(&data, 20, usize::MAX / 2, &o).kind, Kind::ArrayShape);

    let e = err(
        &data,
        20,
        4,
        &MapOptions {
            n_neighbors: 20,
            ..o.clone()
        },
    );
    assert_eq!(e.kind, Kind::InvalidParameter);
    assert_eq!(
        e.message,
        "n_neighbors 20 must be less than the number of points 20"
    );
    assert!(e.hint.is_some());
    let e = err(
        &data,
        20,
        4,
        &MapOptions {
            n_neighbors: 1,
            ..o.clone()
        },
    );
    assert_eq!(e.kind, Kind::InvalidParameter);
    assert_eq!(e.message, "n_neighbors must be at least 2, got 1");
    // Three points with n_neighbors 2 is the smallest map.
    let three = umap_2d(
        &data[..12],
        3,
        4,
        &MapOptions {
            n_neighbors: 2,
            ..o.clone()
        },
    )
    .unwrap();
    assert_eq!(three.len(), 3);
    // n_neighbors = n − 1 is the largest that works.
    assert!(umap_2d(
        &data,
        20,
        4,
        &MapOptions {
            n_neighbors: 19,
            epochs: Some(20),
            ..o.clone()
        }
    )
    .is_ok());

    for md in [-0.1f32, 1.5, f32::NAN] {
        let e = err(
            &data,
            20,
            4,
            &MapOptions {
                min_dist: md,
                ..o.clone()
            },
        );
        assert_eq!(e.kind, Kind::InvalidParameter, "min_dist {md}");
        assert!(e.message.starts_with("min_dist must be between 0 and 1"));
    }
    for ep in [0, 10_001] {
        let e = err(
            &data,
            20,
            4,
            &MapOptions {
                epochs: Some(ep),
                ..o.clone()
            },
        );
        assert_eq!(e.kind, Kind::InvalidParameter, "epochs {ep}");
        assert_eq!(
            e.message,
            format!("epochs must be between 1 and 10000, got {ep}")
        );
    }

    for (bad, shown) in [
        (f32::NAN, "NaN"),
        (f32::INFINITY, "inf"),
        (f32::NEG_INFINITY, "-inf"),
    ] {
        let mut d = data.clone();
        d[7 * 4 + 2] = bad;
        for metric in [Metric::Cosine, Metric::Euclidean] {
            let e = err(
                &d,
                20,
                4,
                &MapOptions {
                    metric,
                    ..o.clone()
                },
            );
            assert_eq!(e.kind, Kind::Data);
            assert_eq!(
                e.message,
                format!("point 7 has the non-finite value {shown} at dimension 2")
            );
        }
    }

    let mut d = data.clone();
    d[5 * 4..6 * 4].fill(0.0);
    let e = err(&d, 20, 4, &o);
    assert_eq!(e.kind, Kind::Data);
    assert_eq!(
        e.message,
        "point 5 is a zero vector, for which cosine distance is undefined"
    );
    assert!(e.hint.is_some());
    // The same point is fine under Euclidean distance.
    let eu = MapOptions {
        metric: Metric::Euclidean,
        epochs: Some(20),
        ..o.clone()
    };
    assert!(umap_2d(&d, 20, 4, &eu).is_ok());

    let _ = MAX_POINTS;
}

#[test]
fn metric_names() {
    assert_eq!(" Cosine ".parse::<Metric>().unwrap(), Metric::Cosine);
    assert_eq!("EUCLIDEAN".parse::<Metric>().unwrap(), Metric::Euclidean);
    let e = "manhattan".parse::<Metric>().unwrap_err();
    assert_eq!(e.kind, Kind::InvalidParameter);
    assert_eq!(e.message, "unknown metric \"manhattan\"");
    assert_eq!(Metric::Cosine.name(), "cosine");
}

#[test]
fn progress_is_reported_and_can_cancel() {
    let (data, _) = blobs(3, 400, 16, 3.0, 8);
    let o = MapOptions {
        epochs: Some(30),
        ..opts()
    };
    let mut seen: Vec<Progress> = Vec::new();
    let map = umap_2d_with_progress(&data, 1200, 16, &o, &mut |p| {
        seen.push(p);
        Ok(())
    })
    .unwrap();
    assert_eq!(map.len(), 1200);
    let nb: Vec<&Progress> = seen
        .iter()
        .filter(|p| p.stage == Stage::Neighbors)
        .collect();
    let op: Vec<&Progress> = seen.iter().filter(|p| p.stage == Stage::Optimize).collect();
    assert_eq!(nb.first().map(|p| (p.done, p.total)), Some((0, 1200)));
    assert_eq!(nb.last().map(|p| (p.done, p.total)), Some((1200, 1200)));
    assert!(nb.windows(2).all(|w| w[0].done < w[1].done));
    assert_eq!(op.len(), 31);
    assert_eq!(op.last().map(|p| (p.done, p.total)), Some((30, 30)));
    // Neighbours come first, then the optimisation.
    let first_opt = seen
        .iter()
        .position(|p| p.stage == Stage::Optimize)
        .unwrap();
    assert!(seen[first_opt..].iter().all(|p| p.stage == Stage::Optimize));

    for stop_at in [Stage::Neighbors, Stage::Optimize] {
        let mut calls_after = 0;
        let mut stopped = false;
        let r = umap_2d_with_progress(&data, 1200, 16, &o, &mut |p| {
            if stopped {
                calls_after += 1;
            }
            if p.stage == stop_at && p.done > 0 {
                stopped = true;
                return Err(Error::new(
                    Kind::Internal,
                    "canceling statement due to user request",
                ));
            }
            Ok(())
        });
        let e = r.unwrap_err();
        assert_eq!(e.message, "canceling statement due to user request");
        assert_eq!(calls_after, 0);
    }
}

/// umap-learn's `find_ab_params(spread, min_dist)`, as recorded in the tests of the R
/// package `umap`, which checks itself against it.
#[test]
fn curve_parameters_match_umap_learn() {
    for (spread, md, a, b) in [
        (1.0, 0.1, 1.576_943_460_41, 0.895_060_878_123),
        (2.0, 0.1, 0.544_660_540_037, 0.842_055_426_75),
        (0.6, 0.2, 2.950_317_964_02, 1.148_889_176_55),
    ] {
        let (fa, fb) = fit_ab(md, spread);
        assert!(
            (fa - a).abs() < 1e-4 * a && (fb - b).abs() < 1e-4 * b,
            "spread {spread} min_dist {md}: got a={fa} b={fb}, want {a} {b}"
        );
    }
}

/// pbmc3k, as scanpy's basic recipe prepares it (normalise to 1e4, log1p, the 300 most
/// variable genes, z-scored, clipped at 10): the map keeps the Seurat cell types
/// together. Leave-one-out kNN-15 label accuracy over the annotated cells is 0.878 with
/// cosine distance in the 300-gene space; the map scores 0.881. The initial layout
/// alone (PCA) scores 0.73 and 20 epochs 0.85, so 0.86 needs the full optimisation.
#[test]
fn pbmc3k_cell_types_stay_together() {
    use exceiver_core::data::{tenx, ObsValues};
    use exceiver_core::preprocess::{log1p32, normalize_count};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/pbmc3k");
    let m = tenx::read(&dir).unwrap();
    let (cells, genes) = (m.n_cells(), m.n_genes());
    let mut rows = Vec::with_capacity(cells);
    let (mut sum, mut sum2) = (vec![0f64; genes], vec![0f64; genes]);
    for c in 0..cells {
        let (g, k) = m.cell(c);
        let total: f64 = k.iter().map(|&x| x as f64).sum();
        let row: Vec<(usize, f64)> = g
            .iter()
            .zip(k)
            .map(|(&g, &k)| (g as usize, log1p32(normalize_count(k, total)) as f64))
            .collect();
        for &(g, y) in &row {
            sum[g] += y;
            sum2[g] += y * y;
        }
        rows.push(row);
    }
    let n = cells as f64;
    let var: Vec<f64> = (0..genes)
        .map(|g| sum2[g] / n - (sum[g] / n).powi(2))
        .collect();
    let mut order: Vec<usize> = (0..genes).collect();
    order.sort_by(|&a, &b| var[b].total_cmp(&var[a]).then(a.cmp(&b)));
    let dim = 300;
    let mut col = vec![usize::MAX; genes];
    for (j, &g) in order[..dim].iter().enumerate() {
        col[g] = j;
    }
    let z = |g: usize, y: f64| ((y - sum[g] / n) / var[g].sqrt()).min(10.0) as f32;
    let mut data = Vec::with_capacity(cells * dim);
    for row in &rows {
        let mut v: Vec<f32> = order[..dim].iter().map(|&g| z(g, 0.0)).collect();
        for &(g, y) in row {
            if col[g] != usize::MAX {
                v[col[g]] = z(g, y);
            }
        }
        data.extend(v);
    }
    let labels = match m
        .obs
        .iter()
        .find(|c| c.name == "seurat_annotations")
        .map(|c| &c.values)
    {
        Some(ObsValues::Text(v)) => v.clone(),
        other => panic!("no text column seurat_annotations: {other:?}"),
    };

    let o = MapOptions {
        epochs: Some(200),
        ..opts()
    };
    let map = umap_2d(&data, cells, dim, &o).unwrap();
    // Score the annotated cells only.
    let names: Vec<&str> = {
        let mut v: Vec<&str> = labels.iter().flatten().map(|s| s.as_str()).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let keep: Vec<usize> = (0..cells).filter(|&i| labels[i].is_some()).collect();
    let sub: Vec<[f32; 2]> = keep.iter().map(|&i| map[i]).collect();
    let lab: Vec<usize> = keep
        .iter()
        .map(|&i| {
            names
                .binary_search(&labels[i].as_deref().unwrap_or(""))
                .unwrap_or(0)
        })
        .collect();
    let acc = knn_label_accuracy(&sub, &lab, 15);
    eprintln!("pbmc3k map: kNN-15 label accuracy {acc:.4}");
    assert!(acc >= 0.86, "kNN-15 label accuracy in the pbmc3k map {acc}");
}
