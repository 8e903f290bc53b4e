//! int8 products of frozen weights, for inference (`--dtype int8`, `model::precision`):
//! `x W^T + b` with each row of `x` quantised on the fly to int8 with its own scale
//! (`max |x_r| / 127`) and each output column of `W` once, at packing, with its own
//! (`max |W_j| / 127`); the integer sums are exact, then scaled back to f32. Where the CPU has
//! AVX-512 VNNI the sums run on `vpdpbusd` (64 byte products into 16 i32 sums an instruction);
//! it multiplies unsigned bytes by signed ones, so activations go in as `q + 128` and the
//! packed weight's column sums times 128 are taken off again. Elsewhere f32's Linear runs on
//! the dequantised weight (the same levels times their scales) and the input as it is:
//! quantising the input there would cost a pass over it (7% of the product, measured) to buy
//! nothing but VNNI's loss, so the fallback costs what f32 costs and its results lie nearer
//! f32's (docs/BENCHMARKS.md).

use crate::kernels::matmul::linear_forward;
use crate::kernels::panels::{LANES, ROWS};
use crate::kernels::parallel::par_vec;

/// A weight `[n, k]` (a Linear's, out x in) quantised per output column to int8, laid out for
/// the path this CPU takes.
pub struct QuantizedI8 {
    n: usize,
    k: usize,
    n_padded: usize,
    quads: usize,
    layout: Layout,
    /// Per column: what one unit of its int8 values is worth.
    scales: Vec<f32>,
    /// Per column: 128 times the sum of its int8 values, which the `+ 128` on every activation
    /// adds to its integer sum.
    offsets: Vec<i32>,
}

enum Layout {
    /// For `vpdpbusd`: panels of 16 columns, each `[k/4][16][4]` (for each group of four input
    /// positions and each column, its four values side by side); `k` padded to a multiple of
    /// 4 and `n` to one of 16 with zeros.
    Panels(Vec<i8>),
    /// For the fallback: the levels, row-major `[n, k]`, dequantised (each times its column's
    /// scale) for each product (a pass over the weight, where the product makes `m` of them).
    Levels(Vec<i8>),
}

impl std::fmt::Debug for QuantizedI8 {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "QuantizedI8 [{}, {}]", self.n, self.k)
    }
}

/// The scale that maps the largest magnitude of `values` to 127, and its inverse; 0 for all
/// zeros (NaN for values that are not finite: the output is NaN, as f32's would be).
fn scale_of(max_abs: f32) -> (f32, f32) {
    if max_abs == 0.0 {
        (0.0, 0.0)
    } else if !max_abs.is_finite() {
        (f32::NAN, 0.0)
    } else {
        (max_abs / 127.0, 127.0 / max_abs)
    }
}

