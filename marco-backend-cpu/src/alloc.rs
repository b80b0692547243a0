//! Weight buffers that ask for transparent huge pages.
//!
//! Decode streams every weight once per token. Where Linux hands out transparent huge pages
//! only on request (`/sys/kernel/mm/transparent_hugepage/enabled` = `madvise`, a common
//! default), anonymous memory gets 4 KiB pages, so streaming gigabytes of weights costs a TLB
//! miss and a page walk every 4 KiB — while a memory-mapped model file (what llama.cpp
//! streams) may sit in the page cache's large folios. Asking for huge pages before the buffer
//! is first written makes the kernel back it with 2 MiB pages where it can. Advisory only: the
//! values are the same either way, and elsewhere nothing is done.

/// An empty vector with room for `len` elements, its memory advised as huge-page backed.
pub(crate) fn with_capacity<T>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    advise(v.as_mut_ptr() as *mut u8, len.saturating_mul(std::mem::size_of::<T>()));
    v
}

/// `len` copies of `value`, the memory advised as huge-page backed before it is written.
pub(crate) fn filled<T: Clone>(len: usize, value: T) -> Vec<T> {
    let mut v = with_capacity(len);
    v.resize(len, value);
    v
}

/// A copy of `data` in advised memory.
pub(crate) fn copied<T: Clone>(data: &[T]) -> Vec<T> {
    let mut v = with_capacity(data.len());
    v.extend_from_slice(data);
    v
}

#[cfg(target_os = "linux")]
fn advise(ptr: *mut u8, bytes: usize) {
    const HUGE: usize = 2 << 20;
    // Only whole huge pages inside the buffer; small buffers are not worth a system call.
    if bytes < 2 * HUGE {
        return;
    }
    let start = (ptr as usize).next_multiple_of(HUGE);
    let end = (ptr as usize).saturating_add(bytes) / HUGE * HUGE;
    if end > start {
        // SAFETY: the range lies inside this process's own allocation; MADV_HUGEPAGE changes
        // how the kernel backs it, never its contents, and failure (no THP support) is harmless.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_ptr: *mut u8, _bytes: usize) {}

#[cfg(test)]
mod tests {
    #[test]
    fn buffers_hold_what_they_are_given() {
        let big = super::filled(5 << 20, 7u8);
        assert_eq!(big.len(), 5 << 20);
        assert!(big.iter().all(|&b| b == 7));
        let data: Vec<u16> = (0..3_000_000u32).map(|i| i as u16).collect();
        assert_eq!(super::copied(&data), data);
        let mut v = super::with_capacity::<f32>(10);
        v.push(1.0);
        assert_eq!(v, [1.0]);
    }
}
