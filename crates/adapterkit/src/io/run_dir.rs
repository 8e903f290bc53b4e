//! A run's output directory: where it may go ([`check_output_dir`]), where an adapter named by
//! directory or Hub id is ([`locate`]), and our settings beside AdapterHub's files.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::adapter_dir::{
    read_json, ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_PICKLE, HEAD_CONFIG, HEAD_WEIGHTS,
    HEAD_WEIGHTS_PICKLE, SAVING,
};

/// Our settings that AdapterHub's files have no field for: `{"max_seq_len": N}` when the
/// adapter was trained with `--max-seq-len`.
pub const RUN_SETTINGS: &str = "adapterkit_settings.json";

/// Records the sequence limit an adapter was trained with (`None`: the model's own; the
/// file is removed), so that `eval` and `predict` use it again.
pub fn record_max_seq_len(dir: &Path, max_seq_len: Option<usize>) -> Result<()> {
    let path = dir.join(RUN_SETTINGS);
    match max_seq_len {
        Some(n) => {
            crate::io::atomic::write_json_atomic(&path, &serde_json::json!({ "max_seq_len": n }))
        }
        None if path.exists() => std::fs::remove_file(&path).map_err(|e| Error::io(&path, e)),
        None => Ok(()),
    }
}

/// The sequence limit recorded by [`record_max_seq_len`], if any.
pub fn recorded_max_seq_len(dir: &Path) -> Result<Option<usize>> {
    let path = dir.join(RUN_SETTINGS);
    if !path.exists() {
        return Ok(None);
    }
    let json = read_json(&path)?;
    match &json["max_seq_len"] {
        serde_json::Value::Null => Ok(None),
        n => n
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| Error::file(&path, "max_seq_len is not a whole number")),
    }
}

/// Whether `dir` may receive a training run's files: absent, empty, or an earlier run's (its
/// `training_log.jsonl` is there). Any other folder is refused unless `overwrite`, so that a
/// mistyped output path never mixes a run's files into someone else's folder, nor has them
/// replace files of the same names there.
pub fn check_output_dir(dir: &Path, overwrite: bool) -> Result<()> {
    let ours = [crate::train::TRAINING_LOG, SAVING].map(|f| dir.join(f).exists());
    if overwrite || !dir.exists() || ours.contains(&true) {
        return Ok(());
    }
    if !dir.is_dir() {
        return Err(Error::file(
            dir,
            "the output path is a file, not a directory",
        ));
    }
    let mut entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    if entries.next().is_some() {
        return Err(Error::file(
            dir,
            "the output directory holds files but no adapterkit run (no training_log.jsonl); \
             choose another directory, or pass --overwrite to write ours among them",
        ));
    }
    Ok(())
}

/// `dir_or_id` as a directory: itself, or the files of a Hub repository of that name (as
/// AdapterHub publishes adapters, e.g. `AdapterHub/roberta-base-pf-imdb`) fetched into the
/// Hub cache: the adapter's config and weights, and its head's.
pub fn locate(dir_or_id: &Path) -> Result<PathBuf> {
    if dir_or_id.is_dir() {
        return Ok(dir_or_id.to_path_buf());
    }
    let id = dir_or_id.to_str().filter(|id| {
        !dir_or_id.exists() && crate::model::load::looks_like_model_id(id) && id.contains('/')
    });
    let Some(id) = id else {
        return Err(Error::file(dir_or_id, "no such adapter directory"));
    };
    let hub = crate::model::load::HubRepo::open(id)?;
    let not_found = |e: Error| {
        Error::file(
            dir_or_id,
            format!("no such adapter directory, nor a Hub repository with an adapter: {e}"),
        )
    };
    let config = hub
        .fetch(ADAPTER_CONFIG)
        .ok_or_else(|| not_found(hub.missing(ADAPTER_CONFIG)))?;
    hub.fetch(ADAPTER_WEIGHTS)
        .or_else(|| hub.fetch(ADAPTER_WEIGHTS_PICKLE))
        .ok_or_else(|| not_found(hub.missing(ADAPTER_WEIGHTS)))?;
    hub.fetch(HEAD_CONFIG);
    hub.fetch(HEAD_WEIGHTS)
        .or_else(|| hub.fetch(HEAD_WEIGHTS_PICKLE));
    let snapshot = config.parent().map(Path::to_path_buf);
    snapshot.ok_or_else(|| Error::file(&config, "not in a snapshot folder of the hub cache"))
}
