//! Linear, softmax and GELU as single CPU kernels with hand-written backward passes (candle's
//! fused softmax has no backward, and its GELU backward is a chain of element-wise tensors),
//! and what the other fused ops share: reading tensors in place, a frozen Linear, state kept
//! for the backward pass. Each kernel is one pass over memory, split by rows over candle's
//! threads; `ops` picks these on CPU for f32 and keeps the composed ones elsewhere.
//! `docs/BENCHMARKS.md` has the comparison. LayerNorm is in `layer_norm`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, TensorId};

use crate::kernels::bf16::{self, PackedBf16};
use crate::kernels::int8::{self, QuantizedI8};
use crate::kernels::matmul::{linear_forward, matmul_into, View};
use crate::kernels::parallel::{par_rows, par_vec, par_zeros, threads, ROW};
use crate::kernels::simd::{dot, erf, exp, softmax_in_place, with_wide_simd};

pub(crate) fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused op needs a contiguous input".into()))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// [`contiguous`] for each of a custom op's inputs.
pub(crate) fn contiguous_all<'a, const N: usize>(
    inputs: [(&'a CpuStorage, &Layout); N],
) -> Result<[&'a [f32]; N]> {
    let mut values = [&[][..]; N];
    for (value, (storage, layout)) in values.iter_mut().zip(inputs) {
        *value = contiguous(storage, layout)?;
    }
    Ok(values)
}

/// Runs `f` on the values of a contiguous f32 CPU tensor, borrowed, not copied.
pub(crate) fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    with_all_values(&[t], |values| f(values[0]))
}

/// [`with_values`] for several tensors at once.
pub(crate) fn with_all_values<R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<R> {
    let tensors = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let values = guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            candle_core::Storage::Cpu(cpu) => contiguous(cpu, layout),
            _ => candle_core::bail!("fused op: a CPU tensor was expected"),
        })
        .collect::<Result<Vec<_>>>()?;
    f(&values)
}

