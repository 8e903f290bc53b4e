//! The training loop shared by every method: adapters, head-only and full fine-tuning.
//!
//! AdamW with decoupled weight decay, linear warm-up and decay, global-norm gradient clipping,
//! length-bucketed padded batches, evaluation after each epoch, early stopping on a chosen
//! metric, the best model kept (saved on each improvement), and a JSONL log of every epoch.

pub mod batches;
pub mod checkpoint;
pub mod evaluate;
pub mod optim;
pub mod schedule;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::adapter_model::AdapterModel;
use crate::error::{Error, Result};
use crate::io::adapter_dir;
use crate::metrics::Metrics;
use crate::model::Mode;
use crate::rng::SeededRng;
use batches::EncodedDataset;
use optim::{AdamW, AdamWConfig};
use schedule::LinearSchedule;

#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Stop after this many epochs without improvement.
    pub patience: Option<usize>,
    /// The validation metric to select on; `None` picks the task's default.
    pub metric: Option<String>,
    pub eval_batch_size: usize,
    /// Robust AdapterDrop: for each batch, skip the adapters of the lowest `n` layers, `n`
    /// drawn uniformly from `0..=max` with the run's seed, so that one adapter serves any `n`.
    pub robust_drop_max: Option<usize>,
    /// Continue from the checkpoint in the output directory, if there is one
    /// ([`checkpoint`]); the same settings, data and thread count are required.
    pub resume: bool,
    /// Also write a checkpoint every this many steps, inside epochs.
    pub save_steps: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch_size: 32,
            learning_rate: 1e-4,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            seed: 42,
            patience: None,
            metric: None,
            eval_batch_size: 64,
            robust_drop_max: None,
            resume: false,
            save_steps: None,
        }
    }
}

/// What one epoch did; also one line of `training_log.jsonl`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub step: usize,
    pub train_loss: f64,
    pub validation: Metrics,
    pub learning_rate: f64,
    pub seconds: f64,
    pub train_examples_per_second: f64,
    pub best: bool,
    /// The loss of each of the epoch's steps, in order.
    pub step_losses: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub metric: String,
    pub best_epoch: usize,
    pub best_value: f64,
    pub stopped_early: bool,
    pub train_seconds: f64,
    pub train_examples_per_second: f64,
    pub epochs: Vec<EpochReport>,
}

/// Progress callbacks, for a progress bar; the library prints nothing itself.
pub trait Observer {
    fn on_start(&mut self, _total_steps: usize) {}
    fn on_step(&mut self, _step: usize, _loss: f64, _examples: usize) {}
    fn on_epoch(&mut self, _report: &EpochReport) {}
}

pub struct Silent;
impl Observer for Silent {}

/// Where the best model goes: a directory in AdapterHub's layout plus the log.
pub struct Output<'a> {
    pub dir: &'a Path,
    /// Recorded in the saved configs (`model_name`).
    pub model_name: &'a str,
}

pub const TRAINING_LOG: &str = "training_log.jsonl";

