//! LoRA (Hu et al. 2021) and (IA)³ (Liu et al. 2022) with AdapterHub's `LoRAConfig`,
//! `IA3Config`, tensor names and semantics (adapters 1.3, `methods/lora.py`).
//!
//! Both change Linears of the encoder (`LayerHooks::linear`). A LoRA adds a low-rank update,
//! `W x + b + dropout(x) Aᵀ Bᵀ · alpha/r`; an (IA)³ vector scales the output,
//! `(W x + b) ⊙ l · alpha`. AdapterHub saves (IA)³ as a LoRA whose `composition_mode` is
//! `"scale"`, so one config type and one module type serve both.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{Device, Result as CandleResult, Tensor, Var};
use candle_nn::Linear;

use crate::error::{Error, Result};
use crate::methods::gate::Gate;
use crate::model::hooks::{LayerHooks, LinearChange, LinearSite};
use crate::model::{BertConfig, Mode};
use crate::params::{init, Params};
use crate::rng::SeededRng;

pub use crate::methods::lora_config::{CompositionMode, LoraConfig, LoraInit, PeftOnly, PRESETS};

/// One module on one Linear: `lora_A` `[r, in]` (LoRA only) and `lora_B` `[out, r]`.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    a: Option<Tensor>,
    b: Tensor,
    /// `use_gating` (UniPELT): a gate on the Linear's input scales the update instead of
    /// `alpha / r`.
    gate: Option<Gate>,
    params: Params,
}

impl LoraLinear {
    fn new(
        config: &LoraConfig,
        inputs: usize,
        outputs: usize,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let r = config.r;
        let (a, b) = match config.init_weights {
            LoraInit::Lora => (
                init::kaiming_uniform(rng, (r, inputs), device)?,
                init::zeros((outputs, r), device)?,
            ),
            LoraInit::Bert => (
                init::normal(rng, (r, inputs), 0.02, device)?,
                init::normal(rng, (outputs, r), 0.02, device)?,
            ),
            LoraInit::Ia3 => (
                init::ones((r, inputs), device)?,
                init::ones((outputs, r), device)?,
            ),
        };
        let mut params = Params::default();
        let a = match config.composition_mode {
            CompositionMode::Add => {
                let var = Var::from_tensor(&a)?;
                params.push("lora_A", var.clone());
                Some(var.as_tensor().clone())
            }
            CompositionMode::Scale => None,
        };
        let b = Var::from_tensor(&b)?;
        params.push("lora_B", b.clone());
        let gate = if config.use_gating() {
            Some(Gate::new(
                &mut params,
                "gate",
                (inputs, 1),
                false,
                rng,
                device,
            )?)
        } else {
            None
        };
        Ok(Self {
            a,
            b: b.as_tensor().clone(),
            gate,
            params,
        })
    }

    /// Whether its weights are plain tensors (no gradient to take).
    pub fn is_frozen(&self) -> bool {
        !self.b.track_op() && self.a.as_ref().is_none_or(|a| !a.track_op())
    }

    /// Whether its update is a fixed change of the weights, which may fold into them: frozen,
    /// and no gate (a gate depends on the input).
    pub fn folds(&self) -> bool {
        self.is_frozen() && self.gate.is_none()
    }

    /// `lora_A` (LoRA only) and `lora_B`.
    pub fn matrices(&self) -> (Option<&Tensor>, &Tensor) {
        (self.a.as_ref(), &self.b)
    }

    fn frozen(&self) -> Self {
        Self {
            a: self.a.as_ref().map(Tensor::detach),
            b: self.b.detach(),
            gate: self.gate.as_ref().map(Gate::frozen),
            params: Params::default(),
        }
    }

    /// An (IA)³ module's vector `l · scaling` `[out]`.
    fn scale(&self, config: &LoraConfig) -> CandleResult<Tensor> {
        self.b.flatten_all()? * config.scaling()
    }

    /// The module's output on the Linear's input `x` `[.., in]`, after the modules before it
    /// in a stack (`before`): AdapterHub's `LoRA.forward` / `IA3.forward`. A LoRA's is
    /// `dropout(before or x) Aᵀ Bᵀ · scaling`, `[.., out]`; an (IA)³'s the vector
    /// `l · scaling` `[out]`, times `before` when there is one.
    pub fn forward(
        &self,
        config: &LoraConfig,
        x: &Tensor,
        before: Option<Tensor>,
        mode: &mut Mode,
    ) -> CandleResult<Tensor> {
        let scaling = config.scaling();
        match &self.a {
            Some(a) => {
                let input = before.unwrap_or_else(|| x.clone());
                let input = mode.dropout(&input, config.dropout)?;
                let dims = input.dims().to_vec();
                let rows = input.elem_count() / dims[dims.len() - 1];
                let flat = input.reshape((rows, dims[dims.len() - 1]))?;
                let low = flat.matmul(&a.t()?)?.matmul(&self.b.t()?)?;
                let mut out_dims = dims;
                *out_dims.last_mut().expect("a tensor with dimensions") = self.b.dim(0)?;
                let low = low.reshape(out_dims)?;
                match &self.gate {
                    // AdapterHub: the gate's value instead of alpha / r.
                    Some(gate) => low.broadcast_mul(&Gate::column(&gate.values(x)?, 0)?),
                    None => low * scaling,
                }
            }
            None => {
                let vector = self.scale(config)?;
                match before {
                    Some(before) => before.broadcast_mul(&vector),
                    None => Ok(vector),
                }
            }
        }
    }

