//! AdamW (Loshchilov & Hutter), as `torch.optim.AdamW` computes it, with weight decay that
//! skips biases and normalisation weights, and a state that can be saved and restored.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Error, Result};
use crate::params::Params;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    /// Biases and LayerNorm weights (the 1-D tensors) take no weight decay.
    decay: bool,
    m: Tensor,
    v: Tensor,
    /// Updates this parameter has had: torch counts per parameter, and a parameter without a
    /// gradient in a step (an adapter skipped by AdapterDrop) takes no step.
    steps: usize,
}

pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    step: usize,
}

impl AdamW {
    pub fn new(params: &Params, config: AdamWConfig) -> Result<Self> {
        let slots = params
            .iter()
            .map(|(name, var)| {
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    decay: var.rank() > 1,
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                    steps: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            slots,
            step: 0,
        })
    }

    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// One update at learning rate `lr`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        for slot in &mut self.slots {
            let Some(grad) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            slot.steps += 1;
            let t = slot.steps as i32;
            let bias1 = 1.0 - c.beta1.powi(t);
            let bias2 = 1.0 - c.beta2.powi(t);
            let theta = slot.var.as_tensor().detach();
            slot.m = ((&slot.m * c.beta1)? + (grad * (1.0 - c.beta1))?)?;
            slot.v = ((&slot.v * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&slot.m / bias1)?;
            let v_hat = (&slot.v / bias2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let decayed = if slot.decay && c.weight_decay > 0.0 {
                (&theta * (1.0 - lr * c.weight_decay))?
            } else {
                theta
            };
            slot.var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// The moments by parameter name (`{name}.exp_avg`, `{name}.exp_avg_sq`, and the
    /// parameter's step count as a one-element `{name}.step`).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut tensors = HashMap::new();
        for slot in &self.slots {
            tensors.insert(format!("{}.exp_avg", slot.name), slot.m.clone());
            tensors.insert(format!("{}.exp_avg_sq", slot.name), slot.v.clone());
            let steps = Tensor::new(&[slot.steps as f32], slot.m.device())?;
            tensors.insert(format!("{}.step", slot.name), steps);
        }
        Ok(tensors)
    }

    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: String, dims: &[usize]| -> Result<Tensor> {
            let t = tensors
                .get(&key)
                .ok_or_else(|| Error::input(format!("optimizer state has no {key}")))?;
            if t.dims() != dims {
                return Err(Error::input(format!(
                    "optimizer state {key} has shape {:?}, expected {dims:?}",
                    t.dims()
                )));
            }
            Ok(t.clone())
        };
        for slot in &mut self.slots {
            slot.m = get(format!("{}.exp_avg", slot.name), slot.m.dims())?;
            slot.v = get(format!("{}.exp_avg_sq", slot.name), slot.v.dims())?;
            slot.steps = get(format!("{}.step", slot.name), &[1])?.to_vec1::<f32>()?[0] as usize;
        }
        self.step = self.slots.iter().map(|s| s.steps).max().unwrap_or(0);
        Ok(())
    }
}

/// The global L2 norm of all gradients of `params`.
pub fn grad_norm(params: &Params, grads: &GradStore) -> Result<f64> {
    let mut total = 0f64;
    for (_, var) in params.iter() {
        if let Some(g) = grads.get(var.as_tensor()) {
            total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    Ok(total.sqrt())
}

/// Scales the gradients so their global norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(params: &Params, grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(params, grads)?;
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        for (_, var) in params.iter() {
            if let Some(g) = grads.get(var.as_tensor()) {
                let scaled = (g * scale)?;
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps on f(w, b) = sum(w^2) + sum(b^2); reference from torch 2.15:
    /// w = torch.tensor([[1., -2.], [3., 0.5]], requires_grad=True); b = torch.tensor([0.5, -1.], requires_grad=True)
    /// opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.01}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    /// for _ in range(2): opt.zero_grad(); ((w**2).sum() + (b**2).sum()).backward(); opt.step()
    #[test]
    fn two_steps_match_torch_adamw() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[[1f32, -2.], [3., 0.5]], &dev)?)?;
        let b = Var::from_tensor(&Tensor::new(&[0.5f32, -1.], &dev)?)?;
        let mut params = Params::default();
        params.push("w", w.clone());
        params.push("b", b.clone());
        let mut opt = AdamW::new(&params, AdamWConfig::default())?;
        for _ in 0..2 {
            let loss = (w.as_tensor().sqr()?.sum_all()? + b.as_tensor().sqr()?.sum_all()?)?;
            opt.step(&loss.backward()?, 0.1)?;
        }
        let w_now = w.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let b_now = b.as_tensor().to_vec1::<f32>()?;
        let w_want = [0.798_519_1f32, -1.796_272_6, 2.794_209_2, 0.300_297_86];
        let b_want = [0.301_187_43f32, -0.800_412_24];
        for (got, want) in w_now.iter().chain(&b_now).zip(w_want.iter().chain(&b_want)) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        let mut again = AdamW::new(&params, AdamWConfig::default())?;
        again.load_state(&opt.state()?)?;
        assert_eq!(again.steps_taken(), 2);
        // The restored optimizer continues exactly as the original.
        let loss = (w.as_tensor().sqr()?.sum_all()? + b.as_tensor().sqr()?.sum_all()?)?;
        let grads = loss.backward()?;
        let (before_w, before_b) = (w.as_tensor().copy()?, b.as_tensor().copy()?);
        opt.step(&grads, 0.1)?;
        let (once_w, once_b) = (w.as_tensor().copy()?, b.as_tensor().copy()?);
        w.set(&before_w)?;
        b.set(&before_b)?;
        again.step(&grads, 0.1)?;
        assert_eq!(w.as_tensor().to_vec2::<f32>()?, once_w.to_vec2::<f32>()?);
        assert_eq!(b.as_tensor().to_vec1::<f32>()?, once_b.to_vec1::<f32>()?);
        Ok(())
    }
}
