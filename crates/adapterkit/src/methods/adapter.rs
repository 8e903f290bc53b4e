//! One named adapter: the modules AdapterHub keeps under one name. Usually one module (a
//! bottleneck adapter, a LoRA, an (IA)³ vector); AdapterHub's `ConfigUnion` puts several under
//! one name, at most one of each kind (e.g. a LoRA beside a bottleneck adapter).
//!
//! Adding a method means a variant in [`ModuleConfig`] and [`Module`] and the arms the compiler
//! then asks for; the model, composition, training and files go through these types.

use std::collections::BTreeSet;

use candle_core::{Device, Result as CandleResult, Tensor};
use candle_nn::Linear;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::methods::bottleneck::BottleneckAdapters;
use crate::methods::bottleneck_config::{self, BnConfig};
use crate::methods::lora::{self, Lora, LoraConfig};
use crate::methods::prefix_tuning::{PrefixTuning, PrefixTuningConfig};
use crate::model::hooks::{KeyValuePrefix, LayerHooks, LinearChange, LinearSite, Position};
use crate::model::layer::Positions;
use crate::model::layer_norm::LayerNorm;
use crate::model::{BertConfig, Mode};
use crate::params::Params;
use crate::rng::SeededRng;

/// One module's config, by kind.
#[derive(Debug, Clone, PartialEq)]
pub enum ModuleConfig {
    Bottleneck(BnConfig),
    /// A LoRA, or (with `composition_mode: "scale"`) an (IA)³ vector.
    Lora(LoraConfig),
    PrefixTuning(PrefixTuningConfig),
}

impl ModuleConfig {
    /// The kind, as AdapterHub's `architecture` names it.
    pub fn kind(&self) -> &'static str {
        match self {
            ModuleConfig::Bottleneck(_) => "bottleneck",
            ModuleConfig::Lora(_) => "lora",
            ModuleConfig::PrefixTuning(_) => "prefix_tuning",
        }
    }

    fn to_json(&self) -> Value {
        match self {
            ModuleConfig::Bottleneck(c) => serde_json::to_value(c),
            ModuleConfig::Lora(c) => serde_json::to_value(c),
            ModuleConfig::PrefixTuning(c) => serde_json::to_value(c),
        }
        .expect("configs serialize")
    }

    fn from_json(value: Value, version: Option<&str>) -> std::result::Result<Self, String> {
        match value.get("architecture").and_then(Value::as_str) {
            None | Some("bottleneck") => BnConfig::from_json(value).map(ModuleConfig::Bottleneck),
            Some("lora") => LoraConfig::from_json(value, version).map(ModuleConfig::Lora),
            Some("prefix_tuning") => {
                PrefixTuningConfig::from_json(value).map(ModuleConfig::PrefixTuning)
            }
            Some(other) => Err(format!(
                "adapters of architecture \"{other}\" are not supported by adapterkit \
                 (bottleneck, lora, prefix_tuning and unions of them are)"
            )),
        }
    }
}

/// The config of one named adapter: its modules' configs, in AdapterHub's order.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig(pub Vec<ModuleConfig>);

impl From<BnConfig> for AdapterConfig {
    fn from(config: BnConfig) -> Self {
        Self(vec![ModuleConfig::Bottleneck(config)])
    }
}

impl From<LoraConfig> for AdapterConfig {
    fn from(config: LoraConfig) -> Self {
        Self(vec![ModuleConfig::Lora(config)])
    }
}

/// Every preset name [`AdapterConfig::preset`] takes.
pub fn preset_names() -> Vec<&'static str> {
    let bottleneck = bottleneck_config::PRESETS.iter();
    let others = lora::PRESETS
        .iter()
        .chain(&["prefix_tuning", "mam", "unipelt"]);
    bottleneck.chain(others).copied().collect()
}