/// `dx = g W`, or `dx += g W` when `accumulate`: a Linear's input gradient from its output's.
fn linear_input_grad_into(
    g: &[f32],
    rows: usize,
    w: &[f32],
    (n, k): (usize, usize),
    dx: &mut [f32],
    accumulate: bool,
) {
    let (g, w) = (View::rows(g, rows, n), View::rows(w, n, k));
    matmul_into(dx, k, g, w, accumulate, threads());
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
        let [x, w, b] = contiguous_all([(s1, l1), (s2, l2), (s3, l3)])?;
        let (n, k) = l2.shape().dims2()?;
        if b.len() != n || l1.shape().dims().last() != Some(&k) {
            candle_core::bail!(
                "linear: input {:?}, weight {:?}, bias {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let out = linear_forward(x, x.len() / k.max(1), w, b, (n, k));
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
        let dev = x.device();
        with_values(grad, |values| {
            let dx = if x.track_op() {
                let dx = with_values(w, |w| {
                    let mut dx = par_zeros(rows * k);
                    linear_input_grad_into(values, rows, w, (n, k), &mut dx, false);
                    Ok(dx)
                })?;
                Some(Tensor::from_vec(dx, x.shape(), dev)?)
            } else {
                None
            };
            let dw = if w.track_op() {
                let dw = with_values(x, |x| {
                    let mut dw = vec![0f32; n * k];
                    let (g, x) = (View::rows(values, rows, n), View::rows(x, rows, k));
                    matmul_into(&mut dw, k, g.t(), x, false, threads());
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

/// `values` (rows of `scale.len()`) times `scale`, in place: an (IA)³ vector on a fused block's
/// product, or on its gradient.
pub(crate) fn scale_rows(values: &mut [f32], scale: &[f32]) {
    let width = scale.len();
    par_rows(values, width, |_, block| {
        for row in block.chunks_exact_mut(width) {
            row.iter_mut().zip(scale).for_each(|(v, s)| *v *= s);
        }
    });
}

/// A copy of `values` times `scale` ([`scale_rows`]).
pub(crate) fn scaled_rows(values: &[f32], scale: &[f32]) -> Vec<f32> {
    let mut scaled = values.to_vec();
    scale_rows(&mut scaled, scale);
    scaled
}

/// `dscale += sum over rows of grad * values` (rows of `dscale.len()`): a scale's gradient from
/// the scaled output's gradient and the unscaled output.
pub(crate) fn add_scale_grad(dscale: &mut [f32], grad: &[f32], values: &[f32]) {
    let width = dscale.len();
    for (g, v) in grad.chunks_exact(width).zip(values.chunks_exact(width)) {
        (dscale.iter_mut().zip(g).zip(v)).for_each(|((d, g), v)| *d += g * v);
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

/// Rows (tokens) per block of a frozen block's backward pass: large enough for the matrix
/// products to run at full rate, small enough that a block's temporaries (its gradients, its
/// recomputed products) stay a few MiB, where the whole batch's would add to the peak.
pub(crate) const BACKWARD_ROWS: usize = 1024;

/// What a frozen block's forward pass leaves for its backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// Nothing: there is no backward pass (the input takes no gradient).
    None,
    /// The block's products, kept in memory until the backward pass.
    Kept,
    /// Nothing: the backward pass recomputes the products from the block's input, the same
    /// values to the bit (see `model::precision`: bf16 training, where they cost half).
    Recomputed,
}

/// A Linear that takes no gradient, held by the fused ops of frozen blocks (whose weights are
/// fields of the op, not graph inputs).
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    /// `[out, in]`
    pub weight: Tensor,
    /// `[out]`
    pub bias: Tensor,
    /// The weight in bf16 or int8, when the model runs so (`model::precision`): the forward
    /// product takes it; the backward one keeps the f32 weight.
    pub packed: Option<PackedWeight>,
}

/// A Linear's weight `W` (`[out, in]`) in a lower precision, and which weight tensor it was
/// made from: a copy is used only while the Linear still holds that tensor, so weights
/// replaced later are never read stale.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    of: TensorId,
    form: Packed,
}

#[derive(Debug, Clone)]
enum Packed {
    /// Packed for the forward product (`x W^T`); the backward one keeps f32 (see
    /// `model::precision`).
    Bf16(Arc<PackedBf16>),
    /// Quantised per output column, for inference.
    Int8(Arc<QuantizedI8>),
}

impl PackedWeight {
    /// `weight` (f32 on CPU) packed in bf16.
    pub fn bf16(weight: &Tensor) -> Result<Self> {
        Self::of(weight, |w, n, k| {
            Packed::Bf16(Arc::new(PackedBf16::pack(w, n, k)))
        })
    }

    /// `weight` (f32 on CPU) quantised to int8.
    pub fn int8(weight: &Tensor) -> Result<Self> {
        Self::of(weight, |w, n, k| {
            Packed::Int8(Arc::new(QuantizedI8::pack(w, n, k)))
        })
    }

    /// `weight` (`[n, k]`) as `pack` lays out its values.
    fn of(weight: &Tensor, pack: impl FnOnce(&[f32], usize, usize) -> Packed) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        Ok(Self {
            of: weight.id(),
            form: with_values(weight, |w| Ok(pack(w, n, k)))?,
        })
    }

    /// Whether the copy is in bf16.
    pub fn is_bf16(&self) -> bool {
        matches!(self.form, Packed::Bf16(_))
    }

    /// Whether this is a copy of `weight`.
    pub fn is_of(&self, weight: &Tensor) -> bool {
        self.of == weight.id()
    }

    /// `weight` packed the way this is.
    fn same_form(&self, weight: &Tensor) -> Result<Self> {
        match self.form {
            Packed::Bf16(_) => Self::bf16(weight),
            Packed::Int8(_) => Self::int8(weight),
        }
    }
}

impl FrozenLinear {
    /// `linear` when it has a bias and neither its weight nor its bias takes a gradient.
    pub fn of(linear: &candle_nn::Linear) -> Option<Self> {
        let bias = linear.bias()?;
        let weight = linear.weight();
        (!weight.track_op() && !bias.track_op()).then(|| Self {
            weight: weight.clone(),
            bias: bias.clone(),
            packed: None,
        })
    }

    /// This Linear with its products on `copy` when given: `copy` itself when it was made
    /// from this weight, else this weight packed the same way now (weights the hooks changed).
    pub fn packed_as(mut self, copy: Option<&PackedWeight>) -> Result<Self> {
        self.packed = match copy {
            None => None,
            Some(copy) if copy.is_of(&self.weight) => Some(copy.clone()),
            Some(copy) => Some(copy.same_form(&self.weight)?),
        };
        Ok(self)
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
        let dims = self.dims()?;
        match self.packed.as_ref().map(|p| &p.form) {
            Some(Packed::Bf16(packed)) => {
                return with_values(&self.bias, |b| Ok(bf16::linear(x, rows, packed, b)));
            }
            Some(Packed::Int8(quantized)) => {
                return with_values(&self.bias, |b| Ok(int8::linear(x, rows, quantized, b)));
            }
            None => {}
        }
        with_all_values(&[&self.weight, &self.bias], |v| {
            Ok(linear_forward(x, rows, v[0], v[1], dims))
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
        let dims = self.dims()?;
        with_values(&self.weight, |w| {
            linear_input_grad_into(g, rows, w, dims, dx, accumulate);
            Ok(())
        })
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
        let dx = with_all_values(&[y, grad], |v| {
            let (ys, gs) = (v[0], v[1]);
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
        })?;
        Ok(Some(Tensor::from_vec(dx, y.shape(), y.device())?))
    }
}

/// Exact GELU, `x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`.
pub struct GeluOp;

#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
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
        let dx = with_all_values(&[x, grad], |v| {
            let mut dx = v[1].to_vec();
            par_rows(&mut dx, ROW, |first, block| {
                gelu_backward(&v[0][first * ROW..], block)
            });
            Ok(dx)
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
        FrozenLinear {
            weight,
            bias,
            packed: None,
        }
    }

    /// Asserts that `fused` and `nodes` (the same function of `inputs`) agree within 1e-5, and
    /// so do their gradients of each input under the loss `sum(out * r)` (relative to the
    /// largest).
    pub fn assert_same_output_and_grads(
        nodes: &Tensor,
        fused: &Tensor,
        inputs: &[&Var],
        r: &Tensor,
        what: &str,
    ) -> Result<()> {
        let max = |t: &Tensor| t.abs()?.max_all()?.to_scalar::<f32>();
        let diff = max(&(nodes - fused)?)?;
        assert!(diff < 1e-5, "{what}: output differs by {diff}");
        let [nodes, fused] = [nodes, fused].map(|out| (out * r)?.sum_all()?.backward());
        let (nodes, fused) = (nodes?, fused?);
        for (i, input) in inputs.iter().enumerate() {
            let grad = |grads: &candle_core::backprop::GradStore| {
                grads.get(input.as_tensor()).expect("a gradient").clone()
            };
            let (by_nodes, by_fused) = (grad(&nodes), grad(&fused));
            let diff = max(&(&by_nodes - &by_fused)?)?;
            let scale = max(&by_nodes)?.max(1.0);
            assert!(
                diff < 1e-5 * scale,
                "{what}: input {i}'s gradient differs by {diff} (largest {scale})"
            );
        }
        Ok(())
    }
}
