//! How the process's heap treats large buffers. Encoding and decoding a
//! tensor allocate a few buffers of its size and free them before the next
//! tensor; glibc's malloc serves every one above its mmap threshold (128 KiB
//! at first) with fresh pages from the kernel and returns them on free, so
//! each tensor paid a page fault per 4 KiB of every buffer, a quarter of the
//! time of the rotated methods. Kept in the heap, they are reused.

/// Largest threshold glibc accepts on 64-bit (`DEFAULT_MMAP_THRESHOLD_MAX`):
/// buffers up to 32 MiB come from the heap and stay there when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Freed memory at the top of the heap kept for reuse instead of trimmed:
/// a process's peak stays its peak until it exits, which a one-shot
/// compressor does soon.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// Keeps freed buffers of up to 32 MiB in the heap for the next tensor.
/// Call once at start-up, before any thread exists; elsewhere than glibc
/// it does nothing.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's parameters; it is called
    // before any other thread could allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
