//! Matrix Market text: parse, then group by cell.
#![no_main]
use exceiver_core::data::mtx;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // below libFuzzer's malloc limit, so that a size past the budget is refused by the
    // reader's own checks and a huge allocation that slips through is a finding
    exceiver_core::limits::set_max_bytes(256 << 20);
    if let Ok(t) = mtx::read(std::io::Cursor::new(data)) {
        let _ = mtx::cells_by_genes(&t);
    }
});
