//! A global allocator for tests that pin allocations on a hot path: it forwards to the system
//! allocator and, while switched on for the current thread, counts that thread's allocations.
//! Only the measuring thread is counted, so other tests of the same binary running at the same
//! time do not disturb the counts. Included with `#[path]` by the test binaries that need it
//! (each binary has one global allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static LARGE_BYTES: Cell<usize> = const { Cell::new(usize::MAX) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    static ALLOCATED_BYTES: Cell<u64> = const { Cell::new(0) };
    static LARGE: Cell<u64> = const { Cell::new(0) };
}

/// What the thread allocated while counting was on.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub allocations: u64,
    pub bytes: u64,
    /// Allocations of at least the `large_bytes` given to [`start`].
    pub large: u64,
}

/// Resets this thread's counts and starts counting; an allocation of at least `large_bytes` is
/// also counted as large.
pub fn start(large_bytes: usize) {
    ALLOCATIONS.with(|n| n.set(0));
    ALLOCATED_BYTES.with(|b| b.set(0));
    LARGE.with(|n| n.set(0));
    LARGE_BYTES.with(|l| l.set(large_bytes));
    COUNTING.with(|on| on.set(true));
}

/// Stops counting and returns what was counted since [`start`].
pub fn stop() -> Counts {
    COUNTING.with(|on| on.set(false));
    Counts {
        allocations: ALLOCATIONS.with(Cell::get),
        bytes: ALLOCATED_BYTES.with(Cell::get),
        large: LARGE.with(Cell::get),
    }
}

fn note(bytes: usize) {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
            ALLOCATED_BYTES.with(|b| b.set(b.get() + bytes as u64));
            if bytes >= LARGE_BYTES.with(Cell::get) {
                LARGE.with(|n| n.set(n.get() + 1));
            }
        }
    });
}

// SAFETY: forwards to the system allocator; the counters are const-initialised thread-locals
// without destructors, so touching them never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;
