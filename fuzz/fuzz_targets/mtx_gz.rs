//! Gzip-compressed Matrix Market (`matrix.mtx.gz`), as the 10x reader opens it.
#![no_main]
use exceiver_core::data::mtx;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // below libFuzzer's malloc limit, so that a size past the budget is refused by the
    // reader's own checks and a huge allocation that slips through is a finding
    exceiver_core::limits::set_max_bytes(256 << 20);
    let r = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(data));
    if let Ok(t) = mtx::read(r) {
        let _ = mtx::cells_by_genes(&t);
    }
});
