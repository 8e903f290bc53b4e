//! `LoraConfig`: a LoRA's (or (IA)³'s) configuration, with AdapterHub's field names, defaults
//! and presets (`LoRAConfig`, `IA3Config`), so that `adapter_config.json` files interoperate.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::hooks::LinearSite;

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
    crate::methods::whole_as_int(*x).serialize(s)
}

/// Fields of AdapterHub's `LoRAConfig` that we do not implement, with the only value we accept.
const UNSUPPORTED_UNLESS: &[(&str, Value)] = &[
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

    /// `use_gating` (UniPELT): a gate on the Linear's input scales the update, in place of
    /// `alpha / r` (as AdapterHub does: its gated LoRA ignores alpha).
    pub fn use_gating(&self) -> bool {
        self.other.get("use_gating") == Some(&Value::Bool(true))
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

    /// Checks the config against a model's shape and the features we implement.
    /// `widest`: the largest dimension of the model's Linears; a rank above it adds nothing
    /// (and a file claiming a huge one must not allocate it).
    pub fn validate(&self, num_layers: usize, widest: usize) -> std::result::Result<(), String> {
        if self.architecture != "lora" {
            return Err(format!(
                "architecture \"{}\" is not a LoRA",
                self.architecture
            ));
        }
        if self.r == 0 {
            return Err("r must be at least 1, got 0".into());
        }
        if self.r > widest {
            return Err(format!(
                "r is {}, more than the model's widest Linear ({widest}): a larger rank adds nothing",
                self.r
            ));
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
            if self.use_gating() {
                return Err(
                    "use_gating with composition_mode \"scale\" ((IA)³) is not supported".into(),
                );
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
        let value = serde_json::to_value(self).map_err(|e| e.to_string())?;
        let value = crate::methods::with_overrides(value, overrides);
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
