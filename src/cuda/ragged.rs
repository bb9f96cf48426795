//! Attention over a batch of sequences of different lengths, each in its own
//! pages of the shared key/value cache: the descriptors `kernels/attention.cu`
//! reads, built on the host ([`RaggedAttention`]) and copied to the device
//! before the layers run ([`RaggedDevice`]).
//!
//! One launch covers the batch: its grid is every sequence's query tiles ×
//! heads × the batch's most key splits. Each sequence is split as it would be
//! alone ([`AttentionSplit`] of its own shape), so its arithmetic, and its
//! result, do not depend on the other sequences.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use super::driver_error;
use super::kernels::{int, AttentionSplit, ATTENTION_QUERIES};
use crate::error::{Error, Result};

/// One sequence of a batch (kernels/attention.cu `Sequence`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SequenceDesc {
    /// Its first query row in the batch.
    pub q_begin: i32,
    pub queries: i32,
    pub attend_len: i32,
    /// Where its page table starts in the batch's page table.
    pub pages: i32,
    /// Keys per split.
    pub chunk: i32,
    pub splits: i32,
    /// Its first row of the split scratch (when `splits > 1`).
    pub scratch: i32,
}

/// `ATTENTION_QUERIES` queries of one sequence (kernels/attention.cu
/// `QueryTile`): a block of the attention grid.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryTile {
    pub sequence: i32,
    /// Its first query row in the batch.
    pub q0: i32,
}

// SAFETY: plain C structs of 32-bit fields, laid out like the kernel's.
unsafe impl DeviceRepr for SequenceDesc {}
unsafe impl DeviceRepr for QueryTile {}
// SAFETY: all-zero bits are valid values of both.
unsafe impl ValidAsZeroBits for SequenceDesc {}
unsafe impl ValidAsZeroBits for QueryTile {}

/// What attention needs to know of one sequence.
#[derive(Debug, Clone, Copy)]
pub struct SequenceShape<'a> {
    /// Its query rows, which follow the previous sequence's in the batch.
    pub queries: usize,
    /// Slots `0 .. attend_len` of the sequence are attended over.
    pub attend_len: usize,
    /// Its page table: slot `s` is in page `pages[s / page_size]`.
    pub pages: &'a [u32],
}

/// The host side of a batch's attention: descriptors, query tiles, the used
/// part of every sequence's page table, and the launch's extents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaggedAttention {
    pub sequences: Vec<SequenceDesc>,
    pub tiles: Vec<QueryTile>,
    pub page_table: Vec<u32>,
    pub page_size: usize,
    /// Query rows of the whole batch.
    pub queries: usize,
    /// The grid's z extent: the most splits of any sequence.
    pub max_splits: usize,
    /// Scratch rows the split sequences take together.
    pub scratch_rows: usize,
}

impl RaggedAttention {
    /// Lays out `sequences` for a cache of `page_size`-slot pages, splitting
    /// each for a GPU of `sms` multiprocessors as it would be alone.
    pub fn new(
        sequences: &[SequenceShape],
        page_size: usize,
        heads: usize,
        sms: usize,
    ) -> Result<RaggedAttention> {
        let mut plan = RaggedAttention {
            page_size,
            max_splits: 1,
            ..RaggedAttention::default()
        };
        for (i, s) in sequences.iter().enumerate() {
            let used = s.attend_len.div_ceil(page_size.max(1));
            let pages = s.pages.get(..used).ok_or_else(|| {
                Error::Device(format!(
                    "attention: sequence {i} attends over {} slots but has {} pages of {page_size}",
                    s.attend_len,
                    s.pages.len()
                ))
            })?;
            let split = AttentionSplit::new(s.queries, heads, s.attend_len, sms);
            let q_begin = plan.queries;
            let desc = SequenceDesc {
                q_begin: int(q_begin)?,
                queries: int(s.queries)?,
                attend_len: int(s.attend_len)?,
                pages: int(plan.page_table.len())?,
                chunk: int(split.chunk)?,
                splits: int(split.splits)?,
                scratch: int(plan.scratch_rows)?,
            };
            if split.splits > 1 {
                plan.scratch_rows += split.splits * s.queries * heads;
                plan.max_splits = plan.max_splits.max(split.splits);
            }
            plan.page_table.extend_from_slice(pages);
            for q0 in (q_begin..q_begin + s.queries).step_by(ATTENTION_QUERIES) {
                plan.tiles.push(QueryTile {
                    sequence: int(i)?,
                    q0: int(q0)?,
                });
            }
            plan.sequences.push(desc);
            plan.queries += s.queries;
        }
        int(plan.scratch_rows)?;
        Ok(plan)
    }
}

