//! A phase-fair reader-writer spin lock (the PF-T lock of Brandenburg and Anderson, "Spin-based
//! reader-writer synchronization for multiprocessor real-time systems", 2010).
//!
//! Readers share the lock and writers hold it alone, as with any reader-writer lock; what this
//! one adds is a bound on waiting. Writers take tickets and enter in ticket order. A writer that
//! has its turn announces itself, after which arriving readers wait, and it waits only for the
//! readers already inside. Readers that arrive while a writer waits or holds the lock enter
//! together as soon as that writer leaves, before the next writer. So a writer waits for at most
//! one reader phase per writer ahead of it, and a reader for at most one writer phase: a stream
//! of readers cannot starve a writer (a spin lock without writer preference lets readers that
//! keep overlapping hold a writer off for as long as they like), and a stream of writers cannot
//! starve readers.
//!
//! Portable (core atomics only), so the host tests run it with threads. The one `unsafe` is the
//! access to the protected value, which the protocol makes exclusive or shared as the guard says.

#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

use core::cell::UnsafeCell;
use core::hint::spin_loop;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicU32, Ordering};

/// Readers are counted in `reader_in` and `reader_out` in steps of this; the low byte holds the
/// waiting writer's bits.
const READER: u32 = 0x100;
/// Writer bits: a writer is present...
const WRITER_PRESENT: u32 = 0x2;
/// ...and the low bit of its ticket, so that readers waiting on one writer see the next one as
/// a change.
const WRITER_PHASE: u32 = 0x1;
const WRITER_BITS: u32 = WRITER_PRESENT | WRITER_PHASE;

/// A reader-writer lock in which a writer waits for at most one phase of readers per writer
/// ahead of it, and a reader for at most one writer.
pub struct FairRwLock<T> {
    /// Readers that have entered (times [`READER`]), plus the present writer's bits.
    reader_in: AtomicU32,
    /// Readers that have left (times [`READER`]).
    reader_out: AtomicU32,
    /// Next writer ticket.
    writer_in: AtomicU32,
    /// Writer ticket being served.
    writer_out: AtomicU32,
    value: UnsafeCell<T>,
}

// SAFETY: the lock hands out `&T` to several threads at once (needs `T: Sync`) and `&mut T` to
// one thread at a time (needs `T: Send`), as `std::sync::RwLock` does.
unsafe impl<T: Send + Sync> Sync for FairRwLock<T> {}
// SAFETY: moving the lock moves the value; nothing in it is tied to a thread.
unsafe impl<T: Send> Send for FairRwLock<T> {}

impl<T> FairRwLock<T> {
    /// A lock around `value`.
    pub const fn new(value: T) -> Self {
        FairRwLock {
            reader_in: AtomicU32::new(0),
            reader_out: AtomicU32::new(0),
            writer_in: AtomicU32::new(0),
            writer_out: AtomicU32::new(0),
            value: UnsafeCell::new(value),
        }
    }

    /// Shares the lock, waiting while a writer that arrived earlier waits or holds it.
    pub fn read(&self) -> FairRwLockReadGuard<'_, T> {
        let writer = self.reader_in.fetch_add(READER, Ordering::Acquire) & WRITER_BITS;
        if writer != 0 {
            // Wait for this writer's phase to end (it leaves, or the next writer has its turn:
            // the phase bit differs, and this reader goes before that one).
            while self.reader_in.load(Ordering::Acquire) & WRITER_BITS == writer {
                spin_loop();
            }
        }
        FairRwLockReadGuard { lock: self }
    }

    /// Holds the lock alone, after the writers that came before and the readers already inside.
    pub fn write(&self) -> FairRwLockWriteGuard<'_, T> {
        let ticket = self.writer_in.fetch_add(1, Ordering::Relaxed);
        while self.writer_out.load(Ordering::Acquire) != ticket {
            spin_loop();
        }
        let bits = WRITER_PRESENT | (ticket & WRITER_PHASE);
        // From here arriving readers wait; those already in are counted by `entered`.
        let entered = self.reader_in.fetch_add(bits, Ordering::AcqRel) & !WRITER_BITS;
        while self.reader_out.load(Ordering::Acquire) != entered {
            spin_loop();
        }
        FairRwLockWriteGuard { lock: self }
    }

    /// The value, through exclusive access to the lock (no locking needed).
    pub fn get_mut(&mut self) -> &mut T {
        self.value.get_mut()
    }

    /// The value, the lock taken apart.
    pub fn into_inner(self) -> T {
        self.value.into_inner()
    }

    fn read_unlock(&self) {
        self.reader_out.fetch_add(READER, Ordering::Release);
    }

    fn write_unlock(&self) {
        // Readers that arrived meanwhile go first, then the next writer.
        self.reader_in.fetch_and(!WRITER_BITS, Ordering::Release);
        self.writer_out.fetch_add(1, Ordering::Release);
    }
}

