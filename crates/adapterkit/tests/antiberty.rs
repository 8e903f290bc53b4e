//! Real weights of another size: AntiBERTy (`scripts/fetch-assets.sh`), a BERT of 8 layers x 512
//! trained on antibody sequences, with a 25-token vocabulary that keeps case. It encodes as
//! `transformers` does (`tests/fixtures/encoders/make_real_encoder_fixtures.py`), and an adapter
//! learns on it to tell two residue motifs apart.

mod common;

use adapterkit::adapter_model::{AdapterModel, Method};
use adapterkit::batch::Batch;
use adapterkit::data::{Dataset, Example, Target, TaskKind};
use adapterkit::heads::HeadConfig;
use adapterkit::model::load::Pretrained;
use adapterkit::model::{Mode, NoHooks};
use adapterkit::rng::SeededRng;
use adapterkit::train::batches::EncodedDataset;
use adapterkit::train::{self, Silent, TrainConfig};
use candle_core::{DType, Device};
use common::*;

/// The fetched AntiBERTy ([`asset_dir`]).
fn antiberty() -> Option<Pretrained> {
    let dir = asset_dir("antiberty/AntiBERTy_md_smooth", "pytorch_model.bin")?;
    Some(Pretrained::load(dir.to_str().unwrap(), &Device::Cpu).unwrap())
}

/// A protein sequence as AntiBERTy's tokenizer reads it: one residue per word.
fn residues(sequence: &str) -> String {
    let letters: Vec<String> = sequence.chars().map(String::from).collect();
    letters.join(" ")
}

#[test]
fn antiberty_encodes_as_transformers_does() {
    let Some(model) = antiberty() else { return };
    let expected = load_expected("encoders/antiberty-expected.safetensors");
    let listing =
        std::fs::read_to_string(fixtures().join("encoders/antiberty-sequences.json")).unwrap();
    let sequences: Vec<String> = serde_json::from_str(&listing).unwrap();
    let texts: Vec<String> = sequences.iter().map(|s| residues(s)).collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    // Case kept: every residue is a token of its own, none `[UNK]`.
    let batch: Batch = model.tokenizer.batch(&texts, &Device::Cpu).unwrap();
    assert_eq!(ids_of(&batch.input_ids), ids_of(&expected["input_ids"]));
    let hidden = (model.model)
        .forward(&batch, &NoHooks, &mut Mode::Eval)
        .unwrap();
    let keep = (expected["attention_mask"].to_dtype(DType::F32))
        .and_then(|m| m.unsqueeze(2))
        .unwrap();
    let masked = |t: &candle_core::Tensor| t.broadcast_mul(&keep).unwrap();
    let diff = max_abs_diff(&masked(&hidden), &masked(&expected["last_hidden_state"]));
    eprintln!("AntiBERTy: max |diff| {diff:.2e}");
    assert!(diff < 1e-4, "{diff}");
}

/// Random residues with one of two motifs somewhere inside: which one?
fn motifs(name: &str, n: usize, seed: u64) -> Dataset {
    const RESIDUES: &[u8] = b"ACDEFGHIKLMNPQRSTVWY";
    let mut rng = SeededRng::new(seed);
    let examples = (0..n)
        .map(|i| {
            let motif = if i % 2 == 0 { "WGQG" } else { "FDYW" };
            let mut sequence: String = (0..16)
                .map(|_| RESIDUES[rng.below(RESIDUES.len())] as char)
                .collect();
            sequence.insert_str(rng.below(13), motif);
            Example {
                text: residues(&sequence),
                text_pair: None,
                target: Target::Class(motif.into()),
            }
        })
        .collect();
    Dataset {
        name: name.into(),
        examples,
    }
}

#[test]
fn an_adapter_learns_a_motif_task_on_antiberty() {
    let Some(model) = antiberty() else { return };
    let labels = ["WGQG".to_string(), "FDYW".to_string()];
    let head = HeadConfig::new(TaskKind::Classification, &labels).unwrap();
    let mut tuned = AdapterModel::new(
        model.model.clone(),
        &Method::from_name("houlsby").unwrap(),
        "motif",
        head.clone(),
        false,
        7,
        &Device::Cpu,
    )
    .unwrap();
    let tok = &model.tokenizer;
    let train_set = EncodedDataset::new(&motifs("train", 64, 1), tok, &head).unwrap();
    let validation = EncodedDataset::new(&motifs("validation", 32, 2), tok, &head).unwrap();
    let config = TrainConfig {
        epochs: 4,
        batch_size: 16,
        learning_rate: 1e-3,
        seed: 7,
        ..Default::default()
    };
    let summary = train::train(
        &mut tuned,
        &train_set,
        &validation,
        &config,
        tok.pad_id(),
        None,
        &mut Silent,
    )
    .unwrap();
    let losses: Vec<f64> = summary.epochs.iter().map(|e| e.train_loss).collect();
    eprintln!(
        "AntiBERTy motif task: losses {losses:?}, best {}",
        summary.best_value
    );
    assert!(
        losses[losses.len() - 1] < losses[0] * 0.8,
        "loss did not fall: {losses:?}"
    );
}
