//! A PyTorch Lightning checkpoint (.ckpt: a zip holding a pickle and tensor storages).
#![no_main]
use exceiver_core::model::weights;
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    // below libFuzzer's malloc limit, so that a size past the budget is refused by the
    // reader's own checks and a huge allocation that slips through is a finding
    exceiver_core::limits::set_max_bytes(256 << 20);
    let p = common::scratch().join("input.ckpt");
    std::fs::write(&p, data).unwrap();
    let _ = weights::load_checkpoint(&p);
});
