//! Model weights as safetensors bytes (what the catalog stores and import reads).
#![no_main]
use exceiver_core::model::weights;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // below libFuzzer's malloc limit, so that a size past the budget is refused by the
    // reader's own checks and a huge allocation that slips through is a finding
    exceiver_core::limits::set_max_bytes(256 << 20);
    let _ = weights::load_safetensors(data);
});
