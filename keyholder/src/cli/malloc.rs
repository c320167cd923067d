//! glibc's malloc tuning for `serve`. By default glibc raises its mmap threshold to the size of
//! every large block it frees (up to 32 MiB): after the first streamed answers, the outbound
//! client's read buffers (up to ~400 KiB each, one per busy connection) are no longer mapped and
//! unmapped but carved from the per-thread arenas, where the pieces of a hundred concurrent
//! streams fragment them and resident memory stays at the peak (~65-95 MB after 64 concurrent
//! 1 MiB answers, against ~27 MB with a fixed threshold; docs/benchmarks.md). A fixed
//! threshold (glibc's own default, 128 KiB) is only settable before the process starts
//! (`GLIBC_TUNABLES`; `mallopt` would need unsafe code), so `serve` starts itself once more
//! with it, under the same process id. An owner who sets `GLIBC_TUNABLES` (even empty) keeps
//! their own setting.

/// The environment variable glibc reads its tunables from.
pub const TUNABLES: &str = "GLIBC_TUNABLES";
/// The setting: glibc's default threshold, no longer raised.
pub const SETTING: &str = "glibc.malloc.mmap_threshold=131072";

/// Replaces this process by the same command with [`SETTING`], unless `GLIBC_TUNABLES` is set.
/// Returns only if it is set (or on another platform), or if the new start failed, which is
/// logged: the server then runs without it.
pub fn restart_with_tuning() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt as _;
        if std::env::var_os(TUNABLES).is_some() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let mut command = std::process::Command::new(exe);
        if let Some(arg0) = args.next() {
            command.arg0(arg0);
        }
        let err = command.args(args).env(TUNABLES, SETTING).exec();
        eprintln!(
            "keyholder: could not restart with {TUNABLES}={SETTING} ({err}); running without it"
        );
    }
}
