//! `--dtype bf16`: the encoder's frozen products in bf16 give what the same model gives in f32
//! node by node with the factors of every Linear that the kernel takes in bf16 rounded (the
//! weight; on `vdpbf16ps` the input too: products f32 holds exactly, so only the order of the
//! sums differs), on every path: all positions or the first, with and without dropout, after
//! its weights are replaced, and in a frozen copy; the gradients they pass back are f32's
//! (`g W`). int8 likewise against every Linear as `x dq(q(W))^T + b`, on VNNI
//! `dq(q(x)) dq(q(W))^T + b`, each row of `x` and of `W` quantised with its own scale.

mod common;

use std::collections::HashMap;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use candle_nn::Linear;

use adapterkit::kernels::{bf16, int8};
use adapterkit::model::hooks::{LayerHooks, LinearChange, LinearSite};
use adapterkit::model::layer::Positions;
use adapterkit::model::{BertModel, Mode, NoHooks, Precision};
use common::{max_abs_diff, run_encoder, tiny_encoder};

/// Every Linear as `round(x) round(W)^T + b` where the kernel rounds its input (`vdpbf16ps`),
/// else `x round(W)^T + b`, node by node (a change applied to the output keeps each block off
/// the fused ops), and its input's gradient as `g W`: the value's rounding error
/// `x (round(W) - W)^T` is added as a constant.
struct RoundedToBf16;

fn round(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::BF16)?.to_dtype(DType::F32)
}

/// Rounds values to bf16 going forward and passes gradients back as they are.
struct RoundValue;

impl CustomOp1 for RoundValue {
    fn name(&self) -> &'static str {
        "round-to-bf16"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().expect("contiguous");
        let values = &storage.as_slice::<f32>()?[start..end];
        let out = values
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

impl LayerHooks for RoundedToBf16 {
    fn linear(&self, _layer: usize, _site: LinearSite, base: &Linear) -> Option<LinearChange<'_>> {
        let (weight, bias) = (base.weight().clone(), base.bias().cloned());
        Some(LinearChange::Apply(Box::new(
            move |x: &Tensor, _out: Tensor, _mode: &mut Mode| {
                let x = match bf16::avx512_bf16() {
                    true => x.contiguous()?.apply_op1(RoundValue)?,
                    false => x.clone(),
                };
                let plain = Linear::new(weight.clone(), bias.clone());
                let rounding = Linear::new((round(&weight)? - &weight)?, None);
                let error = adapterkit::model::ops::linear(&rounding, &x.detach())?;
                adapterkit::model::ops::linear(&plain, &x)? + error
            },
        )))
    }
}

/// `encoder` in bf16 against its rounded reference on every path; returns the largest
/// difference of bf16 to plain f32.
fn assert_matches_rounded_reference(encoder: &BertModel, case: &str) -> f32 {
    let mut in_bf16 = encoder.clone();
    in_bf16.set_precision(Precision::Bf16).unwrap();
    let mut off_f32 = 0f32;
    for positions in [Positions::All, Positions::First] {
        for train in [false, true] {
            let fast = run_encoder(&in_bf16, &NoHooks, positions, train);
            let reference = run_encoder(encoder, &RoundedToBf16, positions, train);
            let diff = max_abs_diff(&fast, &reference);
            let case = format!("{case}, {positions:?}, train {train}");
            assert!(diff < 2e-6, "{case}: {diff} off the rounded reference");
            off_f32 = off_f32.max(max_abs_diff(
                &fast,
                &run_encoder(encoder, &NoHooks, positions, train),
            ));
        }
    }
    off_f32
}

#[test]
fn bf16_products_are_the_rounded_factors_summed_in_f32() {
    let encoder = tiny_encoder();
    let off_f32 = assert_matches_rounded_reference(&encoder, "as loaded");
    // bf16 keeps 8 bits of mantissa: the states move, but not far.
    assert!(off_f32 > 1e-5 && off_f32 < 0.1, "bf16 is {off_f32} off f32");
}

#[test]
fn replaced_weights_and_frozen_copies_get_new_bf16_copies() {
    let mut encoder = tiny_encoder();
    encoder.set_precision(Precision::Bf16).unwrap();
    // New weights for one Linear: its bf16 copy must follow.
    let name = "encoder.layer.1.intermediate.dense.weight";
    let old = encoder
        .named_tensors()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1;
    let new = (old * -1.5).unwrap();
    encoder
        .set_tensors(&HashMap::from([(name.to_string(), new)]))
        .unwrap();
    let mut in_f32 = encoder.clone();
    in_f32.set_precision(Precision::F32).unwrap();
    assert_matches_rounded_reference(&in_f32, "replaced weights");
    let bf16 = run_encoder(&encoder, &NoHooks, Positions::All, false);
    let frozen = run_encoder(&encoder.frozen(), &NoHooks, Positions::All, false);
    assert_eq!(
        max_abs_diff(&bf16, &frozen),
        0.0,
        "a frozen copy computes alike"
    );
    let reference = run_encoder(&in_f32, &RoundedToBf16, Positions::All, false);
    assert!(max_abs_diff(&bf16, &reference) < 2e-6);
}

