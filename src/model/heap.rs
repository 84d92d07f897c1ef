//! The process heap (glibc). ONNX Runtime allocates through `malloc`. Buffers above glibc's
//! mmap threshold get a mapping of their own, which `free` hands back to the system; smaller
//! ones come from heaps that keep freed memory resident for reuse. The threshold starts at
//! 128 KiB and rises to each freed mapping's size (at most 32 MiB), so after a few batches a
//! worker's activations all live in the heaps. On a worker that holds a model for days that
//! kept memory was most of what sat above the weights (README "Performance").
//!
//! A `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or `GLIBC_TUNABLES` in the environment
//! wins: the thresholds are then left alone. Elsewhere than glibc these do nothing.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tuned_by_environment() -> bool {
    [
        "MALLOC_MMAP_THRESHOLD_",
        "MALLOC_TRIM_THRESHOLD_",
        "GLIBC_TUNABLES",
    ]
    .iter()
    .any(|k| std::env::var_os(k).is_some())
}

/// Every buffer of 128 KiB or more in a mapping of its own, for a model load: the parsed
/// model's and the repacking's transient copies then go straight back to the system. Loading
/// a 335 MiB ViT-B/32 peaked at 410–420 MiB resident so, against 500–600 MiB in the heaps
/// (where the peak varied with the order in which ONNX Runtime's hash maps visit weights).
pub fn map_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if !tuned_by_environment() {
        // SAFETY: mallopt only changes a glibc tunable.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        }
    }
}

/// After a load: buffers up to 32 MiB from the heaps again, kept while the top of a heap
/// holds less than 64 MiB free. These are the values glibc's own adjustment settles at on
/// a busy worker (setting a threshold turns that adjustment off); lower ones cost the
/// encoder 5–8% in page faults.
pub fn reuse_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if !tuned_by_environment() {
        // SAFETY: mallopt only changes glibc tunables.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 64 * 1024 * 1024);
        }
    }
}

/// Hands the heaps' free pages back to the system (`malloc_trim`). Costs a walk over the free
/// chunks and, later, a page fault for each page used again.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
