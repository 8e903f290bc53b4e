//! Our BERT encoder: one small struct per Hugging Face module, weights named by the
//! checkpoint's own keys, hook points for the tuning methods, and a backward pass everywhere.

pub mod attention;
pub mod bert;
pub mod config;
pub mod dropout;
pub mod embeddings;
pub mod fused;
pub mod fused_attention;
pub mod fused_feed_forward;
pub mod fused_layer_norm;
pub mod hooks;
pub mod layer;
pub mod layer_norm;
pub mod load;
mod matmul;
pub mod ops;
mod parallel;
pub mod random;
mod simd;

pub use bert::BertModel;
pub use config::BertConfig;
pub use dropout::Mode;
pub use hooks::{LayerHooks, LinearSite, NoHooks};
