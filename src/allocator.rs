//! glibc malloc settings for libtorch's CPU tensors.
//!
//! libtorch allocates CPU tensors with `posix_memalign` and frees them as soon as they die, so a
//! training step allocates and frees the same few-hundred-KiB activations thousands of times. With
//! glibc's defaults, blocks above the (dynamic) mmap threshold are fresh `mmap`s and the top of the
//! heap is trimmed back to the OS, so the next step touches new pages again: ~4,000 page faults per
//! dit-tiny step, ~10% of the step on a 2-core VM (BENCHMARKS.md, "Demo … session 6"). A fixed 32 MiB
//! mmap threshold (larger than any one activation of the models up to dit-bench) and a 256 MiB trim
//! threshold keep those blocks in the heap for reuse; fixing either also turns off glibc's dynamic
//! threshold. PyTorch's CPU tuning guide gets the same effect by preloading jemalloc or tcmalloc; a
//! Rust global allocator cannot, since libtorch does not allocate through it.

/// Applies the settings unless the user chose their own (glibc's `MALLOC_*` variables, glibc
/// tunables, or a preloaded allocator). Returns whether glibc accepted them; false elsewhere.
pub fn tune_for_tensors() -> bool {
    let user_chose = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD"]
        .iter()
        .any(|name| std::env::var_os(name).is_some());
    !user_chose && set_thresholds()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> bool {
    const MMAP_THRESHOLD: libc::c_int = 32 << 20;
    const TRIM_THRESHOLD: libc::c_int = 256 << 20;
    // SAFETY: mallopt only changes allocator parameters; it is called before any thread starts
    // allocating tensors, and glibc validates the values (returning 0 on rejection).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    #[test]
    fn glibc_accepts_the_thresholds() {
        // mallopt reports rejected values by returning 0 (older glibc rejected mmap thresholds
        // above 32 MiB); a rejected setting would silently leave the defaults in place.
        assert!(super::set_thresholds());
    }
}
