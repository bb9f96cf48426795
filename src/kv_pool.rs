//! The key/value cache as a pool of fixed-size pages shared by all sequences.
//!
//! A backend allocates the pool's memory once ([`Backend::allocate_cache`]);
//! this is its bookkeeping: which pages are free. A sequence takes the pages
//! for all its slots when it is admitted and returns them when it finishes or
//! is cancelled. A diffusion request knows its length up front (prompt plus
//! generation), so taking them all at once costs nothing in capacity and means
//! a running sequence never waits for memory or needs preempting. Pages of one
//! size cannot fragment: any free page serves any sequence.
//!
//! [`Backend::allocate_cache`]: crate::backend::Backend::allocate_cache

use crate::backend::CacheLayout;

/// Slots per page: small enough that a sequence wastes under a page, large
/// enough that page tables stay short (a 4096-slot sequence has 256 pages).
pub const PAGE_SIZE: usize = 16;

#[derive(Debug)]
pub struct PagePool {
    layout: CacheLayout,
    /// Free pages, the lowest on top.
    free: Vec<u32>,
}

impl PagePool {
    pub fn new(layout: CacheLayout) -> PagePool {
        PagePool {
            layout,
            free: (0..layout.pages as u32).rev().collect(),
        }
    }

    pub fn layout(&self) -> CacheLayout {
        self.layout
    }

    /// Pages a sequence of `slots` slots needs.
    pub fn pages_for(&self, slots: usize) -> usize {
        slots.div_ceil(self.layout.page_size)
    }

    /// Whether a sequence of `slots` slots fits the pool when it is empty.
    pub fn can_ever_hold(&self, slots: usize) -> bool {
        self.pages_for(slots) <= self.layout.pages
    }

    /// The page table of a new sequence of `slots` slots, or `None` while
    /// too few pages are free.
    pub fn allocate(&mut self, slots: usize) -> Option<Vec<u32>> {
        let need = self.pages_for(slots);
        let keep = self.free.len().checked_sub(need)?;
        let mut pages = self.free.split_off(keep);
        pages.reverse();
        Some(pages)
    }

    /// Returns a finished sequence's pages.
    pub fn release(&mut self, pages: Vec<u32>) {
        debug_assert!(pages.iter().all(|p| !self.free.contains(p)));
        self.free.extend(pages);
        // Keep handing out low pages first, so a lightly used pool stays compact.
        self.free.sort_unstable_by(|a, b| b.cmp(a));
    }

    pub fn pages_in_use(&self) -> usize {
        self.layout.pages - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(pages: usize) -> PagePool {
        PagePool::new(CacheLayout {
            pages,
            page_size: 4,
        })
    }

    #[test]
    fn sequences_take_whole_pages_and_give_them_back() {
        let mut pool = pool(5);
        let a = pool.allocate(9).unwrap(); // 3 pages
        assert_eq!(a, vec![0, 1, 2]);
        assert_eq!(pool.pages_in_use(), 3);
        assert_eq!(pool.allocate(9), None, "2 pages left");
        let b = pool.allocate(8).unwrap();
        assert_eq!(b, vec![3, 4]);
        pool.release(a);
        let c = pool.allocate(12).unwrap();
        assert_eq!(c, vec![0, 1, 2]);
        pool.release(b);
        pool.release(c);
        assert_eq!(pool.pages_in_use(), 0);
    }

    #[test]
    fn a_sequence_larger_than_the_pool_can_never_fit() {
        let pool = pool(2);
        assert!(pool.can_ever_hold(8));
        assert!(!pool.can_ever_hold(9));
    }
}
