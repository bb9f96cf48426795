//! Which positions a block's forward passes see (DESIGN §3.4).
//!
//! Without pruning, every position. With a suffix window, the prefix up to the
//! block's end, the first `window` positions after it, and the last `tail`
//! positions of the sequence, each at its true position. Cache slot `i` holds
//! position `kept[i]`; since the prefix is contiguous, a block's slots equal
//! its positions.

/// Positions kept for the block ending at `block_end` in a sequence of `len`.
pub fn kept_positions(
    block_end: usize,
    len: usize,
    window: Option<usize>,
    tail: usize,
) -> Vec<u32> {
    let suffix = len - block_end;
    let mut kept: Vec<u32> = (0..block_end as u32).collect();
    match window {
        Some(window) if suffix > window => {
            kept.extend(block_end as u32..(block_end + window) as u32);
            let tail = tail.min(suffix - window);
            kept.extend((len - tail) as u32..len as u32);
        }
        _ => kept.extend(block_end as u32..len as u32),
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_window_keeps_everything() {
        assert_eq!(kept_positions(4, 7, None, 1), vec![0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn window_and_tail_keep_true_positions() {
        assert_eq!(kept_positions(3, 12, Some(2), 1), vec![0, 1, 2, 3, 4, 11]);
        assert_eq!(
            kept_positions(3, 12, Some(2), 3),
            vec![0, 1, 2, 3, 4, 9, 10, 11]
        );
    }

    #[test]
    fn window_longer_than_suffix_keeps_the_suffix_once() {
        assert_eq!(kept_positions(3, 6, Some(8), 1), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(kept_positions(3, 6, Some(3), 1), vec![0, 1, 2, 3, 4, 5]);
        // One position past the window: it is the tail.
        assert_eq!(kept_positions(3, 7, Some(3), 1), vec![0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn last_block_has_no_suffix() {
        assert_eq!(kept_positions(5, 5, Some(2), 1), vec![0, 1, 2, 3, 4]);
    }
}
