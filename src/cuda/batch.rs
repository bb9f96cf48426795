//! A batch of forward passes as the device runs it: the passes' rows
//! concatenated in order, every row's physical cache slot resolved through
//! its sequence's page table, and attention's description of the sequences.
//! Everything here is host work done before the layers' launches, so the
//! launches themselves depend only on the batch's [`Step`].

use std::ops::Range;

use super::buffers::Capacity;
use super::graphs::Step;
use super::ragged::{RaggedAttention, SequenceShape};
use crate::backend::{CacheLayout, ForwardPass};
use crate::error::{Error, Result};

pub struct Batch {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// The physical cache slot each row writes.
    pub slots: Vec<u32>,
    /// Each pass's rows whose output is wanted, as rows of the batch.
    pub wanted: Vec<Range<usize>>,
    pub attention: RaggedAttention,
    pub step: Step,
}

impl Batch {
    /// Lays out `passes`, which [`ForwardPass::validate_batch`] accepted for
    /// `layout`, for a model of `vocab` tokens and `heads` query heads on a
    /// GPU of `sms` multiprocessors.
    pub fn new(
        passes: &[ForwardPass],
        layout: &CacheLayout,
        vocab: usize,
        heads: usize,
        sms: usize,
    ) -> Result<Batch> {
        let rows: usize = passes.iter().map(|p| p.tokens.len()).sum();
        let mut batch = Batch {
            tokens: Vec::with_capacity(rows),
            positions: Vec::with_capacity(rows),
            slots: Vec::with_capacity(rows),
            wanted: Vec::with_capacity(passes.len()),
            attention: RaggedAttention::default(),
            step: Step {
                sequences: Vec::with_capacity(passes.len()),
            },
        };
        for pass in passes {
            if let Some(&bad) = pass.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::invalid(format!(
                    "token id {bad} is outside the vocabulary of {vocab} entries"
                )));
            }
            let first = batch.tokens.len();
            batch
                .wanted
                .push(first + pass.rows.start..first + pass.rows.end);
            batch.tokens.extend_from_slice(pass.tokens);
            batch.positions.extend_from_slice(pass.positions);
            for slot in pass.write_slot..pass.write_slot + pass.tokens.len() {
                // Below layout.slots(), which the kernels' 32-bit indices hold.
                batch
                    .slots
                    .push(pass.physical_slot(slot, layout.page_size) as u32);
            }
            batch
                .step
                .sequences
                .push((pass.tokens.len(), pass.attend_len));
        }
        let shapes: Vec<SequenceShape> = passes
            .iter()
            .map(|p| SequenceShape {
                queries: p.tokens.len(),
                attend_len: p.attend_len,
                pages: p.pages,
            })
            .collect();
        batch.attention = RaggedAttention::new(&shapes, layout.page_size, heads, sms)?;
        Ok(batch)
    }

    /// What the activations must hold to run this batch.
    pub fn need(&self) -> Capacity {
        Capacity {
            tokens: self.tokens.len(),
            scratch_rows: self.attention.scratch_rows,
            pages: self.attention.page_table.len(),
        }
    }

    /// Rows whose output is wanted, all passes together.
    pub fn wanted_rows(&self) -> usize {
        self.wanted.iter().map(|r| r.len()).sum()
    }

    /// `per_row` values of each wanted row, in pass order, split per pass.
    pub fn per_pass<T>(&self, mut values: Vec<T>, per_row: usize) -> Vec<Vec<T>> {
        let mut out = Vec::with_capacity(self.wanted.len());
        for rows in self.wanted.iter().rev() {
            out.push(values.split_off(values.len() - rows.len() * per_row));
        }
        out.reverse();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_write_their_own_pages_and_outputs_come_back_per_pass() {
        let layout = CacheLayout {
            pages: 8,
            page_size: 4,
        };
        let a = ForwardPass {
            tokens: &[1, 2, 3],
            positions: &[4, 5, 6],
            write_slot: 3,
            attend_len: 8,
            rows: 1..3,
            pages: &[6, 2],
        };
        let b = ForwardPass {
            tokens: &[9],
            positions: &[0],
            write_slot: 0,
            attend_len: 1,
            rows: 0..1,
            pages: &[5],
        };
        let batch = Batch::new(&[a, b.clone()], &layout, 10, 2, 132).unwrap();
        // Slot 3 is the last of page 6; 4 and 5 open page 2.
        assert_eq!(batch.slots, vec![27, 8, 9, 20]);
        assert_eq!(batch.wanted, vec![1..3, 3..4]);
        assert_eq!(batch.step.sequences, vec![(3, 8), (1, 1)]);
        assert_eq!(batch.need().tokens, 4);
        assert_eq!(
            batch.per_pass(vec![10, 11, 12, 13, 14, 15], 2),
            vec![vec![10, 11, 12, 13], vec![14, 15]]
        );
        let bad = ForwardPass { tokens: &[10], ..b };
        let err = Batch::new(&[bad], &layout, 10, 2, 132).err().unwrap();
        assert!(err.to_string().contains("token id 10"), "{err}");
    }
}
