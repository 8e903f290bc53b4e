//! Training or evaluation, and the dropout that depends on it.

use candle_core::{Result, Tensor};

use crate::kernels::dropout::{keep_mask, DropoutMask};
use crate::kernels::parallel::threads;
use crate::rng::SeededRng;

/// How a forward pass runs: `Eval` is deterministic; `Train` applies dropout with masks drawn
/// from its own seeded generator, so two runs with the same seed drop the same units.
#[derive(Debug, Clone)]
pub enum Mode {
    Eval,
    Train(SeededRng),
}

impl Mode {
    pub fn train(seed: u64) -> Self {
        Mode::Train(SeededRng::new(seed))
    }

    /// The dropout generator's state (a training checkpoint keeps it); zeros in evaluation.
    pub fn rng_state(&self) -> [u64; 4] {
        match self {
            Mode::Train(rng) => rng.state(),
            Mode::Eval => [0; 4],
        }
    }

    pub fn is_train(&self) -> bool {
        matches!(self, Mode::Train(_))
    }

    /// Inverted dropout: zeroes each element with probability `p` and scales the rest by
    /// `1 / (1 - p)` while training; the identity in evaluation.
    pub fn dropout(&mut self, x: &Tensor, p: f32) -> Result<Tensor> {
        match self.dropout_mask(x.elem_count(), p) {
            Some(mask) => masked(x, &mask),
            None => Ok(x.clone()),
        }
    }

    /// Which of `n` elements inverted dropout keeps, as bits, keyed by one draw
    /// from the generator (see [`keep_mask`]); `None` in evaluation or when `p` is 0.
    fn keep_mask(&mut self, n: usize, p: f32) -> Option<Vec<u64>> {
        match self {
            Mode::Train(rng) if p > 0.0 => {
                let threads = threads();
                Some(keep_mask(rng.next_u64(), n, p, threads))
            }
            _ => None,
        }
    }

    /// [`keep_mask`](Self::keep_mask) with its scale, for the fused ops that apply dropout
    /// themselves.
    pub fn dropout_mask(&mut self, n: usize, p: f32) -> Option<DropoutMask> {
        let bits = self.keep_mask(n, p)?;
        Some(DropoutMask {
            bits,
            scale: 1.0 / (1.0 - p),
        })
    }
}

/// `x` times a drawn dropout mask: the kept elements scaled, zeros elsewhere.
pub fn masked(x: &Tensor, mask: &DropoutMask) -> Result<Tensor> {
    let mut factors = vec![1f32; x.elem_count()];
    mask.apply(0, &mut factors);
    let factors = Tensor::from_vec(factors, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * factors
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn eval_is_identity_and_train_drops_about_p_with_rescaling() -> Result<()> {
        let x = Tensor::ones((100, 100), candle_core::DType::F32, &Device::Cpu)?;
        let same = Mode::Eval.dropout(&x, 0.3)?;
        assert_eq!(same.to_vec2::<f32>()?, x.to_vec2::<f32>()?);

        let dropped = Mode::train(5)
            .dropout(&x, 0.3)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let zeros = dropped.iter().filter(|v| **v == 0.0).count();
        assert!((2700..3300).contains(&zeros), "{zeros} of 10000 dropped");
        let kept = dropped.iter().find(|v| **v != 0.0).unwrap();
        assert!((kept - 1.0 / 0.7).abs() < 1e-6);

        let again = Mode::train(5)
            .dropout(&x, 0.3)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(dropped, again, "same seed, same mask");
        Ok(())
    }
}
