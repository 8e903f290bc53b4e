//! bf16 matrix products of frozen weights, summed in f32: `x W^T` with `x` and `W` rounded to
//! bf16 (round to nearest even), the first step of `--dtype bf16` (issue 18; the model does not
//! call it yet). The weight is packed once ([`PackedBf16`]); rows are split over threads, and
//! the product dispatches at run time
//! to `vdpbf16ps` (AVX-512 BF16: each instruction multiplies 32 pairs of bf16 and adds them into
//! 16 f32 sums) and otherwise runs a portable loop that computes the same sums in the same
//! order per output, so the two agree to f32 rounding.

use half::bf16;

use crate::kernels::parallel::par_rows;

/// Output columns one AVX-512 register holds.
const LANES: usize = 16;

/// A weight `[n, k]` (a Linear's, out x in) in bf16, packed for [`matmul`]: in panels of 16
/// output columns, each panel `[k/2][16][2]` (for each pair of input positions `2p, 2p + 1` and
/// each of the panel's columns, the two values side by side), so that a panel is read
/// contiguously; `k` is padded to even and `n` to a multiple of 16 with zeros.
pub struct PackedBf16 {
    n: usize,
    k: usize,
    n_padded: usize,
    pairs: usize,
    data: Vec<u16>,
}

/// `x` rounded to bf16 (nearest, ties to even), as bits.
fn bits(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

impl PackedBf16 {
    /// Packs `weight`, row-major `[n, k]`.
    pub fn pack(weight: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(weight.len(), n * k, "a weight of {n} x {k}");
        let (pairs, n_padded) = (k.div_ceil(2), n.div_ceil(LANES) * LANES);
        let mut data = vec![0u16; pairs * n_padded * 2];
        for j in 0..n {
            let (panel, lane) = (j / LANES, j % LANES);
            for i in 0..k {
                data[Self::at(pairs, panel, i / 2, lane) + i % 2] = bits(weight[j * k + i]);
            }
        }
        Self {
            n,
            k,
            n_padded,
            pairs,
            data,
        }
    }

    /// Where pair `p` of column `lane` of panel `panel` starts in `data`.
    fn at(pairs: usize, panel: usize, p: usize, lane: usize) -> usize {
        ((panel * pairs + p) * LANES + lane) * 2
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn columns(&self) -> usize {
        self.k
    }
}

/// A row of `x` as bf16 pairs: `pairs[p]` holds positions `2p` (low half) and `2p + 1`.
fn row_pairs(row: &[f32], pairs: usize) -> Vec<u32> {
    (0..pairs)
        .map(|p| {
            let low = bits(row[2 * p]) as u32;
            let high = row.get(2 * p + 1).map_or(0, |&v| bits(v)) as u32;
            low | (high << 16)
        })
        .collect()
}

/// `out = x W^T`, `x` row-major `[m, k]`, `out` `[m, n]`, both factors rounded to bf16 and the
/// products summed in f32 (a pair of products at a time, as `vdpbf16ps` sums them).
pub fn matmul(x: &[f32], m: usize, w: &PackedBf16, out: &mut [f32]) {
    assert_eq!(x.len(), m * w.k, "x of {m} x {}", w.k);
    assert_eq!(out.len(), m * w.n, "out of {m} x {}", w.n);
    // Rows split over candle's threads, each block of rows computed whole.
    par_rows(out, w.n, |first, out| {
        let rows = out.len() / w.n.max(1);
        let x = &x[first * w.k..(first + rows) * w.k];
        #[cfg(target_arch = "x86_64")]
        if avx512_bf16() {
            // SAFETY: the CPU has the instructions (checked just now).
            unsafe { matmul_avx512_bf16(x, rows, w, out) };
            return;
        }
        matmul_portable(x, rows, w, out);
    });
}

/// Whether `matmul` runs on `vdpbf16ps` here.
pub fn avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`matmul`] without special instructions: each output sums its pairs in order, each pair's
/// two products first, as the instruction does.
pub fn matmul_portable(x: &[f32], m: usize, w: &PackedBf16, out: &mut [f32]) {
    let widen = |b: u16| f32::from_bits((b as u32) << 16);
    for r in 0..m {
        let pairs = row_pairs(&x[r * w.k..(r + 1) * w.k], w.pairs);
        for j in 0..w.n {
            let mut sum = 0f32;
            for (p, &pair) in pairs.iter().enumerate() {
                let at = PackedBf16::at(w.pairs, j / LANES, p, j % LANES);
                let (x0, x1) = (widen(pair as u16), widen((pair >> 16) as u16));
                let (w0, w1) = (widen(w.data[at]), widen(w.data[at + 1]));
                sum += x0 * w0 + x1 * w1;
            }
            out[r * w.n + j] = sum;
        }
    }
}

/// [`matmul`] on `vdpbf16ps`: four rows at a time against one panel of 16 output columns, so
/// that each load of the weight serves four rows (their pairs broadcast to every lane), then the
/// rows left one at a time.
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn matmul_avx512_bf16(x: &[f32], m: usize, w: &PackedBf16, out: &mut [f32]) {
    let pairs: Vec<Vec<u32>> = (0..m)
        .map(|r| row_pairs(&x[r * w.k..(r + 1) * w.k], w.pairs))
        .collect();
    let mut r = 0;
    while r + 4 <= m {
        rows_avx512_bf16::<4>(&pairs[r..r + 4], r, w, out);
        r += 4;
    }
    for r in r..m {
        rows_avx512_bf16::<1>(&pairs[r..r + 1], r, w, out);
    }
}

/// `R` rows (their pairs), the first of them row `first` of `out`, against every panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn rows_avx512_bf16<const R: usize>(
    pairs: &[Vec<u32>],
    first: usize,
    w: &PackedBf16,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut sums = [0f32; LANES];
    for panel in 0..w.n_padded / LANES {
        let mut acc = [_mm512_setzero_ps(); R];
        let start = PackedBf16::at(w.pairs, panel, 0, 0);
        for p in 0..w.pairs {
            // SAFETY: the panel's pair `p` is 32 values inside `data`.
            let b: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                w.data.as_ptr().add(start + p * LANES * 2) as *const __m512i,
            ));
            for (acc, row) in acc.iter_mut().zip(pairs) {
                let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(row[p] as i32));
                *acc = _mm512_dpbf16_ps(*acc, a, b);
            }
        }
        let column = panel * LANES;
        let count = LANES.min(w.n - column.min(w.n));
        for (i, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(sums.as_mut_ptr(), *acc);
            out[(first + i) * w.n + column..][..count].copy_from_slice(&sums[..count]);
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

    /// Both paths against f64 products of the bf16-rounded factors (within f32 summation error)
    /// and of the f32 factors (within bf16's rounding), at odd and even sizes with padding.
    #[test]
    fn products_match_the_rounded_factors_on_every_path() {
        let mut rng = SeededRng::new(11);
        for (m, n, k) in [(1, 1, 1), (3, 17, 7), (5, 40, 64), (8, 384, 384)] {
            let (x, w) = (random(&mut rng, m * k), random(&mut rng, n * k));
            let packed = PackedBf16::pack(&w, n, k);
            let round =
                |v: &[f32]| -> Vec<f32> { v.iter().map(|&a| bf16::from_f32(a).to_f32()).collect() };
            let exact_rounded = reference(&round(&x), m, &round(&w), n, k);
            let exact = reference(&x, m, &w, n, k);
            let mut paths = vec![("portable", vec![0f32; m * n])];
            matmul_portable(&x, m, &packed, &mut paths[0].1);
            if avx512_bf16() {
                let mut fast = vec![0f32; m * n];
                matmul(&x, m, &packed, &mut fast);
                paths.push(("avx512_bf16", fast));
            }
            let scale = (k as f32).sqrt();
            for (path, out) in &paths {
                let rounding = max_diff(out, &exact_rounded);
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
            if let [(_, portable), (_, fast)] = &paths[..] {
                let diff = max_diff(portable, fast);
                assert!(diff < 1e-5 * scale, "paths differ at {m}x{n}x{k}: {diff}");
            }
        }
    }
}
