//! Settings, all under the reserved prefix `exceiver.`.

use exceiver_core::device::Device;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::{CStr, CString};

/// `exceiver.threads`: worker threads for bulk work (`embed_table`, training).
/// 0 means one per CPU core. Worker threads never call PostgreSQL.
static THREADS: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `exceiver.max_memory` (MB): the most memory one piece of work sized by input (a file
/// read, a training run, a checkpoint import) may plan to take; checked before anything
/// is allocated. Superuser-only, so that no role can raise its own limit.
static MAX_MEMORY_MB: GucSetting<i32> = GucSetting::<i32>::new(8192);

/// `exceiver.gpu_tf32`: f32 matrix products on a GPU on TF32 tensor cores (off: full
/// f32, within the fixtures' tolerances).
static GPU_TF32: GucSetting<bool> = GucSetting::<bool>::new(false);

pub fn init() {
    GucRegistry::define_int_guc(
        c"exceiver.max_memory",
        c"The most memory one exceiver job sized by input may plan to use.",
        c"File reads, training and checkpoint imports estimate their memory and refuse to start past it (SQLSTATE 54000).",
        &MAX_MEMORY_MB,
        64,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MB,
    );
    // Long parsing loops in the core ask this backend thread for interrupts.
    exceiver_core::limits::set_interrupt_hook(Some(check_interrupts));
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
    GucRegistry::define_bool_guc(
        c"exceiver.gpu_tf32",
        c"Run exceiver's f32 matrix products on a GPU on TF32 tensor cores.",
        c"Off (the default): full f32, within the reference fixtures' tolerances. No effect on the CPU.",
        &GPU_TF32,
        GucContext::Userset,
        GucFlags::default(),
    );
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"exceiver.device",
            c"Where exceiver's bulk work runs: cpu, cuda or cuda:N.",
            c"embed_table and training read it; per-row functions such as embed always run on the CPU of the calling backend.",
            &DEVICE,
            GucContext::Userset,
            GucFlags::default(),
            Some(check_device),
            None,
            None,
        );
        pgrx::pg_sys::MarkGUCPrefixReserved(c"exceiver".as_ptr());
    }
}

fn check_interrupts() {
    pgrx::check_for_interrupts!();
}

/// Pass `exceiver.max_memory` to the core before work sized by input.
pub fn apply_limits() {
    exceiver_core::limits::set_max_bytes(MAX_MEMORY_MB.get().max(1) as u64 * 1024 * 1024);
}

/// The number of worker threads to use.
pub fn threads() -> usize {
    match THREADS.get() {
        n if n > 0 => n as usize,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

/// `exceiver.device`: where bulk work (`embed_table`, training) runs: `cpu` (default),
/// `cuda` or `cuda:N`. Checked when set; a GPU in a CPU-only build is an error at use.
static DEVICE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"cpu"));

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_device(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pgrx::pg_sys::GucSource::Type,
) -> bool {
    if newval.is_null() || unsafe { (*newval).is_null() } {
        return true;
    }
    let s = unsafe { CStr::from_ptr(*newval) }
        .to_string_lossy()
        .into_owned();
    match Device::parse(&s) {
        Ok(_) => true,
        Err(e) => {
            let msg = CString::new(e.message.replace('\0', "")).unwrap_or_default();
            unsafe {
                pgrx::pg_sys::GUC_check_errdetail_string = pgrx::pg_sys::pstrdup(msg.as_ptr())
            };
            false
        }
    }
}

/// Pass `exceiver.gpu_tf32` to the core before work on a device.
pub fn apply_precision() {
    use exceiver_core::device::{set_matmul_precision, MatmulPrecision};
    set_matmul_precision(if GPU_TF32.get() {
        MatmulPrecision::Tf32
    } else {
        MatmulPrecision::F32
    });
}

/// The device bulk work should run on (already validated by the check hook).
pub fn device() -> Device {
    DEVICE
        .get()
        .and_then(|s| Device::parse(&s.to_string_lossy()).ok())
        .unwrap_or(Device::Cpu)
}
