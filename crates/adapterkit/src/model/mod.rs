//! Our BERT encoder: one small struct per Hugging Face module, weights named by the
//! checkpoint's own keys, hook points for the tuning methods, and a backward pass everywhere.
//! The CPU kernels its ops run on are in [`crate::kernels`].

pub mod architecture;
pub mod attention;
pub mod bert;
pub mod checkpoint;
pub mod config;
pub mod dropout;
pub mod embeddings;
pub mod hooks;
pub mod layer;
pub mod layer_norm;
pub mod load;
pub mod ops;
pub mod precision;
pub mod random;

pub use architecture::Architecture;
pub use bert::BertModel;
pub use config::BertConfig;
pub use dropout::Mode;
pub use hooks::{LayerHooks, LinearSite, NoHooks};
pub use precision::Precision;
