//! HDF5 files are parsed in a child process.
//!
//! The HDF5 C library (Debian 12's 1.10.8, which the `hdf5` crate links) does not
//! survive every malformed file: fuzzing the `.h5ad` reader (`make fuzz`) found a
//! segmentation fault in `H5HG_read` on a corrupt variable-length string, and the Cell
//! Ranger `.h5` reader leaks memory on some error paths. Inside a PostgreSQL backend a
//! crash restarts every session of the server, and a leak stays for the session's life.
//! So the readers that call into HDF5 run in a forked child process: the child parses
//! the file, sends the matrix (or the error) back through a pipe and exits with
//! `_exit`; a crash or a leak ends with the child, and the parent turns a child that
//! died into a file-format error. Fuzzing also found files on which the library never
//! returns: the child has a CPU-time limit sized by the file ([`cpu_seconds_for`]).
//! The parent checks for interrupts while it waits
//! ([`crate::limits::interrupt`]) and kills the child if the work is cancelled.
//!
//! The fork happens while holding the `hdf5` crate's library lock, so that no other
//! thread of the parent can hold it (or be inside the library) at that moment, one fork
//! at a time; the child never calls the parent's interrupt hook and restores default
//! signal handling. A process whose other threads use the HDF5 library while it forks
//! (a test harness writing files on other threads) must keep them out of the library
//! meanwhile: the child would inherit the lock's waiters. A PostgreSQL backend has one
//! thread that uses HDF5.

use super::CellMatrix;
use crate::error::{Error, Kind, Result};
use serde::{Deserialize, Serialize};

/// What the child sends back.
#[derive(Serialize, Deserialize)]
enum Reply {
    Matrix(CellMatrix),
    Failed {
        kind: Kind,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
}

/// Kills and reaps the child unless it was reaped already (e.g. on cancel).
struct Child {
    pid: libc::pid_t,
    reaped: bool,
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: our own child; reaping it leaves no zombie.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                let mut st = 0;
                libc::waitpid(self.pid, &mut st, 0);
            }
        }
    }
}

struct Fd(libc::c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: a descriptor this module opened and owns.
        unsafe { libc::close(self.0) };
    }
}

fn os_error(what: &str) -> Error {
    Error::new(
        Kind::Io,
        format!("{what}: {}", std::io::Error::last_os_error()),
    )
}

/// CPU seconds a child may spend on a file of `bytes`: 60 s, plus 4 s per MB (a
/// 23 MB `.h5ad` is read in well under two seconds). Fuzzing found files on which the HDF5 library
/// loops forever; past this the child is killed (SIGXCPU) and the load fails with 22P04.
pub fn cpu_seconds_for(bytes: u64) -> u64 {
    60 + 4 * (bytes >> 20)
}

/// CPU milliseconds a child may use before it is stopped (SIGPROF), in place of the
/// file-sized limit; 0 (the default) keeps [`cpu_seconds_for`]. Only for fuzzing: the
/// fuzz targets read inputs of a few kilobytes, and libFuzzer's mutations of the seeds
/// often make the library loop, so a minute per such input would leave the targets at
/// 15 executions a second.
static CPU_MS_CAP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Set [`CPU_MS_CAP`] for this process (0: the file-sized limit).
pub fn set_cpu_ms_cap(ms: u64) {
    CPU_MS_CAP.store(ms, std::sync::atomic::Ordering::Relaxed);
}

/// Run `read` (an HDF5 reader of the file `path`) in a child process; the path names
/// the file in errors and sizes the child's CPU limit ([`cpu_seconds_for`]).
pub fn run_file(
    path: &std::path::Path,
    read: impl FnOnce() -> Result<CellMatrix>,
) -> Result<CellMatrix> {
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    run_limited(&path.display().to_string(), cpu_seconds_for(bytes), read)
}

