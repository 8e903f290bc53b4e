//! AdapterFusion (Pfeiffer et al., EACL 2021): attention over the outputs of several frozen
//! adapters, learnt per layer for a target task, with AdapterHub's config, names and
//! semantics (its `compose_fuse` and `BertFusion.forward`).

use std::cell::RefCell;

use candle_core::{Device, Result as CandleResult, Tensor, D};
use candle_nn::Linear;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::methods::bottleneck::BottleneckAdapters;
use crate::model::hooks::{LayerHooks, Position};
use crate::model::layer_norm::LayerNorm;
use crate::model::{ops, BertConfig, Mode};
use crate::params::{frozen_linear, init, new_linear, Params};
use crate::rng::SeededRng;

/// AdapterHub's `AdapterFusionConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FusionConfig {
    pub key: bool,
    pub query: bool,
    pub value: bool,
    pub query_before_ln: bool,
    /// Adds `0.01 * sum ||I - V||^2` over the value matrices to the training loss.
    pub regularization: bool,
    pub residual_before: bool,
    /// Softmax temperature starting at 50, falling by 50/1000 per forward pass, down to 1.
    pub temperature: bool,
    pub value_before_softmax: bool,
    /// Start the value matrix at the identity (off-diagonal 1e-6).
    pub value_initialized: serde_json::Value,
    /// Dropout on the attention scores; `None` takes the model's attention dropout.
    pub dropout_prob: Option<f32>,
}

pub const FUSION_PRESETS: &[&str] = &["dynamic", "static"];

impl FusionConfig {
    pub fn preset(name: &str) -> Result<Self> {
        let dynamic = name == "dynamic";
        if !FUSION_PRESETS.contains(&name) {
            return Err(Error::input(format!(
                "unknown fusion preset '{name}' (known: {})",
                FUSION_PRESETS.join(", ")
            )));
        }
        Ok(Self {
            key: true,
            query: true,
            value: dynamic,
            query_before_ln: false,
            regularization: dynamic,
            residual_before: false,
            temperature: false,
            value_before_softmax: true,
            value_initialized: dynamic.into(),
            dropout_prob: None,
        })
    }

    fn value_initialized(&self) -> bool {
        match &self.value_initialized {
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::String(s) => !s.is_empty() && s != "false",
            _ => false,
        }
    }
}

/// One fusion layer: `softmax(query(q) . key(up_i) / T)` weighs the adapters' outputs.
#[derive(Debug, Clone)]
pub struct FusionLayer {
    config: FusionConfig,
    query: Option<Linear>,
    key: Option<Linear>,
    /// `[hidden, hidden]`, no bias.
    value: Option<Linear>,
    dropout: f32,
    /// The softmax temperature: set from the schedule by [`Fusion::set_schedule`].
    temperature: f64,
    params: Params,
}