impl AdapterConfig {
    /// A preset by AdapterHub's name: `seq_bn` (`pfeiffer`), `double_seq_bn` (`houlsby`),
    /// `par_bn` (`parallel`), `lora`, `ia3`, `prefix_tuning`, `mam` (Mix-and-Match: a prefix
    /// and a parallel adapter), `unipelt` (a gated prefix, bottleneck adapter and LoRA).
    pub fn preset(name: &str) -> Result<Self> {
        if let Some(config) = LoraConfig::preset(name) {
            return Ok(Self(vec![ModuleConfig::Lora(config)]));
        }
        if let Some(config) = PrefixTuningConfig::preset(name) {
            return Ok(Self(vec![ModuleConfig::PrefixTuning(config)]));
        }
        if name == "unipelt" {
            // AdapterHub's UniPELTConfig: a prefix (length 10), a sequential bottleneck adapter
            // (reduction 16) and a LoRA (r 8, alpha 2), each with a gate.
            let gating = [("use_gating".to_string(), "true".to_string())];
            let prefix = PrefixTuningConfig::preset("prefix_tuning")
                .expect("a preset")
                .with_overrides(&[gating[0].clone(), ("prefix_length".into(), "10".into())])
                .map_err(Error::input)?;
            let bottleneck = BnConfig::preset("seq_bn")?
                .with_overrides(&[gating[0].clone(), ("reduction_factor".into(), "16".into())])
                .map_err(Error::input)?;
            let lora = LoraConfig::preset("lora")
                .expect("a preset")
                .with_overrides(&[gating[0].clone(), ("alpha".into(), "2".into())])
                .map_err(Error::input)?;
            return Ok(Self(vec![
                ModuleConfig::PrefixTuning(prefix),
                ModuleConfig::Bottleneck(bottleneck),
                ModuleConfig::Lora(lora),
            ]));
        }
        if name == "mam" {
            // AdapterHub's MAMConfig: a prefix (bottleneck 800) and a parallel adapter.
            let mut prefix = PrefixTuningConfig::preset("prefix_tuning").expect("a preset");
            prefix.bottleneck_size = 800;
            let parallel = BnConfig::preset("par_bn")?;
            return Ok(Self(vec![
                ModuleConfig::PrefixTuning(prefix),
                ModuleConfig::Bottleneck(parallel),
            ]));
        }
        match BnConfig::preset(name) {
            Ok(config) => Ok(Self(vec![ModuleConfig::Bottleneck(config)])),
            Err(_) => Err(Error::input(format!(
                "unknown adapter preset '{name}' (known: {})",
                preset_names().join(", ")
            ))),
        }
    }

    /// Parses the `config` of an `adapter_config.json` (a module's config, or
    /// `{"architecture": "union", "configs": [...]}`); `version` is the file's.
    pub fn from_json(value: Value, version: Option<&str>) -> std::result::Result<Self, String> {
        if value.get("architecture").and_then(Value::as_str) != Some("union") {
            return Ok(Self(vec![ModuleConfig::from_json(value, version)?]));
        }
        let configs = value
            .get("configs")
            .and_then(Value::as_array)
            .ok_or("a union config needs a \"configs\" list")?;
        let modules = configs
            .iter()
            .map(|c| ModuleConfig::from_json(c.clone(), version))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let config = Self(modules);
        config.check_kinds()?;
        Ok(config)
    }

    /// The `config` field of `adapter_config.json`, as AdapterHub writes it.
    pub fn to_json(&self) -> Value {
        match &self.0[..] {
            [one] => one.to_json(),
            many => json!({
                "architecture": "union",
                "configs": many.iter().map(ModuleConfig::to_json).collect::<Vec<_>>(),
            }),
        }
    }

    /// At least one module, and at most one of each kind.
    fn check_kinds(&self) -> std::result::Result<(), String> {
        if self.0.is_empty() {
            return Err("a union of no modules".into());
        }
        let mut kinds = BTreeSet::new();
        for module in &self.0 {
            if !kinds.insert(module.kind()) {
                return Err(format!(
                    "two {} modules in one union (at most one of each kind)",
                    module.kind()
                ));
            }
        }
        Ok(())
    }

    /// Applies `key=value` overrides (the CLI's `--adapter-option`) to the one module.
    pub fn with_overrides(
        &self,
        overrides: &[(String, String)],
    ) -> std::result::Result<Self, String> {
        let [module] = &self.0[..] else {
            return Err("options apply to an adapter of one module, not to a union".into());
        };
        Ok(Self(vec![match module {
            ModuleConfig::Bottleneck(c) => ModuleConfig::Bottleneck(c.with_overrides(overrides)?),
            ModuleConfig::Lora(c) => ModuleConfig::Lora(c.with_overrides(overrides)?),
            ModuleConfig::PrefixTuning(c) => {
                ModuleConfig::PrefixTuning(c.with_overrides(overrides)?)
            }
        }]))
    }
}

/// One module of an adapter, over all layers.
#[derive(Debug, Clone)]
pub enum Module {
    Bottleneck(BottleneckAdapters),
    Lora(Lora),
    PrefixTuning(PrefixTuning),
}

impl Module {
    fn params(&self) -> Params {
        match self {
            Module::Bottleneck(m) => m.params(),
            Module::Lora(m) => m.params(),
            Module::PrefixTuning(m) => m.params(),
        }
    }

    fn frozen(&self) -> Self {
        match self {
            Module::Bottleneck(m) => Module::Bottleneck(m.frozen()),
            Module::Lora(m) => Module::Lora(m.frozen()),
            Module::PrefixTuning(m) => Module::PrefixTuning(m.frozen()),
        }
    }

    fn config(&self) -> ModuleConfig {
        match self {
            Module::Bottleneck(m) => ModuleConfig::Bottleneck(m.config.clone()),
            Module::Lora(m) => ModuleConfig::Lora(m.config.clone()),
            Module::PrefixTuning(m) => ModuleConfig::PrefixTuning(m.config.clone()),
        }
    }
}

/// A named adapter: its modules, at most one of each kind.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub name: String,
    pub modules: Vec<Module>,
}

