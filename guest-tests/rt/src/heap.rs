//! A small heap for `alloc` (formatted messages, vectors), carved from .bss.

use core::cell::UnsafeCell;

use buddy_system_allocator::LockedHeap;

const HEAP_SIZE: usize = 256 * 1024;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; HEAP_SIZE]>);

// SAFETY: the arena is handed to the allocator once, in `init`, and never touched directly again.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; HEAP_SIZE]));

#[global_allocator]
static HEAP: LockedHeap<32> = LockedHeap::empty();

/// Gives the arena to the allocator (boot CPU, once, before any allocation).
pub(crate) fn init() {
    // SAFETY: `init` runs once at boot; the arena is a static region nothing else uses.
    unsafe { HEAP.lock().init(ARENA.0.get() as usize, HEAP_SIZE) };
}
