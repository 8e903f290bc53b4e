//! A frozen layer's feed-forward block, `dropout(gelu(x W1^T + b1) W2^T + b2)`, as one CPU op
//! whose backward pass returns `dL/dx` alone.
//!
//! As separate graph nodes, the block keeps four tensors per layer for the backward pass (the
//! expansion, its GELU, the projection and a float dropout mask), and candle's backward pass
//! zero-fills and adds a gradient into each, two of them `[tokens, intermediate]`. With the
//! weights frozen (adapter training, inference), this op keeps only the expansion before GELU
//! (or nothing, recomputing it in the backward pass) and a bit mask; the weights are fields
//! of the op, not graph inputs.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::kernels::dropout::{self, DropoutMask};
use crate::kernels::fused::{
    contiguous, gelu_backward, gelu_forward, gelu_in_place, with_values, Activations, FrozenLinear,
    Kept, BACKWARD_ROWS,
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
    /// The expansion `x W1^T + b1`, `[tokens, intermediate]`, for the backward pass.
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

impl CustomOp1 for FeedForwardOp {
    fn name(&self) -> &'static str {
        "fused-feed-forward"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(storage, layout)?;
        let h = self.sizes()?.1;
        if layout.shape().dims().last() != Some(&h) {
            candle_core::bail!("feed-forward: input {:?}, hidden {h}", layout.shape());
        }
        let rows = x.len() / h;
        let mut expansion = self.expand.forward(x, rows)?;
        let keep = self.activations == Activations::Kept;
        let mut out = if keep {
            let activation = par_vec(expansion.len(), ROW, |first, block| {
                gelu_forward(&expansion[first * ROW..], block)
            });
            self.project.forward(&activation, rows)?
        } else {
            // Not kept, the expansion is not needed after its GELU.
            par_rows(&mut expansion, ROW, |_, block| gelu_in_place(block));
            self.project.forward(&expansion, rows)?
        };
        dropout::apply(self.dropout.as_ref(), &mut out);
        if keep {
            self.expansion.put(expansion);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// `dx = ((g * mask) W2 * gelu'(expansion)) W1`, in blocks of rows: only a block's
    /// `[rows, intermediate]` gradient (and its expansion, when recomputed) exists at a time.
    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (i, h) = self.sizes()?;
        let rows = x.elem_count() / h;
        let kept = match self.activations {
            Activations::Recomputed => None,
            _ => Some(self.expansion.take("feed-forward")?),
        };
        let mut g = with_values(grad, |g| Ok(g.to_vec()))?;
        dropout::apply(self.dropout.as_ref(), &mut g);
        with_values(x, |x| {
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
                let g = &mut g[first * h..][..n * h];
                let mut d_expansion = par_zeros(n * i);
                self.project.backward_into(g, n, &mut d_expansion, false)?;
                par_rows(&mut d_expansion, ROW, |first, block| {
                    gelu_backward(&expansion[first * ROW..], block)
                });
                // This block's rows of `g` are read: they become those of `dx`.
                self.expand.backward_into(&d_expansion, n, g, false)?;
            }
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(g, x.shape(), x.device())?))
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

    /// Output and `dL/dx` of the op against the block node by node (candle's backward pass),
    /// with the expansion kept and recomputed, with and without dropout, on a block small
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
            for (p, activations) in [0.0, 0.3]
                .into_iter()
                .flat_map(|p| kept_or_recomputed.map(|a| (p, a)))
            {
                let (mut node_mode, mut fused_mode) = (Mode::train(7), Mode::train(7));
                let expand = Linear::new(w1.clone(), Some(b1.clone()));
                let project = Linear::new(w2.clone(), Some(b2.clone()));
                let act = Activation::Gelu.forward(&linear(&expand, x.as_tensor())?)?;
                let nodes = node_mode.dropout(&linear(&project, &act)?, p)?;

                let mask = fused_mode.dropout_mask(tokens * hidden, p);
                let (expand, project) = (frozen(&w1, &b1), frozen(&w2, &b2));
                let op = FeedForwardOp::new(expand, project, mask, activations);
                let fused = x.as_tensor().apply_op1(op)?;
                let what = format!("p = {p}, {activations:?}");
                assert_same_output_and_grads(&nodes, &fused, &[&x], &r, &what)?;

                // Without a backward pass (GELU in place): the same output.
                let mask = Mode::train(7).dropout_mask(tokens * hidden, p);
                let (expand, project) = (frozen(&w1, &b1), frozen(&w2, &b2));
                let op = FeedForwardOp::new(expand, project, mask, Activations::None);
                let inference = x.as_tensor().detach().apply_op1(op)?;
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
        let out = x.as_tensor().apply_op1(op)?;
        let err = out.sum_all()?.backward().unwrap_err().to_string();
        assert!(err.contains("without a kept forward pass"), "{err}");
        Ok(())
    }
}