/// `v` in units of `1 / inverse`, to the nearest integer (ties to even, as `vcvtps2dq`).
fn level(v: f32, inverse: f32) -> i8 {
    (v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8
}

/// `values` as int8 with a scale such that the largest magnitude maps to 127; returns the scale.
fn quantize(values: &[f32], out: &mut [i8]) -> f32 {
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (scale, inverse) = scale_of(max);
    for (q, &v) in out.iter_mut().zip(values) {
        *q = level(v, inverse);
    }
    scale
}

impl QuantizedI8 {
    /// Quantises and packs `weight`, row-major `[n, k]`, for the path this CPU takes.
    pub fn pack(weight: &[f32], n: usize, k: usize) -> Self {
        Self::pack_for(weight, n, k, avx512_vnni())
    }

    /// [`pack`](Self::pack) in panels (`panels`) or dequantised.
    fn pack_for(weight: &[f32], n: usize, k: usize, panels: bool) -> Self {
        assert_eq!(weight.len(), n * k, "a weight of {n} x {k}");
        let (quads, n_padded) = (k.div_ceil(4), n.div_ceil(LANES) * LANES);
        let (mut scales, mut offsets) = (vec![0f32; n], vec![0i32; n]);
        let mut data = vec![0i8; if panels { quads * n_padded * 4 } else { n * k }];
        let mut row = vec![0i8; k];
        for j in 0..n {
            scales[j] = quantize(&weight[j * k..(j + 1) * k], &mut row);
            offsets[j] = 128 * row.iter().map(|&q| q as i32).sum::<i32>();
            if !panels {
                data[j * k..(j + 1) * k].copy_from_slice(&row);
                continue;
            }
            let (panel, lane) = (j / LANES, j % LANES);
            for (i, &q) in row.iter().enumerate() {
                data[Self::at(quads, panel, i / 4, lane) + i % 4] = q;
            }
        }
        let layout = match panels {
            true => Layout::Panels(data),
            false => Layout::Levels(data),
        };
        Self {
            n,
            k,
            n_padded,
            quads,
            layout,
            scales,
            offsets,
        }
    }

    /// Where group `g` of column `lane` of panel `panel` starts in `data`.
    fn at(quads: usize, panel: usize, g: usize, lane: usize) -> usize {
        ((panel * quads + g) * LANES + lane) * 4
    }
}

/// Rows of `x` quantised for `vpdpbusd`, with AVX-512 (`fast`) or without: each row's
/// `q + 128` as bytes, four to a `u32` (`[m][k/4]`; the padding is 128, that is `q = 0`,
/// against padding weights of 0), and each row's scale.
fn quantize_rows_on(x: &[f32], m: usize, k: usize, fast: bool) -> (Vec<u32>, Vec<f32>) {
    let quads = k.div_ceil(4);
    let mut packed = vec![0x8080_8080u32; m * quads];
    let mut scales = vec![0f32; m];
    let mut levels = vec![0i8; k];
    for r in 0..m {
        let row = &x[r * k..(r + 1) * k];
        let bytes = &mut packed[r * quads..(r + 1) * quads];
        #[cfg(target_arch = "x86_64")]
        if fast {
            // SAFETY: `fast` only where the CPU has AVX-512.
            scales[r] = unsafe { avx512::quantize_row(row, bytes) };
            continue;
        }
        scales[r] = quantize(row, &mut levels);
        for (word, levels) in bytes.iter_mut().zip(levels.chunks(4)) {
            let byte = |i: usize| levels.get(i).map_or(128u32, |&q| (q as u8 ^ 0x80) as u32);
            *word = byte(0) | byte(1) << 8 | byte(2) << 16 | byte(3) << 24;
        }
    }
    (packed, scales)
}

/// `x W^T + bias`, `x` row-major `[m, k]`, as a new `[m, n]` matrix: int8 products, scaled
/// back per row and column (exact integer sums with VNNI); in the fallback the input's f32
/// values times the dequantised weight.
pub fn linear(x: &[f32], m: usize, w: &QuantizedI8, bias: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), m * w.k, "x of {m} x {}", w.k);
    assert_eq!(bias.len(), w.n, "a bias of {}", w.n);
    match &w.layout {
        // Each thread zeroes and writes its own rows (a serial zero-fill first costs a pass).
        Layout::Panels(data) => par_vec(m * w.n, w.n, |first, out| {
            let rows = out.len() / w.n.max(1);
            on_panels(
                &x[first * w.k..(first + rows) * w.k],
                rows,
                w,
                data,
                bias,
                out,
            )
        }),
        Layout::Levels(levels) => {
            // As f32's Linear, on the input as it is and the dequantised weight.
            let weight = par_vec(w.n * w.k, w.k.max(1), |first, rows| {
                let levels = &levels[first * w.k..][..rows.len()];
                let rows = rows.chunks_exact_mut(w.k).zip(levels.chunks_exact(w.k));
                for (j, (row, levels)) in rows.enumerate() {
                    let scale = w.scales[first + j];
                    row.iter_mut()
                        .zip(levels)
                        .for_each(|(v, &q)| *v = q as f32 * scale);
                }
            });
            linear_forward(x, m, &weight, bias, (w.n, w.k))
        }
    }
}

/// The `vpdpbusd` product of the `m` rows of `x` into `out`.
fn on_panels(x: &[f32], m: usize, w: &QuantizedI8, data: &[i8], bias: &[f32], out: &mut [f32]) {
    let (mut a, row_scales) = quantize_rows_on(x, m, w.k, true);
    // Whole register blocks: rows of zeros (`q + 128` = 0x80) after the last.
    a.resize(m.div_ceil(ROWS) * ROWS * w.quads, 0x8080_8080);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: panels are made only where the CPU has the instructions.
    unsafe {
        avx512::sums(&a, m, w, data, &row_scales, bias, out)
    };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("panels are made only where the CPU has VNNI: {data:p} {a:p} {out:p}");
}

