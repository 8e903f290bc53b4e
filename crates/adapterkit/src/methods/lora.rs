//! LoRA (Hu et al. 2021) and (IA)³ (Liu et al. 2022) with AdapterHub's `LoRAConfig`,
//! `IA3Config`, tensor names and semantics (adapters 1.3, `methods/lora.py`).
//!
//! Both change Linears of the encoder (`LayerHooks::linear`). A LoRA adds a low-rank update,
//! `W x + b + dropout(x) Aᵀ Bᵀ · alpha/r`; an (IA)³ vector scales the output,
//! `(W x + b) ⊙ l · alpha`. AdapterHub saves (IA)³ as a LoRA whose `composition_mode` is
//! `"scale"`, so one config type and one module type serve both.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{Device, Result as CandleResult, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::hooks::{LayerHooks, LinearChange, LinearSite};
use crate::model::{BertConfig, Mode};
use crate::params::{init, Params};
use crate::rng::SeededRng;

/// How the module's output joins the Linear's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompositionMode {
    /// LoRA: `out + update`.
    Add,
    /// (IA)³: `out ⊙ scale`.
    Scale,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// A Kaiming-uniform (as `nn.Linear`), B zeros: the update starts at zero.
    Lora,
    /// A and B N(0, 0.02).
    Bert,
    /// Ones: an (IA)³ scale starts as the identity.
    Ia3,
}

/// AdapterHub's `LoRAConfig` (and `IA3Config`), field for field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub architecture: String,
    #[serde(default = "yes")]
    pub selfattn_lora: bool,
    #[serde(default)]
    pub intermediate_lora: bool,
    #[serde(default)]
    pub output_lora: bool,
    #[serde(default)]
    pub leave_out: Vec<usize>,
    #[serde(default = "eight")]
    pub r: usize,
    /// An int in AdapterHub's files; written back as one when whole.
    #[serde(default = "eight_f", serialize_with = "whole_as_int")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f32,
    #[serde(default = "query_value")]
    pub attn_matrices: Vec<String>,
    #[serde(default = "add")]
    pub composition_mode: CompositionMode,
    #[serde(default = "lora_init")]
    pub init_weights: LoraInit,
    /// AdapterHub's other fields (`use_gating`, `use_dora`, `vera_*`, `dtype`, ...), kept so
    /// that a saved config round-trips; [`validate`](Self::validate) rejects what we lack.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
    /// What Hugging Face PEFT's LoRA can be and AdapterHub's cannot (never in AdapterHub's
    /// JSON): set when read from a PEFT file.
    #[serde(skip)]
    pub peft_only: PeftOnly,
}

/// PEFT's LoRA options beyond AdapterHub's: `attention.output.dense` among the targets, and
/// rank-stabilised scaling (`use_rslora`: `alpha / √r`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeftOnly {
    pub attention_output: bool,
    pub rslora: bool,
}

impl PeftOnly {
    /// Why AdapterHub's files cannot hold a LoRA with these options, if they cannot.
    pub fn beyond_adapterhub(&self) -> Option<&'static str> {
        match (self.attention_output, self.rslora) {
            (true, _) => Some("a LoRA on attention.output.dense"),
            (_, true) => Some("rank-stabilised scaling (use_rslora)"),
            _ => None,
        }
    }
}

fn yes() -> bool {
    true
}
fn eight() -> usize {
    8
}
fn eight_f() -> f64 {
    8.0
}
fn query_value() -> Vec<String> {
    vec!["q".into(), "v".into()]
}
fn add() -> CompositionMode {
    CompositionMode::Add
}
fn lora_init() -> LoraInit {
    LoraInit::Lora
}

fn whole_as_int<S: serde::Serializer>(x: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        s.serialize_i64(*x as i64)
    } else {
        s.serialize_f64(*x)
    }
}

