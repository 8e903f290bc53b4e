//! LayerNorm with a backward pass (candle's fused one has none).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::layer_norm::{LayerNormOp, Sum3Op, SumLayerNormOp};
use crate::model::ops;

#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }

    /// `LayerNorm(sum of parts)`, two or three parts of one shape: a residual connection
    /// (and an adapter's output) and the norm. With the LayerNorm frozen, on CPU in f32, one
    /// op (`kernels::layer_norm::SumLayerNormOp`): no tensor is kept for the sum, and the parts
    /// share one gradient; otherwise the sum (of three parts on CPU in f32 one op, `Sum3Op`,
    /// which keeps no partial sum), then the LayerNorm.
    pub fn of_sum(&self, parts: &[&Tensor]) -> Result<Tensor> {
        let (first, rest) = parts
            .split_first()
            .ok_or_else(|| candle_core::Error::Msg("layer norm of an empty sum".into()))?;
        let frozen = !self.weight.track_op() && !self.bias.track_op();
        let same = rest.iter().all(|p| p.shape() == first.shape());
        if frozen && same && ops::fused_applies(first) {
            let op = SumLayerNormOp {
                norm: LayerNormOp { eps: self.eps },
                weight: self.weight.clone(),
                bias: self.bias.clone(),
            };
            match parts {
                [a, b] => return a.contiguous()?.apply_op2(&b.contiguous()?, op),
                [a, b, c] => {
                    return a
                        .contiguous()?
                        .apply_op3(&b.contiguous()?, &c.contiguous()?, op)
                }
                _ => {}
            }
        }
        let sum = match parts {
            [a, b, c] if same && ops::fused_applies(a) => {
                a.contiguous()?
                    .apply_op3(&b.contiguous()?, &c.contiguous()?, Sum3Op)?
            }
            _ => rest.iter().try_fold((*first).clone(), |sum, p| sum + *p)?,
        };
        self.forward(&sum)
    }

    /// The same LayerNorm with plain tensors (no gradient, no graph).
    pub fn frozen(&self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            eps: self.eps,
        }
    }
}

impl LayerNorm {
    /// Whether both hold the same numbers.
    pub fn same_as(&self, other: &LayerNorm) -> Result<bool> {
        let values = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        Ok(self.eps == other.eps
            && values(&self.weight)? == values(&other.weight)?
            && values(&self.bias)? == values(&other.bias)?)
    }
}

/// Every LayerNorm of an encoder: the embeddings' and, per layer, the one after attention and
/// the one after the feed-forward block (indexed by [`Position::index`]). An adapter trained
/// together with them brings its own.
///
/// [`Position::index`]: crate::model::hooks::Position::index
#[derive(Debug, Clone)]
pub struct EncoderLayerNorms {
    pub embeddings: LayerNorm,
    pub layers: Vec<[LayerNorm; 2]>,
}

impl EncoderLayerNorms {
    /// Whether every LayerNorm holds the same numbers in both.
    pub fn same_as(&self, other: &EncoderLayerNorms) -> Result<bool> {
        if self.layers.len() != other.layers.len() || !self.embeddings.same_as(&other.embeddings)? {
            return Ok(false);
        }
        for (a, b) in self.layers.iter().zip(&other.layers) {
            if !a[0].same_as(&b[0])? || !a[1].same_as(&b[1])? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::testing::random;
    use crate::rng::SeededRng;
    use candle_core::Var;

    /// The fused LayerNorm of a sum against the sum and the composed LayerNorm: output and
    /// each part's gradient, for two and three parts, one of them taking no gradient.
    #[test]
    fn of_sum_matches_sum_then_layer_norm() -> Result<()> {
        let mut rng = SeededRng::new(6);
        let weight = Var::from_tensor(&(random(&mut rng, &[48])? + 1.0)?)?;
        let bias = Var::from_tensor(&random(&mut rng, &[48])?)?;
        let r = random(&mut rng, &[3, 70, 48])?;
        let max = |t: &Tensor| t.abs()?.max_all()?.to_scalar::<f32>();
        // Frozen (one op), and trained (three parts: their sum one op).
        for (count, trained) in [(2, false), (3, false), (2, true), (3, true)] {
            let norm = LayerNorm {
                weight: weight.as_tensor().clone(),
                bias: bias.as_tensor().clone(),
                eps: 1e-12,
            };
            let norm = if trained { norm } else { norm.frozen() };
            let vars = (0..count)
                .map(|_| Var::from_tensor(&random(&mut rng, &[3, 70, 48])?))
                .collect::<Result<Vec<_>>>()?;
            let constant = random(&mut rng, &[3, 70, 48])?;
            let mut parts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            parts[count - 1] = &constant;
            let fused = norm.of_sum(&parts)?;
            let sum = parts[1..]
                .iter()
                .try_fold(parts[0].clone(), |s, p| s + *p)?;
            let composed = ops::layer_norm_composed(&sum, &norm.weight, &norm.bias, norm.eps)?;
            let what = format!("{count} parts, trained: {trained}");
            assert!(
                max(&(&fused - &composed)?)? < 1e-5,
                "{what}: outputs differ"
            );
            let fused_grads = (&fused * &r)?.sum_all()?.backward()?;
            let composed_grads = (&composed * &r)?.sum_all()?.backward()?;
            let mut with_grads: Vec<&Tensor> =
                vars[..count - 1].iter().map(|v| v.as_tensor()).collect();
            if trained {
                with_grads.extend([weight.as_tensor(), bias.as_tensor()]);
            }
            for t in with_grads {
                let a = fused_grads.get(t).expect("a gradient");
                let b = composed_grads.get(t).expect("a gradient");
                assert!(
                    max(&(a - b)?)? < 1e-4 * max(b)?.max(1.0),
                    "{what}: a gradient differs"
                );
            }
            // candle's addition gives even a constant part a gradient; the fused ops do not.
            if !trained || count == 3 {
                assert!(fused_grads.get(&constant).is_none(), "{what}: constant");
            }
        }
        Ok(())
    }
}