impl Adapter {
    /// A freshly initialised adapter for `model`, drawing its weights from `rng` module by
    /// module.
    pub fn new(
        name: &str,
        config: &AdapterConfig,
        model: &BertConfig,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        config
            .check_kinds()
            .map_err(|e| Error::input(format!("adapter '{name}': {e}")))?;
        let modules = config
            .0
            .iter()
            .map(|c| {
                Ok(match c {
                    ModuleConfig::Bottleneck(c) => {
                        Module::Bottleneck(BottleneckAdapters::new(name, c, model, rng, device)?)
                    }
                    ModuleConfig::Lora(c) => Module::Lora(Lora::new(name, c, model, rng, device)?),
                    ModuleConfig::PrefixTuning(c) => {
                        Module::PrefixTuning(PrefixTuning::new(name, c, model, rng, device)?)
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            name: name.into(),
            modules,
        })
    }

    /// A bottleneck adapter alone.
    pub fn of_bottleneck(adapter: BottleneckAdapters) -> Self {
        Self {
            name: adapter.name.clone(),
            modules: vec![Module::Bottleneck(adapter)],
        }
    }

    pub fn config(&self) -> AdapterConfig {
        AdapterConfig(self.modules.iter().map(Module::config).collect())
    }

    pub fn bottleneck(&self) -> Option<&BottleneckAdapters> {
        self.modules.iter().find_map(|m| match m {
            Module::Bottleneck(b) => Some(b),
            _ => None,
        })
    }

    pub fn lora(&self) -> Option<&Lora> {
        self.modules.iter().find_map(|m| match m {
            Module::Lora(l) => Some(l),
            _ => None,
        })
    }

    /// Whether a gate of the adapter (UniPELT) reads a module's input over every position: the
    /// last layer must then compute every position, not the first token alone.
    pub fn gates_read_every_position(&self) -> bool {
        let bottleneck = self.bottleneck().is_some_and(|b| b.config.use_gating());
        let lora = self.lora().is_some_and(|l| l.config.use_gating());
        bottleneck || lora
    }

    /// Where the last layer must compute for a head that reads the first token, with
    /// `adapters` running: the first token alone, unless a gate reads every position.
    pub fn last_positions<'a>(adapters: impl IntoIterator<Item = &'a Adapter>) -> Positions {
        match adapters.into_iter().any(Adapter::gates_read_every_position) {
            true => Positions::All,
            false => Positions::First,
        }
    }

    /// The same adapter under another name (its modules' names too, which name its tensors).
    pub fn rename(&mut self, name: &str) {
        self.name = name.into();
        for module in &mut self.modules {
            match module {
                Module::Bottleneck(m) => m.name = name.into(),
                Module::Lora(m) => m.name = name.into(),
                Module::PrefixTuning(m) => m.name = name.into(),
            }
        }
    }

    pub fn prefix_tuning(&self) -> Option<&PrefixTuning> {
        self.modules.iter().find_map(|m| match m {
            Module::PrefixTuning(p) => Some(p),
            _ => None,
        })
    }

    /// Every parameter under AdapterHub's name, without the model prefix.
    pub fn params(&self) -> Params {
        let mut all = Params::default();
        for module in &self.modules {
            all.0.extend(module.params().0);
        }
        all
    }

    /// Every weight under the name `adapter.safetensors` gives it (without the model prefix),
    /// frozen or not.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let tensors = self.modules.iter().map(|m| match m {
            Module::Bottleneck(m) => m.tensors(),
            Module::Lora(m) => m.tensors(),
            Module::PrefixTuning(m) => m.tensors(),
        });
        tensors.flatten().collect()
    }

    /// A copy with plain-tensor weights, for inference.
    pub fn frozen(&self) -> Self {
        Self {
            name: self.name.clone(),
            modules: self.modules.iter().map(Module::frozen).collect(),
        }
    }

    /// AdapterDrop at run time: no module of the adapter runs in these layers.
    pub fn set_skip_layers(&mut self, layers: &BTreeSet<usize>) {
        for module in &mut self.modules {
            match module {
                Module::Bottleneck(m) => m.skip_layers = layers.clone(),
                Module::Lora(m) => m.skip_layers = layers.clone(),
                Module::PrefixTuning(m) => m.skip_layers = layers.clone(),
            }
        }
    }
}

impl LayerHooks for Adapter {
    fn linear(&self, layer: usize, site: LinearSite, base: &Linear) -> Option<LinearChange<'_>> {
        self.lora()?.linear(layer, site, base)
    }

    fn key_value_prefix(
        &self,
        layer: usize,
        input: &Tensor,
        mode: &mut Mode,
    ) -> CandleResult<Option<KeyValuePrefix>> {
        match self.prefix_tuning() {
            Some(p) => p.key_value_prefix(layer, input, mode),
            None => Ok(None),
        }
    }

    fn sub_layer_output(
        &self,
        layer: usize,
        position: Position,
        hidden: &Tensor,
        input: &Tensor,
        layer_norm: &LayerNorm,
        mode: &mut Mode,
    ) -> CandleResult<Tensor> {
        match self.bottleneck() {
            Some(b) => b.sub_layer_output(layer, position, hidden, input, layer_norm, mode),
            None => layer_norm.of_sum(&[hidden, input]),
        }
    }
}
