//! Resuming a killed run. At the end of every epoch (and every `save_steps` steps) the whole
//! training state is written as one set: a new folder `checkpoint/epoch-N` (or `step-N` inside
//! an epoch; every file written atomically), then `LATEST`, an atomic one-line pointer to it,
//! then the older folders go. A kill at any moment leaves `LATEST` pointing at a complete set,
//! or no set at all.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::EpochReport;
use crate::error::{Error, Result};
use crate::io::atomic::{write_atomic, write_json_atomic};
use crate::params::Params;

pub const CHECKPOINTS: &str = "checkpoint";
const LATEST: &str = "LATEST";
const PROGRESS: &str = "progress.json";
const TENSORS: &str = "state.safetensors";

/// Where a run stands after an epoch, besides its tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    /// Epochs finished.
    pub epoch: usize,
    pub step: usize,
    /// The generators' states: batch order, robust AdapterDrop, dropout.
    pub shuffle_rng: [u64; 4],
    pub drop_rng: [u64; 4],
    pub dropout_rng: [u64; 4],
    /// The best epoch so far and its metric value.
    pub best: Option<(usize, f64)>,
    pub stopped_early: bool,
    pub train_seconds: f64,
    pub history: Vec<EpochReport>,
    /// The run's settings, data sizes, parameters and thread count: a checkpoint resumes only
    /// the run that wrote it.
    pub fingerprint: String,
    /// Set when the checkpoint was taken inside epoch `epoch + 1`; `shuffle_rng` is then the
    /// state that draws that epoch's batch order.
    pub in_epoch: Option<InEpoch>,
}

/// How far an unfinished epoch got.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InEpoch {
    pub batches_done: usize,
    pub loss_sum: f64,
    pub seen: usize,
    pub step_losses: Vec<f64>,
}

/// A checkpoint as read back: the progress and the tensors by role.
pub struct Saved {
    pub progress: Progress,
    /// The trainable parameters now.
    pub params: HashMap<String, Tensor>,
    /// The optimizer's state ([`super::optim::AdamW::state`]).
    pub optimizer: HashMap<String, Tensor>,
    /// The best epoch's parameters (none before the first epoch ends).
    pub best: HashMap<String, Tensor>,
}

const ROLES: [&str; 3] = ["param.", "optim.", "best."];

/// Writes the run's state under `dir/checkpoint/` as one set (see the module's documentation):
/// `progress`, the parameters now, the optimizer's state and the best epoch's parameters.
pub fn save(
    dir: &Path,
    progress: Progress,
    params: &Params,
    optimizer: &AdamW,
    best: Option<&HashMap<String, Tensor>>,
) -> Result<()> {
    let saved = Saved {
        params: params.snapshot()?,
        optimizer: optimizer.state()?,
        best: best.cloned().unwrap_or_default(),
        progress,
    };
    let root = dir.join(CHECKPOINTS);
    let name = match &saved.progress.in_epoch {
        None => format!("epoch-{}", saved.progress.epoch),
        Some(_) => format!("step-{}", saved.progress.step),
    };
    let partial = root.join(format!("{name}.partial"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    let mut tensors = Vec::new();
    for (role, map) in ROLES
        .iter()
        .zip([&saved.params, &saved.optimizer, &saved.best])
    {
        tensors.extend(map.iter().map(|(k, t)| (format!("{role}{k}"), t.clone())));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let path = partial.join(TENSORS);
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| Error::file(&path, e))?;
    write_atomic(&path, &bytes)?;
    let progress = serde_json::to_value(&saved.progress).map_err(|e| Error::file(&path, e))?;
    write_json_atomic(&partial.join(PROGRESS), &progress)?;
    let done = root.join(&name);
    if done.exists() {
        std::fs::remove_dir_all(&done).map_err(|e| Error::io(&done, e))?;
    }
    std::fs::rename(&partial, &done).map_err(|e| Error::io(&done, e))?;
    write_atomic(&root.join(LATEST), name.as_bytes())?;
    for entry in std::fs::read_dir(&root).map_err(|e| Error::io(&root, e))? {
        let path = entry.map_err(|e| Error::io(&root, e))?.path();
        if path.is_dir() && path != done {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// The checkpoint `LATEST` points at in `dir`, if any.
pub fn load(dir: &Path, device: &Device) -> Result<Option<Saved>> {
    let latest = dir.join(CHECKPOINTS).join(LATEST);
    if !latest.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&latest).map_err(|e| Error::io(&latest, e))?;
    let set = dir.join(CHECKPOINTS).join(name.trim());
    let path = set.join(PROGRESS);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let progress: Progress = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let path = set.join(TENSORS);
    let tensors = candle_core::safetensors::load(&path, device)
        .map_err(|e| Error::file(&path, crate::error::tensor_message(&e)))?;
    let mut maps: [HashMap<String, Tensor>; 3] = Default::default();
    for (key, tensor) in tensors {
        let role = ROLES.iter().position(|r| key.starts_with(r));
        let role = role.ok_or_else(|| Error::file(&path, format!("unexpected tensor {key}")))?;
        maps[role].insert(key[ROLES[role].len()..].to_string(), tensor);
    }
    let [params, optimizer, best] = maps;
    Ok(Some(Saved {
        progress,
        params,
        optimizer,
        best,
    }))
}
