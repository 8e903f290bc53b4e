//! A frozen layer's feed-forward block, `dropout(gelu(x W1^T + b1) W2^T + b2)`, as one CPU op
//! whose backward pass returns `dL/dx` alone.
//!
//! As separate graph nodes, the block keeps four tensors per layer for the backward pass (the
//! expansion, its GELU, the projection and a float dropout mask), and candle's backward pass
//! zero-fills and adds a gradient into each, two of them `[tokens, intermediate]`. With the
//! weights frozen (adapter training, inference), this op keeps only the expansion before GELU
//! and a byte mask; the weights are fields of the op, not graph inputs.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::kernels::dropout::{self, DropoutMask};
use crate::kernels::fused::{
    contiguous, gelu_backward, gelu_forward, gelu_in_place, with_values, FrozenLinear, Kept,
};
use crate::kernels::parallel::{par_rows, par_vec, par_zeros, ROW};

pub struct FeedForwardOp {
    /// `intermediate.dense`
    pub expand: FrozenLinear,
    /// `output.dense`
    pub project: FrozenLinear,
    pub dropout: Option<DropoutMask>,
    /// Whether to keep the expansion for a backward pass (its input takes a gradient).
    pub keep_for_backward: bool,
    /// The expansion `x W1^T + b1`, `[tokens, intermediate]`, for the backward pass.
    expansion: Kept<Vec<f32>>,
}

impl FeedForwardOp {
    pub fn new(
        expand: FrozenLinear,
        project: FrozenLinear,
        dropout: Option<DropoutMask>,
        keep_for_backward: bool,
    ) -> Self {
        Self {
            expand,
            project,
            dropout,
            keep_for_backward,
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
        let mut out = if self.keep_for_backward {
            let activation = par_vec(expansion.len(), ROW, |first, block| {
                gelu_forward(&expansion[first * ROW..], block)
            });
            self.project.forward(&activation, rows)?
        } else {
            // Without a backward pass the expansion is not needed after its GELU.
            par_rows(&mut expansion, ROW, |_, block| gelu_in_place(block));
            self.project.forward(&expansion, rows)?
        };
        dropout::apply(self.dropout.as_ref(), &mut out);
        if self.keep_for_backward {
            self.expansion.put(expansion);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// `dx = ((g * mask) W2 * gelu'(expansion)) W1`.
    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let expansion = self.expansion.take("feed-forward")?;
        let (i, h) = self.sizes()?;
        let rows = expansion.len() / i;
        let mut g = with_values(grad, |g| Ok(g.to_vec()))?;
        dropout::apply(self.dropout.as_ref(), &mut g);
        let mut d_expansion = par_zeros(rows * i);
        self.project
            .backward_into(&g, rows, &mut d_expansion, false)?;
        par_rows(&mut d_expansion, ROW, |first, block| {
            gelu_backward(&expansion[first * ROW..], block)
        });
        drop(expansion);
        let mut dx = g; // rows x hidden, overwritten
        self.expand
            .backward_into(&d_expansion, rows, &mut dx, false)?;
        debug_assert_eq!(dx.len(), rows * h);
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::testing::{assert_same_output_and_dx, frozen, random};
    use crate::model::ops::{linear, Activation};
    use crate::model::Mode;
    use crate::rng::SeededRng;
    use candle_core::Var;
    use candle_nn::Linear;

    /// Output and `dL/dx` of the op against the block node by node (candle's backward pass),
    /// with and without dropout, on a block small enough for one thread and one split over
    /// threads.
    #[test]
    fn matches_the_block_node_by_node() -> Result<()> {
        let mut rng = SeededRng::new(3);
        for (tokens, hidden, intermediate) in [(5, 8, 32), (300, 64, 256)] {
            let w1 = random(&mut rng, &[intermediate, hidden])?;
            let b1 = random(&mut rng, &[intermediate])?;
            let w2 = (random(&mut rng, &[hidden, intermediate])? * 0.1)?;
            let b2 = random(&mut rng, &[hidden])?;
            let x = Var::from_tensor(&random(&mut rng, &[1, tokens, hidden])?)?;
            let r = random(&mut rng, &[1, tokens, hidden])?;
            for p in [0.0, 0.3] {
                let (mut node_mode, mut fused_mode) = (Mode::train(7), Mode::train(7));
                let expand = Linear::new(w1.clone(), Some(b1.clone()));
                let project = Linear::new(w2.clone(), Some(b2.clone()));
                let act = Activation::Gelu.forward(&linear(&expand, x.as_tensor())?)?;
                let nodes = node_mode.dropout(&linear(&project, &act)?, p)?;

                let mask = fused_mode.dropout_mask(tokens * hidden, p);
                let (expand, project) = (frozen(&w1, &b1), frozen(&w2, &b2));
                let op = FeedForwardOp::new(expand, project, mask, true);
                let fused = x.as_tensor().apply_op1(op)?;
                assert_same_output_and_dx(&nodes, &fused, &x, &r, &format!("p = {p}"))?;

                // Without a backward pass (GELU in place): the same output.
                let mask = Mode::train(7).dropout_mask(tokens * hidden, p);
                let (expand, project) = (frozen(&w1, &b1), frozen(&w2, &b2));
                let op = FeedForwardOp::new(expand, project, mask, false);
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
        let op = FeedForwardOp::new(frozen(&w1, &b1), frozen(&w2, &b2), None, false);
        let out = x.as_tensor().apply_op1(op)?;
        let err = out.sum_all()?.backward().unwrap_err().to_string();
        assert!(err.contains("without a kept forward pass"), "{err}");
        Ok(())
    }
}
