//! Named trainable parameters: how a method exposes its weights to the optimizer and to files.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use candle_nn::Linear;

use crate::error::Result;
use crate::rng::SeededRng;

/// A list of `(name, variable)` pairs, in a stable order.
#[derive(Debug, Clone, Default)]
pub struct Params(pub Vec<(String, Var)>);

impl Params {
    pub fn push(&mut self, name: impl Into<String>, var: Var) {
        self.0.push((name.into(), var));
    }

    /// Appends `other`'s parameters with `prefix.` before their names.
    pub fn extend_prefixed(&mut self, prefix: &str, other: Params) {
        for (name, var) in other.0 {
            self.0.push((format!("{prefix}.{name}"), var));
        }
    }

    pub fn count(&self) -> usize {
        self.0.iter().map(|(_, v)| v.elem_count()).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = &(String, Var)> {
        self.0.iter()
    }

    /// The current values, by name (a copy: later training does not change them).
    pub fn snapshot(&self) -> Result<HashMap<String, Tensor>> {
        self.0
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect()
    }

    /// Sets every parameter from `tensors` (same names); shapes must match. Returns the
    /// names in `tensors` that no parameter took, so the caller can report them.
    pub fn load(
        &self,
        tensors: &HashMap<String, Tensor>,
    ) -> std::result::Result<Vec<String>, String> {
        for (name, var) in &self.0 {
            let tensor = tensors
                .get(name)
                .ok_or_else(|| format!("missing tensor {name}"))?;
            if tensor.dims() != var.dims() {
                return Err(format!(
                    "tensor {name} has shape {:?}, expected {:?}",
                    tensor.dims(),
                    var.dims()
                ));
            }
            let tensor = tensor
                .to_dtype(var.dtype())
                .and_then(|t| t.to_device(var.device()));
            var.set(&tensor.map_err(|e| e.to_string())?)
                .map_err(|e| format!("{name}: {e}"))?;
        }
        let known: std::collections::HashSet<&str> =
            self.0.iter().map(|(n, _)| n.as_str()).collect();
        let mut unexpected: Vec<String> = tensors
            .keys()
            .filter(|k| !known.contains(k.as_str()))
            .cloned()
            .collect();
        unexpected.sort();
        Ok(unexpected)
    }
}

/// The same Linear with plain tensors: it runs, takes no gradient and records no graph.
pub fn frozen_linear(linear: &Linear) -> Linear {
    Linear::new(linear.weight().detach(), linear.bias().map(Tensor::detach))
}

/// A trainable Linear (`weight: [out, in]`, `bias: [out]`) whose `Var`s are registered in
/// `params` under `name.weight` / `name.bias`.
pub fn new_linear(params: &mut Params, name: &str, weight: Tensor, bias: Tensor) -> Result<Linear> {
    let weight = Var::from_tensor(&weight)?;
    let bias = Var::from_tensor(&bias)?;
    let linear = Linear::new(weight.as_tensor().clone(), Some(bias.as_tensor().clone()));
    params.push(format!("{name}.weight"), weight);
    params.push(format!("{name}.bias"), bias);
    Ok(linear)
}

/// Weight initialisations used by the methods, all drawn from our seeded generator.
pub mod init {
    use super::*;
    use candle_core::Device;

    /// N(0, std) weights (`bert` init uses std 0.02).
    pub fn normal(
        rng: &mut SeededRng,
        shape: (usize, usize),
        std: f64,
        device: &Device,
    ) -> Result<Tensor> {
        Ok(rng.normal_tensor(shape, 0.0, std, device)?)
    }

    /// N(0, std) truncated to [-2 std, 2 std] by rejection, as `torch.nn.init.trunc_normal_`
    /// with `a = -2 std, b = 2 std`.
    pub fn truncated_normal(
        rng: &mut SeededRng,
        shape: (usize, usize),
        std: f64,
        device: &Device,
    ) -> Result<Tensor> {
        let n = shape.0 * shape.1;
        let mut values = Vec::with_capacity(n);
        while values.len() < n {
            let x = rng.normal_f64();
            if x.abs() <= 2.0 {
                values.push((x * std) as f32);
            }
        }
        Ok(Tensor::from_vec(values, shape, device)?)
    }

    /// `torch.nn.init.kaiming_uniform_(w, a=sqrt(5))`: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    pub fn kaiming_uniform(
        rng: &mut SeededRng,
        shape: (usize, usize),
        device: &Device,
    ) -> Result<Tensor> {
        let bound = 1.0 / (shape.1 as f64).sqrt();
        Ok(rng.uniform_tensor(shape, -bound, bound, device)?)
    }

    pub fn zeros(shape: impl Into<candle_core::Shape>, device: &Device) -> Result<Tensor> {
        Ok(Tensor::zeros(shape, candle_core::DType::F32, device)?)
    }

    pub fn ones(shape: impl Into<candle_core::Shape>, device: &Device) -> Result<Tensor> {
        Ok(Tensor::ones(shape, candle_core::DType::F32, device)?)
    }
}
