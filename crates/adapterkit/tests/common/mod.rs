//! Helpers shared by the integration tests: fixture paths and tensor comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use adapterkit::batch::Batch;
use adapterkit::model::hooks::LayerHooks;
use adapterkit::model::layer::Positions;
use adapterkit::model::load::ModelFiles;
use adapterkit::model::{BertModel, Mode};
use candle_core::{DType, Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn tiny_bert_dir() -> PathBuf {
    fixtures().join("tiny-bert")
}

/// The folder of a fetched asset (`scripts/fetch-assets.sh`), `folder` under `assets/`, present
/// when it holds `file`. `None` skips a real-model test, unless `ADAPTERKIT_REQUIRE_ASSETS=1`
/// (as in CI), where a missing asset is a failure.
pub fn asset_dir(folder: &str, file: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("ADAPTERKIT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets"))
        .join(folder);
    if dir.join(file).exists() {
        return Some(dir);
    }
    if std::env::var("ADAPTERKIT_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!("{} is missing: run scripts/fetch-assets.sh", dir.display());
    }
    eprintln!(
        "skipping: {} not fetched (scripts/fetch-assets.sh)",
        dir.display()
    );
    None
}

/// The fetched all-MiniLM-L6-v2 ([`asset_dir`]).
pub fn minilm_dir() -> Option<PathBuf> {
    asset_dir("all-MiniLM-L6-v2", "model.safetensors")
}

pub fn load_expected(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).unwrap()
}

/// A batch from the fixture's int64 ids, types and mask.
pub fn batch_of(ids: &Tensor, types: &Tensor, mask: Option<&Tensor>) -> Batch {
    let u32s = |t: &Tensor| t.to_dtype(DType::U32).unwrap();
    Batch {
        input_ids: u32s(ids),
        token_type_ids: u32s(types),
        attention_mask: mask
            .map(u32s)
            .unwrap_or_else(|| u32s(&ids.ones_like().unwrap())),
    }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn ids_of(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2().unwrap()
}

/// The tiny random BERT of `tests/fixtures/tiny-bert/`.
pub fn tiny_encoder() -> BertModel {
    let files = ModelFiles::in_dir(&tiny_bert_dir()).unwrap();
    files
        .load_model(&files.load_config().unwrap(), &Device::Cpu)
        .unwrap()
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// A fusion fixture case laid out as we save it: the fusion and head files, with each fused
/// adapter in a sub-directory named after it.
pub fn fusion_laid_out(case: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = fixtures().join("fusion");
    copy_dir(&fixtures.join(case), dir.path());
    copy_dir(&fixtures.join("adapter_a"), &dir.path().join("a"));
    copy_dir(&fixtures.join("adapter_b"), &dir.path().join("b"));
    dir
}

/// Two short texts, the second padded: what the hook and precision tests run the tiny encoder on.
pub fn two_texts() -> Batch {
    let ids = Tensor::new(
        &[[2u32, 5, 6, 3, 8, 9, 3], [2, 11, 12, 95, 3, 0, 0]],
        &Device::Cpu,
    );
    let mask = Tensor::new(&[[1u32; 7], [1, 1, 1, 1, 1, 0, 0]], &Device::Cpu);
    Batch {
        input_ids: ids.unwrap(),
        token_type_ids: Tensor::zeros((2, 7), DType::U32, &Device::Cpu).unwrap(),
        attention_mask: mask.unwrap(),
    }
}

/// `encoder` on [`two_texts`] at `positions` with `hooks`, in training (dropout seeded 7) or
/// evaluation.
pub fn run_encoder(
    encoder: &BertModel,
    hooks: &dyn LayerHooks,
    positions: Positions,
    train: bool,
) -> Tensor {
    let mut mode = if train { Mode::train(7) } else { Mode::Eval };
    encoder
        .forward_at(&two_texts(), positions, hooks, &mut mode)
        .unwrap()
}
