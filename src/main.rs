//! `aliyun-sms-worker`: every command lives in [`aliyun_sms_worker::cli`].

/// jemalloc rather than glibc's allocator, which took a quarter of the worker's CPU at full
/// rate (docs/profile.md): with jemalloc the worker spends about a third less CPU per job.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Freed pages are purged after a second (jemalloc keeps them ten by default; the purge runs
/// as the allocator is used, so a worker that falls idle keeps them until its next jobs), so
/// the pages of one burst are reused or returned before the next one adds its own.
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &[u8; 37] = b"dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> std::process::ExitCode {
    aliyun_sms_worker::cli::main()
}
