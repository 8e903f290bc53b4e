//! Files: atomic writes, AdapterHub's adapter directories and merged model directories.

pub mod adapter_dir;
pub mod atomic;
pub mod fusion_dir;
pub mod guard;
pub mod model_dir;
pub mod peft;
pub mod run_dir;
