//! The `keyholder` command: parses the command line and runs the command (see `keyholder::cli`,
//! one module per command).

/// jemalloc instead of glibc's malloc: glibc raises its mmap threshold to the size of every large
/// block freed, so after the first streamed answers the outbound client's read buffers (up to
/// ~400 KiB each) were carved from per-thread arenas that a hundred concurrent streams fragment,
/// and resident memory stayed at the peak (~65-95 MB after 64 concurrent 1 MiB proxied answers).
/// jemalloc's background thread returns freed pages within a second (`dirty_decay_ms:1000`, set
/// at build time in `.cargo/config.toml`), and its thread caches cost less CPU per call than
/// glibc's arenas (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    keyholder::cli::main()
}