impl<T: Default> Default for FairRwLock<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> core::fmt::Debug for FairRwLock<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FairRwLock").finish_non_exhaustive()
    }
}

/// Shared access to a [`FairRwLock`]'s value, until dropped.
pub struct FairRwLockReadGuard<'a, T> {
    lock: &'a FairRwLock<T>,
}

impl<T> Deref for FairRwLockReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: a read guard exists only between `read` and its drop, during which no writer
        // is inside (a writer enters only when every reader that entered before it has left,
        // and readers arriving while it waits or holds the lock wait), so no `&mut T` exists.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> Drop for FairRwLockReadGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.read_unlock();
    }
}

/// Exclusive access to a [`FairRwLock`]'s value, until dropped.
pub struct FairRwLockWriteGuard<'a, T> {
    lock: &'a FairRwLock<T>,
}

impl<T> Deref for FairRwLockWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: a write guard is alone inside the lock (see `deref_mut`); it lends `&T` for
        // no longer than it is borrowed.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for FairRwLockWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: a write guard exists only between `write` and its drop, during which no other
        // writer is inside (tickets) and no reader is (the ones before it have left, the ones
        // after it wait), so this is the only reference to the value.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for FairRwLockWriteGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.write_unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn readers_share_and_writers_exclude() {
        let lock = Arc::new(FairRwLock::new((0u64, 0u64)));
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|id| {
                let (lock, inside) = (lock.clone(), inside.clone());
                thread::spawn(move || {
                    for i in 0..20_000u64 {
                        if (i + id) % 4 == 0 {
                            let mut value = lock.write();
                            assert_eq!(
                                inside.fetch_add(1, Ordering::SeqCst),
                                0,
                                "a writer is alone"
                            );
                            // Two fields kept equal: a reader that saw a half-written pair
                            // would catch it.
                            value.0 += 1;
                            value.1 += 1;
                            inside.fetch_sub(1, Ordering::SeqCst);
                        } else {
                            let value = lock.read();
                            assert_eq!(value.0, value.1, "no writer inside a reader");
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(lock.read().0, 20_000);
        let two = (lock.read(), lock.read());
        assert_eq!(two.0 .0, two.1 .0, "readers share");
    }

    /// Three readers re-enter without a pause, always overlapping one another, so the lock is
    /// never free. A writer still gets in, after a bounded number of reader sections.
    #[test]
    fn readers_do_not_starve_a_writer() {
        let lock = Arc::new(FairRwLock::new(0u64));
        let sections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (lock, sections, stop) = (lock.clone(), sections.clone(), stop.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _value = lock.read();
                        // A critical section long enough that the readers overlap.
                        thread::sleep(Duration::from_micros(200));
                        sections.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        // Let the readers get going and overlap.
        while sections.load(Ordering::SeqCst) < 30 {
            thread::yield_now();
        }
        let writer = {
            let (lock, sections) = (lock.clone(), sections.clone());
            thread::spawn(move || {
                let mut worst = 0;
                for _ in 0..20 {
                    let before = sections.load(Ordering::SeqCst);
                    *lock.write() += 1;
                    worst = worst.max(sections.load(Ordering::SeqCst) - before);
                }
                worst
            })
        };
        // A lock that lets overlapping readers keep a writer out never lets it finish.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !writer.is_finished() {
            assert!(std::time::Instant::now() < deadline, "the writer starved");
            thread::sleep(Duration::from_millis(1));
        }
        let worst = writer.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            reader.join().unwrap();
        }
        // Each write waits for the sections already inside (one per reader), plus those that
        // end while the writer thread is not running before it takes its ticket: a handful
        // (the bound leaves room for a busy host), not an unbounded run.
        assert!(
            worst <= 3 * 10,
            "a writer waited for {worst} reader sections"
        );
        assert_eq!(*lock.read(), 20);
    }

    #[test]
    fn a_writer_waits_for_the_readers_inside_and_blocks_new_ones() {
        let lock = Arc::new(FairRwLock::new(0u32));
        let first = lock.read();
        let writer = {
            let lock = lock.clone();
            thread::spawn(move || *lock.write() = 1)
        };
        // The writer announces itself and waits for `first`.
        while lock.reader_in.load(Ordering::SeqCst) & WRITER_PRESENT == 0 {
            thread::yield_now();
        }
        let late = {
            let lock = lock.clone();
            thread::spawn(move || *lock.read())
        };
        thread::sleep(Duration::from_millis(20));
        assert!(!writer.is_finished() && !late.is_finished());
        drop(first);
        writer.join().unwrap();
        assert_eq!(
            late.join().unwrap(),
            1,
            "the late reader went after the writer"
        );
    }
}