    /// `W` changed as the module changes the Linear's output: `W + B A · scaling`, or each
    /// row (and the bias) scaled.
    pub fn merge(
        &self,
        config: &LoraConfig,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> CandleResult<(Tensor, Option<Tensor>)> {
        let scaling = config.scaling();
        match &self.a {
            Some(a) => Ok(((weight + (self.b.matmul(a)? * scaling)?)?, bias.cloned())),
            None => {
                let column = (&self.b * scaling)?;
                let bias = bias.map(|b| b * column.flatten_all()?).transpose()?;
                Ok((weight.broadcast_mul(&column)?, bias))
            }
        }
    }
}

/// Joins what a chain of modules made (`hidden`, see [`LoraLinear::forward`]) with the
/// Linear's output, as the chain's last module does (`com` in AdapterHub).
pub fn compose(out: Tensor, hidden: &Tensor, mode: CompositionMode) -> CandleResult<Tensor> {
    match mode {
        CompositionMode::Add => out.broadcast_add(hidden),
        CompositionMode::Scale => out.broadcast_mul(hidden),
    }
}

/// One named LoRA (or (IA)³) over all layers of a model.
#[derive(Debug, Clone)]
pub struct Lora {
    pub name: String,
    pub config: LoraConfig,
    modules: BTreeMap<(usize, LinearSite), LoraLinear>,
    /// Layers skipped at run time (AdapterDrop's `skip_layers`).
    pub skip_layers: BTreeSet<usize>,
}

impl Lora {
    /// A freshly initialised module for `model`, drawing its weights from `rng`.
    pub fn new(
        name: &str,
        config: &LoraConfig,
        model: &BertConfig,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let invalid = |message: String| Error::input(format!("adapter '{name}': {message}"));
        crate::methods::bottleneck::check_name(name).map_err(invalid)?;
        let widest = model.hidden_size.max(model.intermediate_size);
        config
            .validate(model.num_hidden_layers, widest)
            .map_err(invalid)?;
        let (hidden, intermediate) = (model.hidden_size, model.intermediate_size);
        let mut modules = BTreeMap::new();
        for layer in 0..model.num_hidden_layers {
            if config.leave_out.contains(&layer) {
                continue;
            }
            for site in config.sites() {
                let (inputs, outputs) = match site {
                    // attention.output.dense is hidden -> hidden, as q, k and v.
                    LinearSite::Intermediate => (hidden, intermediate),
                    LinearSite::Output => (intermediate, hidden),
                    _ => (hidden, hidden),
                };
                let module = LoraLinear::new(config, inputs, outputs, rng, device)?;
                modules.insert((layer, site), module);
            }
        }
        Ok(Self {
            name: name.into(),
            config: config.clone(),
            modules,
            skip_layers: BTreeSet::new(),
        })
    }

    /// A copy with plain-tensor weights, for inference.
    pub fn frozen(&self) -> Self {
        Self {
            modules: self.modules.iter().map(|(k, m)| (*k, m.frozen())).collect(),
            ..self.clone()
        }
    }

    /// The module on `site`'s Linear in `layer`, unless absent there or skipped.
    pub fn get(&self, layer: usize, site: LinearSite) -> Option<&LoraLinear> {
        if self.skip_layers.contains(&layer) {
            return None;
        }
        self.modules.get(&(layer, site))
    }

    /// Every parameter under AdapterHub's name, without the model prefix:
    /// `encoder.layer.{i}.attention.self.query.loras.{name}.lora_A`, ...
    pub fn params(&self) -> Params {
        let mut all = Params::default();
        for ((layer, site), module) in &self.modules {
            let prefix = format!(
                "encoder.layer.{layer}.{}.loras.{}",
                site.module(),
                self.name
            );
            all.extend_prefixed(&prefix, module.params.clone());
        }
        all
    }

    /// Every weight with its full name, frozen or not (what `adapter.safetensors` holds).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.modules
            .iter()
            .flat_map(|((layer, site), module)| {
                let prefix = format!(
                    "encoder.layer.{layer}.{}.loras.{}",
                    site.module(),
                    self.name
                );
                let a = module.a.clone().map(|a| (format!("{prefix}.lora_A"), a));
                let gate: Vec<_> = (module.gate.iter())
                    .flat_map(|g| g.tensors(&format!("{prefix}.gate")))
                    .collect();
                a.into_iter()
                    .chain([(format!("{prefix}.lora_B"), module.b.clone())])
                    .chain(gate)
            })
            .collect()
    }

    /// Each module's Linear as merged weights would give it ([`LoraLinear::merge`]).
    pub fn modules(&self) -> impl Iterator<Item = (usize, LinearSite, &LoraLinear)> {
        self.modules.iter().map(|((l, s), m)| (*l, *s, m))
    }
}

impl LayerHooks for Lora {
    fn linear(&self, layer: usize, site: LinearSite, base: &Linear) -> Option<LinearChange<'_>> {
        let module = self.get(layer, site)?;
        // A frozen module without dropout folds into the weights for the pass (and so runs
        // in the fused block ops).
        if module.folds() && self.config.dropout == 0.0 {
            if let Ok((weight, bias)) = module.merge(&self.config, base.weight(), base.bias()) {
                return Some(LinearChange::Weights(Linear::new(weight, bias)));
            }
        }
        let config = &self.config;
        match config.composition_mode {
            // A function of the input alone, which the fused attention op takes as an input.
            CompositionMode::Add => Some(LinearChange::Add(Box::new(
                move |x: &Tensor, mode: &mut Mode| module.forward(config, x, None, mode),
            ))),
            // A vector, which the fused ops take as an input.
            CompositionMode::Scale => Some(LinearChange::Scale(Box::new(move |_: &mut Mode| {
                module.scale(config)
            }))),
        }
    }
}
