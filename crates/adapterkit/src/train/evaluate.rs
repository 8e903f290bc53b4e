//! Predictions and metrics over a whole dataset.

use candle_core::Device;

use crate::adapter_model::AdapterModel;
use crate::data::TaskKind;
use crate::error::Result;
use crate::metrics::{classification_metrics, multilabel_metrics, regression_metrics, Metrics};
use crate::model::Mode;
use crate::train::batches::{EncodedDataset, Targets};

/// Logits per example, in dataset order.
pub fn predict_logits(
    model: &AdapterModel,
    data: &EncodedDataset,
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let mut out = vec![Vec::new(); data.len()];
    for indices in data.eval_batches(batch_size) {
        let (batch, _) = data.batch(&indices, pad_id, device)?;
        let logits = model.logits(&batch, &mut Mode::Eval)?.to_vec2::<f32>()?;
        for (i, row) in indices.into_iter().zip(logits) {
            out[i] = row;
        }
    }
    Ok(out)
}

pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, v)| {
            if *v > best.1 {
                (i, *v)
            } else {
                best
            }
        })
        .0
}

/// The task's metrics for `logits` against the dataset's targets.
pub fn metrics_of(
    kind: TaskKind,
    num_labels: usize,
    logits: &[Vec<f32>],
    targets: &Targets,
) -> Metrics {
    match (kind, targets) {
        (TaskKind::Classification, Targets::Classes(gold)) => {
            let pred: Vec<usize> = logits.iter().map(|r| argmax(r)).collect();
            let gold: Vec<usize> = gold.iter().map(|g| *g as usize).collect();
            classification_metrics(&pred, &gold, num_labels)
        }
        (TaskKind::Regression, Targets::Values(gold)) => {
            let pred: Vec<f64> = logits.iter().map(|r| r[0] as f64).collect();
            let gold: Vec<f64> = gold.iter().map(|g| *g as f64).collect();
            regression_metrics(&pred, &gold)
        }
        (TaskKind::MultiLabel, Targets::MultiHot(gold)) => {
            let pred: Vec<Vec<bool>> = logits
                .iter()
                .map(|r| r.iter().map(|v| *v > 0.0).collect())
                .collect();
            let gold: Vec<Vec<bool>> = gold
                .iter()
                .map(|r| r.iter().map(|v| *v > 0.5).collect())
                .collect();
            multilabel_metrics(&pred, &gold)
        }
        _ => unreachable!("EncodedDataset::new builds targets of the head's kind"),
    }
}

/// Evaluates `model` on `data`.
pub fn evaluate(
    model: &AdapterModel,
    data: &EncodedDataset,
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> Result<Metrics> {
    // Frozen weights: no graph is recorded, so activations are freed as the pass goes.
    let logits = predict_logits(&model.frozen().merged()?, data, batch_size, pad_id, device)?;
    let config = &model.head.config;
    Ok(metrics_of(
        config.kind()?,
        config.num_labels,
        &logits,
        &data.targets,
    ))
}

/// The metrics [`metrics_of`] reports for a task.
pub fn metric_names(kind: TaskKind) -> &'static [&'static str] {
    match kind {
        TaskKind::Classification => &["accuracy", "macro_f1", "mcc"],
        TaskKind::Regression => &["pearson", "spearman", "mse"],
        TaskKind::MultiLabel => &["subset_accuracy", "micro_f1", "macro_f1"],
    }
}

/// The metric training selects on by default: accuracy, Pearson, or micro-F1.
pub fn default_metric(kind: TaskKind) -> &'static str {
    match kind {
        TaskKind::Classification => "accuracy",
        TaskKind::Regression => "pearson",
        TaskKind::MultiLabel => "micro_f1",
    }
}
