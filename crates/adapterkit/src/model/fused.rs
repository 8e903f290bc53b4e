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

/// `dst = lhs rhs`, or `dst += lhs rhs` when `accumulate`; `dst` is `lhs.rows x rhs.cols`
/// with row stride `dst_row_stride`. One `gemm` call (the crate candle uses), on `threads`.
pub(crate) fn matmul_into(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: View,
    rhs: View,
    accumulate: bool,
    threads: usize,
) {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    assert_eq!(k, rhs.rows, "matmul_into: inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_row_stride + n <= dst.len(),
        "matmul_into: dst too small"
    );
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
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
            parallelism,
        )
    }
}

/// `x W^T + b` for a frozen `W` `[n, k]` and `b` `[n]` over the last dimension of `x`: one
/// matrix product written onto the broadcast bias, and a backward pass that returns only
/// `dL/dx` (candle's matmul backward also computes the frozen weight's gradient, a third of
/// the backward work for nothing).
pub struct FrozenLinearOp {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl CustomOp1 for FrozenLinearOp {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout)?;
        let (n, k) = self.weight.dims2()?;
        let rows = x.len() / k.max(1);
        let out = with_values(&self.weight, |w| {
            let (mut out, accumulate) = match &self.bias {
                Some(bias) => (with_values(bias, |b| Ok(b.repeat(rows)))?, true),
                None => (vec![0f32; rows * n], false),
            };
            let threads = candle_core::utils::get_num_threads();
            matmul_into(
                &mut out,
                n,
                View::rows(x, rows, k),
                View::rows(w, n, k).t(),
                accumulate,
                threads,
            );
            Ok(out)
        })?;
        let mut dims = layout.shape().dims().to_vec();
        *dims
            .last_mut()
            .expect("a linear's input has a feature dimension") = n;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, k) = self.weight.dims2()?;
        let rows = x.elem_count() / k.max(1);
        let dx = with_values(grad, |g| {
            with_values(&self.weight, |w| {
                let mut dx = vec![0f32; rows * k];
                let threads = candle_core::utils::get_num_threads();
                matmul_into(
                    &mut dx,
                    k,
                    View::rows(g, rows, n),
                    View::rows(w, n, k),
                    false,
                    threads,
                );
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
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
        let mean = row.iter().sum::<f32>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
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
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (d, v) in dst.iter_mut().zip(row) {
                    *d = (v - max).exp();
                    sum += *d;
                }
                let inv = 1.0 / sum;
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
                        let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
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

/// Exact GELU, `x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`, with erf as candle computes it.
pub struct GeluOp;

const ROW: usize = 4096; // element blocks for `par_rows`; GELU has no rows of its own

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `d gelu / dx = Phi(x) + x phi(x)`.
fn gelu_grad(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * x * x).exp()
        * (0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2);
    cdf + x * pdf
}

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout)?;
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, ROW, |first, block| {
            for (d, v) in block.iter_mut().zip(&x[first * ROW..]) {
                *d = gelu(*v);
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_values(x, |xs| {
            with_values(grad, |gs| {
                let mut dx = vec![0f32; xs.len()];
                par_rows(&mut dx, ROW, |first, block| {
                    let at = first * ROW;
                    for ((d, v), g) in block.iter_mut().zip(&xs[at..]).zip(&gs[at..]) {
                        *d = g * gelu_grad(*v);
                    }
                });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
