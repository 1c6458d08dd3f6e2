//! mimalloc as the process's malloc, for libtorch's CPU tensors as much as for Rust's own heap
//! (the `#[global_allocator]` itself is declared by the binary).
//!
//! libtorch allocates a CPU tensor with `posix_memalign` and frees it as soon as it dies, so a
//! small model's training step allocates and frees the same activations thousands of times; glibc's
//! malloc spends a visible share of the step on that. PyTorch's CPU tuning guide preloads jemalloc
//! or tcmalloc for this; a Rust `#[global_allocator]` alone would not reach libtorch, which calls
//! malloc directly. mimalloc's `override` feature exports `malloc`, `free`, `posix_memalign`, …
//! from the executable, and the dynamic linker resolves every library's calls to the executable's
//! definitions first, so one allocator serves the whole process with nothing to preload
//! (BENCHMARKS.md, "Allocator").

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (v2 and v3); the Rust bindings leave it out.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory mapped for reuse instead of returning it to the OS shortly after (mimalloc's
/// default): a training step frees and reallocates the same activations every step, and faulting
/// them in again costs a visible share of the step.
/// The process's footprint stays at its peak, which is what a training run holds anyway. A user's
/// `MIMALLOC_PURGE_DELAY` wins.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's documented options, valid at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
    }
}

/// Which allocator owns the memory at `address` (a tensor's data pointer, say): "mimalloc" when
/// the override reached the library that allocated it, "system" otherwise. Benchmarks report it,
/// since a small model's step time depends on the allocator.
pub fn owner_of(address: usize) -> &'static str {
    // SAFETY: a read-only lookup of the address in mimalloc's region map; nothing is dereferenced.
    if unsafe { libmimalloc_sys::mi_is_in_heap_region(address as *const std::ffi::c_void) } {
        "mimalloc"
    } else {
        "system"
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rust_allocations_come_from_mimalloc() {
        let v = vec![0u8; 1 << 20];
        assert_eq!(super::owner_of(v.as_ptr() as usize), "mimalloc");
        let on_stack = 0u64;
        assert_eq!(super::owner_of(&on_stack as *const u64 as usize), "system");
    }
}
