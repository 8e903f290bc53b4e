//! AdapterHub's gates (UniPELT, `use_gating`): a Linear from a module's input to one or more
//! values, through a sigmoid, averaged over the sequence, padding included, as AdapterHub
//! averages it. The module's output is multiplied by them, one value per text.

use candle_core::{Device, Result as CandleResult, Tensor};
use candle_nn::Linear;

use crate::error::Result;
use crate::model::ops;
use crate::params::{frozen_linear, init, new_linear, Params};
use crate::rng::SeededRng;

#[derive(Debug, Clone)]
pub struct Gate {
    linear: Linear,
}

impl Gate {
    /// A new gate registered in `params` as `name.weight` / `name.bias`: weight N(0, 0.02);
    /// bias zeros (`zero_bias`, a bottleneck adapter's) or PyTorch's default U(±1/√in).
    pub fn new(
        params: &mut Params,
        name: &str,
        (inputs, outputs): (usize, usize),
        zero_bias: bool,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let weight = init::normal(rng, (outputs, inputs), 0.02, device)?;
        let bias = if zero_bias {
            init::zeros(outputs, device)?
        } else {
            let bound = 1.0 / (inputs as f64).sqrt();
            rng.uniform_tensor(outputs, -bound, bound, device)?
        };
        Ok(Self {
            linear: new_linear(params, name, weight, bias)?,
        })
    }

    /// `[batch, outputs]`: `mean over positions of sigmoid(W x + b)` for `x` `[batch, seq, in]`.
    pub fn values(&self, x: &Tensor) -> CandleResult<Tensor> {
        candle_nn::ops::sigmoid(&ops::linear(&self.linear, x)?)?.mean(1)
    }

    /// Its `i`-th value per text, `[batch, 1, 1]`, to multiply a `[batch, ., .]` tensor by.
    pub fn column(values: &Tensor, i: usize) -> CandleResult<Tensor> {
        values.narrow(1, i, 1)?.unsqueeze(2)
    }

    pub fn frozen(&self) -> Self {
        Self {
            linear: frozen_linear(&self.linear),
        }
    }

    /// Its weight and bias under `name`.
    pub fn tensors(&self, name: &str) -> Vec<(String, Tensor)> {
        let mut out = vec![(format!("{name}.weight"), self.linear.weight().clone())];
        out.extend(
            self.linear
                .bias()
                .map(|b| (format!("{name}.bias"), b.clone())),
        );
        out
    }
}
