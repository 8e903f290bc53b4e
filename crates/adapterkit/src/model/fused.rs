//! LayerNorm, softmax and GELU as single CPU kernels with hand-written backward passes
//! (candle's fused LayerNorm and softmax have no backward, and its GELU backward is a chain of
//! element-wise tensors). Each is one pass over memory, split by rows over candle's threads;
//! `ops` picks these on CPU for f32 and keeps the composed ones elsewhere. `docs/BENCHMARKS.md`
//! has the comparison.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

/// Runs `f(first_row, rows_of_out)` on consecutive blocks of whole rows of `out` (rows of
/// `row_len`), one block per thread (candle's thread count), and returns each block's result.
fn par_rows<R: Send>(
    out: &mut [f32],
    row_len: usize,
    f: impl Fn(usize, &mut [f32]) -> R + Sync,
) -> Vec<R> {
    // A last partial row (GELU's element blocks) counts as a row.
    let rows = out.len().div_ceil(row_len.max(1));
    // Below ~64k elements a thread costs more than it saves.
    let threads = candle_core::utils::get_num_threads()
        .min(out.len() / 65536)
        .clamp(1, rows.max(1));
    if threads == 1 {
        return vec![f(0, out)];
    }
    let per_thread = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = out
            .chunks_mut((per_thread * row_len).max(1))
            .enumerate()
            .map(|(i, block)| scope.spawn(move || f(i * per_thread, block)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a fused-op worker panicked"))
            .collect()
    })
}

