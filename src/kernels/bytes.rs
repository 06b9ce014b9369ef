//! The bytes the kernels read: a tensor's bytes borrowed from the mapped model file or
//! held in memory, and zeroed plain-data vectors backed by huge pages where possible.

use std::sync::Arc;

/// A tensor's bytes as stored: borrowed from the mapped model file, or read into memory.
pub enum TensorBytes {
    Mapped {
        map: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Vec<u8>),
}

impl std::ops::Deref for TensorBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            TensorBytes::Mapped { map, start, len } => &map[*start..*start + *len],
            TensorBytes::Owned(v) => v,
        }
    }
}

/// A vector of `count` all-zero values, its memory untouched until written, advised
/// for huge pages.
///
/// # Safety
/// `T` must be plain data for which every bit pattern, all-zero included, is valid.
pub unsafe fn zeroed_plain<T>(count: usize) -> Vec<T> {
    if count == 0 || std::mem::size_of::<T>() == 0 {
        return Vec::new();
    }
    let layout = std::alloc::Layout::array::<T>(count).expect("tensor size overflows");
    // The vector takes the allocation with the layout it was made with.
    let mut v = unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut T;
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Vec::from_raw_parts(ptr, count, count)
    };
    advise_huge_pages(unsafe { as_bytes_mut(&mut v) });
    v
}

/// The bytes of a slice of plain data.
///
/// # Safety
/// `T` must be plain data without padding for which every bit pattern is valid.
pub unsafe fn as_bytes_mut<T>(v: &mut [T]) -> &mut [u8] {
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

/// Asks the kernel to back a large, still untouched allocation with 2 MiB pages: filling
/// a gigabyte of weights then takes a few hundred page faults instead of a quarter of a
/// million, which was most of the load time. A no-op where transparent huge pages are
/// off.
fn advise_huge_pages(bytes: &mut [u8]) {
    if bytes.is_empty() {
        return;
    }
    const HUGE: usize = 2 << 20;
    let start = (bytes.as_ptr() as usize).next_multiple_of(HUGE);
    let end = (bytes.as_ptr() as usize + bytes.len()) & !(HUGE - 1);
    if end > start {
        // SAFETY: the range lies inside `bytes`; MADV_HUGEPAGE changes no contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}
