//! Prefix tuning (Li & Liang 2021) with AdapterHub's `PrefixTuningConfig`, tensor names and
//! semantics (adapters 1.3, `methods/prefix_tuning.py`): `P` trained key and value vectors per
//! layer, prepended to the layer's own keys and values, which every query may attend to.
//!
//! The vectors are reparameterised: `control_trans(wte(0..P))`, with `wte` an embedding of
//! `[P, hidden]` and `control_trans` = Linear(hidden, bottleneck) → non-linearity →
//! Linear(bottleneck, layers · 2 · hidden), whose output row `p` holds, for the `s`-th layer
//! with a prefix (`leave_out` excepted), its key at columns `2s·hidden..` and its value at
//! `(2s+1)·hidden..` (heads side by side). `flat`: one parameter `control_trans` of
//! `P · layers · 2 · hidden` read the same way. Dropout applies to the keys and values.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{Device, Module as _, Result as CandleResult, Tensor, Var};
use candle_nn::Linear;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::methods::gate::Gate;
use crate::model::hooks::KeyValuePrefix;
use crate::model::ops::Activation;
use crate::model::{BertConfig, Mode};
use crate::params::{init, new_linear, Params};
use crate::rng::SeededRng;

/// AdapterHub's `PrefixTuningConfig`, field for field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefixTuningConfig {
    pub architecture: String,
    #[serde(default = "yes")]
    pub encoder_prefix: bool,
    #[serde(default = "yes")]
    pub cross_prefix: bool,
    #[serde(default)]
    pub leave_out: Vec<usize>,
    #[serde(default)]
    pub flat: bool,
    #[serde(default = "thirty")]
    pub prefix_length: usize,
    #[serde(default = "five_twelve")]
    pub bottleneck_size: usize,
    #[serde(default = "tanh")]
    pub non_linearity: Activation,
    #[serde(default)]
    pub dropout: f32,
    #[serde(default)]
    pub use_gating: bool,
    #[serde(default = "yes")]
    pub shared_gating: bool,
    /// AdapterHub's other fields (`init_weights_seed`), kept so that a saved config
    /// round-trips.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

fn yes() -> bool {
    true
}
fn thirty() -> usize {
    30
}
fn five_twelve() -> usize {
    512
}
fn tanh() -> Activation {
    Activation::Tanh
}

/// The most prefix positions accepted: more is a malformed file, not a model to build.
const MAX_PREFIX_LENGTH: usize = 4096;

impl PrefixTuningConfig {
    /// `prefix_tuning` (`PrefixTuningConfig()`).
    pub fn preset(name: &str) -> Option<Self> {
        (name == "prefix_tuning").then(|| {
            serde_json::from_value(serde_json::json!({ "architecture": "prefix_tuning" }))
                .expect("the defaults parse")
        })
    }

