//! The hypervisor's heap: the reserved RAM after its image, stacks and boot tables.

use buddy_system_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap<33> = LockedHeap::empty();

unsafe extern "C" {
    static __heap_start: u8;
}

/// Hands `[__heap_start, end)` to the allocator.
///
/// # Safety
/// Call once, with `end` the end of RAM reserved for the hypervisor.
pub unsafe fn init(end: u64) {
    // SAFETY: taking a linker symbol's address reads nothing.
    let start = unsafe { &__heap_start as *const u8 as usize };
    // SAFETY: the range is RAM the hypervisor reserves and nothing else uses (caller's contract).
    unsafe { HEAP.lock().init(start, end as usize - start) };
}

/// Bytes handed out and total, for the boot log.
pub fn usage() -> (usize, usize) {
    let heap = HEAP.lock();
    (heap.stats_alloc_actual(), heap.stats_total_bytes())
}
