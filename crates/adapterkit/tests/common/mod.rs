//! Helpers shared by the integration tests: fixture paths and tensor comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use adapterkit::batch::Batch;
use candle_core::{DType, Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn tiny_bert_dir() -> PathBuf {
    fixtures().join("tiny-bert")
}

/// The fetched all-MiniLM-L6-v2 (`scripts/fetch-assets.sh`). `None` skips a real-model test,
/// unless `ADAPTERKIT_REQUIRE_ASSETS=1` (as in CI), where a missing model is a failure.
pub fn minilm_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("ADAPTERKIT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets"))
        .join("all-MiniLM-L6-v2");
    if dir.join("model.safetensors").exists() {
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
