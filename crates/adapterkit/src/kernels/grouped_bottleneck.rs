//! Many plain bottleneck adapters side by side, each over its own consecutive rows and with its
//! own LayerNorm (a `batch_split` or `parallel` of adapters, as `adapterkit serve` runs them),
//! as one op: each slice is computed on one thread, and the slices are spread over the pool.
//! Run slice by slice as separate ops, their few small ops each left the pool's other thread
//! idle (8 adapters over 64 short texts took 12% longer than one adapter over all of them).
//! Evaluation only: frozen weights, no dropout, no backward pass.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use crate::kernels::fused::{contiguous_all, with_all_values, FrozenLinear};
use crate::kernels::layer_norm::LayerNormOp;
use crate::kernels::matmul::{matmul_onto_bias, View};
use crate::kernels::parallel::map_parallel;
use crate::model::ops::Activation;

/// What the adapters' skip connection adds (AdapterHub's `residual_before_ln`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residual {
    /// The sub-layer's output (`true`).
    Hidden,
    /// The sub-layer's output plus its input (`"post_add"`).
    Sum,
    /// What the adapter reads, after the original LayerNorm (`false`).
    Normed,
}

/// One slice: its rows and, if an adapter sits there, its projections.
pub struct Slice {
    /// Token rows of the batch (sequences x positions).
    pub rows: Range<usize>,
    /// `(down, up, scaling)`; `None`: the plain sub-layer, `LayerNorm(hidden + input)`.
    pub adapter: Option<(FrozenLinear, FrozenLinear, f32)>,
    /// The slice's original LayerNorm: weight and bias.
    pub norm: (Tensor, Tensor),
}

/// Arguments: the sub-layer's output (`hidden`) and input, `[..., width]`, contiguous.
/// Per slice: `LayerNorm(up(act(down(x))) * scaling + residual + input)`, where `x` is
/// `hidden`, or `LayerNorm(hidden + input)` when `norm_before` (AdapterHub's
/// `original_ln_before`).
pub struct GroupedBottleneckOp {
    pub slices: Vec<Slice>,
    pub activation: Activation,
    pub norm_before: bool,
    pub residual: Residual,
    pub eps: f64,
}

impl GroupedBottleneckOp {
    fn forward(&self, hidden: &[f32], input: &[f32], width: usize) -> Result<Vec<f32>> {
        let rows = hidden.len() / width.max(1);
        let mut expected = 0;
        for slice in &self.slices {
            if slice.rows.start != expected || slice.rows.end < slice.rows.start {
                candle_core::bail!("grouped bottleneck: slices must cover the rows in order");
            }
            expected = slice.rows.end;
        }
        if expected != rows || input.len() != hidden.len() {
            candle_core::bail!("grouped bottleneck: {rows} rows, slices cover {expected}");
        }
        let mut tensors: Vec<&Tensor> = Vec::new();
        for slice in &self.slices {
            tensors.extend([&slice.norm.0, &slice.norm.1]);
            if let Some((down, up, _)) = &slice.adapter {
                tensors.extend([&down.weight, &down.bias, &up.weight, &up.bias]);
            }
        }
        let mut out = vec![0f32; hidden.len()];
        with_all_values(&tensors, |values| {
            let mut values = values.iter();
            let mut next = || values.next().copied().unwrap_or_default();
            let mut work = Vec::with_capacity(self.slices.len());
            let mut rest = out.as_mut_slice();
            for slice in &self.slices {
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(slice.rows.len() * width);
                rest = tail;
                let norm = (next(), next());
                let adapter = slice.adapter.as_ref().map(|(_, _, scaling)| AdapterValues {
                    down_weight: next(),
                    down_bias: next(),
                    up_weight: next(),
                    up_bias: next(),
                    scaling: *scaling,
                });
                work.push((slice.rows.clone(), norm, adapter, mine));
            }
            let results = map_parallel(work, |_, (rows, norm, adapter, out)| {
                let range = rows.start * width..rows.end * width;
                let (hidden, input) = (&hidden[range.clone()], &input[range]);
                self.slice(hidden, input, width, norm, adapter, out)
            });
            results.into_iter().collect::<Result<Vec<()>>>()
        })?;
        Ok(out)
    }

    /// One slice, on the calling thread.
    fn slice(
        &self,
        hidden: &[f32],
        input: &[f32],
        width: usize,
        (norm_weight, norm_bias): (&[f32], &[f32]),
        adapter: Option<AdapterValues>,
        out: &mut [f32],
    ) -> Result<()> {
        let rows = hidden.len() / width.max(1);
        let norm = |x: &[f32], dst: &mut [f32]| {
            LayerNormOp::normalize_into(x, norm_weight, norm_bias, self.eps, dst)
        };
        let sum: Vec<f32> = hidden.iter().zip(input).map(|(h, i)| h + i).collect();
        let Some(adapter) = adapter else {
            // No adapter here: the plain sub-layer.
            norm(&sum, out);
            return Ok(());
        };
        let normed = self.norm_before.then(|| {
            let mut x = vec![0f32; sum.len()];
            norm(&sum, &mut x);
            x
        });
        let x = normed.as_deref().unwrap_or(hidden);
        let residual = match self.residual {
            _ if !self.norm_before => hidden,
            Residual::Hidden => hidden,
            Residual::Sum => &sum,
            Residual::Normed => x,
        };
        let bottleneck = adapter.down_bias.len();
        let down = View::rows(adapter.down_weight, bottleneck, width).t();
        let mut mid = matmul_onto_bias(View::rows(x, rows, width), down, adapter.down_bias, 1);
        mid.iter_mut()
            .for_each(|v| *v = activate(self.activation, *v));
        let up = View::rows(adapter.up_weight, width, bottleneck).t();
        let up = matmul_onto_bias(View::rows(&mid, rows, bottleneck), up, adapter.up_bias, 1);
        // (up + residual) + input, added in the order the adapter alone adds them
        // (`LayerNorm::of_sum`), so that large values round alike.
        let total: Vec<f32> = (up.iter().zip(residual).zip(input))
            .map(|((u, r), i)| u * adapter.scaling + r + i)
            .collect();
        norm(&total, out);
        Ok(())
    }
}

/// An adapter's weights, borrowed: `down` `[bottleneck, width]`, `up` `[width, bottleneck]`.
struct AdapterValues<'a> {
    down_weight: &'a [f32],
    down_bias: &'a [f32],
    up_weight: &'a [f32],
    up_bias: &'a [f32],
    scaling: f32,
}

/// The non-linearity on one value, as candle's ops compute it.
fn activate(activation: Activation, x: f32) -> f32 {
    match activation {
        Activation::Gelu => crate::kernels::fused::gelu(x),
        Activation::GeluNew => {
            let inner = (2.0f32 / std::f32::consts::PI).sqrt() * x * (1.0 + 0.044715 * x * x);
            0.5 * x * (1.0 + inner.tanh())
        }
        Activation::Relu => x.max(0.0),
        Activation::Swish => x / (1.0 + (-x).exp()),
        Activation::Tanh => x.tanh(),
    }
}

impl CustomOp2 for GroupedBottleneckOp {
    fn name(&self) -> &'static str {
        "grouped-bottleneck"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("grouped bottleneck: hidden {l1:?}, input {l2:?}");
        }
        let width = l1.dims().last().copied().unwrap_or(0);
        let [hidden, input] = contiguous_all([(s1, l1), (s2, l2)])?;
        let out = self.forward(hidden, input, width)?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}
