//! Measurements for `adapterkit bench`: time per step of inference and training on random
//! inputs, the FLOPs they do, and the machine's matmul peak to compare with.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::adapter_model::AdapterModel;
use crate::batch::Batch;
use crate::composed_model::ComposedModel;
use crate::error::Result;
use crate::kernels::bf16::avx512_bf16;
use crate::kernels::fused::FrozenLinear;
use crate::kernels::int8::avx512_vnni;
use crate::model::layer::Positions;
use crate::model::precision::packed_weights;
use crate::model::{BertConfig, Mode, Precision};
use crate::rng::SeededRng;
use crate::train::optim::{AdamW, AdamWConfig};

/// A full batch of random token ids (no padding), and random class targets.
pub fn random_batch(
    config: &BertConfig,
    batch: usize,
    seq: usize,
    classes: usize,
    seed: u64,
    device: &Device,
) -> Result<(Batch, Tensor)> {
    let mut rng = SeededRng::new(seed);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| rng.below(config.vocab_size) as u32)
        .collect();
    let targets: Vec<u32> = (0..batch).map(|_| rng.below(classes) as u32).collect();
    let input_ids = Tensor::from_vec(ids, (batch, seq), device)?;
    Ok((
        Batch {
            token_type_ids: input_ids.zeros_like()?,
            attention_mask: input_ids.ones_like()?,
            input_ids,
        },
        Tensor::from_vec(targets, batch, device)?,
    ))
}

/// Multiply-adds x 2 of one forward pass over `batch` sequences of `seq` tokens whose last
/// layer computes its output at `last` (the matmuls; element-wise work is small beside them).
pub fn forward_flops(config: &BertConfig, batch: usize, seq: usize, last: Positions) -> f64 {
    let (h, i, l) = (
        config.hidden_size as f64,
        config.intermediate_size as f64,
        config.num_hidden_layers as f64,
    );
    let (tokens, sequences) = ((batch * seq) as f64, batch as f64);
    // Keys and values are projected at every token; the query and output projections, the
    // feed-forward block and the attention itself at every position that is computed.
    let key_value = 2.0 * h * h;
    let per_position = 2.0 * h * h + 2.0 * h * i + 2.0 * seq as f64 * h;
    let layer = tokens * (key_value + per_position);
    let last_layer = match last {
        Positions::All => layer,
        Positions::First => tokens * key_value + sequences * per_position,
    };
    2.0 * ((l - 1.0) * layer + last_layer)
}

/// Seconds per call of `step`, after `warmup` untimed calls: the median of `runs`.
pub fn time_per_step(
    warmup: usize,
    runs: usize,
    mut step: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        step()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        step()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// One evaluation forward pass with the model's hooks, its last layer computed at `last`:
/// what `logits` does (the first position), or every position as `transformers` does.
pub fn inference_step(model: &AdapterModel, batch: &Batch, last: Positions) -> Result<()> {
    let logits = model.logits_at(batch, last, &mut Mode::Eval)?;
    logits.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    Ok(())
}

/// One evaluation forward pass of a composed model (every head).
pub fn composed_step(model: &ComposedModel, batch: &Batch) -> Result<()> {
    for task in model.logits(batch, &mut Mode::Eval)? {
        task.logits.sum_all()?.to_scalar::<f32>()?;
    }
    Ok(())
}

/// A training step: forward with dropout, backward, AdamW update of `params`.
pub fn training_step(
    model: &AdapterModel,
    optimizer: &mut AdamW,
    batch: &Batch,
    targets: &Tensor,
    mode: &mut Mode,
) -> Result<()> {
    let logits = model.logits(batch, mode)?;
    let loss = model.head.loss(&logits, targets)?;
    let grads = loss.backward()?;
    optimizer.step(&grads, 1e-4)
}

/// An optimizer for `model`'s trainable parameters with the training loop's settings.
pub fn optimizer_for(model: &AdapterModel) -> Result<AdamW> {
    AdamW::new(&model.trainable(), AdamWConfig::default())
}

/// FLOP/s of an `n x n` by `n x n` f32 matmul: the machine's practical peak, as the best of
/// `runs` products after one untimed one (a single product reads 109-200 GFLOP/s from run to run
/// on a 2-core box shared with other work; the best of several is what the hardware does).
pub fn matmul_peak(n: usize, runs: usize, device: &Device) -> Result<f64> {
    let mut rng = SeededRng::new(1);
    let a = rng.normal_tensor((n, n), 0.0, 1.0, device)?;
    let b = rng.normal_tensor((n, n), 0.0, 1.0, device)?;
    product_rate(n, runs, || {
        a.matmul(&b)?.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })
}

/// Operations a second of a frozen Linear's product in `precision` (bf16 or int8: the kernel
/// the encoder's blocks run on, the weight packed once outside the timing, int8's activations
/// quantised inside it) on an `n x n` input and weight, best of `runs` after one untimed
/// product, and the path it took.
pub fn frozen_matmul_rate(
    precision: Precision,
    n: usize,
    runs: usize,
) -> Result<(f64, &'static str)> {
    let mut rng = SeededRng::new(1);
    let x = rng.normal_tensor((n, n), 0.0, 1.0, &Device::Cpu)?;
    let weight = rng.normal_tensor((n, n), 0.0, 1.0, &Device::Cpu)?;
    let linear = candle_nn::Linear::new(weight, Some(Tensor::zeros(n, DType::F32, &Device::Cpu)?));
    let packed = packed_weights(precision, [&linear])?;
    let frozen = FrozenLinear::of(&linear)
        .expect("plain tensors take no gradient")
        .packed_as(packed.as_ref().map(|[p]| p))?;
    let x = x.flatten_all()?.to_vec1::<f32>()?;
    let rate = product_rate(n, runs, || {
        frozen.forward(&x, n)?;
        Ok(())
    })?;
    let path = match precision {
        Precision::F32 => "f32 gemm",
        Precision::Bf16 if avx512_bf16() => "avx512_bf16",
        Precision::Bf16 => "fallback: f32 gemm, the weight widened from bf16",
        Precision::Int8 if avx512_vnni() => "avx512_vnni",
        Precision::Int8 => "fallback: f32 gemm, the weight dequantised from int8",
    };
    Ok((rate, path))
}

/// FLOP/s of `product` (an `n^3` product), best of `runs` after one untimed call.
fn product_rate(n: usize, runs: usize, mut product: impl FnMut() -> Result<()>) -> Result<f64> {
    product()?;
    let mut best = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        product()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best)
}

/// The instruction-set extensions the CPU has that matter to matrix products (what a bf16 or
/// int8 path would dispatch on), as Linux's `/proc/cpuinfo` names them (AMX's detection is not
/// in stable Rust's `is_x86_feature_detected!`); empty where that file is not there.
pub fn cpu_features() -> Vec<&'static str> {
    const FEATURES: [&str; 8] = [
        "avx2",
        "fma",
        "avx512f",
        "avx512_bf16",
        "avx512_vnni",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
    ];
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = (cpuinfo.lines())
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, flags)| flags.split_whitespace().collect())
        .unwrap_or_default();
    FEATURES.into_iter().filter(|f| flags.contains(f)).collect()
}

/// The process's peak resident memory in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
