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
//!   threads never call into the host; [`run_workers`] keeps taking it while worker
//!   threads run (a training step, a batch of embeddings) and stops them between items.

use crate::error::{Error, Kind, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// Whether the calling thread holds the interrupt hook.
fn hook_is_here() -> bool {
    let hook = *HOOK.lock().unwrap_or_else(|e| e.into_inner());
    hook.is_some_and(|(tid, _)| tid == std::thread::current().id())
}

/// Run `jobs` on one scoped thread each and return their results in order, while the
/// calling thread keeps taking the host's interrupts (every 50 ms, and whenever a job
/// ends). Each job gets a stop flag to check between its items: when the hook unwinds
/// (the host cancels the work), the flag is raised, the jobs are waited for (one item
/// each at most) and the unwind goes on. Without a hook this is a plain scoped join.
pub fn run_workers<'env, T, F>(jobs: Vec<F>) -> Vec<std::thread::Result<T>>
where
    F: FnOnce(&AtomicBool) -> T + Send + 'env,
    T: Send + 'env,
{
    /// Wakes the waiting thread when a job ends, panicking or not.
    struct Wake(std::thread::Thread);
    impl Drop for Wake {
        fn drop(&mut self) {
            self.0.unpark();
        }
    }
    let stop = AtomicBool::new(false);
    let watch = hook_is_here();
    let waiter = std::thread::current();
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|job| {
                let (stop, wake) = (&stop, Wake(waiter.clone()));
                s.spawn(move || {
                    let _wake = wake;
                    job(stop)
                })
            })
            .collect();
        while watch && !handles.iter().all(|h| h.is_finished()) {
            std::thread::park_timeout(std::time::Duration::from_millis(50));
            if let Err(cancel) = std::panic::catch_unwind(interrupt) {
                stop.store(true, Ordering::Relaxed);
                for h in handles {
                    let _ = h.join();
                }
                std::panic::resume_unwind(cancel);
            }
        }
        handles.into_iter().map(|h| h.join()).collect()
    })
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

    static CANCEL: AtomicBool = AtomicBool::new(false);
    fn cancel_when_asked() {
        if CANCEL.load(Ordering::Relaxed) {
            std::panic::panic_any("cancelled by the host");
        }
    }

    #[test]
    fn workers_stop_between_items_when_the_host_cancels() {
        use std::sync::atomic::AtomicUsize;
        use std::time::{Duration, Instant};
        // without a hook: every job runs to its end, results in order
        let r = run_workers((0..3).map(|i| move |_: &AtomicBool| i * 10).collect());
        assert_eq!(
            r.into_iter().map(|x| x.unwrap()).collect::<Vec<_>>(),
            [0, 10, 20]
        );

        // with the hook on this thread: the host cancels 150 ms into jobs of 100 items of
        // 40 ms each (4 s); they stop within an item of the next poll (50 ms), and the
        // cancel goes on. The bounds leave room for a machine busy with other tests
        // (once 68 items of 20 ms ran where about 20 do): the point is that the jobs
        // stop long before their end
        set_interrupt_hook(Some(cancel_when_asked));
        let done = AtomicUsize::new(0);
        let t0 = Instant::now();
        let timer = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(150));
            CANCEL.store(true, Ordering::Relaxed);
        });
        let jobs: Vec<_> = (0..2)
            .map(|_| {
                let done = &done;
                move |stop: &AtomicBool| {
                    for _ in 0..100 {
                        if stop.load(Ordering::Relaxed) {
                            return false;
                        }
                        std::thread::sleep(Duration::from_millis(40));
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    true
                }
            })
            .collect();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_workers(jobs)));
        let took = t0.elapsed();
        set_interrupt_hook(None);
        timer.join().unwrap();
        let payload = r.expect_err("the host's cancel must reach the caller");
        assert_eq!(
            payload.downcast_ref::<&str>(),
            Some(&"cancelled by the host")
        );
        assert!(took < Duration::from_secs(2), "stopped after {took:?}");
        let n = done.load(Ordering::Relaxed);
        assert!((2..100).contains(&n), "{n} of 200 items ran");
    }
}