/// Training the LayerNorms beside the frozen blocks: their gradients, which every frozen
/// block's backward product carries, match the reference's (bf16 forward, f32 backward).
#[test]
fn bf16_gradients_pass_back_through_the_f32_weights() {
    let mut encoder = tiny_encoder();
    let params = encoder
        .make_trainable(|name| name.contains("LayerNorm"))
        .unwrap();
    let mut in_bf16 = encoder.clone();
    in_bf16.set_precision(Precision::Bf16).unwrap();
    let gradients = |encoder: &BertModel, hooks: &dyn LayerHooks, positions, train| {
        let out = run_encoder(encoder, hooks, positions, train);
        let probe = (out.ones_like().unwrap().cumsum(2).unwrap().sin()).unwrap();
        let grads = (out * probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let all: Vec<Tensor> = params
            .iter()
            .map(|(_, var)| grads.get(var.as_tensor()).unwrap().flatten_all().unwrap())
            .collect();
        Tensor::cat(&all, 0).unwrap()
    };
    for positions in [Positions::All, Positions::First] {
        for train in [false, true] {
            let fast = gradients(&in_bf16, &NoHooks, positions, train);
            let reference = gradients(&encoder, &RoundedToBf16, positions, train);
            let scale = reference
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = max_abs_diff(&fast, &reference) / scale;
            assert!(
                diff < 1e-6,
                "{positions:?}, train {train}: {diff} off, relative"
            );
            let f32_grads = gradients(&encoder, &NoHooks, positions, train);
            let off_f32 = max_abs_diff(&fast, &f32_grads) / scale;
            assert!(
                off_f32 > 1e-6,
                "{positions:?}, train {train}: bf16 never ran"
            );
        }
    }
}

/// Every Linear with each row of its weight, and on VNNI of its input, quantised to int8 levels
/// of `max |row| / 127` (ties to even) and back, node by node.
struct QuantizedToInt8;

fn quantized(t: &Tensor) -> Result<Tensor> {
    let k = t.dim(candle_core::D::Minus1)?;
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(values.len());
    for row in values.chunks(k) {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (scale, inverse) = if max == 0.0 {
            (0.0, 0.0)
        } else {
            (max / 127.0, 127.0 / max)
        };
        out.extend(
            row.iter()
                .map(|v| (v * inverse).round_ties_even().clamp(-127.0, 127.0) * scale),
        );
    }
    Tensor::from_vec(out, t.shape(), t.device())
}

impl LayerHooks for QuantizedToInt8 {
    fn linear(&self, _layer: usize, _site: LinearSite, base: &Linear) -> Option<LinearChange<'_>> {
        let (weight, bias) = (base.weight().clone(), base.bias().cloned());
        Some(LinearChange::Apply(Box::new(
            move |x: &Tensor, _out: Tensor, _mode: &mut Mode| {
                let quantized_weights = Linear::new(quantized(&weight)?, bias.clone());
                let x = match int8::avx512_vnni() {
                    true => quantized(x)?,
                    false => x.clone(),
                };
                adapterkit::model::ops::linear(&quantized_weights, &x)
            },
        )))
    }
}

#[test]
fn int8_products_are_the_dequantised_factors() {
    let encoder = tiny_encoder();
    let mut in_int8 = encoder.clone();
    in_int8.set_precision(Precision::Int8).unwrap();
    for positions in [Positions::All, Positions::First] {
        let fast = run_encoder(&in_int8, &NoHooks, positions, false);
        let reference = run_encoder(&encoder, &QuantizedToInt8, positions, false);
        let diff = max_abs_diff(&fast, &reference);
        assert!(
            diff < 1e-5,
            "{positions:?}: {diff} off the dequantised reference"
        );
        let off_f32 = max_abs_diff(&fast, &run_encoder(&encoder, &NoHooks, positions, false));
        assert!(
            off_f32 > 1e-4 && off_f32 < 0.5,
            "{positions:?}: int8 is {off_f32} off f32"
        );
    }
}
