//! Process-wide limits on work sized by input, and a hook to stop long work.
//!
//! - [`max_bytes`]: the most memory one piece of work (a file read, a training run, a
//!   checkpoint import) may plan to take. Every size that comes from input is checked
//!   against it, and against the input's own size, *before* anything is allocated
//!   ([`check_bytes`]), so that a three-line header cannot ask for gigabytes. The
//!   PostgreSQL extension sets it from the superuser-only setting `exceiver.max_memory`.
//! - [`interrupt`]: long loops (file parsing) call it now and then; the embedding
//!   application installs a check that can abort the work (PostgreSQL's
//!   `CHECK_FOR_INTERRUPTS`). It runs only on the thread that installed it, so worker
//!   threads never call into the host.

use crate::error::{Error, Kind, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::ThreadId;

/// Default budget when nobody set one: 8 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 8 << 30;

static MAX_BYTES: AtomicU64 = AtomicU64::new(DEFAULT_MAX_BYTES);

/// Set the memory budget for work sized by input (bytes; 0 restores the default).
pub fn set_max_bytes(bytes: u64) {
    let b = if bytes == 0 { DEFAULT_MAX_BYTES } else { bytes };
    MAX_BYTES.store(b, Ordering::Relaxed);
}

/// The memory budget for work sized by input, in bytes.
pub fn max_bytes() -> u64 {
    MAX_BYTES.load(Ordering::Relaxed)
}

fn human(b: u128) -> String {
    const U: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} bytes")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Refuse (`Kind::Limit`, SQLSTATE 54000) work that would need `bytes` when the budget
/// is smaller. `what` says what needs the memory.
pub fn check_bytes(bytes: u128, what: &str) -> Result<()> {
    let max = max_bytes() as u128;
    if bytes > max {
        return Err(Error::new(
            Kind::Limit,
            format!(
                "{what} needs about {} ({bytes} bytes), over the limit of {} (exceiver.max_memory)",
                human(bytes),
                human(max)
            ),
        )
        .with_hint("A superuser can raise exceiver.max_memory if the server has the memory."));
    }
    Ok(())
}

type Hook = (ThreadId, fn());
static HOOK: Mutex<Option<Hook>> = Mutex::new(None);

/// Install `check` as the interrupt hook for the calling thread (None removes it).
/// `check` may unwind (panic) to abort the work; it is never called on another thread.
pub fn set_interrupt_hook(check: Option<fn()>) {
    let mut h = HOOK.lock().unwrap_or_else(|e| e.into_inner());
    *h = check.map(|f| (std::thread::current().id(), f));
}

/// Give the host a chance to stop the work (see [`set_interrupt_hook`]).
pub fn interrupt() {
    let hook = *HOOK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((tid, f)) = hook {
        if tid == std::thread::current().id() {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_refuses_with_numbers() {
        let e = check_bytes(u128::from(u64::MAX), "a test").unwrap_err();
        assert_eq!(e.kind, Kind::Limit);
        assert!(e.message.contains("a test needs about"), "{}", e.message);
        assert!(check_bytes(1024, "a test").is_ok());
    }
}