/// A [`RaggedAttention`] on the device, in buffers sized once for a bound on
/// the batch: at most `tokens` sequences and tiles (each has a query), and
/// `pages` page-table entries.
pub struct RaggedDevice {
    /// The plan last uploaded, which the launches describe.
    pub(super) plan: RaggedAttention,
    pub(super) sequences: CudaSlice<SequenceDesc>,
    pub(super) tiles: CudaSlice<QueryTile>,
    pub(super) page_table: CudaSlice<u32>,
}

impl RaggedDevice {
    pub fn new(stream: &Arc<CudaStream>, tokens: usize, pages: usize) -> Result<RaggedDevice> {
        let what = "attention descriptors";
        Ok(RaggedDevice {
            plan: RaggedAttention::default(),
            sequences: stream.alloc_zeros(tokens).map_err(driver_error(what))?,
            tiles: stream.alloc_zeros(tokens).map_err(driver_error(what))?,
            page_table: stream.alloc_zeros(pages).map_err(driver_error(what))?,
        })
    }

    pub fn bytes(tokens: usize, pages: usize) -> usize {
        tokens * (size_of::<SequenceDesc>() + size_of::<QueryTile>()) + pages * 4
    }

    /// Copies `plan` to the device; the attention launches that follow run it.
    pub fn upload(&mut self, stream: &Arc<CudaStream>, plan: &RaggedAttention) -> Result<()> {
        let fits = plan.sequences.len() <= self.sequences.len()
            && plan.tiles.len() <= self.tiles.len()
            && plan.page_table.len() <= self.page_table.len();
        if !fits {
            return Err(Error::Device(format!(
                "attention: a batch of {} sequences, {} query tiles and {} pages exceeds the \
                 descriptor buffers ({}, {}, {})",
                plan.sequences.len(),
                plan.tiles.len(),
                plan.page_table.len(),
                self.sequences.len(),
                self.tiles.len(),
                self.page_table.len()
            )));
        }
        let copy = |e| driver_error("copying attention descriptors to the GPU")(e);
        stream
            .memcpy_htod(
                &plan.sequences,
                &mut self.sequences.slice_mut(..plan.sequences.len()),
            )
            .map_err(copy)?;
        stream
            .memcpy_htod(&plan.tiles, &mut self.tiles.slice_mut(..plan.tiles.len()))
            .map_err(copy)?;
        stream
            .memcpy_htod(
                &plan.page_table,
                &mut self.page_table.slice_mut(..plan.page_table.len()),
            )
            .map_err(copy)?;
        self.plan = plan.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_keep_their_own_splits_and_scratch() {
        // 132 SMs, 32 heads: a cached step (32 queries over 2048 slots) splits
        // five ways alone, and so it does beside a full forward, which does not.
        let (a, b): (Vec<u32>, Vec<u32>) = ((0..128).collect(), vec![200, 7, 130]);
        let plan = RaggedAttention::new(
            &[
                SequenceShape {
                    queries: 32,
                    attend_len: 2048,
                    pages: &a,
                },
                SequenceShape {
                    queries: 40,
                    attend_len: 40,
                    pages: &b,
                },
            ],
            16,
            32,
            132,
        )
        .unwrap();
        let alone = AttentionSplit::new(32, 32, 2048, 132);
        assert_eq!(plan.sequences[0].splits as usize, alone.splits);
        assert_eq!(plan.sequences[1].splits, 1);
        assert_eq!(plan.max_splits, alone.splits);
        assert_eq!(plan.scratch_rows, alone.splits * 32 * 32);
        // Only the pages attended over: 3 of the second sequence's.
        assert_eq!(plan.page_table.len(), 128 + 3);
        assert_eq!(plan.sequences[1].pages, 128);
        assert_eq!(plan.sequences[1].q_begin, 32);
        // Tiles never straddle sequences: 2 + 3.
        let tiles: Vec<(i32, i32)> = plan.tiles.iter().map(|t| (t.sequence, t.q0)).collect();
        assert_eq!(tiles, vec![(0, 0), (0, 16), (1, 32), (1, 48), (1, 64)]);
        assert_eq!(plan.queries, 72);
    }

    #[test]
    fn too_few_pages_is_an_error() {
        let err = RaggedAttention::new(
            &[SequenceShape {
                queries: 1,
                attend_len: 17,
                pages: &[3],
            }],
            16,
            4,
            132,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("attends over 17 slots but has 1 pages"),
            "{err}"
        );
    }
}