impl FusionLayer {
    pub fn new(
        config: &FusionConfig,
        hidden: usize,
        dropout: f32,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let mut params = Params::default();
        let mut dense = |params: &mut Params, name: &str| -> Result<Linear> {
            new_linear(
                params,
                name,
                init::normal(rng, (hidden, hidden), 0.02, device)?,
                init::zeros(hidden, device)?,
            )
        };
        let query = if config.query {
            Some(dense(&mut params, "query")?)
        } else {
            None
        };
        let key = if config.key {
            Some(dense(&mut params, "key")?)
        } else {
            None
        };
        let value = if config.value {
            let weight = if config.value_initialized() {
                let eye = Tensor::eye(hidden, candle_core::DType::F32, device)?;
                ((eye.ones_like()? - &eye)? * 1e-6)?.add(&eye)?
            } else {
                init::normal(rng, (hidden, hidden), 0.02, device)?
            };
            let var = candle_core::Var::from_tensor(&weight)?;
            let linear = Linear::new(var.as_tensor().clone(), None);
            params.push("value.weight", var);
            Some(linear)
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            query,
            key,
            value,
            dropout: config.dropout_prob.unwrap_or(dropout),
            temperature: schedule_temperature(config, 0),
            params,
        })
    }

    /// A copy with plain-tensor weights: it runs, takes no gradient and records no graph.
    pub fn frozen(&self) -> Self {
        Self {
            query: self.query.as_ref().map(frozen_linear),
            key: self.key.as_ref().map(frozen_linear),
            value: self.value.as_ref().map(frozen_linear),
            params: Params::default(),
            ..self.clone()
        }
    }

    /// `query`: `[b, s, h]`; `ups`: `[b, s, n, h]`; `residual`: `[b, s, h]`. Returns the fused
    /// output `[b, s, h]` and the attention `[b, s, n]`.
    pub fn forward(
        &self,
        query: &Tensor,
        ups: &Tensor,
        residual: &Tensor,
        mode: &mut Mode,
    ) -> CandleResult<(Tensor, Tensor)> {
        let c = &self.config;
        let mut value = ups.clone();
        if c.residual_before {
            value = value.broadcast_add(&residual.unsqueeze(2)?)?;
        }
        let q = match &self.query {
            Some(l) => ops::linear(l, query)?,
            None => query.clone(),
        };
        // AdapterHub adds the residual in place to the one tensor it passes as keys and values.
        let k = match &self.key {
            Some(l) => ops::linear(l, &value)?,
            None => value.clone(),
        };
        if let (Some(l), true) = (&self.value, c.value_before_softmax) {
            value = ops::linear(l, &value)?;
        }
        // [b, s, 1, h] x [b, s, h, n] -> [b, s, n]
        let scores = q
            .unsqueeze(2)?
            .matmul(&k.transpose(2, 3)?.contiguous()?)?
            .squeeze(2)?;
        let scores = mode.dropout(&scores, self.dropout)?;
        let probs = ops::softmax_last_dim(&(scores / self.temperature)?)?;
        let mut context = probs
            .unsqueeze(2)?
            .matmul(&value.contiguous()?)?
            .squeeze(2)?;
        if let (Some(l), false) = (&self.value, c.value_before_softmax) {
            context = ops::linear(l, &context)?;
        }
        if !c.residual_before {
            context = (context + residual)?;
        }
        Ok((context, probs))
    }

    /// `0.01 * ||I - V||^2`, when the layer has a value matrix.
    pub fn regularization(&self) -> CandleResult<Option<Tensor>> {
        let Some(value) = &self.value else {
            return Ok(None);
        };
        let w = value.weight();
        let eye = Tensor::eye(w.dim(0)?, w.dtype(), w.device())?;
        Ok(Some(((eye - w)?.sqr()?.sum_all()? * 0.01)?))
    }
}

/// AdapterFusion over named adapters, at every place where all of them have an adapter.
#[derive(Debug, Clone)]
pub struct Fusion {
    pub config: FusionConfig,
    /// The fused adapters, in order; frozen unless trained jointly.
    pub adapters: Vec<BottleneckAdapters>,
    layers: Vec<[Option<FusionLayer>; 2]>,
}

/// AdapterHub's temperature schedule (`temperature: true`): the softmax temperature starts at
/// 50 and falls by a thousandth of that per pass, to 1. Without it, 1.
pub fn schedule_temperature(config: &FusionConfig, passes: usize) -> f64 {
    const START: f64 = 50.0;
    if config.temperature {
        (START - passes as f64 * (START / 1000.0)).max(1.0)
    } else {
        1.0
    }
}

/// The schedule's end: a fusion loaded for inference runs at it.
pub const SCHEDULE_END: usize = 1000;

