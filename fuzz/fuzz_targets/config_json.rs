//! Model configs from JSON: the stored config and the reference's hyperparameters.
#![no_main]
use exceiver_core::model::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // below libFuzzer's malloc limit, so that a size past the budget is refused by the
    // reader's own checks and a huge allocation that slips through is a finding
    exceiver_core::limits::set_max_bytes(256 << 20);
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(c) = Config::from_hyper_parameters(s) {
            let _ = c.validate();
        }
        if let Ok(c) = serde_json::from_str::<Config>(s) {
            let _ = c.validate();
        }
    }
});
