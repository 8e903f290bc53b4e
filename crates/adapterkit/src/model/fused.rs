//! Linear, LayerNorm, softmax and GELU as single CPU kernels with hand-written backward passes
//! (candle's fused LayerNorm and softmax have no backward, and its GELU backward is a chain of
//! element-wise tensors). Each is one pass over memory, split by rows over candle's threads;
//! `ops` picks these on CPU for f32 and keeps the composed ones elsewhere. `docs/BENCHMARKS.md`
//! has the comparison.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::model::matmul::{matmul_into, View};
use crate::model::parallel::{map_parallel, threads};
use crate::model::simd::{dot, erf, exp, lanes, softmax_in_place, sum, with_wide_simd};

/// Runs `f(first_row, rows_of_out)` on consecutive blocks of whole rows of `out` (rows of
/// `row_len`), one block per thread (candle's thread count), and returns each block's result.
pub(crate) fn par_rows<T: Send, R: Send>(
    out: &mut [T],
    row_len: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    // A last partial row (GELU's element blocks) counts as a row.
    let rows = out.len().div_ceil(row_len.max(1));
    // Below ~64k elements a thread costs more than it saves.
    let threads = threads().min(out.len() / 65536).clamp(1, rows.max(1));
    if threads == 1 {
        return vec![f(0, out)];
    }
    let per_thread = rows.div_ceil(threads);
    let blocks: Vec<&mut [T]> = out.chunks_mut((per_thread * row_len).max(1)).collect();
    map_parallel(blocks, |i, block| f(i * per_thread, block))
}

