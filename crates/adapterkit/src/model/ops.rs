//! Differentiable building blocks. candle's fused `layer_norm` and `softmax_last_dim` have no
//! backward pass, so the encoder uses these, composed from ops that candle can differentiate.

use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::kernels::attention::AttentionOp;
use crate::kernels::fused::{Activations, FrozenLinear, PackedWeight};
use crate::model::hooks::{LayerHooks, LinearChange, LinearSite, OutputScale, OutputUpdate};
use crate::model::Mode;

/// A non-linearity, by the names `transformers` (`hidden_act`) and AdapterHub (`non_linearity`) use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU, `x * Phi(x)` (`transformers`' "gelu"; AdapterHub's legacy "gelu_orig").
    #[serde(alias = "gelu_orig")]
    Gelu,
    /// GELU's tanh approximation (`transformers`' "gelu_new" and "gelu_pytorch_tanh").
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
    Relu,
    /// `x * sigmoid(x)`.
    #[serde(alias = "silu")]
    Swish,
    Tanh,
}

impl Activation {
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu if fused_applies(x) => {
                x.contiguous()?.apply_op1(crate::kernels::fused::GeluOp)
            }
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluNew => x.gelu(),
            Activation::Relu => x.relu(),
            Activation::Swish => x.silu(),
            Activation::Tanh => x.tanh(),
        }
    }
}

/// Whether the fused CPU kernels (`model::fused`) apply.
pub(crate) fn fused_applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_applies(x) {
        return x.contiguous()?.apply_op3(
            weight,
            bias,
            crate::kernels::layer_norm::LayerNormOp { eps },
        );
    }
    layer_norm_composed(x, weight, bias, eps)
}

/// [`layer_norm`] composed from candle's differentiable ops (any device and dtype).
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(variance + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Softmax over the last dimension, shifted by the row maximum for stability.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused_applies(x) {
        return x.contiguous()?.apply_op1(crate::kernels::fused::SoftmaxOp);
    }
    softmax_composed(x)
}

/// Multi-head attention, `dropout(softmax(q k^T / sqrt(head_dim) + bias)) v` per head:
/// `query` `[batch, queries, hidden]`, `key` and `value` `[batch, keys, hidden]` (heads side by
/// side in `hidden`), `bias` `[batch, 1, 1, keys]` (the padding mask); `[batch, queries,
/// hidden]` out. On CPU in f32 one fused op (`kernels::attention`), elsewhere composed.
pub fn attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    bias: &Tensor,
    heads: usize,
    dropout: f32,
    mode: &mut Mode,
) -> Result<Tensor> {
    let (batch, queries, hidden) = query.dims3()?;
    let keys = key.dim(1)?;
    if fused_applies(query) && bias.dims() == [batch, 1, 1, keys] && !bias.track_op() {
        let mask = attention_dropout(mode, heads, queries, bias, dropout)?;
        let op = AttentionOp::new(heads, hidden, bias, mask)?;
        return query
            .contiguous()?
            .apply_op3(&key.contiguous()?, &value.contiguous()?, op);
    }
    attention_composed(query, key, value, bias, heads, dropout, mode)
}