impl Fusion {
    pub fn new(
        adapters: Vec<BottleneckAdapters>,
        config: &FusionConfig,
        model: &BertConfig,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        if adapters.is_empty() {
            return Err(Error::input("fusion needs at least one adapter, got none"));
        }
        let placements = |a: &BottleneckAdapters| (a.config.mh_adapter, a.config.output_adapter);
        if let Some(odd) = adapters
            .iter()
            .find(|a| placements(a) != placements(&adapters[0]))
        {
            return Err(Error::input(format!(
                "adapters '{}' and '{}' sit at different places (mh_adapter, output_adapter: {:?} vs {:?}); fused adapters must share them",
                adapters[0].name, odd.name, placements(&adapters[0]), placements(odd)
            )));
        }
        let mut names = std::collections::BTreeSet::new();
        for a in &adapters {
            if !names.insert(a.name.as_str()) {
                return Err(Error::input(format!(
                    "adapter '{}' is named twice in the fusion (names must be unique)",
                    a.name
                )));
            }
        }
        let layers = (0..model.num_hidden_layers)
            .map(|_| {
                let mut places = [None, None];
                for (slot, position) in places.iter_mut().zip(Position::BOTH) {
                    // AdapterHub adds a fusion layer where every fused adapter's config places one.
                    let everywhere = adapters.iter().all(|a| match position {
                        Position::Attention => a.config.mh_adapter,
                        Position::Output => a.config.output_adapter,
                    });
                    if everywhere {
                        *slot = Some(FusionLayer::new(
                            config,
                            model.hidden_size,
                            model.attention_probs_dropout_prob,
                            rng,
                            device,
                        )?);
                    }
                }
                Ok(places)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            adapters,
            layers,
        })
    }

    /// A copy with plain-tensor weights throughout, for inference.
    pub fn frozen(&self) -> Self {
        Self {
            adapters: self
                .adapters
                .iter()
                .map(BottleneckAdapters::frozen)
                .collect(),
            layers: self
                .layers
                .iter()
                .map(|places| places.clone().map(|l| l.map(|l| l.frozen())))
                .collect(),
            ..self.clone()
        }
    }

    /// The fusion layer at one place, if the fused adapters all sit there.
    pub fn layer(&self, layer: usize, position: Position) -> Option<&FusionLayer> {
        self.layers.get(layer)?[position.index()].as_ref()
    }

