//! Who may do what, decided by PostgreSQL itself.
//!
//! - Server files: [`check_server_files`] asks exactly what `COPY … FROM/TO 'file'` asks
//!   (`has_privs_of_role(GetUserId(), pg_read_server_files / pg_write_server_files)`,
//!   which superusers always pass), in C, with no SQL text a caller could shadow: a
//!   temporary view named `pg_roles` or a NOINHERIT membership gets nowhere.
//! - The SQL that exceiver runs inside its functions runs under [`PinnedSearchPath`]:
//!   `search_path = pg_catalog, pg_temp`, so no object of the caller's (a temporary
//!   relation, a function or operator in a schema early on the caller's path) can stand
//!   in for a catalog or built-in one. Table names the caller passes are resolved with
//!   the caller's own path first ([`crate::api::bulk::relation_name`]), then used fully
//!   qualified.
//! - Models: see [`crate::api::model`] (owner column, row-level security).

use crate::errors::raise_code;
use pgrx::{pg_sys, PgSqlErrorCode};

/// What a function does with a file on the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FileAccess {
    Read,
    Write,
}

/// Raise `42501` unless the current user may read (or write) server files as `COPY`
/// would let them: a superuser, or a role that has the privileges of
/// `pg_read_server_files` (`pg_write_server_files`), membership with INHERIT.
/// `more` is appended to the hint.
pub(crate) fn check_server_files(access: FileAccess, more: &str) {
    let (role, what, verb) = match access {
        FileAccess::Read => (pg_sys::ROLE_PG_READ_SERVER_FILES, "read", "load"),
        FileAccess::Write => (pg_sys::ROLE_PG_WRITE_SERVER_FILES, "write", "write"),
    };
    // SAFETY: plain catalog lookups of the current user in a backend with a transaction.
    let ok = unsafe { pg_sys::has_privs_of_role(pg_sys::GetUserId(), pg_sys::Oid::from(role)) };
    if !ok {
        raise_code(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to {what} server files"),
            Some(&format!(
                "Only superusers and roles with the privileges of pg_{what}_server_files may {verb} \
                 files on the server (as for COPY; a NOINHERIT member must SET ROLE first){more}."
            )),
        );
    }
}

/// The search path under which exceiver's own SQL runs.
const PINNED: &std::ffi::CStr = c"pg_catalog, pg_temp";

/// While alive, `search_path` is `pg_catalog, pg_temp` (a new GUC nesting level, as a
/// function's `SET search_path` clause makes). Dropping it restores the caller's value;
/// on an error the transaction's (or subtransaction's) abort restores it.
pub(crate) struct PinnedSearchPath {
    level: i32,
}

impl PinnedSearchPath {
    pub(crate) fn new() -> Self {
        // SAFETY: the same calls fmgr makes for a function's SET clause; GUC_ACTION_SAVE
        // is allowed in parallel workers too.
        let level = unsafe {
            let level = pg_sys::NewGUCNestLevel();
            pg_sys::set_config_option(
                c"search_path".as_ptr(),
                PINNED.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
            level
        };
        PinnedSearchPath { level }
    }
}

impl Drop for PinnedSearchPath {
    fn drop(&mut self) {
        // While an error unwinds, the (sub)transaction abort pops this level itself.
        if !std::thread::panicking() {
            // SAFETY: pops the level pushed in `new`, restoring the caller's value.
            unsafe { pg_sys::AtEOXact_GUC(true, self.level) };
        }
    }
}

/// Run `f` with the pinned search path.
pub(crate) fn pinned<T>(f: impl FnOnce() -> T) -> T {
    let _guard = PinnedSearchPath::new();
    f()
}