/// Trains `model` in place; on return it holds the best epoch's weights.
pub fn train(
    model: &mut AdapterModel,
    train: &EncodedDataset,
    validation: &EncodedDataset,
    config: &TrainConfig,
    pad_id: u32,
    output: Option<&Output>,
    observer: &mut dyn Observer,
) -> Result<TrainSummary> {
    if config.epochs == 0 || config.batch_size == 0 || config.eval_batch_size == 0 {
        return Err(Error::input("epochs and batch sizes must be positive"));
    }
    if train.is_empty() || validation.is_empty() {
        return Err(Error::input(
            "training and validation data must not be empty",
        ));
    }
    let device = model.head.params().0[0].1.device().clone();
    let kind = model.head.config.kind()?;
    let metric = config
        .metric
        .clone()
        .unwrap_or_else(|| evaluate::default_metric(kind).to_string());
    let known = evaluate::metric_names(kind);
    if !known.contains(&metric.as_str()) {
        return Err(Error::input(format!(
            "unknown metric '{metric}' (this task has: {})",
            known.join(", ")
        )));
    }
    if config.patience == Some(0) {
        return Err(Error::input("patience must be at least 1 epoch"));
    }
    if config.save_steps == Some(0) {
        return Err(Error::input("save_steps must be at least 1 step"));
    }
    if model.encoder.precision() == crate::model::Precision::Int8 {
        return Err(Error::input(
            "int8 is for inference (eval, predict, encode, serve): train in f32 or bf16",
        ));
    }
    let lower_is_better = metric == "mse";

    let params = model.trainable();
    let mut optimizer = AdamW::new(
        &params,
        AdamWConfig {
            weight_decay: config.weight_decay,
            ..Default::default()
        },
    )?;
    let steps_per_epoch = train.len().div_ceil(config.batch_size);
    let schedule = LinearSchedule::new(
        config.learning_rate,
        steps_per_epoch * config.epochs,
        config.warmup_ratio,
    );
    let mut shuffle_rng = SeededRng::new(config.seed);
    let mut drop_rng = SeededRng::new(config.seed ^ 0xad4b_7e5d_0000_0002);
    // Dropout draws from its own stream, so changing the batch order does not change masks.
    let mut dropout_rng = SeededRng::new(config.seed ^ 0x5eed_d20f_0000_0001);
    let layers = model.encoder.layers.len();
    let mut train_seconds = 0.0;
    let mut history: Vec<EpochReport> = Vec::new();
    let mut best: Option<(usize, f64, HashMap<String, candle_core::Tensor>)> = None;
    let mut step = 0;
    let mut stopped_early = false;
    let mut start_epoch = 1;
    let mut in_epoch: Option<checkpoint::InEpoch> = None;
    let precision = model.encoder.precision();
    let fingerprint = fingerprint(config, train, validation, &params, precision);
    if config.resume {
        let dir = output
            .ok_or_else(|| Error::input("resuming needs the output directory of the run"))?
            .dir;
        if let Some(saved) = checkpoint::load(dir, &device)? {
            let p = saved.progress;
            if p.fingerprint != fingerprint {
                return Err(Error::input(format!(
                    "the checkpoint in {} is of another run (settings, data, parameters or \
                     --threads or --dtype differ): resume with the same ones, or train afresh elsewhere\n\
                     checkpoint: {}\nthis run:   {fingerprint}",
                    dir.display(),
                    p.fingerprint
                )));
            }
            params.load(&saved.params).map_err(Error::Training)?;
            optimizer.load_state(&saved.optimizer)?;
            (shuffle_rng, drop_rng, dropout_rng) = (
                SeededRng::from_state(p.shuffle_rng),
                SeededRng::from_state(p.drop_rng),
                SeededRng::from_state(p.dropout_rng),
            );
            best = p.best.map(|(epoch, value)| (epoch, value, saved.best));
            (step, stopped_early, train_seconds) = (p.step, p.stopped_early, p.train_seconds);
            start_epoch = p.epoch + 1;
            history = p.history;
            in_epoch = p.in_epoch;
        }
    }
    if let Some(fusion) = &mut model.fusion {
        fusion.set_schedule(step); // the temperature schedule follows the steps taken
    }
    let mut mode = Mode::Train(dropout_rng);
    let log_path = output.map(|o| o.dir.join(TRAINING_LOG));
    if let Some(o) = output {
        std::fs::create_dir_all(o.dir).map_err(|e| Error::io(o.dir, e))?;
        // A resumed run's log holds the epochs of its checkpoint, not any done after it.
        // Created before anything else is written: it marks the directory as a run's.
        let path = o.dir.join(TRAINING_LOG);
        std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        for report in &history {
            append_line(&path, report)?;
        }
    }

    observer.on_start(steps_per_epoch * config.epochs);
    let epochs = if stopped_early {
        start_epoch..=0
    } else {
        start_epoch..=config.epochs
    };
    for epoch in epochs {
        let epoch_start = Instant::now();
        let epoch_order = shuffle_rng.state();
        let batches = train.epoch_batches(config.batch_size, &mut shuffle_rng);
        // A run resumed inside this epoch takes up where its checkpoint left it.
        let done = in_epoch.take().unwrap_or_default();
        let (mut loss_sum, mut seen, mut step_losses) =
            (done.loss_sum, done.seen, done.step_losses);
        for (batch_index, indices) in batches.iter().enumerate().skip(done.batches_done) {
            let (batch, targets) = train.batch(indices, pad_id, &device)?;
            if let Some(max) = config.robust_drop_max {
                let dropped = drop_rng.below(max.min(layers) + 1);
                model.set_skip_layers(&(0..dropped).collect())?;
            }
            if let Some(fusion) = &mut model.fusion {
                fusion.set_schedule(step);
            }
            let logits = model.logits(&batch, &mut mode)?;
            let mut loss = model.head.loss(&logits, &targets)?;
            if let Some(regularization) = model.regularization_loss()? {
                loss = (loss + regularization)?;
            }
            let loss_value = loss.to_scalar::<f32>()? as f64;
            if !loss_value.is_finite() {
                let kept = match (&best, output) {
                    (Some((e, _, _)), Some(o)) => format!(
                        "the best adapter so far (epoch {e}) is kept in {}",
                        o.dir.display()
                    ),
                    _ => "no epoch finished, so nothing was saved".to_string(),
                };
                return Err(Error::Training(format!(
                    "the loss became {loss_value} at epoch {epoch}, step {}; lower the learning rate ({}); {kept}",
                    step + 1,
                    config.learning_rate
                )));
            }
            let mut grads = loss.backward()?;
            optim::clip_grad_norm(&params, &mut grads, config.max_grad_norm)?;
            optimizer.step(&grads, schedule.at(step))?;
            step += 1;
            loss_sum += loss_value * indices.len() as f64;
            step_losses.push(loss_value);
            seen += indices.len();
            observer.on_step(step, loss_value, indices.len());
            let more = batch_index + 1 < batches.len();
            if let (Some(o), Some(every), true) = (output, config.save_steps, more) {
                if step % every == 0 {
                    let progress = checkpoint::Progress {
                        epoch: epoch - 1,
                        step,
                        shuffle_rng: epoch_order,
                        drop_rng: drop_rng.state(),
                        dropout_rng: mode.rng_state(),
                        best: best.as_ref().map(|b| (b.0, b.1)),
                        stopped_early: false,
                        train_seconds: train_seconds + epoch_start.elapsed().as_secs_f64(),
                        history: history.clone(),
                        fingerprint: fingerprint.clone(),
                        in_epoch: Some(checkpoint::InEpoch {
                            batches_done: batch_index + 1,
                            loss_sum,
                            seen,
                            step_losses: step_losses.clone(),
                        }),
                    };
                    let best = best.as_ref().map(|b| &b.2);
                    checkpoint::save(o.dir, progress, &params, &optimizer, best)?;
                }
            }
        }
        let epoch_train_seconds = epoch_start.elapsed().as_secs_f64();
        if config.robust_drop_max.is_some() {
            model.set_skip_layers(&Default::default())?; // evaluate with every adapter
        }
        train_seconds += epoch_train_seconds;
        if let Some(fusion) = &mut model.fusion {
            fusion.set_schedule(step);
        }
        let metrics =
            evaluate::evaluate(model, validation, config.eval_batch_size, pad_id, &device)?;
        let value = metrics
            .get(&metric)
            .expect("checked against metric_names above");
        let improved = match &best {
            None => true,
            Some((_, b, _)) => {
                if lower_is_better {
                    value < *b
                } else {
                    value > *b
                }
            }
        };
        if improved {
            best = Some((epoch, value, model.trainable().snapshot()?));
            if let Some(o) = output {
                adapter_dir::save(o.dir, model, o.model_name)?;
            }
        }
        let report = EpochReport {
            epoch,
            step,
            train_loss: loss_sum / seen.max(1) as f64,
            validation: metrics,
            learning_rate: schedule.at(step.saturating_sub(1)),
            seconds: epoch_start.elapsed().as_secs_f64(),
            train_examples_per_second: seen as f64 / epoch_train_seconds.max(1e-9),
            best: improved,
            step_losses,
        };
        if let Some(path) = &log_path {
            append_line(path, &report)?;
        }
        observer.on_epoch(&report);
        history.push(report);
        let best_epoch = best.as_ref().map_or(epoch, |b| b.0);
        stopped_early =
            config.patience.is_some_and(|p| epoch - best_epoch >= p) && epoch < config.epochs;
        if let Some(o) = output {
            let progress = checkpoint::Progress {
                epoch,
                step,
                shuffle_rng: shuffle_rng.state(),
                drop_rng: drop_rng.state(),
                dropout_rng: mode.rng_state(),
                best: best.as_ref().map(|b| (b.0, b.1)),
                stopped_early,
                train_seconds,
                history: history.clone(),
                fingerprint: fingerprint.clone(),
                in_epoch: None,
            };
            let best = best.as_ref().map(|b| &b.2);
            checkpoint::save(o.dir, progress, &params, &optimizer, best)?;
        }
        if stopped_early {
            break;
        }
    }
    let (best_epoch, best_value, weights) = best.expect("at least one epoch ran");
    params.load(&weights).map_err(Error::Training)?;
    let examples: usize = history.len() * train.len();
    Ok(TrainSummary {
        metric,
        best_epoch,
        best_value,
        stopped_early,
        train_seconds,
        train_examples_per_second: examples as f64 / train_seconds.max(1e-9),
        epochs: history,
    })
}

