//! The tuning methods, each a set of named parameters plus the [`LayerHooks`] that run them.
//!
//! [`LayerHooks`]: crate::model::hooks::LayerHooks

pub mod adapter;
pub mod bottleneck;
pub mod bottleneck_config;
pub mod composition;
pub mod fusion;
pub mod lora;
pub mod lora_config;
