//! bf16 matrix products of frozen weights, summed in f32: `x W^T` with `W` rounded to bf16
//! (round to nearest even), what `--dtype bf16` runs the frozen blocks' Linears on
//! (`model::precision`). The weight is packed once ([`PackedBf16`]); rows are split over
//! threads, and the product dispatches at run time to `vdpbf16ps` (AVX-512 BF16: each
//! instruction multiplies 32 pairs of bf16 and adds them into 16 f32 sums), which takes the
//! input rounded to bf16 too. Elsewhere f32's Linear runs on the weight widened from its bf16
//! values and the input as it is: rounding the input there would cost a pass over it (7% of
//! the product, measured) to buy nothing but the instruction's loss, so the fallback costs
//! what f32 costs and its results lie nearer f32's (docs/BENCHMARKS.md).

use half::bf16;

use crate::kernels::matmul::linear_forward;
use crate::kernels::panels::LANES;
use crate::kernels::parallel::{par_vec, ROW};

/// A weight `[n, k]` (a Linear's, out x in) in bf16, laid out for [`linear`].
pub struct PackedBf16 {
    n: usize,
    k: usize,
    n_padded: usize,
    pairs: usize,
    layout: Layout,
}

enum Layout {
    /// For `vdpbf16ps`: panels of 16 output columns, each `[k/2][16][2]` (for each pair of
    /// input positions `2p, 2p + 1` and each of the panel's columns, the two values side by
    /// side), so that a panel is read contiguously; `k` padded to even and `n` to a multiple
    /// of 16 with zeros.
    Panels(Vec<u16>),
    /// For the fallback: the weight's bf16 values as bits, row-major `[n, k]`, widened to f32
    /// for each product (a pass over the weight, where the product makes `m` of them).
    Bits(Vec<u16>),
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "PackedBf16 [{}, {}]", self.n, self.k)
    }
}

/// `x` rounded to bf16 (nearest, ties to even), as bits.
fn bits(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

impl PackedBf16 {
    /// Packs `weight`, row-major `[n, k]`, for the path this CPU takes.
    pub fn pack(weight: &[f32], n: usize, k: usize) -> Self {
        Self::pack_for(weight, n, k, avx512_bf16())
    }

    /// [`pack`](Self::pack) in panels (`panels`) or as bf16 bits, row-major.
    fn pack_for(weight: &[f32], n: usize, k: usize, panels: bool) -> Self {
        assert_eq!(weight.len(), n * k, "a weight of {n} x {k}");
        let (pairs, n_padded) = (k.div_ceil(2), n.div_ceil(LANES) * LANES);
        let layout = if panels {
            let mut data = vec![0u16; pairs * n_padded * 2];
            for j in 0..n {
                let (panel, lane) = (j / LANES, j % LANES);
                for i in 0..k {
                    data[Self::at(pairs, panel, i / 2, lane) + i % 2] = bits(weight[j * k + i]);
                }
            }
            Layout::Panels(data)
        } else {
            Layout::Bits(weight.iter().map(|&w| bits(w)).collect())
        };
        Self {
            n,
            k,
            n_padded,
            pairs,
            layout,
        }
    }

    /// Where pair `p` of column `lane` of panel `panel` starts in the panels.
    fn at(pairs: usize, panel: usize, p: usize, lane: usize) -> usize {
        ((panel * pairs + p) * LANES + lane) * 2
    }
}

/// A row of `x` as bf16 pairs: `pairs[p]` holds positions `2p` (low half) and `2p + 1`.
fn pair(row: &[f32], p: usize) -> u32 {
    let low = bits(row[2 * p]) as u32;
    let high = row.get(2 * p + 1).map_or(0, |&v| bits(v)) as u32;
    low | (high << 16)
}

/// `x W^T + bias`, `x` row-major `[m, k]`, as a new `[m, n]` matrix, the weight in bf16 and
/// the products summed in f32; on `vdpbf16ps` the input rounded to bf16 too (a pair of
/// products at a time, as the instruction sums them). On panels each block of rows is zeroed
/// and written by its own thread (`par_vec`; a serial zero-fill first cost a tenth of a bf16
/// forward pass).
pub fn linear(x: &[f32], m: usize, w: &PackedBf16, bias: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), m * w.k, "x of {m} x {}", w.k);
    assert_eq!(bias.len(), w.n, "a bias of {}", w.n);
    match &w.layout {
        // SAFETY: panels are made only where the CPU has the instructions.
        #[cfg(target_arch = "x86_64")]
        Layout::Panels(panels) => par_vec(m * w.n, w.n, |first, out| unsafe {
            on_panels(x, first, w, panels, bias, out)
        }),
        #[cfg(not(target_arch = "x86_64"))]
        Layout::Panels(_) => unreachable!("panels are made only where the CPU has AVX-512 BF16"),
        // Without the instructions: f32's Linear on the input as it is and the weight widened
        // from its bits (a pass over the weight, where the product makes `m`).
        Layout::Bits(bits) => {
            let weight = par_vec(bits.len(), ROW, |first, block| {
                let bits = &bits[first * ROW..][..block.len()];
                block.iter_mut().zip(bits).for_each(|(v, &b)| *v = widen(b));
            });
            linear_forward(x, m, &weight, bias, (w.n, w.k))
        }
    }
}

