//! A global allocator for the test binary that can cap what one thread holds: inside
//! `with_cap`, an allocation that would take the thread's live bytes over the cap fails,
//! which aborts the process (a loud failure of the test that asked for too much). Outside
//! `with_cap` it is the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    static CAP: Cell<Option<usize>> = const { Cell::new(None) };
    static LIVE: Cell<usize> = const { Cell::new(0) };
}

pub struct Capped;

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let over = CAP
            .try_with(|c| c.get())
            .ok()
            .flatten()
            .is_some_and(|cap| LIVE.with(|l| l.get()).saturating_add(layout.size()) > cap);
        if over {
            eprintln!(
                "alloc_cap: an allocation of {} bytes goes over the cap",
                layout.size()
            );
            return std::ptr::null_mut();
        }
        let _ = LIVE.try_with(|l| l.set(l.get().saturating_add(layout.size())));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(layout.size())));
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Capped = Capped;

/// Runs `f` with this thread's live allocations capped at `cap` bytes more than now.
pub fn with_cap<T>(cap: usize, f: impl FnOnce() -> T) -> T {
    let base = LIVE.with(|l| l.get());
    CAP.with(|c| c.set(Some(base.saturating_add(cap))));
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            CAP.with(|c| c.set(None));
        }
    }
    let _reset = Reset;
    f()
}
