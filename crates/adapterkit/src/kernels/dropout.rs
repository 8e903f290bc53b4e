//! Dropout masks for the fused ops: drawn in parallel blocks, kept as bytes.

use crate::kernels::parallel::par_rows_over;
use crate::rng::SeededRng;

/// Which of `n` elements dropout with probability `p` keeps (1) or drops (0). Blocks of the
/// mask are drawn in parallel, each from its own generator seeded by `key` and the block's
/// index, so the mask depends on `key` alone, not on `threads`. An element is dropped when a
/// 32-bit draw falls below `p * 2^32` (two draws per 64-bit number).
pub fn keep_mask(key: u64, n: usize, p: f32, threads: usize) -> Vec<u8> {
    const BLOCK: usize = 1 << 16;
    let threshold = (p as f64 * (1u64 << 32) as f64) as u64;
    let fill = |index: usize, block: &mut [u8]| {
        let mut rng = SeededRng::new(key ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for pair in block.chunks_mut(2) {
            let bits = rng.next_u64();
            for (k, draw) in pair.iter_mut().zip([bits & 0xffff_ffff, bits >> 32]) {
                *k = (draw >= threshold) as u8;
            }
        }
    };
    let mut keep = vec![0u8; n];
    // Rows of `BLOCK` elements: a thread's range starts at block `first`.
    par_rows_over(threads, &mut keep, BLOCK, |first, range| {
        for (i, block) in range.chunks_mut(BLOCK).enumerate() {
            fill(first + i, block);
        }
    });
    keep
}

/// A drawn dropout mask as bytes (a quarter of a float mask's memory): 1 keeps an element,
/// which is then scaled by `scale`, `1 / (1 - p)`; 0 drops it.
#[derive(Debug, Clone)]
pub struct DropoutMask {
    pub keep: Vec<u8>,
    pub scale: f32,
}

/// Applies `mask`, if there is one, to all of `values`: a fused op's output, or its output
/// gradient in the backward pass.
pub fn apply(mask: Option<&DropoutMask>, values: &mut [f32]) {
    if let Some(mask) = mask {
        mask.apply(0, values);
    }
}

impl DropoutMask {
    /// Multiplies `values` (the mask's elements from `first` on) by what the mask keeps: the
    /// forward pass and, for the output gradient, the backward pass.
    pub fn apply(&self, first: usize, values: &mut [f32]) {
        let keep = &self.keep[first..][..values.len()];
        for (v, k) in values.iter_mut().zip(keep) {
            *v *= *k as f32 * self.scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_does_not_depend_on_the_thread_count() {
        let n = 5 * (1 << 16) + 7; // blocks split unevenly, a last partial block
        let one = keep_mask(11, n, 0.1, 1);
        assert_eq!(one, keep_mask(11, n, 0.1, 3));
        assert_ne!(one, keep_mask(12, n, 0.1, 1), "another key, another mask");
        let dropped = one.iter().filter(|k| **k == 0).count() as f64 / n as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped {dropped}");
    }
}
