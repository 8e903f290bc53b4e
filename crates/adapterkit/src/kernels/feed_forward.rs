//! A frozen layer's feed-forward block, `dropout(gelu((x W1^T + b1) * s) W2^T + b2)` (the scale
//! `s` an (IA)³ vector, where there is one), as one CPU op whose backward pass returns `dL/dx`
//! and `dL/ds`.
//!
//! As separate graph nodes, the block keeps four tensors per layer for the backward pass (the
//! expansion, its GELU, the projection and a float dropout mask), and candle's backward pass
//! zero-fills and adds a gradient into each, two of them `[tokens, intermediate]`. With the
//! weights frozen (adapter training, inference), this op keeps only the expansion before GELU
//! (or nothing, recomputing it in the backward pass) and a bit mask; the weights are fields
//! of the op, not graph inputs.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::kernels::dropout::{self, DropoutMask};
use crate::kernels::fused::{
    add_scale_grad, contiguous_all, gelu_backward, gelu_forward, gelu_in_place, scale_rows,
    scaled_rows, with_all_values, with_values, Activations, FrozenLinear, Kept, BACKWARD_ROWS,
};
use crate::kernels::parallel::{par_rows, par_vec, par_zeros, ROW};

pub struct FeedForwardOp {
    /// `intermediate.dense`
    pub expand: FrozenLinear,
    /// `output.dense`
    pub project: FrozenLinear,
    pub dropout: Option<DropoutMask>,
    /// Whether the expansion is kept for the backward pass, recomputed there, or not needed.
    pub activations: Activations,
    /// The expansion `x W1^T + b1` (not scaled), `[tokens, intermediate]`, for the backward
    /// pass.
    expansion: Kept<Vec<f32>>,
}

impl FeedForwardOp {
    pub fn new(
        expand: FrozenLinear,
        project: FrozenLinear,
        dropout: Option<DropoutMask>,
        activations: Activations,
    ) -> Self {
        Self {
            expand,
            project,
            dropout,
            activations,
            expansion: Kept::new(),
        }
    }

    /// The op on `x`, the expansion scaled by `scale` `[intermediate]` where given.
    pub fn apply(self, x: &Tensor, scale: Option<&Tensor>) -> Result<Tensor> {
        let scale = match scale {
            Some(scale) => scale.flatten_all()?,
            None => Tensor::zeros(0, DType::F32, x.device())?,
        };
        x.contiguous()?.apply_op2(&scale, self)
    }

    /// `(intermediate, hidden)`, checked against both Linears.
    fn sizes(&self) -> Result<(usize, usize)> {
        let (i, h) = self.expand.dims()?;
        if self.project.dims()? != (h, i) {
            candle_core::bail!(
                "feed-forward: weights {:?} and {:?}",
                self.expand.weight.shape(),
                self.project.weight.shape()
            );
        }
        Ok((i, h))
    }
}

