//! `BnConfig`: a bottleneck adapter's configuration, with AdapterHub's field names, defaults
//! and presets, so that `adapter_config.json` files interoperate.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::ops::Activation;

/// A number for every layer, or a map such as `{"1": 8, "default": 16}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ReductionFactor {
    Uniform(f64),
    PerLayer(BTreeMap<String, f64>),
}

/// Whole factors are written as integers (`16`, not `16.0`), as AdapterHub's files have them.
impl Serialize for ReductionFactor {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        let number = crate::methods::whole_as_int;
        let value = match self {
            ReductionFactor::Uniform(f) => number(*f),
            ReductionFactor::PerLayer(map) => {
                Value::Object(map.iter().map(|(k, v)| (k.clone(), number(*v))).collect())
            }
        };
        value.serialize(serializer)
    }
}

impl ReductionFactor {
    pub fn for_layer(&self, layer: usize) -> std::result::Result<f64, String> {
        match self {
            ReductionFactor::Uniform(r) => Ok(*r),
            ReductionFactor::PerLayer(map) => map
                .get(&layer.to_string())
                .or_else(|| map.get("default"))
                .copied()
                .ok_or_else(|| {
                    format!("reduction_factor has no entry for layer {layer} and no \"default\"")
                }),
        }
    }
}

