//! The fuzz targets' bodies, one function per parser of outside input. `fuzz_targets/*.rs` hand
//! them libFuzzer's inputs; `runtime/tests/fuzz_regressions.rs` includes `targets.rs` and replays
//! the committed corpus and every past crasher through the same functions on every `cargo test`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;

pub mod targets;

/// No parser may make one allocation this large from a fuzzed input of at most 64 KiB: every size
/// it allocates for must be bounded by the input's real length or by a [`t2i_rt::Limits`] field.
const MAX_ALLOCATION: usize = 512 << 20;

/// The system allocator, aborting (a crash libFuzzer records) on any allocation over
/// [`MAX_ALLOCATION`]: an unbounded allocation shows up as a finding even where the machine could
/// have served it.
struct Capped;

fn check(size: usize) {
    if size > MAX_ALLOCATION {
        // Stderr is unbuffered: this writes without allocating.
        let _ = std::io::stderr().write_all(b"t2i-rt-fuzz: an allocation over 512 MiB (unbounded by the input)\n");
        std::process::abort();
    }
}

// SAFETY: every call is forwarded unchanged to `System`, after a size check that only aborts.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;
