//! The fuzz targets' CPU cap on HDF5 reader processes (`isolated::set_cpu_ms_cap`). It
//! is process-wide, so it is tested in a process of its own: beside the library's unit
//! tests it would stop their children too.

use exceiver_core::data::{isolated, CellMatrix};
use exceiver_core::error::Kind;

#[test]
fn the_fuzzing_cap_stops_a_loop_within_its_milliseconds() {
    isolated::set_cpu_ms_cap(200);
    let t = std::time::Instant::now();
    let e = isolated::run(
        "loop.h5ad",
        || -> exceiver_core::error::Result<CellMatrix> {
            loop {
                std::hint::black_box(0u64);
            }
        },
    )
    .unwrap_err();
    assert_eq!(e.kind, Kind::FileFormat, "{e}");
    assert!(e.message.contains("killed by signal 27"), "{e}");
    assert!(t.elapsed().as_millis() < 5000, "{:?}", t.elapsed());
    // a reader that finishes within the cap is untouched
    let m = isolated::run("ok", || Ok(CellMatrix::default())).unwrap();
    assert_eq!(m.n_cells(), 0);
    isolated::set_cpu_ms_cap(0);
}
