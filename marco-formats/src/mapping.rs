//! Memory maps of model files, and giving their pages back.
//!
//! Loading reads each tensor once and keeps its own copy (packed for the kernels); the mapped
//! file pages it read would otherwise stay in the process's resident set until the map is
//! dropped, so a 15 GB checkpoint loaded into 15 GB of weights would peak at 30 GB. Releasing
//! each tensor's pages once it is copied keeps the peak near the loaded size; the kernel may
//! keep them in its page cache (a second load reads them from memory, not disk).

use std::ops::Range;

/// Drops the pages of `range` (bytes of `map`) from this process's resident set. A later
/// read of the range faults them in again from the file, so this never changes what is read;
/// on platforms without `madvise` it does nothing.
pub fn release_pages(map: &memmap2::Mmap, range: Range<usize>) {
    let end = range.end.min(map.len());
    if range.start >= end {
        return;
    }
    #[cfg(unix)]
    {
        // SAFETY: the map is a read-only private file mapping, so discarding its pages loses
        // nothing: the next access reads the same bytes from the file. memmap2 widens the
        // range to whole pages.
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, end - range.start) };
    }
}