/// What a checkpoint must match to be resumed: the settings (not `resume` itself), the data
/// sizes, the parameters' names and shapes, and the kernels' thread count (sums split over
/// other threads round differently).
fn fingerprint(
    config: &TrainConfig,
    train: &EncodedDataset,
    validation: &EncodedDataset,
    params: &crate::params::Params,
    precision: crate::model::Precision,
) -> String {
    // How often checkpoints are written changes nothing the run computes.
    let settings = TrainConfig {
        resume: false,
        save_steps: None,
        ..config.clone()
    };
    let shapes: Vec<String> = params
        .iter()
        .map(|(n, v)| format!("{n}{:?}", v.dims()))
        .collect();
    // FNV-1a: the same on every build, unlike std's hasher.
    let hash = shapes
        .concat()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
    // f32 runs' checkpoints read as they did before `--dtype` existed.
    let products = match precision {
        crate::model::Precision::F32 => String::new(),
        other => format!("; {other} products"),
    };
    format!(
        "{settings:?}; {} train / {} validation examples; {} parameter tensors (shapes {hash:016x}); {} threads{products}",
        train.len(),
        validation.len(),
        shapes.len(),
        crate::kernels::parallel::threads()
    )
}

fn append_line(path: &PathBuf, value: &impl Serialize) -> Result<()> {
    let line = serde_json::to_string(value).map_err(|e| Error::file(path, e))?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(file, "{line}")
        .and_then(|_| file.flush())
        .map_err(|e| Error::io(path, e))
}
