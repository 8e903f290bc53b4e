//! Dropout masks for the fused ops: drawn in parallel blocks, kept as bits.

use crate::kernels::parallel::par_rows_over;
use crate::kernels::simd::with_wide_simd;
use crate::rng::SeededRng;

/// Elements of a mask drawn by one generator.
const BLOCK: usize = 1 << 16;

/// Which of `n` elements dropout with probability `p` keeps: bit `i % 64` of word `i / 64` is
/// 1 where element `i` is kept. Blocks of the mask are drawn in parallel, each from its own
/// generator seeded by `key` and the block's index, so the mask depends on `key` alone, not
/// on `threads`. An element is dropped when a 32-bit draw falls below `p * 2^32` (two draws
/// per 64-bit number).
pub fn keep_mask(key: u64, n: usize, p: f32, threads: usize) -> Vec<u64> {
    const WORDS: usize = BLOCK / 64;
    let threshold = (p as f64 * (1u64 << 32) as f64) as u64;
    let fill = |index: usize, words: &mut [u64]| {
        let mut rng = SeededRng::new(key ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let elements = (n - index * BLOCK).min(BLOCK);
        for (w, word) in words.iter_mut().enumerate() {
            let count = (elements - 64 * w).min(64);
            let mut bits = 0u64;
            for pair in 0..count.div_ceil(2) {
                let draws = rng.next_u64();
                let kept = [draws & 0xffff_ffff, draws >> 32].map(|d| (d >= threshold) as u64);
                bits |= kept[0] << (2 * pair);
                if 2 * pair + 1 < count {
                    bits |= kept[1] << (2 * pair + 1);
                }
            }
            *word = bits;
        }
    };
    let mut keep = vec![0u64; n.div_ceil(64)];
    // Rows of a block's words: a thread's range starts at block `first`.
    par_rows_over(threads, &mut keep, WORDS, |first, range| {
        for (i, words) in range.chunks_mut(WORDS).enumerate() {
            fill(first + i, words);
        }
    });
    keep
}

/// Whether `bits` (a [`keep_mask`]) keeps element `i`.
fn keeps(bits: &[u64], i: usize) -> bool {
    (bits[i / 64] >> (i % 64)) & 1 == 1
}

/// A drawn dropout mask as bits (a 32nd of a float mask's memory): a kept element is scaled by
/// `scale`, `1 / (1 - p)`; a dropped one is multiplied by 0.
#[derive(Debug, Clone)]
pub struct DropoutMask {
    /// As [`keep_mask`] gives them.
    pub bits: Vec<u64>,
    pub scale: f32,
}

/// Applies `mask`, if there is one, to all of `values`: a fused op's output, or its output
/// gradient in the backward pass.
pub fn apply(mask: Option<&DropoutMask>, values: &mut [f32]) {
    if let Some(mask) = mask {
        mask.apply(0, values);
    }
}

/// `values[64 w + j] *= bit j of bits[w] * scale`.
#[inline(always)]
fn apply_words_kernel(bits: &[u64], scale: f32, values: &mut [f32]) {
    for (chunk, &word) in values.chunks_mut(64).zip(bits) {
        for (j, v) in chunk.iter_mut().enumerate() {
            *v *= ((word >> j) & 1) as f32 * scale;
        }
    }
}

with_wide_simd!(apply_words => apply_words_kernel(bits: &[u64], scale: f32, values: &mut [f32]));

impl DropoutMask {
    /// Multiplies `values` (the mask's elements from `first` on) by what the mask keeps: the
    /// forward pass and, for the output gradient, the backward pass.
    pub fn apply(&self, first: usize, values: &mut [f32]) {
        // One by one up to a word's start, then a word at a time.
        let head = ((64 - first % 64) % 64).min(values.len());
        let (head_values, rest) = values.split_at_mut(head);
        for (i, v) in head_values.iter_mut().enumerate() {
            *v *= keeps(&self.bits, first + i) as u8 as f32 * self.scale;
        }
        if !rest.is_empty() {
            apply_words(&self.bits[(first + head) / 64..], self.scale, rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_does_not_depend_on_the_thread_count() {
        let n = 5 * BLOCK + 7; // blocks split unevenly, a last partial block
        let one = keep_mask(11, n, 0.1, 1);
        assert_eq!(one, keep_mask(11, n, 0.1, 3));
        assert_ne!(one, keep_mask(12, n, 0.1, 1), "another key, another mask");
        let kept = one.iter().map(|w| w.count_ones() as usize).sum::<usize>();
        let dropped = (n - kept) as f64 / n as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped {dropped}");
        assert_eq!(one.last().map(|w| w >> 7), Some(0), "no bits past the end");
    }

    /// `apply` from any first element, over any length, is the mask bit by bit.
    #[test]
    fn apply_is_the_mask_bit_by_bit() {
        let n = 1000;
        let mask = DropoutMask {
            bits: keep_mask(3, n, 0.4, 2),
            scale: 2.5,
        };
        for (first, len) in [(0, n), (0, 64), (5, 200), (64, 100), (130, 3), (999, 1)] {
            let mut values: Vec<f32> = (0..len).map(|i| i as f32 + 1.0).collect();
            mask.apply(first, &mut values);
            for (i, v) in values.iter().enumerate() {
                let kept = keeps(&mask.bits, first + i);
                let expected = if kept { (i as f32 + 1.0) * 2.5 } else { 0.0 };
                assert_eq!(*v, expected, "element {} from {first}", first + i);
            }
        }
    }
}