/// Run `read` (an HDF5 reader) in a child process; `what` names the file in errors.
pub fn run(what: &str, read: impl FnOnce() -> Result<CellMatrix>) -> Result<CellMatrix> {
    run_limited(what, cpu_seconds_for(0), read)
}

/// [`run`] with the child limited to `cpu_seconds` of CPU time.
pub fn run_limited(
    what: &str,
    cpu_seconds: u64,
    read: impl FnOnce() -> Result<CellMatrix>,
) -> Result<CellMatrix> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_error("could not create a pipe for the HDF5 reader"));
    }
    let (rd, wr) = (Fd(fds[0]), Fd(fds[1]));
    // One fork at a time in this process, so that no thread of ours is waiting on the
    // HDF5 library lock at the moment of a fork (a child would inherit its waiter).
    static FORK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let one_at_a_time = FORK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: fork while holding the HDF5 library lock (see the module doc).
    let pid = hdf5::sync::sync(|| unsafe { libc::fork() });
    drop(one_at_a_time);
    if pid < 0 {
        return Err(os_error("could not start the HDF5 reader process"));
    }
    if pid == 0 {
        child(rd, wr, cpu_seconds, read);
    }
    drop(wr);
    let mut proc = Child { pid, reaped: false };
    let bytes = read_all(&rd, what)?;
    let mut status = 0;
    // SAFETY: waits for our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
        proc.reaped = true;
    }
    let died = if libc::WIFSIGNALED(status) {
        Some(format!("was killed by signal {}", libc::WTERMSIG(status)))
    } else if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) != 0 {
        Some(format!("exited with status {}", libc::WEXITSTATUS(status)))
    } else {
        None
    };
    let reply: Option<Reply> = postcard::from_bytes(&bytes).ok();
    match (reply, died) {
        (Some(Reply::Matrix(m)), None) => Ok(m),
        (
            Some(Reply::Failed {
                kind,
                message,
                detail,
                hint,
            }),
            None,
        ) => Err(Error {
            kind,
            message,
            detail,
            hint,
        }),
        (_, died) => Err(Error::format(format!(
            "the HDF5 library failed on \"{what}\": its reader process {}",
            died.unwrap_or_else(|| "sent no result".to_string())
        ))
        .with_hint("The file is corrupt or not of the format it claims.")),
    }
}

/// The child: parse, reply, `_exit`. Never returns.
fn child(rd: Fd, wr: Fd, cpu_seconds: u64, read: impl FnOnce() -> Result<CellMatrix>) -> ! {
    drop(rd);
    let lim = libc::rlimit {
        rlim_cur: cpu_seconds as libc::rlim_t,
        rlim_max: cpu_seconds as libc::rlim_t + 5,
    };
    // SAFETY: limits this process only.
    unsafe { libc::setrlimit(libc::RLIMIT_CPU, &lim) };
    let cap_ms = CPU_MS_CAP.load(std::sync::atomic::Ordering::Relaxed);
    if cap_ms > 0 {
        let t = libc::itimerval {
            it_interval: libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            it_value: libc::timeval {
                tv_sec: (cap_ms / 1000) as libc::time_t,
                tv_usec: ((cap_ms % 1000) * 1000) as libc::suseconds_t,
            },
        };
        // SAFETY: a CPU-time timer of this process; SIGPROF's default action ends it.
        unsafe { libc::setitimer(libc::ITIMER_PROF, &t, std::ptr::null_mut()) };
    }
    // The parent's interrupt hook calls into the host (PostgreSQL): not from here.
    crate::limits::set_interrupt_hook(None);
    // SAFETY: default dispositions, so a crash ends this process only and the host's
    // handlers never run in it.
    unsafe {
        for sig in [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGFPE,
            libc::SIGILL,
            libc::SIGABRT,
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGQUIT,
            libc::SIGHUP,
            libc::SIGALRM,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGPIPE,
            libc::SIGXCPU,
            libc::SIGPROF,
        ] {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    // A panic in the reader is reported by the hook itself, before unwinding or
    // aborting (builds with panic=abort, such as the fuzz targets, never return to a
    // catch_unwind): the parent gets an internal error, not a dead child.
    let fd = wr.0;
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let why = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let reply = Reply::Failed {
            kind: Kind::Internal,
            message: format!("the HDF5 reader panicked: {why}{at}"),
            detail: None,
            hint: None,
        };
        // SAFETY: leave at once, without unwinding into the C library's frames.
        unsafe { libc::_exit(send(fd, &reply)) }
    }));
    let reply = match read() {
        Ok(m) => Reply::Matrix(m),
        Err(e) => Reply::Failed {
            kind: e.kind,
            message: e.message,
            detail: e.detail,
            hint: e.hint,
        },
    };
    let code = send(wr.0, &reply);
    // SAFETY: leave without running the host's exit handlers.
    unsafe { libc::_exit(code) }
}

