//! Files: atomic writes and AdapterHub's adapter directories.

pub mod adapter_dir;
pub mod atomic;
pub mod guard;