    /// Each fusion layer's softmax temperature, in layer order.
    pub fn temperatures(&self) -> Vec<f64> {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|l| l.temperature)
            .collect()
    }

    /// Sets every fusion layer's temperature to the schedule's after `passes` training passes
    /// ([`schedule_temperature`]). AdapterHub lowers it in every forward pass, evaluation
    /// included, so that its predictions depend on how many came before; here training sets
    /// it from its step count, and a loaded fusion runs at the schedule's end
    /// ([`SCHEDULE_END`]).
    pub fn set_schedule(&mut self, passes: usize) {
        let temperature = schedule_temperature(&self.config, passes);
        for layer in self.layers.iter_mut().flatten().flatten() {
            layer.temperature = temperature;
        }
    }

    /// AdapterHub's name for the fusion: the adapter names joined by commas.
    pub fn name(&self) -> String {
        self.adapters
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Parameters as AdapterHub names them (without the model prefix):
    /// `encoder.layer.{i}.{attention.output|output}.adapter_fusion_layer.{a,b}.{query,key,value}.*`.
    pub fn params(&self) -> Params {
        let mut all = Params::default();
        let name = self.name();
        for (i, places) in self.layers.iter().enumerate() {
            for (position, layer) in Position::BOTH.iter().zip(places) {
                if let Some(layer) = layer {
                    all.extend_prefixed(
                        &format!(
                            "encoder.layer.{i}.{}.adapter_fusion_layer.{name}",
                            position.module()
                        ),
                        layer.params.clone(),
                    );
                }
            }
        }
        all
    }

    /// The fusion regularisation term over all layers, if the config asks for it.
    pub fn regularization_loss(&self) -> CandleResult<Option<Tensor>> {
        if !self.config.regularization {
            return Ok(None);
        }
        let mut total: Option<Tensor> = None;
        for layer in self.layers.iter().flatten().flatten() {
            if let Some(r) = layer.regularization()? {
                total = Some(match total {
                    Some(t) => (t + r)?,
                    None => r,
                });
            }
        }
        Ok(total)
    }

    /// Hooks that run the fusion and keep each fusion layer's attention.
    pub fn recording(&self) -> FusionRecorder<'_> {
        FusionRecorder {
            fusion: self,
            record: RefCell::new(Vec::new()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        layer: usize,
        position: Position,
        hidden: &Tensor,
        input: &Tensor,
        layer_norm: &LayerNorm,
        mode: &mut Mode,
        record: Option<&RefCell<Vec<Attention>>>,
    ) -> CandleResult<Tensor> {
        let present: Vec<_> = self
            .adapters
            .iter()
            .filter(|a| !a.skip_layers.contains(&layer))
            .filter_map(|a| a.get(layer, position))
            .collect();
        let (Some(fusion), Some(last)) = (self.layer(layer, position), present.last()) else {
            return layer_norm.of_sum(&[hidden, input]);
        };
        // As AdapterHub: the last adapter prepares the input, every adapter runs on it, the
        // fusion layer weighs their `up` outputs, the last adapter finishes the sub-layer.
        let pre = last.pre_forward(hidden, input, layer_norm, self.config.query_before_ln)?;
        let ups = present
            .iter()
            .map(|a| Ok(a.bottleneck(&pre.x, &pre.residual, mode)?.1))
            .collect::<CandleResult<Vec<_>>>()?;
        let ups = Tensor::stack(&ups, 2)?;
        let (fused, probs) = fusion.forward(&pre.query, &ups, &pre.residual, mode)?;
        if let Some(record) = record {
            record.borrow_mut().push(Attention {
                layer,
                position,
                probs: probs.detach(),
            });
        }
        last.finish(&last.into_stream(fused, hidden)?, input, layer_norm)
    }
}

impl LayerHooks for Fusion {
    fn sub_layer_output(
        &self,
        layer: usize,
        position: Position,
        hidden: &Tensor,
        residual: &Tensor,
        layer_norm: &LayerNorm,
        mode: &mut Mode,
    ) -> CandleResult<Tensor> {
        self.run(layer, position, hidden, residual, layer_norm, mode, None)
    }
}

/// One fusion layer's attention in one forward pass.
pub struct Attention {
    pub layer: usize,
    pub position: Position,
    /// `[batch, seq, adapters]`
    pub probs: Tensor,
}

/// A fusion's hooks that keep its attention ([`Fusion::recording`]): the record is the
/// caller's, so the model itself holds no state that a forward pass changes.
pub struct FusionRecorder<'a> {
    fusion: &'a Fusion,
    record: RefCell<Vec<Attention>>,
}

impl FusionRecorder<'_> {
    /// What the passes so far recorded, emptied.
    pub fn take(&self) -> Vec<Attention> {
        self.record.take()
    }
}

impl LayerHooks for FusionRecorder<'_> {
    fn sub_layer_output(
        &self,
        layer: usize,
        position: Position,
        hidden: &Tensor,
        residual: &Tensor,
        layer_norm: &LayerNorm,
        mode: &mut Mode,
    ) -> CandleResult<Tensor> {
        let record = Some(&self.record);
        (self.fusion).run(layer, position, hidden, residual, layer_norm, mode, record)
    }
}

/// Mean attention `[n]` over the real tokens of a batch, from `[b, s, n]` and the mask `[b, s]`.
pub fn mean_attention(probs: &Tensor, attention_mask: &Tensor) -> CandleResult<Tensor> {
    let mask = attention_mask
        .to_dtype(candle_core::DType::F32)?
        .unsqueeze(D::Minus1)?;
    let total = probs.broadcast_mul(&mask)?.sum((0, 1))?;
    total / mask.sum_all()?.to_scalar::<f32>()? as f64
}