/// bf16 bits as the f32 value they are.
fn widen(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// The `vdpbf16ps` product of the rows of `x` from `first` on into `out`, a block of whole
/// rows of the output.
///
/// # Safety
/// `panels` are `w`'s (made only where `avx512_bf16()` holds).
#[cfg(target_arch = "x86_64")]
unsafe fn on_panels(
    x: &[f32],
    first: usize,
    w: &PackedBf16,
    panels: &[u16],
    bias: &[f32],
    out: &mut [f32],
) {
    let rows = out.len() / w.n.max(1);
    let x = &x[first * w.k..(first + rows) * w.k];
    // SAFETY: as this function's; `out` holds `rows x n` values.
    unsafe { avx512::matmul(x, rows, w, panels, bias, out) };
}

/// Whether [`linear`] runs on `vdpbf16ps` here (see `panels::portable_forced`).
pub fn avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
            && !crate::kernels::panels::portable_forced()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The `vdpbf16ps` path. The rows of `x` are converted to bf16 pairs once (16 values an
/// instruction); each register block (`kernels::panels`) then runs over every pair, each
/// weight load serving 8 rows and each broadcast two panels.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{pair, PackedBf16};
    use crate::kernels::panels::{for_each_block, lane_mask, LANES, ROWS};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 BF16; `out` holds `m x n` values.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn matmul(
        x: &[f32],
        m: usize,
        w: &PackedBf16,
        panels: &[u16],
        bias: &[f32],
        out: &mut [f32],
    ) {
        let (k, pairs) = (w.k, w.pairs);
        // Each row as pairs, `[m][pairs]`, plus a block's worth of zero rows that the last
        // register block may read (their sums are never stored).
        let mut a = vec![0u32; (m + ROWS) * pairs];
        for (row, a) in x.chunks_exact(k).zip(a.chunks_exact_mut(pairs)) {
            let whole = k / 16;
            for c in 0..whole {
                // SAFETY: values `16c..16c + 16` of the row and pairs `8c..8c + 8` exist.
                let v = _mm512_loadu_ps(row.as_ptr().add(16 * c));
                let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_storeu_si256(a.as_mut_ptr().add(8 * c) as *mut __m256i, h);
            }
            for (p, a) in a.iter_mut().enumerate().skip(8 * whole) {
                *a = pair(row, p);
            }
        }
        for_each_block(m, w.n_padded / LANES, |rows, panel, two| {
            let a = &a[rows.start * pairs..(rows.start + ROWS) * pairs];
            // SAFETY: as this function's.
            unsafe {
                if two {
                    tile::<2>(a, rows, panel, w, panels, bias, out);
                } else {
                    tile::<1>(a, rows, panel, w, panels, bias, out);
                }
            }
        });
    }

    /// `P` panels from `panel` on, for the `ROWS` rows whose pairs are `a` (`[ROWS][pairs]`;
    /// rows `rows` of `out` are the real ones among them): every pair, then added onto the
    /// bias, stored.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile<const P: usize>(
        a: &[u32],
        rows: std::ops::Range<usize>,
        panel: usize,
        w: &PackedBf16,
        panels: &[u16],
        bias: &[f32],
        out: &mut [f32],
    ) {
        let mut acc = [[_mm512_setzero_ps(); P]; ROWS];
        let starts: [usize; P] = std::array::from_fn(|i| PackedBf16::at(w.pairs, panel + i, 0, 0));
        let (weights, a) = (panels.as_ptr(), a.as_ptr());
        for p in 0..w.pairs {
            // SAFETY: pair `p` of each panel is 32 values inside `panels`, and `a` holds
            // `ROWS * pairs` values.
            let b: [__m512bh; P] = std::array::from_fn(|i| {
                std::mem::transmute(_mm512_loadu_si512(
                    weights.add(starts[i] + p * LANES * 2) as *const __m512i
                ))
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                let x: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*a.add(r * w.pairs + p) as i32));
                for (acc, b) in acc.iter_mut().zip(&b) {
                    *acc = _mm512_dpbf16_ps(*acc, x, *b);
                }
            }
        }
        for (i, panel) in (panel..panel + P).enumerate() {
            let (column, mask) = (panel * LANES, lane_mask(w.n, panel));
            let under = _mm512_maskz_loadu_ps(mask, bias.as_ptr().add(column));
            for (row, acc) in rows.clone().zip(&acc) {
                let at = out.as_mut_ptr().add(row * w.n + column);
                _mm512_mask_storeu_ps(at, mask, _mm512_add_ps(acc[i], under));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededRng;

    fn random(rng: &mut SeededRng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.normal_f64() as f32).collect()
    }

    /// `x W^T` in f64 from `x` and `W` as given.
    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                    .sum();
                out[r * n + j] = dot as f32;
            }
        }
        out
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Each path against the f64 product of the factors it takes in bf16 (the weight; on
    /// `vdpbf16ps` the input too), within f32 summation error, and of the f32 factors, within
    /// bf16's rounding, at odd and even sizes with padding.
    #[test]
    fn products_match_their_rounded_factors_on_every_path() {
        let mut rng = SeededRng::new(11);
        // Sizes around the register block (8 rows x 2 panels), an odd panel count, several
        // column chunks (of 128) and a deep product.
        for (m, n, k) in [
            (1, 1, 1),
            (3, 17, 7),
            (5, 40, 64),
            (8, 384, 384),
            (13, 150, 33),
            (17, 272, 1536),
            (40, 300, 1024),
        ] {
            let (x, w) = (random(&mut rng, m * k), random(&mut rng, n * k));
            let bias = random(&mut rng, n);
            let round =
                |v: &[f32]| -> Vec<f32> { v.iter().map(|&a| bf16::from_f32(a).to_f32()).collect() };
            let with_bias = |mut out: Vec<f32>| {
                for (o, b) in out.iter_mut().zip(bias.iter().cycle()) {
                    *o += b;
                }
                out
            };
            let exact = with_bias(reference(&x, m, &w, n, k));
            let bits = PackedBf16::pack_for(&w, n, k, false);
            let weight_rounded = with_bias(reference(&x, m, &round(&w), n, k));
            let mut paths = vec![("fallback", linear(&x, m, &bits, &bias), weight_rounded)];
            if avx512_bf16() {
                let panels = PackedBf16::pack_for(&w, n, k, true);
                let both_rounded = with_bias(reference(&round(&x), m, &round(&w), n, k));
                paths.push(("avx512_bf16", linear(&x, m, &panels, &bias), both_rounded));
            }
            let scale = (k as f32).sqrt();
            for (path, out, exact_rounded) in &paths {
                let rounding = max_diff(out, exact_rounded);
                assert!(
                    rounding < 2e-6 * scale * 4.0,
                    "{path} {m}x{n}x{k}: {rounding}"
                );
                let bf16_error = max_diff(out, &exact);
                assert!(
                    bf16_error < 2e-2 * scale,
                    "{path} {m}x{n}x{k}: {bf16_error}"
                );
            }
        }
    }
}