/// A new vector of `len` values written by `fill(first_row, block)` on blocks of whole rows,
/// as [`par_rows`]. Each thread zeroes its own block just before filling it, so no serial
/// pass over the new memory (a zero-fill or a copy on the calling thread) comes first.
pub(crate) fn par_vec(
    len: usize,
    row_len: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(len);
    par_rows(
        &mut out.spare_capacity_mut()[..len],
        row_len,
        |first, block: &mut [std::mem::MaybeUninit<f32>]| {
            block.iter_mut().for_each(|v| {
                v.write(0.0);
            });
            // SAFETY: every element of `block` was initialised just above, and
            // `MaybeUninit<f32>` has the layout of `f32`.
            let block = unsafe { &mut *(block as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            fill(first, block);
        },
    );
    // SAFETY: the blocks cover the first `len` elements, and each was initialised above.
    unsafe { out.set_len(len) };
    out
}

/// `len` zeros, zeroed in parallel (see [`par_vec`]).
pub(crate) fn par_zeros(len: usize) -> Vec<f32> {
    par_vec(len, ROW, |_, _| {})
}

/// `rows` copies of `row` one after another (a bias for a product to be added onto).
fn repeat_rows(row: &[f32], rows: usize) -> Vec<f32> {
    par_vec(row.len() * rows, row.len(), |_, block| {
        block
            .chunks_exact_mut(row.len())
            .for_each(|r| r.copy_from_slice(row))
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
        let mut out = repeat_rows(b, rows);
        let threads = threads();
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
        let threads = threads();
        let dev = x.device();
        with_values(grad, |values| {
            let g = View::rows(values, rows, n);
            let dx = if x.track_op() {
                let dx = with_values(w, |w| {
                    let mut dx = par_zeros(rows * k);
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
            // candle's `sum(0)` reduces along a strided dimension, ~3% of a TREC-6 step.
            let db = if b.track_op() {
                let mut db = vec![0f32; n];
                for row in values.chunks_exact(n) {
                    db.iter_mut().zip(row).for_each(|(d, v)| *d += v);
                }
                Some(Tensor::from_vec(db, b.shape(), dev)?)
            } else {
                None
            };
            Ok((dx, dw, db))
        })
    }
}

/// What a fused op's forward pass keeps for its backward pass, which takes it (once).
pub(crate) struct Kept<T>(std::sync::Mutex<Option<T>>);

impl<T> Kept<T> {
    pub fn new() -> Self {
        Self(std::sync::Mutex::new(None))
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<T>> {
        // A panic elsewhere cannot leave the value half-written: take the lock anyway.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn put(&self, value: T) {
        *self.slot() = Some(value);
    }

    pub fn take(&self, op: &str) -> Result<T> {
        self.slot().take().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{op}: backward without a kept forward pass, or twice"
            ))
        })
    }
}

/// A Linear that takes no gradient, held by the fused ops of frozen blocks (whose weights are
/// fields of the op, not graph inputs).
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    /// `[out, in]`
    pub weight: Tensor,
    /// `[out]`
    pub bias: Tensor,
}

impl FrozenLinear {
    /// `linear` when it has a bias and neither its weight nor its bias takes a gradient.
    pub fn of(linear: &candle_nn::Linear) -> Option<Self> {
        let bias = linear.bias()?;
        let weight = linear.weight();
        (!weight.track_op() && !bias.track_op()).then(|| Self {
            weight: weight.clone(),
            bias: bias.clone(),
        })
    }

    /// `(out, in)`, checked against the bias.
    pub fn dims(&self) -> Result<(usize, usize)> {
        let (n, k) = self.weight.dims2()?;
        if self.bias.dims() != [n] {
            candle_core::bail!(
                "linear: weight {:?}, bias {:?}",
                self.weight.shape(),
                self.bias.shape()
            );
        }
        Ok((n, k))
    }

    /// `x W^T + b` for the `rows` rows of `x`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (n, k) = self.dims()?;
        let mut out = with_values(&self.bias, |b| Ok(repeat_rows(b, rows)))?;
        with_values(&self.weight, |w| {
            let (x, w) = (View::rows(x, rows, k), View::rows(w, n, k));
            matmul_into(&mut out, n, x, w.t(), true, threads());
            Ok(out)
        })
    }

    /// `dx = g W`, or `dx += g W` when `accumulate`: the input's gradient from the output's.
    pub fn backward_into(
        &self,
        g: &[f32],
        rows: usize,
        dx: &mut [f32],
        accumulate: bool,
    ) -> Result<()> {
        let (n, k) = self.dims()?;
        with_values(&self.weight, |w| {
            let (g, w) = (View::rows(g, rows, n), View::rows(w, n, k));
            matmul_into(dx, k, g, w, accumulate, threads());
            Ok(())
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

    /// `(x - mean) / std * w + b` per row.
    fn normalize(&self, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        let h = w.len();
        par_vec(x.len(), h, |first, block| {
            let rows = x[first * h..].chunks_exact(h);
            for (row, dst) in rows.zip(block.chunks_exact_mut(h)) {
                let (mean, rstd) = Self::stats(row, self.eps);
                for i in 0..h {
                    dst[i] = (row[i] - mean) * rstd * w[i] + b[i];
                }
            }
        })
    }

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
        Ok((CpuStorage::F32(self.normalize(x, w, b)), l1.shape().clone()))
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

/// A frozen LayerNorm of the sum of two or three tensors (a residual connection, an adapter's
/// too): arguments the parts, the LayerNorm's weights fields of the op. No tensor for the sum
/// is kept (the backward pass adds the parts again), and every part gets the same gradient.
pub struct SumLayerNormOp {
    pub norm: LayerNormOp,
    pub weight: Tensor,
    pub bias: Tensor,
}

impl SumLayerNormOp {
    fn sum(parts: &[&[f32]]) -> Vec<f32> {
        par_vec(parts[0].len(), ROW, |first, block| {
            block.copy_from_slice(&parts[0][first * ROW..][..block.len()]);
            for part in &parts[1..] {
                let part = &part[first * ROW..][..block.len()];
                block.iter_mut().zip(part).for_each(|(s, p)| *s += p);
            }
        })
    }

    fn forward(&self, parts: &[&[f32]], shape: &Shape) -> Result<(CpuStorage, Shape)> {
        let sum = Self::sum(parts);
        let out = with_values(&self.weight, |w| {
            with_values(&self.bias, |b| Ok(self.norm.normalize(&sum, w, b)))
        })?;
        Ok((CpuStorage::F32(out), shape.clone()))
    }

    /// The gradient every part gets, or `None` when no part takes one.
    fn backward(&self, parts: &[&Tensor], grad: &Tensor) -> Result<Option<Tensor>> {
        if !parts.iter().any(|p| p.track_op()) {
            return Ok(None);
        }
        // The parts' values in place (read guards on their storage), not copies.
        let parts = parts
            .iter()
            .map(|p| p.contiguous())
            .collect::<Result<Vec<_>>>()?;
        let guards: Vec<_> = parts.iter().map(|p| p.storage_and_layout()).collect();
        let values = guards
            .iter()
            .map(|(storage, layout)| match &**storage {
                candle_core::Storage::Cpu(cpu) => contiguous(cpu, layout),
                _ => candle_core::bail!("fused op: a CPU tensor was expected"),
            })
            .collect::<Result<Vec<_>>>()?;
        let sum = Self::sum(&values);
        drop(guards);
        let (dx, _, _) = with_values(&self.weight, |ws| {
            with_values(grad, |gs| {
                self.norm.backward(&sum, ws, gs, &parts[0], &self.weight)
            })
        })?;
        Ok(dx)
    }

    fn check(&self, layouts: &[&Layout]) -> Result<()> {
        let shape = layouts[0].shape();
        let h = self.weight.elem_count();
        if layouts.iter().any(|l| l.shape() != shape) || shape.dims().last() != Some(&h) {
            candle_core::bail!("layer norm of a sum: parts {layouts:?}, {h} features");
        }
        Ok(())
    }
}

impl CustomOp2 for SumLayerNormOp {
    fn name(&self) -> &'static str {
        "fused-sum-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(&[l1, l2])?;
        self.forward(&[contiguous(s1, l1)?, contiguous(s2, l2)?], l1.shape())
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = self.backward(&[a, b], grad)?;
        let take = |t: &Tensor| dx.clone().filter(|_| t.track_op());
        Ok((take(a), take(b)))
    }
}

impl CustomOp3 for SumLayerNormOp {
    fn name(&self) -> &'static str {
        "fused-sum-layer-norm"
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
        self.check(&[l1, l2, l3])?;
        let parts = [
            contiguous(s1, l1)?,
            contiguous(s2, l2)?,
            contiguous(s3, l3)?,
        ];
        self.forward(&parts, l1.shape())
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = self.backward(&[a, b, c], grad)?;
        let take = |t: &Tensor| dx.clone().filter(|_| t.track_op());
        Ok((take(a), take(b), take(c)))
    }
}

/// Softmax over the last dimension, shifted by the row maximum.
pub struct SoftmaxOp;

#[inline(always)]
fn softmax_rows_kernel(rows: &mut [f32], row_len: usize) {
    rows.chunks_exact_mut(row_len).for_each(softmax_in_place);
}

with_wide_simd!(softmax_rows => softmax_rows_kernel(rows: &mut [f32], row_len: usize));

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout)?;
        let n = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let out = par_vec(x.len(), n, |first, block| {
            block.copy_from_slice(&x[first * n..][..block.len()]);
            softmax_rows(block, n);
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

/// Element blocks for `par_rows` over element-wise work, which has no rows of its own.
pub(crate) const ROW: usize = 4096;

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
fn gelu_in_place_kernel(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = gelu(*v);
    }
}

/// `grad *= gelu'(x)`.
#[inline(always)]
fn gelu_backward_kernel(x: &[f32], grad: &mut [f32]) {
    for (g, v) in grad.iter_mut().zip(x) {
        *g *= gelu_grad(*v);
    }
}

with_wide_simd!(gelu_forward => gelu_forward_kernel(x: &[f32], out: &mut [f32]));
with_wide_simd!(gelu_in_place => gelu_in_place_kernel(x: &mut [f32]));
with_wide_simd!(gelu_backward => gelu_backward_kernel(x: &[f32], grad: &mut [f32]));

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout)?;
        let out = par_vec(x.len(), ROW, |first, block| {
            gelu_forward(&x[first * ROW..], block)
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_values(x, |xs| {
            with_values(grad, |gs| {
                let mut dx = gs.to_vec();
                par_rows(&mut dx, ROW, |first, block| {
                    gelu_backward(&xs[first * ROW..], block)
                });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Helpers for the fused ops' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::rng::SeededRng;
    use candle_core::{Device, Var};

    /// Uniform in [-1, 1).
    pub fn random(rng: &mut SeededRng, shape: &[usize]) -> Result<Tensor> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.uniform_f32() * 2.0 - 1.0).collect();
        Tensor::from_vec(values, shape, &Device::Cpu)
    }

    pub fn frozen(weight: &Tensor, bias: &Tensor) -> FrozenLinear {
        let (weight, bias) = (weight.clone(), bias.clone());
        FrozenLinear { weight, bias }
    }

    /// Asserts that `fused` and `nodes` (the same function of `x`) agree within 1e-5, and so
    /// do their gradients of `x` under the loss `sum(out * r)` (relative to the largest).
    pub fn assert_same_output_and_dx(
        nodes: &Tensor,
        fused: &Tensor,
        x: &Var,
        r: &Tensor,
        what: &str,
    ) -> Result<()> {
        let max = |t: &Tensor| t.abs()?.max_all()?.to_scalar::<f32>();
        let diff = max(&(nodes - fused)?)?;
        assert!(diff < 1e-5, "{what}: output differs by {diff}");
        let grad = |out: &Tensor| -> Result<Tensor> {
            let grads = (out * r)?.sum_all()?.backward()?;
            Ok(grads
                .get(x.as_tensor())
                .expect("x takes a gradient")
                .clone())
        };
        let (dx_nodes, dx_fused) = (grad(nodes)?, grad(fused)?);
        let diff = max(&(&dx_nodes - &dx_fused)?)?;
        let scale = max(&dx_nodes)?.max(1.0);
        assert!(
            diff < 1e-5 * scale,
            "{what}: dx differs by {diff} (largest {scale})"
        );
        Ok(())
    }
}