/// Whether [`linear`] runs on `vpdpbusd` here (see `panels::portable_forced`).
pub fn avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && !crate::kernels::panels::portable_forced()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The `vpdpbusd` path: each register block (`kernels::panels`) sums over every group of four
/// in i32, then scales back 16 sums at a time.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{level, scale_of, QuantizedI8};
    use crate::kernels::panels::{for_each_block, lane_mask, LANES, ROWS};
    use std::arch::x86_64::*;

    /// One row quantised into `bytes` (`q + 128`, four to a word), 16 values an instruction;
    /// returns its scale. The same levels as the portable loop: `vcvtps2dq` rounds ties to
    /// even, and no level passes 127 in magnitude, so the saturating narrowing never clips.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn quantize_row(row: &[f32], bytes: &mut [u32]) -> f32 {
        let whole = row.len() / 16;
        let mut max = _mm512_setzero_ps();
        for c in 0..whole {
            max = _mm512_max_ps(
                max,
                _mm512_abs_ps(_mm512_loadu_ps(row.as_ptr().add(16 * c))),
            );
        }
        let tail = row[16 * whole..].iter().fold(0f32, |m, v| m.max(v.abs()));
        let (scale, inverse) = scale_of(_mm512_reduce_max_ps(max).max(tail));
        let (factor, flip) = (_mm512_set1_ps(inverse), _mm_set1_epi8(0x80u8 as i8));
        for c in 0..whole {
            let levels = _mm512_cvtps_epi32(_mm512_mul_ps(
                _mm512_loadu_ps(row.as_ptr().add(16 * c)),
                factor,
            ));
            let packed = _mm_xor_si128(_mm512_cvtsepi32_epi8(levels), flip);
            // SAFETY: values 16c..16c + 16 are words 4c..4c + 4 of `bytes`.
            _mm_storeu_si128(bytes.as_mut_ptr().add(4 * c) as *mut __m128i, packed);
        }
        for i in 16 * whole..row.len() {
            let byte = (level(row[i], inverse) as u8 ^ 0x80) as u32;
            let word = &mut bytes[i / 4];
            *word = (*word & !(0xff << (8 * (i % 4)))) | byte << (8 * (i % 4));
        }
        scale
    }

    /// `a` holds whole blocks of `ROWS` rows (the last padded).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 VNNI.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn sums(
        a: &[u32],
        m: usize,
        w: &QuantizedI8,
        data: &[i8],
        row_scales: &[f32],
        bias: &[f32],
        out: &mut [f32],
    ) {
        for_each_block(m, w.n_padded / LANES, |rows, panel, two| {
            let block = &a[rows.start * w.quads..(rows.start + ROWS) * w.quads];
            // SAFETY: as this function's.
            unsafe {
                if two {
                    tile::<2>(block, rows, panel, w, data, row_scales, bias, out);
                } else {
                    tile::<1>(block, rows, panel, w, data, row_scales, bias, out);
                }
            }
        });
    }

    /// `P` panels from `panel` on, for the `ROWS` rows whose groups are `a` (`[ROWS][quads]`;
    /// rows `rows` of `out` are the real ones among them).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn tile<const P: usize>(
        a: &[u32],
        rows: std::ops::Range<usize>,
        panel: usize,
        w: &QuantizedI8,
        data: &[i8],
        row_scales: &[f32],
        bias: &[f32],
        out: &mut [f32],
    ) {
        let mut acc = [[_mm512_setzero_si512(); P]; ROWS];
        let starts: [usize; P] = std::array::from_fn(|i| QuantizedI8::at(w.quads, panel + i, 0, 0));
        let (weights, a) = (data.as_ptr(), a.as_ptr());
        for g in 0..w.quads {
            // SAFETY: group `g` of each panel is 64 bytes inside `data`, and `a` holds
            // `ROWS * quads` words.
            let b: [__m512i; P] = std::array::from_fn(|i| {
                _mm512_loadu_si512(weights.add(starts[i] + g * LANES * 4) as *const __m512i)
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_epi32(*a.add(r * w.quads + g) as i32);
                for (acc, b) in acc.iter_mut().zip(&b) {
                    *acc = _mm512_dpbusd_epi32(*acc, x, *b);
                }
            }
        }
        for (i, panel) in (panel..panel + P).enumerate() {
            let (column, mask) = (panel * LANES, lane_mask(w.n, panel));
            let offsets = _mm512_maskz_loadu_epi32(mask, w.offsets.as_ptr().add(column));
            let scales = _mm512_maskz_loadu_ps(mask, w.scales.as_ptr().add(column));
            let bias = _mm512_maskz_loadu_ps(mask, bias.as_ptr().add(column));
            for (row, acc) in rows.clone().zip(&acc) {
                // (sum - offset) * (row scale * column scale) + bias.
                let sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i], offsets));
                let scale = _mm512_mul_ps(_mm512_set1_ps(row_scales[row]), scales);
                let value = _mm512_add_ps(_mm512_mul_ps(sums, scale), bias);
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(row * w.n + column), mask, value);
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

    /// Each path is the f64 product of the factors it takes within f32 rounding: the VNNI
    /// path's (exact integer sums) of the dequantised input and weight, the fallback's of the
    /// input as it is and the dequantised weight; and both are the f32 product within int8's
    /// quantisation error. Sizes include the register blocks' edges, rows over threads and a deep product.
    #[test]
    fn products_are_the_dequantised_factors_on_every_path() {
        let mut rng = SeededRng::new(12);
        for (m, n, k) in [
            (1, 1, 1),
            (3, 17, 7),
            (9, 40, 64),
            (13, 150, 33),
            (20, 272, 384),
            (5, 18, 2053),
        ] {
            let (mut x, mut w, bias) = (
                random(&mut rng, m * k),
                random(&mut rng, n * k),
                random(&mut rng, n),
            );
            // A row of zeros (scale 0) among the others; where there are at least two rows and
            // columns, about the largest sums there can be (levels 127 times 127 or 125 at
            // random), past what f32 holds exactly.
            x[..k].iter_mut().for_each(|v| *v = 0.0);
            if m > 1 && n > 1 {
                x[k..2 * k].iter_mut().for_each(|v| *v = 0.5);
                for (i, v) in w[..k].iter_mut().enumerate() {
                    let odd = i > 0 && rng.uniform_f32() < 0.5;
                    *v = if odd { -2.0 * 125.0 / 127.0 } else { -2.0 };
                }
            }
            let packed = QuantizedI8::pack_for(&w, n, k, false);
            // The dequantised factors, and the exact products of the two sets.
            let dequantise = |v: &[f32], rows: usize| -> Vec<f64> {
                let mut q = vec![0i8; k];
                let mut out = Vec::with_capacity(v.len());
                for r in 0..rows {
                    let scale = quantize(&v[r * k..(r + 1) * k], &mut q);
                    out.extend(q.iter().map(|&q| q as f64 * scale as f64));
                }
                out
            };
            let (xd, wd) = (dequantise(&x, m), dequantise(&w, n));
            let product =
                |a: &dyn Fn(usize) -> f64, b: &dyn Fn(usize) -> f64, r: usize, j: usize| {
                    (0..k).map(|i| a(r * k + i) * b(j * k + i)).sum::<f64>() + bias[j] as f64
                };
            let (a, row_scales) = quantize_rows_on(&x, m, k, false);
            let fast = quantize_rows_on(&x, m, k, avx512_vnni());
            assert_eq!(
                (&a, &row_scales),
                (&fast.0, &fast.1),
                "quantised rows differ"
            );
            let portable = linear(&x, m, &packed, &bias);
            let fast = linear(&x, m, &QuantizedI8::pack(&w, n, k), &bias);
            let vnni = avx512_vnni();
            let magnitude = (k as f64).sqrt();
            // Each path's input: dequantised on VNNI, as it is otherwise.
            let (x, xd) = (&x, &xd);
            let input =
                |quantised: bool| move |i: usize| if quantised { xd[i] } else { x[i] as f64 };
            for r in 0..m {
                for j in 0..n {
                    let f32_product = product(&|i| x[i] as f64, &|i| w[i] as f64, r, j);
                    for (path, out, quantised) in
                        [("portable", &portable, false), ("fast", &fast, vnni)]
                    {
                        let exact = product(&input(quantised), &|i| wd[i], r, j);
                        // f32's rounding grows with the size of the terms summed.
                        let terms = product(&|i| input(quantised)(i).abs(), &|i| wd[i].abs(), r, j);
                        let tolerance = 1e-5 * magnitude + 16.0 * f32::EPSILON as f64 * terms;
                        let got = out[r * n + j] as f64;
                        assert!(
                            (got - exact).abs() < tolerance,
                            "{path} (vnni: {vnni}) {m}x{n}x{k} ({r}, {j}): {got} vs {exact}"
                        );
                        assert!(
                            (got - f32_product).abs() < 0.05 * magnitude,
                            "{path}: quantisation error at ({r}, {j})"
                        );
                    }
                }
            }
        }
    }
}
