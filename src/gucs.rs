//! Settings, all under the reserved prefix `exceiver.`.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// `exceiver.threads`: worker threads for bulk work (`embed_table`, training).
/// 0 means one per CPU core. Worker threads never call PostgreSQL.
static THREADS: GucSetting<i32> = GucSetting::<i32>::new(0);

pub fn init() {
    GucRegistry::define_int_guc(
        c"exceiver.threads",
        c"Worker threads for exceiver's bulk work (0: one per CPU core).",
        c"Used by embed_table and training; per-row functions such as embed run in the calling backend only.",
        &THREADS,
        0,
        256,
        GucContext::Userset,
        GucFlags::default(),
    );
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"exceiver".as_ptr()) };
}

/// The number of worker threads to use.
pub fn threads() -> usize {
    match THREADS.get() {
        n if n > 0 => n as usize,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}