/// Defines `$name`, which runs `$kernel` (an `#[inline(always)]` loop written to vectorise)
/// compiled for AVX-512, or AVX2 + FMA, when the CPU has it: the default build targets baseline
/// x86-64, whose SSE2 gives 4 lanes where AVX-512 gives 16.
macro_rules! with_wide_simd {
    ($name:ident => $kernel:ident($($arg:ident: $ty:ty),*)) => {
        pub(crate) fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) {
                    $kernel($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $kernel($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the instructions `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $kernel($($arg),*)
        }
    };
}
pub(crate) use with_wide_simd;

/// `e^x` without a library call or a float-to-int conversion, so that loops over it
/// vectorise: `x = k ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` by its degree-6 Taylor polynomial
/// (relative error below 3e-7), `2^k` built in the exponent bits. Below -80 it is 0: the masked
/// keys of a softmax must get exactly 0, not ~1e-38, which divided by the row's sum becomes a
/// denormal number and slows every later product with it (e^-80 / 512 keys is still normal).
#[inline(always)]
#[allow(clippy::manual_clamp)] // `clamp`'s NaN handling would stop the loop vectorising
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split in two for an exact `k * LN2_HI`
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to an integer k held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let clamped = if x < -80.0 {
        -80.0
    } else if x > 88.0 {
        88.0
    } else {
        x
    };
    let t = clamped * std::f32::consts::LOG2_E + ROUND;
    let k = t - ROUND;
    let r = clamped - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let k_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let e = p * f32::from_bits(k_bits.wrapping_add(127) << 23);
    if x < -80.0 {
        0.0
    } else {
        e
    }
}

/// Sum, maximum and dot product over eight running lanes: a single running sum is a chain of
/// dependent additions that the compiler may not reorder, so it would not vectorise.
#[inline(always)]
fn lanes(xs: &[f32], ys: &[f32], init: f32, step: impl Fn(f32, f32, f32) -> f32) -> [f32; 9] {
    let mut acc = [init; 9];
    let (xc, yc) = (xs.chunks_exact(8), ys.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (x, y) in xc.zip(yc) {
        for i in 0..8 {
            acc[i] = step(acc[i], x[i], y[i]);
        }
    }
    for (x, y) in xr.iter().zip(yr) {
        acc[8] = step(acc[8], *x, *y);
    }
    acc
}

#[inline(always)]
pub(crate) fn sum(xs: &[f32]) -> f32 {
    lanes(xs, xs, 0.0, |a, x, _| a + x).iter().sum()
}

#[inline(always)]
pub(crate) fn dot(xs: &[f32], ys: &[f32]) -> f32 {
    lanes(xs, ys, 0.0, |a, x, y| a + x * y).iter().sum()
}

#[inline(always)]
pub(crate) fn max(xs: &[f32]) -> f32 {
    let acc = lanes(
        xs,
        xs,
        f32::NEG_INFINITY,
        |a, x, _| if x > a { x } else { a },
    );
    acc.into_iter().fold(f32::NEG_INFINITY, f32::max)
}

/// The error function without a library call (vectorises): Numerical Recipes' Chebyshev
/// fit of `erfc`, fractional error below 1.2e-7, so `erf` within ~1.2e-7 absolute.
#[inline(always)]
#[allow(clippy::excessive_precision)] // the coefficients as published
pub(crate) fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * exp(-z * z + poly);
    (1.0 - erfc).copysign(x)
}

pub(crate) fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused op needs a contiguous input".into()))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// Runs `f` on the values of a contiguous f32 CPU tensor, borrowed, not copied.
pub(crate) fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => f(contiguous(cpu, layout)?),
        _ => candle_core::bail!("fused op: a CPU tensor was expected"),
    }
}

/// A matrix inside a slice: element `(r, c)` at `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> View<'a> {
    /// Panics if the matrix reaches past the end of `data` (the bound that makes `matmul_into`
    /// sound).
    pub fn new(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        let last = (rows.max(1) - 1) * row_stride + (cols.max(1) - 1) * col_stride;
        assert!(
            rows == 0 || cols == 0 || last < data.len(),
            "matrix view out of bounds"
        );
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// A dense row-major matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

impl<'a> View<'a> {
    /// Rows `first..first + count`.
    fn row_block(self, first: usize, count: usize) -> Self {
        let data = if count == 0 {
            &self.data[..0]
        } else {
            &self.data[first * self.row_stride..]
        };
        Self::new(data, count, self.cols, self.row_stride, self.col_stride)
    }
}

/// `dst = lhs rhs`, or `dst += lhs rhs` when `accumulate`; `dst` is `lhs.rows x rhs.cols`
/// with row stride `dst_row_stride`. `gemm` (the crate candle uses) on blocks of rows, one per
/// thread: `gemm`'s own threading left a thread idle on narrow products (an adapter's 24-column
/// down-projection), and was no faster on wide ones (`docs/BENCHMARKS.md`).
pub(crate) fn matmul_into(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: View,
    rhs: View,
    accumulate: bool,
    threads: usize,
) {
    let m = lhs.rows;
    let threads = threads.clamp(1, m.div_ceil(16).max(1));
    if threads == 1 {
        return matmul_block(dst, dst_row_stride, lhs, rhs, accumulate);
    }
    let per_thread = m.div_ceil(threads);
    std::thread::scope(|scope| {
        let mut rest = dst;
        for first in (0..m).step_by(per_thread) {
            let count = per_thread.min(m - first);
            let take = if first + count < m {
                count * dst_row_stride
            } else {
                rest.len()
            };
            let (block, tail) = std::mem::take(&mut rest).split_at_mut(take);
            rest = tail;
            let lhs = lhs.row_block(first, count);
            scope.spawn(move || matmul_block(block, dst_row_stride, lhs, rhs, accumulate));
        }
    });
}

fn matmul_block(dst: &mut [f32], dst_row_stride: usize, lhs: View, rhs: View, accumulate: bool) {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    assert_eq!(k, rhs.rows, "matmul_into: inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_row_stride + n <= dst.len(),
        "matmul_into: dst too small"
    );
    // SAFETY: the three views were checked to lie within their slices (`View::new` and the
    // assert above), `dst` is borrowed mutably so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// A Linear, `x W^T + b` over the last dimension of `x`, `W` `[n, k]`, `b` `[n]`; arguments
/// `x`, `W`, `b`. One matrix product written onto the broadcast bias (candle's Linear is four
/// graph nodes), and a backward pass that computes the gradient of only those arguments that
/// take one: for a frozen Linear, `dL/dx` alone (candle's matmul backward also computes the
/// weight's gradient, a third of the backward work for nothing).
pub struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            contiguous(s1, l1)?,
            contiguous(s2, l2)?,
            contiguous(s3, l3)?,
        );
        let (n, k) = l2.shape().dims2()?;
        if b.len() != n || l1.shape().dims().last() != Some(&k) {
            candle_core::bail!(
                "linear: input {:?}, weight {:?}, bias {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let rows = x.len() / k.max(1);
        let mut out = b.repeat(rows);
        let threads = candle_core::utils::get_num_threads();
        matmul_into(
            &mut out,
            n,
            View::rows(x, rows, k),
            View::rows(w, n, k).t(),
            true,
            threads,
        );
        let mut dims = l1.shape().dims().to_vec();
        *dims.last_mut().expect("checked above") = n;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    /// `dx = g W`, `dW = g^T x`, `db` = the column sums of `g`.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let rows = x.elem_count() / k.max(1);
        let threads = candle_core::utils::get_num_threads();
        let dev = x.device();
        with_values(grad, |g| {
            let g = View::rows(g, rows, n);
            let dx = if x.track_op() {
                let dx = with_values(w, |w| {
                    let mut dx = vec![0f32; rows * k];
                    matmul_into(&mut dx, k, g, View::rows(w, n, k), false, threads);
                    Ok(dx)
                })?;
                Some(Tensor::from_vec(dx, x.shape(), dev)?)
            } else {
                None
            };
            let dw = if w.track_op() {
                let dw = with_values(x, |x| {
                    let mut dw = vec![0f32; n * k];
                    matmul_into(&mut dw, k, g.t(), View::rows(x, rows, k), false, threads);
                    Ok(dw)
                })?;
                Some(Tensor::from_vec(dw, w.shape(), dev)?)
            } else {
                None
            };
            let db = if b.track_op() {
                Some((grad.flatten_to(candle_core::D::Minus2)?.sum(0))?)
            } else {
                None
            };
            Ok((dx, dw, db))
        })
    }
}

/// LayerNorm over the last dimension; arguments `x`, `weight`, `bias`.
pub struct LayerNormOp {
    pub eps: f64,
}

impl LayerNormOp {
    /// Per row: mean and 1/std.
    fn stats(row: &[f32], eps: f64) -> (f32, f32) {
        let n = row.len() as f32;
        let mean = sum(row) / n;
        let var = lanes(row, row, 0.0, |a, x, _| a + (x - mean) * (x - mean))
            .iter()
            .sum::<f32>()
            / n;
        (mean, 1.0 / (var + eps as f32).sqrt())
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            contiguous(s1, l1)?,
            contiguous(s2, l2)?,
            contiguous(s3, l3)?,
        );
        let h = w.len();
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, h, |first, block| {
            let rows = x[first * h..].chunks_exact(h);
            for (row, dst) in rows.zip(block.chunks_exact_mut(h)) {
                let (mean, rstd) = Self::stats(row, self.eps);
                for i in 0..h {
                    dst[i] = (row[i] - mean) * rstd * w[i] + b[i];
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        with_values(x, |xs| {
            with_values(w, |ws| {
                with_values(grad, |gs| self.backward(xs, ws, gs, x, w))
            })
        })
    }
}

impl LayerNormOp {
    fn backward(
        &self,
        xs: &[f32],
        ws: &[f32],
        gs: &[f32],
        x: &Tensor,
        w: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = ws.len();
        let mut dx = vec![0f32; xs.len()];
        // Each thread sums dw and db over its rows; the partial sums are added after.
        let partials = par_rows(&mut dx, h, |first, block| {
            let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
            let (mut xhat, mut gw) = (vec![0f32; h], vec![0f32; h]);
            let rows = xs[first * h..]
                .chunks_exact(h)
                .zip(gs[first * h..].chunks_exact(h));
            for ((row, g), dst) in rows.zip(block.chunks_exact_mut(h)) {
                let (mean, rstd) = Self::stats(row, self.eps);
                let (mut mean_gw, mut mean_gw_xhat) = (0f32, 0f32);
                for i in 0..h {
                    xhat[i] = (row[i] - mean) * rstd;
                    gw[i] = g[i] * ws[i];
                    mean_gw += gw[i];
                    mean_gw_xhat += gw[i] * xhat[i];
                    dw[i] += g[i] * xhat[i];
                    db[i] += g[i];
                }
                mean_gw /= h as f32;
                mean_gw_xhat /= h as f32;
                for i in 0..h {
                    dst[i] = rstd * (gw[i] - mean_gw - xhat[i] * mean_gw_xhat);
                }
            }
            (dw, db)
        });
        let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
        for (pw, pb) in partials {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, w.shape(), dev)?),
        ))
    }
}

/// Softmax over the last dimension, shifted by the row maximum.
pub struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout)?;
        let n = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, n, |first, block| {
            for (row, dst) in x[first * n..]
                .chunks_exact(n)
                .zip(block.chunks_exact_mut(n))
            {
                let max = max(row);
                for (d, v) in dst.iter_mut().zip(row) {
                    *d = exp(v - max);
                }
                let inv = 1.0 / sum(dst);
                dst.iter_mut().for_each(|d| *d *= inv);
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// `dx = y * (g - sum(g * y))` per row.
    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let n = y.dims().last().copied().unwrap_or(1).max(1);
        let dx = with_values(y, |ys| {
            with_values(grad, |gs| {
                let mut dx = vec![0f32; ys.len()];
                par_rows(&mut dx, n, |first, block| {
                    let rows = ys[first * n..]
                        .chunks_exact(n)
                        .zip(gs[first * n..].chunks_exact(n));
                    for ((yr, gr), dst) in rows.zip(block.chunks_exact_mut(n)) {
                        let dot = dot(yr, gr);
                        for i in 0..n {
                            dst[i] = yr[i] * (gr[i] - dot);
                        }
                    }
                });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, y.shape(), y.device())?))
    }
}

/// Exact GELU, `x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`.
pub struct GeluOp;

const ROW: usize = 4096; // element blocks for `par_rows`; GELU has no rows of its own

#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `d gelu / dx = Phi(x) + x phi(x)`.
#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = exp(-0.5 * x * x)
        * (0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2);
    cdf + x * pdf
}

#[inline(always)]
fn gelu_forward_kernel(x: &[f32], out: &mut [f32]) {
    for (d, v) in out.iter_mut().zip(x) {
        *d = gelu(*v);
    }
}

#[inline(always)]
fn gelu_backward_kernel(x: &[f32], grad: &[f32], out: &mut [f32]) {
    for ((d, v), g) in out.iter_mut().zip(x).zip(grad) {
        *d = g * gelu_grad(*v);
    }
}

with_wide_simd!(gelu_forward => gelu_forward_kernel(x: &[f32], out: &mut [f32]));
with_wide_simd!(gelu_backward => gelu_backward_kernel(x: &[f32], grad: &[f32], out: &mut [f32]));

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout)?;
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, ROW, |first, block| {
            gelu_forward(&x[first * ROW..], block)
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_values(x, |xs| {
            with_values(grad, |gs| {
                let mut dx = vec![0f32; xs.len()];
                par_rows(&mut dx, ROW, |first, block| {
                    gelu_backward(&xs[first * ROW..], &gs[first * ROW..], block)
                });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The polynomial `exp` and `erf` against the library's, over the ranges the kernels use.
    #[test]
    fn exp_and_erf_match_the_library() {
        for i in 0..=20_000 {
            let x = -80.0 + 168.0 * i as f32 / 20_000.0;
            let (ours, libm) = (exp(x), x.exp());
            assert!(
                (ours - libm).abs() <= 3e-7 * libm,
                "exp({x}): {ours} vs {libm}"
            );
            let x = -6.0 + 12.0 * i as f32 / 20_000.0;
            let (ours, libm) = (erf(x), candle_core::cpu::erf::erf_f32(x));
            assert!((ours - libm).abs() < 3e-7, "erf({x}): {ours} vs {libm}");
        }
        for x in [-80.001, -100.0, -1e30, f32::MIN] {
            assert_eq!(exp(x), 0.0, "exp({x})");
        }
    }
}