/// Fields of AdapterHub's `LoRAConfig` that we do not implement, with the only value we accept.
const UNSUPPORTED_UNLESS: &[(&str, Value)] = &[
    ("use_gating", Value::Bool(false)),
    ("use_dora", Value::Bool(false)),
    ("vera_d", Value::Null),
    ("vera_b", Value::Null),
];

/// Presets by AdapterHub's names.
pub const PRESETS: &[&str] = &["lora", "ia3"];

impl LoraConfig {
    /// `lora` (`LoRAConfig()`) or `ia3` (`IA3Config()`).
    pub fn preset(name: &str) -> Option<Self> {
        let other = [
            ("init_weights_seed", Value::Null),
            ("use_gating", Value::Bool(false)),
            ("use_dora", Value::Bool(false)),
            ("vera_d", Value::Null),
            ("vera_b", Value::Null),
            ("dtype", Value::Null),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let lora = Self {
            architecture: "lora".into(),
            selfattn_lora: true,
            intermediate_lora: false,
            output_lora: false,
            leave_out: Vec::new(),
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            attn_matrices: query_value(),
            composition_mode: CompositionMode::Add,
            init_weights: LoraInit::Lora,
            other,
            peft_only: PeftOnly::default(),
        };
        match name {
            "lora" => Some(lora),
            "ia3" => Some(Self {
                intermediate_lora: true,
                r: 1,
                alpha: 1.0,
                attn_matrices: vec!["k".into(), "v".into()],
                composition_mode: CompositionMode::Scale,
                init_weights: LoraInit::Ia3,
                ..lora
            }),
            _ => None,
        }
    }

    /// Parses a config as AdapterHub writes it. Files of adapters before 1.1 ignored `alpha`
    /// (their scaling was 1): `version` below `adapters.1.1.0` loads with `alpha = r`, as
    /// the Python library does.
    pub fn from_json(value: Value, version: Option<&str>) -> std::result::Result<Self, String> {
        let mut config: Self = serde_json::from_value(value).map_err(|e| e.to_string())?;
        if version.is_some_and(before_alpha_counted) {
            config.alpha = config.r as f64;
        }
        Ok(config)
    }

    /// The Linears of one layer the config reaches (before `leave_out`).
    pub fn sites(&self) -> Vec<LinearSite> {
        let mut sites = Vec::new();
        if self.selfattn_lora {
            for (letter, site) in [
                ("q", LinearSite::Query),
                ("k", LinearSite::Key),
                ("v", LinearSite::Value),
            ] {
                if self.attn_matrices.iter().any(|m| m == letter) {
                    sites.push(site);
                }
            }
        }
        if self.peft_only.attention_output {
            sites.push(LinearSite::AttentionOutput);
        }
        if self.intermediate_lora {
            sites.push(LinearSite::Intermediate);
        }
        if self.output_lora {
            sites.push(LinearSite::Output);
        }
        sites
    }

    /// The factor on the module's output: `alpha / r` for LoRA (`alpha / √r` rank-stabilised),
    /// `alpha` for (IA)³.
    pub fn scaling(&self) -> f64 {
        match self.composition_mode {
            CompositionMode::Add if self.peft_only.rslora => self.alpha / (self.r as f64).sqrt(),
            CompositionMode::Add => self.alpha / self.r as f64,
            CompositionMode::Scale => self.alpha,
        }
    }

    /// Checks the config against a model's layer count and the features we implement.
    pub fn validate(&self, num_layers: usize) -> std::result::Result<(), String> {
        if self.architecture != "lora" {
            return Err(format!(
                "architecture \"{}\" is not a LoRA",
                self.architecture
            ));
        }
        if self.r == 0 {
            return Err("r must be at least 1, got 0".into());
        }
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return Err(format!(
                "alpha must be a number of at least 0, got {}",
                self.alpha
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        if let Some(bad) = self
            .attn_matrices
            .iter()
            .find(|m| !["q", "k", "v"].contains(&m.as_str()))
        {
            return Err(format!(
                "attn_matrices may hold \"q\", \"k\" and \"v\", not \"{bad}\""
            ));
        }
        if let Some(bad) = self.leave_out.iter().find(|l| **l >= num_layers) {
            return Err(format!(
                "leave_out names layer {bad}, but the model has {num_layers} layers"
            ));
        }
        if self.sites().is_empty() {
            return Err(
                "the config places the module at no Linear (selfattn_lora with \
                        attn_matrices, intermediate_lora or output_lora)"
                    .into(),
            );
        }
        if self.composition_mode == CompositionMode::Scale {
            if self.r != 1 {
                return Err(format!(
                    "composition_mode \"scale\" ((IA)³) needs r = 1, got {}",
                    self.r
                ));
            }
            if self.dropout > 0.0 {
                return Err("composition_mode \"scale\" ((IA)³) takes no dropout".into());
            }
        }
        for (key, accepted) in UNSUPPORTED_UNLESS {
            if let Some(value) = self.other.get(*key) {
                if value != accepted {
                    return Err(format!("{key}={value} is not supported by adapterkit"));
                }
            }
        }
        Ok(())
    }

    /// Applies `key=value` overrides (values in JSON syntax, bare words as strings).
    pub fn with_overrides(
        &self,
        overrides: &[(String, String)],
    ) -> std::result::Result<Self, String> {
        let mut value = serde_json::to_value(self).map_err(|e| e.to_string())?;
        for (key, raw) in overrides {
            let parsed = serde_json::from_str(raw).unwrap_or_else(|_| Value::from(raw.as_str()));
            value[key.as_str()] = parsed;
        }
        Self::from_json(value, None).map_err(|e| format!("after overrides: {e}"))
    }
}

/// Whether `version` (`adapters.X.Y.Z`) is one before 1.1.0, whose LoRA ignored `alpha`.
fn before_alpha_counted(version: &str) -> bool {
    let Some(number) = version.strip_prefix("adapters.") else {
        return false;
    };
    let parts: Vec<u64> = number.split('.').map_while(|p| p.parse().ok()).collect();
    parts.len() >= 2 && (parts[0], parts[1]) < (1, 1)
}

/// One module on one Linear: `lora_A` `[r, in]` (LoRA only) and `lora_B` `[out, r]`.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    a: Option<Tensor>,
    b: Tensor,
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
        Ok(Self {
            a,
            b: b.as_tensor().clone(),
            params,
        })
    }

    fn frozen(&self) -> Self {
        Self {
            a: self.a.as_ref().map(Tensor::detach),
            b: self.b.detach(),
            params: Params::default(),
        }
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
                low.reshape(out_dims)? * scaling
            }
            None => {
                let vector = (self.b.flatten_all()? * scaling)?;
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
        config.validate(model.num_hidden_layers).map_err(invalid)?;
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

    /// The layers the module reaches.
    pub fn layers(&self) -> BTreeSet<usize> {
        self.modules.keys().map(|(layer, _)| *layer).collect()
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
                a.into_iter()
                    .chain([(format!("{prefix}.lora_B"), module.b.clone())])
            })
            .collect()
    }

    /// Each module's Linear as merged weights would give it ([`LoraLinear::merge`]).
    pub fn modules(&self) -> impl Iterator<Item = (usize, LinearSite, &LoraLinear)> {
        self.modules.iter().map(|((l, s), m)| (*l, *s, m))
    }
}

impl LayerHooks for Lora {
    fn linear(&self, layer: usize, site: LinearSite) -> Option<LinearChange<'_>> {
        let module = self.get(layer, site)?;
        Some(Box::new(move |x: &Tensor, out: Tensor, mode: &mut Mode| {
            let hidden = module.forward(&self.config, x, None, mode)?;
            compose(out, &hidden, self.config.composition_mode)
        }))
    }
}