/// `residual_before_ln`: where the adapter's skip connection is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResidualBeforeLn {
    /// `true`: the sub-layer output before the original LayerNorm; `false`: after it.
    Flag(bool),
    /// `"post_add"`: after adding the sub-layer input, before the LayerNorm.
    PostAdd(PostAdd),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostAdd {
    PostAdd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitWeights {
    /// N(0, 0.02) weights, zero biases.
    Bert,
    /// Truncated N(0, 0.01) clipped at +-0.02, zero biases.
    Houlsby,
    /// Kaiming-uniform down projection, zero up projection.
    MamAdapter,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BnConfig {
    pub mh_adapter: bool,
    pub output_adapter: bool,
    pub reduction_factor: ReductionFactor,
    pub non_linearity: Activation,
    #[serde(default)]
    pub original_ln_before: bool,
    #[serde(default = "yes")]
    pub original_ln_after: bool,
    #[serde(default)]
    pub ln_before: bool,
    #[serde(default)]
    pub ln_after: bool,
    #[serde(default = "bert_init")]
    pub init_weights: InitWeights,
    #[serde(default)]
    pub is_parallel: bool,
    #[serde(default = "one")]
    pub scaling: f64,
    #[serde(default = "residual_true")]
    pub residual_before_ln: ResidualBeforeLn,
    #[serde(default)]
    pub adapter_residual_before_ln: bool,
    #[serde(default)]
    pub dropout: f32,
    #[serde(default)]
    pub leave_out: Vec<usize>,
    /// AdapterHub's other fields (`use_gating`, `phm_*`, ...), kept so that a
    /// saved config round-trips; [`validate`](Self::validate) rejects the features we lack.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}
fn bert_init() -> InitWeights {
    InitWeights::Bert
}
fn residual_true() -> ResidualBeforeLn {
    ResidualBeforeLn::Flag(true)
}

/// Presets by AdapterHub's names and aliases.
pub const PRESETS: &[&str] = &[
    "seq_bn",
    "pfeiffer",
    "double_seq_bn",
    "houlsby",
    "par_bn",
    "parallel",
];

/// Fields of AdapterHub's `BnConfig` that we do not implement, with the only value we accept.
const UNSUPPORTED_UNLESS: &[(&str, &str)] = &[
    ("cross_adapter", "false"),
    ("phm_layer", "false"),
    ("inv_adapter", "null"),
    ("stochastic_depth", "0.0"),
];

impl BnConfig {
    /// `use_gating` (UniPELT): a gate on the adapter's input scales its output.
    pub fn use_gating(&self) -> bool {
        self.other.get("use_gating") == Some(&Value::Bool(true))
    }

    /// AdapterHub's base defaults plus the given placement, size and non-linearity.
    fn base(mh: bool, output: bool, reduction: f64, non_linearity: Activation) -> Self {
        let other = [
            ("init_weights_seed", Value::Null),
            ("use_gating", Value::from(false)),
            ("inv_adapter", Value::Null),
            ("inv_adapter_reduction_factor", Value::Null),
            ("cross_adapter", Value::from(false)),
            ("phm_layer", Value::from(false)),
            ("phm_dim", Value::from(4)),
            ("factorized_phm_W", Value::from(true)),
            ("shared_W_phm", Value::from(false)),
            ("shared_phm_rule", Value::from(true)),
            ("factorized_phm_rule", Value::from(false)),
            ("phm_c_init", Value::from("normal")),
            ("phm_init_range", Value::from(0.0001)),
            ("learn_phm", Value::from(true)),
            ("hypercomplex_nonlinearity", Value::from("glorot-uniform")),
            ("phm_rank", Value::from(1)),
            ("phm_bias", Value::from(true)),
            ("stochastic_depth", Value::from(0.0)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Self {
            mh_adapter: mh,
            output_adapter: output,
            reduction_factor: ReductionFactor::Uniform(reduction),
            non_linearity,
            original_ln_before: false,
            original_ln_after: true,
            ln_before: false,
            ln_after: false,
            init_weights: InitWeights::Bert,
            is_parallel: false,
            scaling: 1.0,
            residual_before_ln: ResidualBeforeLn::Flag(true),
            adapter_residual_before_ln: false,
            dropout: 0.0,
            leave_out: Vec::new(),
            other,
        }
    }

    /// A preset by AdapterHub's name: `seq_bn` (`pfeiffer`), `double_seq_bn` (`houlsby`),
    /// `par_bn` (`parallel`).
    pub fn preset(name: &str) -> Result<Self> {
        Ok(match name {
            "seq_bn" | "pfeiffer" => Self {
                original_ln_before: true,
                ..Self::base(false, true, 16.0, Activation::Relu)
            },
            "double_seq_bn" | "houlsby" => Self::base(true, true, 16.0, Activation::Swish),
            "par_bn" | "parallel" => Self {
                is_parallel: true,
                scaling: 4.0,
                init_weights: InitWeights::MamAdapter,
                ..Self::base(false, true, 2.0, Activation::Relu)
            },
            other => {
                return Err(Error::input(format!(
                    "unknown adapter preset '{other}' (known: {})",
                    PRESETS.join(", ")
                )))
            }
        })
    }

    /// Parses a config as AdapterHub writes it (checked later, against a model, by
    /// [`validate`](Self::validate)).
    pub fn from_json(value: Value) -> std::result::Result<Self, String> {
        let config: Self = serde_json::from_value(value).map_err(|e| e.to_string())?;
        Ok(config)
    }

    /// The bottleneck width at `layer` for a model of `hidden_size`, as AdapterHub computes it
    /// (`hidden_size // reduction_factor`), or an error when that leaves no bottleneck.
    pub fn bottleneck_size(
        &self,
        layer: usize,
        hidden_size: usize,
    ) -> std::result::Result<usize, String> {
        let factor = self.reduction_factor.for_layer(layer)?;
        if !(factor.is_finite() && factor > 0.0) {
            return Err(format!(
                "reduction_factor must be a positive number, got {factor}"
            ));
        }
        let size = (hidden_size as f64 / factor).floor() as usize;
        if size < 1 {
            return Err(format!(
                "reduction_factor {factor} leaves no bottleneck for hidden size {hidden_size} \
                 (at most {hidden_size})"
            ));
        }
        Ok(size)
    }

    /// Checks the config against a model's shape and the features we implement.
    pub fn validate(
        &self,
        num_layers: usize,
        hidden_size: usize,
    ) -> std::result::Result<(), String> {
        if !self.mh_adapter && !self.output_adapter {
            return Err(
                "neither mh_adapter nor output_adapter is set: the adapter would have no place"
                    .into(),
            );
        }
        for layer in 0..num_layers {
            self.bottleneck_size(layer, hidden_size)?;
        }
        if let Some(bad) = self.leave_out.iter().find(|l| **l >= num_layers) {
            return Err(format!(
                "leave_out names layer {bad}, but the model has {num_layers} layers"
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        if !self.scaling.is_finite() {
            return Err(format!(
                "scaling must be a finite number, got {}",
                self.scaling
            ));
        }
        for (key, accepted) in UNSUPPORTED_UNLESS {
            if let Some(value) = self.other.get(*key) {
                let accepted: Value = serde_json::from_str(accepted).expect("valid literal");
                let same = match (value.as_f64(), accepted.as_f64()) {
                    (Some(a), Some(b)) => a == b,
                    _ => *value == accepted,
                };
                if !same {
                    return Err(format!("{key}={value} is not supported by adapterkit"));
                }
            }
        }
        Ok(())
    }

    /// Applies `key=value` overrides (values in JSON syntax, bare words as strings), as the
    /// CLI's `--adapter-option` gives them.
    pub fn with_overrides(
        &self,
        overrides: &[(String, String)],
    ) -> std::result::Result<Self, String> {
        let value = serde_json::to_value(self).map_err(|e| e.to_string())?;
        let value = crate::methods::with_overrides(value, overrides);
        Self::from_json(value).map_err(|e| format!("after overrides: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_adapterhub_defaults() {
        let houlsby = BnConfig::preset("houlsby").unwrap();
        assert!(houlsby.mh_adapter && houlsby.output_adapter && !houlsby.original_ln_before);
        assert_eq!(houlsby.non_linearity, Activation::Swish);
        assert_eq!(houlsby, BnConfig::preset("double_seq_bn").unwrap());
        let pfeiffer = BnConfig::preset("pfeiffer").unwrap();
        assert!(!pfeiffer.mh_adapter && pfeiffer.output_adapter && pfeiffer.original_ln_before);
        assert_eq!(pfeiffer.non_linearity, Activation::Relu);
        let parallel = BnConfig::preset("parallel").unwrap();
        assert!(parallel.is_parallel);
        assert_eq!(
            (parallel.scaling, parallel.bottleneck_size(0, 384).unwrap()),
            (4.0, 192)
        );
        assert_eq!(parallel.init_weights, InitWeights::MamAdapter);
    }

    #[test]
    fn json_round_trip_keeps_every_field() {
        let config = BnConfig::preset("houlsby").unwrap();
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["reduction_factor"], 16);
        assert_eq!(json["phm_dim"], 4);
        assert_eq!(json["non_linearity"], "swish");
        assert_eq!(json["residual_before_ln"], true);
        assert_eq!(BnConfig::from_json(json).unwrap(), config);
    }

    #[test]
    fn per_layer_reduction_factor_and_post_add() {
        let json = serde_json::json!({
            "mh_adapter": false, "output_adapter": true, "non_linearity": "relu",
            "reduction_factor": {"1": 8, "default": 16}, "residual_before_ln": "post_add"
        });
        let config = BnConfig::from_json(json).unwrap();
        assert_eq!(config.bottleneck_size(0, 384).unwrap(), 24);
        assert_eq!(config.bottleneck_size(1, 384).unwrap(), 48);
        assert_eq!(
            config.residual_before_ln,
            ResidualBeforeLn::PostAdd(PostAdd::PostAdd)
        );
    }

    #[test]
    fn bad_configs_are_named() {
        assert!(BnConfig::preset("lora-ish")
            .unwrap_err()
            .to_string()
            .contains("unknown adapter preset 'lora-ish'"));
        let too_big = BnConfig::preset("houlsby")
            .unwrap()
            .with_overrides(&[("reduction_factor".into(), "1000".into())])
            .unwrap();
        assert!(too_big
            .validate(6, 384)
            .unwrap_err()
            .contains("leaves no bottleneck"));
        let gated = BnConfig::preset("houlsby")
            .unwrap()
            .with_overrides(&[("use_gating".into(), "true".into())])
            .unwrap();
        assert!(gated.use_gating() && gated.validate(6, 384).is_ok());
        let no_default = BnConfig::from_json(serde_json::json!({
            "mh_adapter": true, "output_adapter": true, "non_linearity": "relu", "reduction_factor": {"1": 8}
        })).unwrap();
        assert!(no_default
            .validate(2, 32)
            .unwrap_err()
            .contains("no \"default\""));
    }
}