/// Write the child's reply to the pipe; the child's exit status (0: sent).
fn send(fd: libc::c_int, reply: &Reply) -> libc::c_int {
    let Ok(bytes) = postcard::to_stdvec(reply) else {
        return 2;
    };
    let mut off = 0;
    while off < bytes.len() {
        // SAFETY: writes from a live buffer to our pipe.
        let n = unsafe { libc::write(fd, bytes[off..].as_ptr().cast(), bytes.len() - off) };
        if n <= 0 {
            return 3;
        }
        off += n as usize;
    }
    0
}

/// Read the child's reply, checking for interrupts every 100 ms and the memory budget
/// as it grows.
fn read_all(rd: &Fd, what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let mut p = libc::pollfd {
            fd: rd.0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, 100) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                crate::limits::interrupt();
                continue;
            }
            return Err(os_error("waiting for the HDF5 reader"));
        }
        if r == 0 {
            crate::limits::interrupt();
            continue;
        }
        // SAFETY: reads into a live buffer.
        let n = unsafe { libc::read(rd.0, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(os_error("reading from the HDF5 reader"));
        }
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n as usize]);
        crate::limits::check_bytes(out.len() as u128 * 2, &format!("reading \"{what}\""))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_that_crashes_is_an_error_not_a_crash() {
        let e = run("crash.h5ad", || {
            // SAFETY: kills the child process, as a fault in the C library would.
            unsafe { libc::raise(libc::SIGSEGV) };
            Ok(CellMatrix::default())
        })
        .unwrap_err();
        assert_eq!(e.kind, Kind::FileFormat, "{e}");
        assert!(e.message.contains("killed by signal 11"), "{e}");
    }

    #[test]
    fn a_reader_that_loops_forever_is_stopped() {
        let t = std::time::Instant::now();
        let e = run_limited("loop.h5ad", 1, || loop {
            std::hint::black_box(0u64);
        })
        .unwrap_err();
        assert_eq!(e.kind, Kind::FileFormat, "{e}");
        assert!(e.message.contains("killed by signal 24"), "{e}");
        assert!(t.elapsed().as_secs() < 30);
    }

    #[test]
    fn results_and_errors_cross_the_pipe() {
        let m = run("ok", || {
            Ok(CellMatrix {
                barcodes: vec!["c0".into()],
                genes: vec!["A".into(), "B".into()],
                indptr: vec![0, 1],
                indices: vec![1],
                data: vec![2.5],
                ..CellMatrix::default()
            })
        })
        .unwrap();
        assert_eq!((m.indices.clone(), m.data.clone()), (vec![1], vec![2.5]));
        let e = run("bad", || Err(Error::format("broken").with_hint("fix it"))).unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str(), e.hint.as_deref()),
            (Kind::FileFormat, "broken", Some("fix it"))
        );
        let e = run("panics", || panic!("boom")).unwrap_err();
        assert_eq!(e.kind, Kind::Internal);
        assert!(e.message.contains("panicked: boom at "), "{e}");
    }
}