/// [`attention`] composed from candle's differentiable ops (any device and dtype).
pub fn attention_composed(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    bias: &Tensor,
    heads: usize,
    dropout: f32,
    mode: &mut Mode,
) -> Result<Tensor> {
    let (batch, queries, hidden) = query.dims3()?;
    let head_dim = hidden / heads;
    // [batch, seq, hidden] -> [batch, heads, seq, head_dim]
    let split = |x: &Tensor| -> Result<Tensor> {
        let seq = x.dim(1)?;
        x.reshape((batch, seq, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (query, key, value) = (split(query)?, split(key)?, split(value)?);
    let scores = query.matmul(&key.t()?.contiguous()?)?;
    let scores = (scores * (1.0 / (head_dim as f64).sqrt()))?.broadcast_add(bias)?;
    let probs = mode.dropout(&softmax_composed(&scores)?, dropout)?;
    probs
        .matmul(&value)?
        .transpose(1, 2)?
        .reshape((batch, queries, hidden))
}

/// [`softmax_last_dim`] composed from candle's differentiable ops (any device and dtype).
pub fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    // The shift is a constant for the gradient: detaching it keeps the backward graph small.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// The additive attention bias of a padding mask: 0 where `mask` is 1, a very large negative
/// number where it is 0 (as `transformers` does with the dtype's minimum), shaped
/// `[batch, 1, 1, seq]` to broadcast over heads and query positions.
pub fn attention_bias(mask: &Tensor) -> Result<Tensor> {
    let (batch, seq) = mask.dims2()?;
    let keep = mask.to_dtype(DType::F32)?;
    let bias = ((1.0 - keep)? * f32::MIN as f64)?;
    bias.reshape((batch, 1, 1, seq))
}

/// `x W^T + b` over the last dimension of `x`: on CPU in f32 one op (`model::fused::LinearOp`)
/// whose backward pass computes only the gradients that are needed (for a frozen Linear, only
/// `dL/dx`); elsewhere, and without a bias, candle's.
pub fn linear(linear: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    match linear.bias() {
        Some(bias) if fused_applies(x) => {
            x.contiguous()?
                .apply_op3(linear.weight(), bias, crate::kernels::fused::LinearOp)
        }
        _ => linear.forward(x),
    }
}

/// [`linear`] with the hooks' change to `site`'s Linear in `layer`, if they make one.
pub fn hooked_linear(
    hooks: &dyn LayerHooks,
    layer: usize,
    site: LinearSite,
    weights: &candle_nn::Linear,
    x: &Tensor,
    mode: &mut Mode,
) -> Result<Tensor> {
    match hooks.linear(layer, site, weights) {
        None => linear(weights, x),
        Some(LinearChange::Weights(changed)) => linear(&changed, x),
        Some(LinearChange::Apply(change)) => change(x, linear(weights, x)?, mode),
        Some(LinearChange::Add(update)) => linear(weights, x)?.broadcast_add(&update(x, mode)?),
        Some(LinearChange::Scale(scale)) => linear(weights, x)?.broadcast_mul(&scale(mode)?),
    }
}

/// What the hooks do to a frozen Linear's output that a fused op may take as an input.
pub enum FusedChange<'h> {
    Add(OutputUpdate<'h>),
    Scale(OutputScale<'h>),
}

/// A frozen Linear as a fused op takes it, and the hooks' change to its output, if any.
pub type FrozenWithChange<'h> = (FrozenLinear, Option<FusedChange<'h>>);

/// A block's Linears as the fused ops take them (frozen, with the hooks' weights where they
/// give some, with their products on the block's `packed` copies when it has some), each with
/// the update or scale the hooks give its output, if any; `None` when one is trainable or the
/// hooks change one otherwise.
pub fn frozen_linears<'h, const N: usize>(
    hooks: &'h dyn LayerHooks,
    layer: usize,
    linears: [(LinearSite, &candle_nn::Linear); N],
    packed: Option<&[PackedWeight; N]>,
) -> Result<Option<[FrozenWithChange<'h>; N]>> {
    let mut frozen = Vec::with_capacity(N);
    for (i, (site, base)) in linears.into_iter().enumerate() {
        let (linear, change) = match hooks.linear(layer, site, base) {
            None => (FrozenLinear::of(base), None),
            Some(LinearChange::Weights(changed)) => (FrozenLinear::of(&changed), None),
            Some(LinearChange::Add(update)) => {
                (FrozenLinear::of(base), Some(FusedChange::Add(update)))
            }
            Some(LinearChange::Scale(scale)) => {
                (FrozenLinear::of(base), Some(FusedChange::Scale(scale)))
            }
            Some(LinearChange::Apply(_)) => (None, None),
        };
        let Some(linear) = linear else {
            return Ok(None);
        };
        frozen.push((linear.packed_as(packed.map(|copies| &copies[i]))?, change));
    }
    Ok(frozen.try_into().ok())
}

/// What a frozen block with `inputs` and weights packed as `packed` leaves for its backward
/// pass: nothing without one (no input takes a gradient); in bf16 nothing either, the backward
/// pass recomputing the products at the bf16 rate (`model::precision`); else the products.
pub fn block_activations<const N: usize>(
    inputs: &[&Tensor],
    packed: Option<&[PackedWeight; N]>,
) -> Activations {
    if !inputs.iter().any(|x| x.track_op()) {
        Activations::None
    } else if packed.is_some_and(|copies| copies.iter().all(PackedWeight::is_bf16)) {
        Activations::Recomputed
    } else {
        Activations::Kept
    }
}

/// The dropout mask over the attention probabilities `[batch, heads, queries, keys]` (`bias`
/// is `[batch, 1, 1, keys]`), drawn from `mode`; `None` in evaluation or when `p` is 0.
pub fn attention_dropout(
    mode: &mut Mode,
    heads: usize,
    queries: usize,
    bias: &Tensor,
    p: f32,
) -> Result<Option<crate::kernels::dropout::DropoutMask>> {
    let (batch, _, _, keys) = bias.dims4()?;
    Ok(mode.dropout_mask(batch * heads * queries * keys, p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The fused kernels against the composed ops: outputs and the gradients of every input,
    /// on a small tensor (one thread) and one large enough to be split over threads.
    #[test]
    fn fused_kernels_match_the_composed_ops() -> Result<()> {
        for shape in [(3, 4, 16), (64, 8, 256)] {
            compare_fused_and_composed(shape)?;
        }
        Ok(())
    }

    fn compare_fused_and_composed(shape: (usize, usize, usize)) -> Result<()> {
        let mut rng = crate::rng::SeededRng::new(5);
        let dev = Device::Cpu;
        let h = shape.2;
        let x = Var::from_tensor(&rng.normal_tensor(shape, 0.5, 2.0, &dev)?)?;
        let w = Var::from_tensor(&rng.normal_tensor(h, 1.0, 0.3, &dev)?)?;
        let b = Var::from_tensor(&rng.normal_tensor(h, 0.0, 0.3, &dev)?)?;
        let probe = rng.normal_tensor(shape, 0.0, 1.0, &dev)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        type Run<'a> = Box<dyn Fn() -> Result<Tensor> + 'a>;
        let runs: [(&str, Run, Run); 3] = [
            (
                "layer_norm",
                Box::new(|| layer_norm(&x, &w, &b, 1e-5)),
                Box::new(|| layer_norm_composed(&x, &w, &b, 1e-5)),
            ),
            (
                "softmax",
                Box::new(|| softmax_last_dim(&x)),
                Box::new(|| softmax_composed(&x)),
            ),
            (
                "gelu",
                Box::new(|| Activation::Gelu.forward(&x)),
                Box::new(|| x.gelu_erf()),
            ),
        ];
        for (name, fused, composed) in runs {
            let (f, c) = (fused()?, composed()?);
            assert!(max_diff(&f, &c)? < 1e-5, "{name} forward, {shape:?}");
            let gf = (f * &probe)?.sum_all()?.backward()?;
            let gc = (c * &probe)?.sum_all()?.backward()?;
            for var in [&x, &w, &b] {
                if let (Some(a), Some(b)) = (gf.get(var.as_tensor()), gc.get(var.as_tensor())) {
                    let tolerance = 1e-4 * (1.0 + b.abs()?.max_all()?.to_scalar::<f32>()?);
                    let diff = max_diff(a, b)?;
                    assert!(diff < tolerance, "{name} gradient, {shape:?}: {diff}");
                } else {
                    assert_eq!(
                        gf.get(var.as_tensor()).is_some(),
                        gc.get(var.as_tensor()).is_some(),
                        "{name}: same inputs get gradients"
                    );
                }
            }
        }
        Ok(())
    }

    /// Fused attention against the composed ops, with and without dropout (the same seed draws
    /// the same mask), on padded batches with more keys than queries (as with a prefix):
    /// outputs and the gradients of queries, keys and values.
    #[test]
    fn fused_attention_matches_the_composed_ops() -> Result<()> {
        let mut rng = crate::rng::SeededRng::new(9);
        let dev = Device::Cpu;
        for (batch, heads, queries, keys, head_dim) in [(2, 3, 5, 7, 4), (8, 4, 64, 64, 16)] {
            let hidden = heads * head_dim;
            let mut var = |seq| -> Result<Var> {
                Var::from_tensor(&rng.normal_tensor((batch, seq, hidden), 0.0, 1.0, &dev)?)
            };
            let (q, k, v) = (var(queries)?, var(keys)?, var(keys)?);
            let mut mask = vec![1u32; batch * keys];
            mask[keys - 2..keys].iter_mut().for_each(|m| *m = 0); // padding in sequence 0
            let bias = attention_bias(&Tensor::from_vec(mask, (batch, keys), &dev)?)?;
            let probe = rng.normal_tensor((batch, queries, hidden), 0.0, 1.0, &dev)?;
            for train in [false, true] {
                let mode = || {
                    if train {
                        crate::model::Mode::train(4)
                    } else {
                        crate::model::Mode::Eval
                    }
                };
                let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
                let fused = attention(qt, kt, vt, &bias, heads, 0.1, &mut mode())?;
                let composed = attention_composed(qt, kt, vt, &bias, heads, 0.1, &mut mode())?;
                let diff = (&fused - &composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "forward, train {train}: {diff}");
                let gf = (fused * &probe)?.sum_all()?.backward()?;
                let gc = (composed * &probe)?.sum_all()?.backward()?;
                for (name, x) in [("q", qt), ("k", kt), ("v", vt)] {
                    let (a, b) = (gf.get(x).unwrap(), gc.get(x).unwrap());
                    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(diff < 1e-5, "d{name}, train {train}: {diff}");
                }
            }
        }
        Ok(())
    }

    /// The fused Linear against candle's: outputs, and the gradients of exactly the arguments
    /// that take one (input only for a frozen Linear; input, weight and bias for a trained one).
    #[test]
    fn fused_linear_matches_candle_and_computes_only_the_gradients_needed() -> Result<()> {
        use candle_core::Module;
        let mut rng = crate::rng::SeededRng::new(3);
        let dev = Device::Cpu;
        let x = Var::from_tensor(&rng.normal_tensor((2, 3, 7), 0.0, 1.0, &dev)?)?;
        let probe = rng.normal_tensor((2, 3, 5), 0.0, 1.0, &dev)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        for trained in [false, true] {
            let weight = rng.normal_tensor((5, 7), 0.0, 1.0, &dev)?;
            let bias = rng.normal_tensor(5, 0.0, 1.0, &dev)?;
            let (weight, bias) = if trained {
                let as_var = |t: &Tensor| Var::from_tensor(t).map(|v| v.as_tensor().clone());
                (as_var(&weight)?, as_var(&bias)?)
            } else {
                (weight, bias)
            };
            let linear = candle_nn::Linear::new(weight.clone(), Some(bias.clone()));
            let candle = linear.forward(x.as_tensor())?;
            let fused = super::linear(&linear, x.as_tensor())?;
            assert!(
                max_diff(&candle, &fused)? < 1e-5,
                "forward, trained {trained}"
            );

            let g_candle = (candle * &probe)?.sum_all()?.backward()?;
            let g_fused = (fused * &probe)?.sum_all()?.backward()?;
            for (name, t) in [("x", x.as_tensor()), ("weight", &weight), ("bias", &bias)] {
                match (g_candle.get(t), g_fused.get(t)) {
                    (Some(a), Some(b)) => {
                        let diff = max_diff(a, b)?;
                        assert!(diff < 1e-5, "d{name}, trained {trained}: {diff}");
                    }
                    (None, None) => assert!(!trained && name != "x", "d{name} missing"),
                    (a, b) => panic!(
                        "d{name}, trained {trained}: candle {}, fused {}",
                        a.is_some(),
                        b.is_some()
                    ),
                }
            }
        }
        Ok(())
    }
}
