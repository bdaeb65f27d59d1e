//! A Cell Ranger .h5 file, read as exceiver reads it (the HDF5 library in a child process).
#![no_main]
use exceiver_core::data::tenx;
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    // below libFuzzer's malloc limit, so that a size past the budget is refused by the
    // reader's own checks and a huge allocation that slips through is a finding
    exceiver_core::limits::set_max_bytes(256 << 20);
    // a few kilobytes parse in milliseconds: an input that makes the library loop is
    // stopped after 50 ms of CPU (the product's limit is a minute and more, sized by
    // the file), as contained as a crash, so that looping mutations do not hold the
    // target at 15 executions a second
    exceiver_core::data::isolated::set_cpu_ms_cap(50);
    let p = common::scratch().join("input.h5");
    std::fs::write(&p, data).unwrap();
    common::no_internal_error(tenx::read(&p));
});
