//! The allocator's memory during one-time work. The binary keeps freed memory for reuse
//! (mimalloc's purge delay off: training frees and re-allocates the same large buffers every step,
//! and returning them made a quarter of the CPU time page zeroing). Loading a backbone and merging
//! adapters free buffers of every size once (a weight as read, before it is packed), which would
//! then stay resident beside the model: [`releasing`] returns freed memory at once while it runs.
//! Between phases whose buffers differ in size (a training step's activations, then validation's
//! KV caches) [`trim`] gives back what the first phase freed, so the second does not sit beside it.

/// mimalloc's `purge_delay` option (`mi_option_purge_delay` in mimalloc.h).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Runs `f` with freed memory returned to the OS at once, then restores the purge delay.
/// Harmless where mimalloc is not the global allocator (it sets an option of an unused heap).
pub fn releasing<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: reading and setting a process-wide allocator option; mimalloc allows it at any time.
    let before = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    struct Restore(std::os::raw::c_long);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: as above; collecting frees what the calling thread's heap holds unused.
            unsafe {
                libmimalloc_sys::mi_collect(true);
                libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, self.0);
            }
        }
    }
    let _restore = Restore(before);
    f()
}

/// Returns the memory freed so far to the OS, on this thread and every rayon worker (each holds
/// the pages its own frees left), then keeps the purge delay as it was.
pub fn trim() {
    releasing(|| {
        rayon::broadcast(|_| {
            // SAFETY: collects the calling worker's own heap; mimalloc allows it at any time.
            unsafe { libmimalloc_sys::mi_collect(true) }
        });
    })
}
