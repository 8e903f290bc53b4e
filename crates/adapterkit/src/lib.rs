//! adapterkit: parameter-efficient fine-tuning (bottleneck adapters, AdapterFusion,
//! AdapterDrop) of BERT-family encoders, on candle.
//!
//! ```no_run
//! use adapterkit::{model::load::Pretrained, model::{Mode, NoHooks}, pooling::Pooling};
//! let device = candle_core::Device::Cpu;
//! let pretrained = Pretrained::load("assets/all-MiniLM-L6-v2", &device)?;
//! let batch = pretrained.tokenizer.batch(&["Adapters are small."], &device)?;
//! let hidden = pretrained.model.forward(&batch, &NoHooks, &mut Mode::Eval)?;
//! let embedding = Pooling::Mean.pool(&hidden, &batch.attention_mask)?;
//! # Ok::<(), adapterkit::Error>(())
//! ```

pub mod adapter_model;
pub mod adapter_set;
pub mod batch;
pub mod bench;
pub mod composed_model;
pub mod data;
pub mod error;
pub mod heads;
pub mod io;
pub mod kernels;
pub mod methods;
pub mod metrics;
pub mod model;
pub mod params;
pub mod pooling;
pub mod predictor;
pub mod rng;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