    pub fn from_json(value: Value) -> std::result::Result<Self, String> {
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    /// Applies `key=value` overrides (values in JSON syntax, bare words as strings).
    pub fn with_overrides(
        &self,
        overrides: &[(String, String)],
    ) -> std::result::Result<Self, String> {
        let value = serde_json::to_value(self).map_err(|e| e.to_string())?;
        let value = crate::methods::with_overrides(value, overrides);
        Self::from_json(value).map_err(|e| format!("after overrides: {e}"))
    }

    /// The layers that hold a prefix, in order.
    pub fn layers(&self, num_layers: usize) -> Vec<usize> {
        (0..num_layers)
            .filter(|l| !self.leave_out.contains(l))
            .collect()
    }

    /// Checks the config against a model's shape and the features we implement.
    pub fn validate(&self, num_layers: usize, hidden: usize) -> std::result::Result<(), String> {
        if self.architecture != "prefix_tuning" {
            return Err(format!(
                "architecture \"{}\" is not prefix tuning",
                self.architecture
            ));
        }
        if self.prefix_length == 0 || self.prefix_length > MAX_PREFIX_LENGTH {
            return Err(format!(
                "prefix_length must be 1 to {MAX_PREFIX_LENGTH}, got {}",
                self.prefix_length
            ));
        }
        if !self.flat && (self.bottleneck_size == 0 || self.bottleneck_size > 64 * hidden) {
            return Err(format!(
                "bottleneck_size must be 1 to {}, got {}",
                64 * hidden,
                self.bottleneck_size
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        if let Some(bad) = self.leave_out.iter().find(|l| **l >= num_layers) {
            return Err(format!(
                "leave_out names layer {bad}, but the model has {num_layers} layers"
            ));
        }
        if self.layers(num_layers).is_empty() {
            return Err("leave_out leaves no layer for the prefix".into());
        }
        if !self.encoder_prefix {
            return Err("encoder_prefix=false puts no prefix in an encoder".into());
        }
        Ok(())
    }
}

/// The trained tensors: the reparameterisation, or the flat vectors.
#[derive(Debug, Clone)]
enum Weights {
    /// `wte` `[P, hidden]`, `control_trans.0` (hidden → bottleneck), `control_trans.2`
    /// (bottleneck → layers · 2 · hidden).
    Mlp {
        wte: Tensor,
        down: Linear,
        up: Linear,
    },
    /// `control_trans` `[P · layers · 2 · hidden]`.
    Flat(Tensor),
}

/// One named prefix over the layers of a model.
#[derive(Debug, Clone)]
pub struct PrefixTuning {
    pub name: String,
    pub config: PrefixTuningConfig,
    /// Layer → its index among the layers with a prefix.
    slots: BTreeMap<usize, usize>,
    hidden: usize,
    weights: Weights,
    params: Params,
    /// Frozen: every slot's keys and values, `[P, hidden]` each, computed once.
    computed: Option<Vec<(Tensor, Tensor)>>,
    /// `use_gating`: per layer, a gate on the layer's input that scales the keys (its first
    /// value) and the values (its last), and its parameters (`weight`, `bias`).
    gates: BTreeMap<usize, (Gate, Params)>,
    /// Layers skipped at run time (AdapterDrop's `skip_layers`).
    pub skip_layers: BTreeSet<usize>,
}

impl PrefixTuning {
    /// A freshly initialised prefix for `model`, drawing its weights from `rng` as PyTorch's
    /// defaults do: `wte` and a flat `control_trans` N(0, 1), Linears Kaiming-uniform with
    /// U(±1/√in) biases.
    pub fn new(
        name: &str,
        config: &PrefixTuningConfig,
        model: &BertConfig,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let invalid = |message: String| Error::input(format!("adapter '{name}': {message}"));
        crate::methods::bottleneck::check_name(name).map_err(invalid)?;
        let (layers, hidden) = (model.num_hidden_layers, model.hidden_size);
        config.validate(layers, hidden).map_err(invalid)?;
        let slots: BTreeMap<usize, usize> = config
            .layers(layers)
            .into_iter()
            .enumerate()
            .map(|(slot, layer)| (layer, slot))
            .collect();
        let (p, width) = (config.prefix_length, slots.len() * 2 * hidden);
        let mut params = Params::default();
        let base = "self_prefix";
        let weights = if config.flat {
            let values = rng.normal_tensor(p * width, 0.0, 1.0, device)?;
            let var = Var::from_tensor(&values)?;
            params.push(format!("{base}.control_trans"), var.clone());
            Weights::Flat(var.as_tensor().clone())
        } else {
            let b = config.bottleneck_size;
            let wte = Var::from_tensor(&rng.normal_tensor((p, hidden), 0.0, 1.0, device)?)?;
            params.push(format!("{base}.wte.weight"), wte.clone());
            let mut linear = |name: &str, inputs: usize, outputs: usize| -> Result<Linear> {
                let weight = init::kaiming_uniform(rng, (outputs, inputs), device)?;
                let bound = 1.0 / (inputs as f64).sqrt();
                let bias = rng.uniform_tensor(outputs, -bound, bound, device)?;
                new_linear(&mut params, &format!("{base}.{name}"), weight, bias)
            };
            let down = linear("control_trans.0", hidden, b)?;
            let up = linear("control_trans.2", b, width)?;
            Weights::Mlp {
                wte: wte.as_tensor().clone(),
                down,
                up,
            }
        };
        let mut gates = BTreeMap::new();
        if config.use_gating {
            let outputs = if config.shared_gating { 1 } else { 2 };
            for &layer in slots.keys() {
                let mut params = Params::default();
                let gate = Gate::new(&mut params, "", (hidden, outputs), false, rng, device)?;
                gates.insert(layer, (gate, params));
            }
        }
        Ok(Self {
            name: name.into(),
            config: config.clone(),
            slots,
            hidden,
            weights,
            params,
            computed: None,
            gates,
            skip_layers: BTreeSet::new(),
        })
    }

    /// The name prefix of every tensor (without the model prefix).
    fn prefix(&self) -> String {
        format!("prefix_tuning.prefix_tunings.{}", self.name)
    }

    /// Every parameter under AdapterHub's name, without the model prefix:
    /// `prefix_tuning.prefix_tunings.{name}.self_prefix.wte.weight`, ...
    pub fn params(&self) -> Params {
        let mut all = Params::default();
        all.extend_prefixed(&self.prefix(), self.params.clone());
        for (layer, (_, params)) in &self.gates {
            let params = params
                .iter()
                .map(|(n, v)| (n.trim_start_matches('.').to_string(), v.clone()));
            all.extend_prefixed(&self.gate_name(*layer), Params(params.collect()));
        }
        all
    }

    /// `encoder.layer.{layer}.attention.self.prefix_tuning.prefix_gates.{name}`.
    fn gate_name(&self, layer: usize) -> String {
        format!(
            "encoder.layer.{layer}.attention.self.prefix_tuning.prefix_gates.{}",
            self.name
        )
    }

    /// Every weight with its full name, frozen or not (what `adapter.safetensors` holds).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let base = format!("{}.self_prefix", self.prefix());
        let gates = (self.gates.iter())
            .flat_map(|(layer, (gate, _))| gate.tensors(&self.gate_name(*layer)));
        let gates: Vec<_> = gates.collect();
        let mut weights = match &self.weights {
            Weights::Flat(t) => vec![(format!("{base}.control_trans"), t.clone())],
            Weights::Mlp { wte, down, up } => {
                let mut out = vec![(format!("{base}.wte.weight"), wte.clone())];
                for (name, l) in [("control_trans.0", down), ("control_trans.2", up)] {
                    out.push((format!("{base}.{name}.weight"), l.weight().clone()));
                    if let Some(b) = l.bias() {
                        out.push((format!("{base}.{name}.bias"), b.clone()));
                    }
                }
                out
            }
        };
        weights.extend(gates);
        weights
    }

    /// A copy with plain tensors whose keys and values are computed once, for inference
    /// (computed on each use instead, should that fail).
    pub fn frozen(&self) -> Self {
        let weights = match &self.weights {
            Weights::Flat(t) => Weights::Flat(t.detach()),
            Weights::Mlp { wte, down, up } => Weights::Mlp {
                wte: wte.detach(),
                down: crate::params::frozen_linear(down),
                up: crate::params::frozen_linear(up),
            },
        };
        let gates = (self.gates.iter())
            .map(|(l, (gate, _))| (*l, (gate.frozen(), Params::default())))
            .collect();
        let mut frozen = Self {
            weights,
            params: Params::default(),
            computed: None,
            gates,
            ..self.clone()
        };
        let computed = (0..frozen.slots.len())
            .map(|slot| frozen.slot(slot, &mut Mode::Eval))
            .collect::<CandleResult<Vec<_>>>();
        frozen.computed = computed.ok();
        frozen
    }

    /// The keys and values `[P, hidden]` of the `slot`-th layer with a prefix.
    fn slot(&self, slot: usize, mode: &mut Mode) -> CandleResult<(Tensor, Tensor)> {
        if let Some(computed) = &self.computed {
            return Ok(computed[slot].clone());
        }
        let (p, h) = (self.config.prefix_length, self.hidden);
        let both = match &self.weights {
            Weights::Flat(t) => {
                t.reshape((p, self.slots.len() * 2 * h))?
                    .narrow(1, 2 * slot * h, 2 * h)?
            }
            Weights::Mlp { wte, down, up } => {
                let mid = self.config.non_linearity.forward(&down.forward(wte)?)?;
                // Only this slot's rows of the second Linear.
                let weight = up.weight().narrow(0, 2 * slot * h, 2 * h)?;
                let rows = Linear::new(
                    weight,
                    up.bias()
                        .map(|b| b.narrow(0, 2 * slot * h, 2 * h))
                        .transpose()?,
                );
                rows.forward(&mid)?
            }
        };
        let both = mode.dropout(&both, self.config.dropout)?;
        Ok((both.narrow(1, 0, h)?, both.narrow(1, h, h)?))
    }

    /// `layer`'s prefix keys and values `[P, hidden]` (heads side by side), as evaluation
    /// uses them; `None` where the layer has no prefix.
    pub fn keys_values(&self, layer: usize) -> Option<CandleResult<(Tensor, Tensor)>> {
        let slot = *self.slots.get(&layer)?;
        Some(self.slot(slot, &mut Mode::Eval))
    }

    /// Whether the prefix runs at `layer` (it has one there, and AdapterDrop keeps it).
    pub fn runs_at(&self, layer: usize) -> bool {
        self.slots.contains_key(&layer) && !self.skip_layers.contains(&layer)
    }

    /// `layer`'s prefix keys and values `[P, hidden]` for each row of `input` (the layer's
    /// input, `[rows, seq, hidden]`): `[rows, P, hidden]`, scaled by the layer's gate if it has
    /// one.
    fn for_rows(
        &self,
        layer: usize,
        keys: &Tensor,
        values: &Tensor,
        input: &Tensor,
    ) -> CandleResult<(Tensor, Tensor)> {
        let rows = input.dim(0)?;
        let spread = |t: &Tensor| t.unsqueeze(0)?.expand((rows, t.dim(0)?, self.hidden));
        let (keys, values) = (spread(keys)?, spread(values)?);
        let Some((gate, _)) = self.gates.get(&layer) else {
            return Ok((keys, values));
        };
        let g = gate.values(input)?;
        let last = g.dim(1)? - 1;
        Ok((
            keys.broadcast_mul(&Gate::column(&g, 0)?)?,
            values.broadcast_mul(&Gate::column(&g, last)?)?,
        ))
    }

    /// What the prefix puts in front of `layer`'s keys and values for each row of `input`,
    /// always attended; `None` where it does not run.
    pub fn key_value_prefix(
        &self,
        layer: usize,
        input: &Tensor,
        mode: &mut Mode,
    ) -> CandleResult<Option<KeyValuePrefix>> {
        if !self.runs_at(layer) {
            return Ok(None);
        }
        let (keys, values) = self.slot(self.slots[&layer], mode)?;
        let (keys, values) = self.for_rows(layer, &keys, &values, input)?;
        let (rows, p, _) = keys.dims3()?;
        let bias = Tensor::zeros((rows, 1, 1, p), input.dtype(), input.device())?;
        Ok(Some(KeyValuePrefix { keys, values, bias }))
    }
}
