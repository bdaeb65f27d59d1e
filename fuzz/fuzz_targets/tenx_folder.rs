//! A Cell Ranger folder: the input is split into barcodes.tsv, genes.tsv and
//! matrix.mtx (two little-endian u16 lengths first), written, and read as a folder.
#![no_main]
use exceiver_core::data::tenx;
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    // below libFuzzer's malloc limit, so that a size past the budget is refused by the
    // reader's own checks and a huge allocation that slips through is a finding
    exceiver_core::limits::set_max_bytes(256 << 20);
    if data.len() < 4 {
        return;
    }
    let a = u16::from_le_bytes([data[0], data[1]]) as usize;
    let b = u16::from_le_bytes([data[2], data[3]]) as usize;
    let rest = &data[4..];
    let a = a.min(rest.len());
    let b = b.min(rest.len() - a);
    let d = common::scratch().join("folder");
    let _ = std::fs::create_dir_all(&d);
    std::fs::write(d.join("barcodes.tsv"), &rest[..a]).unwrap();
    std::fs::write(d.join("genes.tsv"), &rest[a..a + b]).unwrap();
    std::fs::write(d.join("matrix.mtx"), &rest[a + b..]).unwrap();
    let _ = tenx::read(&d);
});