impl CustomOp2 for FeedForwardOp {
    fn name(&self) -> &'static str {
        "fused-feed-forward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [x, scale] = contiguous_all([(s1, l1), (s2, l2)])?;
        let (i, h) = self.sizes()?;
        if l1.shape().dims().last() != Some(&h) || !(scale.is_empty() || scale.len() == i) {
            candle_core::bail!(
                "feed-forward: input {:?}, scale {:?}, hidden {h}, intermediate {i}",
                l1.shape(),
                l2.shape()
            );
        }
        let rows = x.len() / h;
        let mut expansion = self.expand.forward(x, rows)?;
        let keep = self.activations == Activations::Kept;
        let mut out = if keep {
            let activation = match scale.is_empty() {
                true => par_vec(expansion.len(), ROW, |first, block| {
                    gelu_forward(&expansion[first * ROW..], block)
                }),
                false => {
                    let mut scaled = scaled_rows(&expansion, scale);
                    par_rows(&mut scaled, ROW, |_, block| gelu_in_place(block));
                    scaled
                }
            };
            self.project.forward(&activation, rows)?
        } else {
            // Not kept, the expansion is not needed after its GELU.
            if !scale.is_empty() {
                scale_rows(&mut expansion, scale);
            }
            par_rows(&mut expansion, ROW, |_, block| gelu_in_place(block));
            self.project.forward(&expansion, rows)?
        };
        dropout::apply(self.dropout.as_ref(), &mut out);
        if keep {
            self.expansion.put(expansion);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// `d = (g * mask) W2 * gelu'(e s)` for the expansion `e`, then `ds = sum over rows of
    /// d * e` and `dx = (d * s) W1`, in blocks of rows: only a block's `[rows, intermediate]`
    /// gradient (and its expansion, when recomputed) exists at a time.
    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (i, h) = self.sizes()?;
        let rows = x.elem_count() / h;
        let kept = match self.activations {
            Activations::Recomputed => None,
            _ => Some(self.expansion.take("feed-forward")?),
        };
        let mut g = with_values(grad, |g| Ok(g.to_vec()))?;
        dropout::apply(self.dropout.as_ref(), &mut g);
        let mut dscale = scale.track_op().then(|| vec![0f32; i]);
        with_all_values(&[x, scale], |values| {
            let (x, scale) = (values[0], values[1]);
            for first in (0..rows).step_by(BACKWARD_ROWS) {
                let n = BACKWARD_ROWS.min(rows - first);
                let recomputed;
                let expansion = match &kept {
                    Some(kept) => &kept[first * i..][..n * i],
                    None => {
                        recomputed = self.expand.forward(&x[first * h..][..n * h], n)?;
                        &recomputed[..]
                    }
                };
                let scaled = (!scale.is_empty()).then(|| scaled_rows(expansion, scale));
                let activated = scaled.as_deref().unwrap_or(expansion);
                let g = &mut g[first * h..][..n * h];
                let mut d_expansion = par_zeros(n * i);
                self.project.backward_into(g, n, &mut d_expansion, false)?;
                par_rows(&mut d_expansion, ROW, |first, block| {
                    gelu_backward(&activated[first * ROW..], block)
                });
                if let Some(dscale) = dscale.as_mut() {
                    add_scale_grad(dscale, &d_expansion, expansion);
                }
                if !scale.is_empty() {
                    scale_rows(&mut d_expansion, scale);
                }
                // This block's rows of `g` are read: they become those of `dx`.
                self.expand.backward_into(&d_expansion, n, g, false)?;
            }
            Ok(())
        })?;
        let dx = match x.track_op() {
            true => Some(Tensor::from_vec(g, x.shape(), x.device())?),
            false => None,
        };
        let dscale = dscale
            .map(|d| Tensor::from_vec(d, scale.shape(), scale.device()))
            .transpose()?;
        Ok((dx, dscale))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::testing::{assert_same_output_and_grads, frozen, random};
    use crate::model::ops::{linear, Activation};
    use crate::model::Mode;
    use crate::rng::SeededRng;
    use candle_core::Var;
    use candle_nn::Linear;

    /// Output, `dL/dx` and the scale's gradient of the op against the block node by node
    /// (candle's backward pass), with the expansion kept and recomputed, with and without
    /// dropout, with and without a scale (and an input without a gradient), on a block small
    /// enough for one thread, one split over threads, and one of several backward blocks.
    #[test]
    fn matches_the_block_node_by_node() -> Result<()> {
        let mut rng = SeededRng::new(3);
        let sizes = [(5, 8, 32), (300, 64, 256), (2 * BACKWARD_ROWS + 3, 8, 16)];
        for (tokens, hidden, intermediate) in sizes {
            let w1 = random(&mut rng, &[intermediate, hidden])?;
            let b1 = random(&mut rng, &[intermediate])?;
            let w2 = (random(&mut rng, &[hidden, intermediate])? * 0.1)?;
            let b2 = random(&mut rng, &[hidden])?;
            let x = Var::from_tensor(&random(&mut rng, &[1, tokens, hidden])?)?;
            let r = random(&mut rng, &[1, tokens, hidden])?;
            let kept_or_recomputed = [Activations::Kept, Activations::Recomputed];
            let scale = Var::from_tensor(&(random(&mut rng, &[intermediate])? + 1.0)?)?;
            let cases = [0.0, 0.3].into_iter().flat_map(|p| {
                kept_or_recomputed.into_iter().flat_map(move |a| {
                    [(false, true), (true, true), (true, false)].map(|s| (p, a, s))
                })
            });
            for (p, activations, (scaled, x_grad)) in cases {
                let x_input = match x_grad {
                    true => x.as_tensor().clone(),
                    false => x.as_tensor().detach(),
                };
                let scale = scaled.then_some(&scale);
                let (mut node_mode, mut fused_mode) = (Mode::train(7), Mode::train(7));
                let expand = Linear::new(w1.clone(), Some(b1.clone()));
                let project = Linear::new(w2.clone(), Some(b2.clone()));
                let mut expansion = linear(&expand, &x_input)?;
                if let Some(scale) = scale {
                    expansion = expansion.broadcast_mul(scale.as_tensor())?;
                }
                let act = Activation::Gelu.forward(&expansion)?;
                let nodes = node_mode.dropout(&linear(&project, &act)?, p)?;

                let mask = fused_mode.dropout_mask(tokens * hidden, p);
                let (expand, project) = (frozen(&w1, &b1), frozen(&w2, &b2));
                let op = FeedForwardOp::new(expand, project, mask, activations);
                let fused = op.apply(&x_input, scale.map(|s| s.as_tensor()))?;
                let what = format!("p = {p}, {activations:?}, scaled {scaled}, dx {x_grad}");
                let inputs: Vec<&Var> = (x_grad.then_some(&x).into_iter()).chain(scale).collect();
                assert_same_output_and_grads(&nodes, &fused, &inputs, &r, &what)?;

                // Without a backward pass (GELU in place): the same output.
                let mask = Mode::train(7).dropout_mask(tokens * hidden, p);
                let (expand, project) = (frozen(&w1, &b1), frozen(&w2, &b2));
                let op = FeedForwardOp::new(expand, project, mask, Activations::None);
                let scale = scale.map(|s| s.as_tensor().detach());
                let inference = op.apply(&x.as_tensor().detach(), scale.as_ref())?;
                let diff = (&fused - &inference)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert_eq!(diff, 0.0, "p = {p}: inference output differs");
            }
        }
        Ok(())
    }

    #[test]
    fn backward_without_a_kept_forward_pass_is_an_error() -> Result<()> {
        let mut rng = SeededRng::new(4);
        let (w1, b1) = (random(&mut rng, &[8, 4])?, random(&mut rng, &[8])?);
        let (w2, b2) = (random(&mut rng, &[4, 8])?, random(&mut rng, &[4])?);
        let x = Var::from_tensor(&random(&mut rng, &[2, 4])?)?;
        let (expand, project) = (frozen(&w1, &b1), frozen(&w2, &b2));
        let op = FeedForwardOp::new(expand, project, None, Activations::None);
        let out = op.apply(x.as_tensor(), None)?;
        let err = out.sum_all()?.backward().unwrap_err().to_string();
        assert!(err.contains("without a kept forward pass"), "{err}");
        Ok(())
    }
}
