//! Differentiable building blocks. candle's fused `layer_norm` and `softmax_last_dim` have no
//! backward pass, so the encoder uses these, composed from ops that candle can differentiate.

use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

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
                x.contiguous()?.apply_op1(crate::model::fused::GeluOp)
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
fn fused_applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_applies(x) {
        return x
            .contiguous()?
            .apply_op3(weight, bias, crate::model::fused::LayerNormOp { eps });
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
        return x.contiguous()?.apply_op1(crate::model::fused::SoftmaxOp);
    }
    softmax_composed(x)
}

/// Attention probabilities, `dropout(softmax(scores * scale + bias))` over the last dimension:
/// `scores` `[batch, heads, queries, keys]`, `bias` `[batch, 1, 1, keys]` (the padding mask).
/// On CPU in f32 one fused op, which keeps its input and a byte mask for the backward pass
/// instead of the scaled, biased, normalised and dropped-out tensors: a fifth of the memory.
pub fn attention_probs(
    scores: &Tensor,
    bias: &Tensor,
    scale: f64,
    dropout: f32,
    mode: &mut crate::model::Mode,
) -> Result<Tensor> {
    let (batch, heads, queries, keys) = scores.dims4()?;
    if fused_applies(scores) && bias.dims() == [batch, 1, 1, keys] && !bias.track_op() {
        let op = crate::model::fused::AttentionProbsOp {
            scale: scale as f32,
            bias: bias.flatten_all()?.to_vec1()?,
            rows_per_batch: heads * queries,
            keep: mode.keep_mask(scores.elem_count(), dropout),
            keep_scale: 1.0 / (1.0 - dropout),
        };
        return scores.contiguous()?.apply_op1(op);
    }
    let scores = (scores * scale)?.broadcast_add(bias)?;
    mode.dropout(&softmax_last_dim(&scores)?, dropout)
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

/// `x W^T + b`, where a frozen `W` (a plain tensor, not a `Var`) takes no gradient: candle's
/// matmul backward computes the gradient of both operands, so through a frozen weight it does
/// a third of the backward work for nothing. This op's backward returns only `dL/dx`.
pub fn linear(linear: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    let weight = linear.weight();
    if weight.is_variable() || !x.track_op() || !x.device().is_cpu() || x.dtype() != DType::F32 {
        return linear.forward(x);
    }
    let dims = x.dims().to_vec();
    let k = *dims
        .last()
        .expect("a linear's input has a feature dimension");
    let rows = x.elem_count() / k.max(1);
    let y = x
        .reshape((rows, k))?
        .contiguous()?
        .apply_op1(FrozenMatmul {
            weight: weight.clone(),
        })?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("non-empty") = weight.dim(0)?;
    let y = y.reshape(out_dims)?;
    match linear.bias() {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `x [m, k] -> x W^T [m, n]` for a frozen `W [n, k]`.
struct FrozenMatmul {
    weight: Tensor,
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("frozen-matmul needs a contiguous input".into())
        })?;
        let x = Tensor::from_slice(
            &storage.as_slice::<f32>()?[start..end],
            layout.shape(),
            &candle_core::Device::Cpu,
        )?;
        let y = x.matmul(&self.weight.t()?)?;
        let shape = y.shape().clone();
        Ok((
            candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?),
            shape,
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.weight)?))
    }
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

    /// The fused attention probabilities against scale, mask, softmax and dropout composed,
    /// with and without dropout (the same seed draws the same mask), on a padded batch.
    #[test]
    fn fused_attention_probs_match_the_composed_ops() -> Result<()> {
        let mut rng = crate::rng::SeededRng::new(9);
        let dev = Device::Cpu;
        for (batch, heads, seq) in [(2, 3, 5), (8, 4, 64)] {
            let x =
                Var::from_tensor(&rng.normal_tensor((batch, heads, seq, seq), 0.0, 3.0, &dev)?)?;
            let mut mask = vec![1u32; batch * seq];
            mask[seq - 2..seq].iter_mut().for_each(|m| *m = 0); // padding in sequence 0
            let bias = attention_bias(&Tensor::from_vec(mask, (batch, seq), &dev)?)?;
            let probe = rng.normal_tensor((batch, heads, seq, seq), 0.0, 1.0, &dev)?;
            for train in [false, true] {
                let mode = || {
                    if train {
                        crate::model::Mode::train(4)
                    } else {
                        crate::model::Mode::Eval
                    }
                };
                let fused = attention_probs(&x, &bias, 0.125, 0.1, &mut mode())?;
                let scaled = (x.as_tensor() * 0.125)?.broadcast_add(&bias)?;
                let composed = mode().dropout(&softmax_composed(&scaled)?, 0.1)?;
                let diff = (&fused - &composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-6, "forward, train {train}: {diff}");
                let gf = (fused * &probe)?.sum_all()?.backward()?;
                let gc = (composed * &probe)?.sum_all()?.backward()?;
                let (a, b) = (
                    gf.get(x.as_tensor()).unwrap(),
                    gc.get(x.as_tensor()).unwrap(),
                );
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-6, "gradient, train {train}: {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn frozen_linear_matches_linear_and_gives_only_the_input_gradient() -> Result<()> {
        let mut rng = crate::rng::SeededRng::new(3);
        let dev = Device::Cpu;
        let weight = rng.normal_tensor((5, 7), 0.0, 1.0, &dev)?;
        let bias = rng.normal_tensor(5, 0.0, 1.0, &dev)?;
        let linear = candle_nn::Linear::new(weight, Some(bias));
        let x = Var::from_tensor(&rng.normal_tensor((2, 3, 7), 0.0, 1.0, &dev)?)?;
        let probe = rng.normal_tensor((2, 3, 5), 0.0, 1.0, &dev)?;

        use candle_core::Module;
        let plain = linear.forward(x.as_tensor())?;
        let frozen = super::linear(&linear, x.as_tensor())?;
        let diff = (&plain - &frozen)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");

        let g_plain = (plain * &probe)?.sum_all()?.backward()?;
        let g_frozen = (frozen * &probe)?.sum_all()?.backward()?;
        let (a, b) = (
            g_plain.get(x.as_tensor()).unwrap(),
            g_frozen.get(x.as_tensor()).unwrap(),
        );
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "input gradient differs by {diff}");
        assert!(
            g_frozen.get(linear.weight()).is_none(),
            "no gradient for the frozen weight"
        );
        Ok(())
    }
}
