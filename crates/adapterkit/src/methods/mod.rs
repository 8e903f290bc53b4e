//! The tuning methods, each a set of named parameters plus the [`LayerHooks`] that run them.
//!
//! [`LayerHooks`]: crate::model::hooks::LayerHooks

pub mod adapter;
pub mod bottleneck;
pub mod bottleneck_config;
pub mod composition;
pub mod fusion;
pub mod gate;
pub mod lora;
pub mod lora_config;
pub mod prefix_tuning;

use serde_json::Value;

/// A whole number as an integer (`16`, not `16.0`), as AdapterHub's files write their ints.
pub(crate) fn whole_as_int(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        Value::from(f)
    }
}

/// `config` (a config as JSON) with `key=value` overrides, as the CLI's `--adapter-option` gives
/// them: values in JSON syntax, bare words as strings.
pub(crate) fn with_overrides(mut config: Value, overrides: &[(String, String)]) -> Value {
    for (key, raw) in overrides {
        let parsed = serde_json::from_str(raw).unwrap_or_else(|_| Value::from(raw.as_str()));
        config[key.as_str()] = parsed;
    }
    config
}
