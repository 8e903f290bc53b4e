//! Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; parallel, He et al. 2021),
//! with AdapterHub's semantics: the three steps of its `pre_forward`, `forward` and
//! `post_forward` are the three steps of [`BottleneckAdapter::forward`].

use std::collections::BTreeSet;

use candle_core::{Device, Module, Result as CandleResult, Tensor, Var};
use candle_nn::Linear;

use crate::error::{Error, Result};
use crate::kernels::dropout::DropoutMask;
use crate::methods::bottleneck_config::{BnConfig, InitWeights, ResidualBeforeLn};
use crate::methods::gate::Gate;
use crate::model::checkpoint::checkpointed;
use crate::model::dropout::masked;
use crate::model::hooks::{LayerHooks, Position};
use crate::model::layer_norm::LayerNorm;
use crate::model::ops;
use crate::model::{BertConfig, Mode};
use crate::params::{frozen_linear, init, new_linear, Params};
use crate::rng::SeededRng;

/// One adapter at one place of one layer: `up(act(down(x))) * scaling` with a skip connection.
#[derive(Debug, Clone)]
pub struct BottleneckAdapter {
    config: BnConfig,
    /// `adapter_down.0` when `ln_before`.
    norm_before: Option<LayerNorm>,
    down: Linear,
    up: Linear,
    /// `adapter_norm_after` when `ln_after`.
    norm_after: Option<LayerNorm>,
    /// `gate` when `use_gating` (UniPELT): scales the output by a value read off the input.
    gate: Option<Gate>,
    params: Params,
}

fn trainable_norm(
    params: &mut Params,
    name: &str,
    size: usize,
    device: &Device,
) -> Result<LayerNorm> {
    let weight = Var::from_tensor(&init::ones(size, device)?)?;
    let bias = Var::from_tensor(&init::zeros(size, device)?)?;
    let norm = LayerNorm {
        weight: weight.as_tensor().clone(),
        bias: bias.as_tensor().clone(),
        eps: 1e-5, // torch.nn.LayerNorm's default, which AdapterHub's adapter norms use
    };
    params.push(format!("{name}.weight"), weight);
    params.push(format!("{name}.bias"), bias);
    Ok(norm)
}

impl BottleneckAdapter {
    pub fn new(
        config: &BnConfig,
        hidden: usize,
        bottleneck: usize,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let mut params = Params::default();
        let norm_before = if config.ln_before {
            Some(trainable_norm(
                &mut params,
                "adapter_down.0",
                hidden,
                device,
            )?)
        } else {
            None
        };
        let down_name = down_name(config.ln_before);
        let (down_w, up_w) = match config.init_weights {
            InitWeights::Bert => (
                init::normal(rng, (bottleneck, hidden), 0.02, device)?,
                init::normal(rng, (hidden, bottleneck), 0.02, device)?,
            ),
            InitWeights::Houlsby => (
                init::truncated_normal(rng, (bottleneck, hidden), 0.01, device)?,
                init::truncated_normal(rng, (hidden, bottleneck), 0.01, device)?,
            ),
            InitWeights::MamAdapter => (
                init::kaiming_uniform(rng, (bottleneck, hidden), device)?,
                init::zeros((hidden, bottleneck), device)?,
            ),
        };
        let down = new_linear(
            &mut params,
            down_name,
            down_w,
            init::zeros(bottleneck, device)?,
        )?;
        let up = new_linear(
            &mut params,
            "adapter_up",
            up_w,
            init::zeros(hidden, device)?,
        )?;
        let norm_after = if config.ln_after {
            Some(trainable_norm(
                &mut params,
                "adapter_norm_after",
                hidden,
                device,
            )?)
        } else {
            None
        };
        let gate = if config.use_gating() {
            Some(Gate::new(
                &mut params,
                "gate",
                (hidden, 1),
                true,
                rng,
                device,
            )?)
        } else {
            None
        };
        Ok(Self {
            config: config.clone(),
            norm_before,
            down,
            up,
            norm_after,
            gate,
            params,
        })
    }

    /// The trainable variables (none when [`frozen`](Self::frozen)).
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Every weight under its AdapterHub name, frozen or not (what a file holds).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let mut norm = |name: &str, n: &LayerNorm| {
            out.push((format!("{name}.weight"), n.weight.clone()));
            out.push((format!("{name}.bias"), n.bias.clone()));
        };
        if let Some(n) = &self.norm_before {
            norm("adapter_down.0", n);
        }
        if let Some(n) = &self.norm_after {
            norm("adapter_norm_after", n);
        }
        let down = down_name(self.norm_before.is_some());
        for (name, l) in [(down, &self.down), ("adapter_up", &self.up)] {
            out.push((format!("{name}.weight"), l.weight().clone()));
            if let Some(b) = l.bias() {
                out.push((format!("{name}.bias"), b.clone()));
            }
        }
        out.extend(self.gate.iter().flat_map(|g| g.tensors("gate")));
        out
    }

    /// AdapterHub's `pre_forward`: what the bottleneck reads, its skip connection, and the
    /// query a fusion layer would use (`query_before_ln`: before the original LayerNorm).
    pub fn pre_forward(
        &self,
        hidden: &Tensor,
        input: &Tensor,
        layer_norm: &LayerNorm,
        query_before_ln: bool,
    ) -> CandleResult<PreForward> {
        let c = &self.config;
        if c.is_parallel {
            // Parallel: the adapter reads the sub-layer's input.
            return Ok(PreForward {
                x: input.clone(),
                residual: input.clone(),
                query: input.clone(),
            });
        }
        let mut h = hidden.clone();
        let mut residual = match c.residual_before_ln {
            ResidualBeforeLn::Flag(true) => Some(h.clone()),
            _ => None,
        };
        let query_before = h.clone();
        if c.original_ln_before {
            h = (h + input)?;
            if matches!(c.residual_before_ln, ResidualBeforeLn::PostAdd(_)) {
                residual = Some(h.clone());
            }
            h = layer_norm.forward(&h)?;
        }
        let residual = residual.unwrap_or_else(|| h.clone());
        let query = if query_before_ln {
            query_before
        } else {
            h.clone()
        };
        Ok(PreForward {
            x: h,
            residual,
            query,
        })
    }

    /// The bottleneck: `up = up(act(down(norm_before(x)))) * scaling`, then dropout,
    /// `norm_after` and, for sequential adapters, the skip connection in the configured order.
    /// Returns the output and `up` (what AdapterFusion attends over).
    pub fn bottleneck(
        &self,
        x: &Tensor,
        residual: &Tensor,
        mode: &mut Mode,
    ) -> CandleResult<(Tensor, Tensor)> {
        let c = &self.config;
        let up = self.project(x)?;
        let mut out = self.gated(mode.dropout(&up, c.dropout)?, x)?;
        let skip = !c.is_parallel;
        if skip && c.adapter_residual_before_ln {
            out = (out + residual)?;
        }
        if let Some(norm) = &self.norm_after {
            out = norm.forward(&out)?;
        }
        if skip && !c.adapter_residual_before_ln {
            out = (out + residual)?;
        }
        Ok((out, up))
    }

    /// `out` times the gate's value for `x` (the adapter's input), if the adapter has a gate.
    fn gated(&self, out: Tensor, x: &Tensor) -> CandleResult<Tensor> {
        match &self.gate {
            Some(gate) => out.broadcast_mul(&Gate::column(&gate.values(x)?, 0)?),
            None => Ok(out),
        }
    }

    /// Whether a gate reads the adapter's input, all positions of it.
    pub fn gated_by_input(&self) -> bool {
        self.gate.is_some()
    }

    /// `up(act(down(norm_before(x)))) * scaling`.
    fn project(&self, x: &Tensor) -> CandleResult<Tensor> {
        let c = &self.config;
        let x = match &self.norm_before {
            Some(norm) => norm.forward(x)?,
            None => x.clone(),
        };
        let down = c.non_linearity.forward(&ops::linear(&self.down, &x)?)?;
        let up = ops::linear(&self.up, &down)?;
        // A scaling of 1 (Houlsby's, Pfeiffer's) would still be a graph node and a pass.
        if c.scaling == 1.0 {
            Ok(up)
        } else {
            up * c.scaling
        }
    }

    /// A parallel adapter's output joins `stream` (the sub-layer's output as the adapters before
    /// it left it); a sequential adapter's output, which carries its own skip connection,
    /// replaces it. AdapterHub's `post_forward` adds the sub-layer's own output instead, which
    /// is the same for an adapter alone.
    pub fn into_stream(&self, out: Tensor, stream: &Tensor) -> CandleResult<Tensor> {
        if self.config.is_parallel {
            out + stream
        } else {
            Ok(out)
        }
    }

    /// The adapter as one step at its place: reads `stream` (and, if parallel, the sub-layer's
    /// `input`) and returns the new stream and `up` (what AdapterFusion attends over). A stack
    /// of adapters is a chain of steps, then [`finish`](Self::finish) by the last one.
    pub fn step(
        &self,
        stream: &Tensor,
        input: &Tensor,
        layer_norm: &LayerNorm,
        mode: &mut Mode,
    ) -> CandleResult<(Tensor, Tensor)> {
        let pre = self.pre_forward(stream, input, layer_norm, false)?;
        let (out, up) = self.bottleneck(&pre.x, &pre.residual, mode)?;
        Ok((self.into_stream(out, stream)?, up))
    }

    /// Ends the sub-layer after the adapters (AdapterHub's `post_forward`): the original
    /// residual and LayerNorm over the stream (`original_ln_after`), or the stream as it is.
    pub fn finish(
        &self,
        stream: &Tensor,
        input: &Tensor,
        layer_norm: &LayerNorm,
    ) -> CandleResult<Tensor> {
        if self.config.original_ln_after {
            layer_norm.of_sum(&[stream, input])
        } else {
            Ok(stream.clone())
        }
    }

    /// Replaces the sub-layer's `LayerNorm(hidden + input)`: `hidden` is the sub-layer's output
    /// (after its projection and dropout), `input` the sub-layer's input.
    pub fn forward(
        &self,
        hidden: &Tensor,
        input: &Tensor,
        layer_norm: &LayerNorm,
        mode: &mut Mode,
    ) -> CandleResult<Tensor> {
        let c = &self.config;
        if !c.is_parallel && self.norm_after.is_none() && c.original_ln_after {
            // Houlsby's and Pfeiffer's case: `LayerNorm(dropout(up) + residual + input)`.
            let dropout = mode.dropout_mask(hidden.elem_count(), c.dropout);
            if let Some(out) = self.checkpointed(hidden, input, layer_norm, dropout.as_ref())? {
                return Ok(out);
            }
            return self.sequential(hidden, input, layer_norm, dropout.as_ref());
        }
        let (stream, _) = self.step(hidden, input, layer_norm, mode)?;
        self.finish(&stream, input, layer_norm)
    }

    /// `LayerNorm(dropout(up) + residual + input)` (one op when the LayerNorm is frozen), with
    /// the dropout mask drawn.
    fn sequential(
        &self,
        hidden: &Tensor,
        input: &Tensor,
        layer_norm: &LayerNorm,
        dropout: Option<&DropoutMask>,
    ) -> CandleResult<Tensor> {
        let pre = self.pre_forward(hidden, input, layer_norm, false)?;
        let up = self.project(&pre.x)?;
        let up = match dropout {
            Some(mask) => masked(&up, mask)?,
            None => up,
        };
        layer_norm.of_sum(&[&self.gated(up, &pre.x)?, &pre.residual, input])
    }

    /// [`sequential`](Self::sequential) as one op that keeps only its inputs for the backward
    /// pass (`model::checkpoint`; two hidden-sized tensors fewer per sub-layer), when it takes
    /// a gradient, runs on CPU in f32 and reads no weights but its two Linears' and the
    /// LayerNorm's (no gate, no LayerNorm of its own); `None` otherwise. Same values, same
    /// gradients.
    fn checkpointed(
        &self,
        hidden: &Tensor,
        input: &Tensor,
        layer_norm: &LayerNorm,
        dropout: Option<&DropoutMask>,
    ) -> CandleResult<Option<Tensor>> {
        let (Some(down_bias), Some(up_bias)) = (self.down.bias(), self.up.bias()) else {
            return Ok(None);
        };
        let params = [
            self.down.weight(),
            down_bias,
            self.up.weight(),
            up_bias,
            &layer_norm.weight,
            &layer_norm.bias,
        ];
        let trains = params.iter().chain([&hidden, &input]).any(|t| t.track_op());
        let plain = self.gate.is_none() && self.norm_before.is_none();
        if !trains || !plain || !ops::fused_applies(hidden) || hidden.shape() != input.shape() {
            return Ok(None);
        }
        // What the sub-graph reads besides its inputs and parameters.
        let (config, eps, dropout) = (self.config.clone(), layer_norm.eps, dropout.cloned());
        let out = checkpointed(hidden, input, &params, move |hidden, input, p| {
            let adapter = Self {
                config: config.clone(),
                norm_before: None,
                down: Linear::new(p[0].clone(), Some(p[1].clone())),
                up: Linear::new(p[2].clone(), Some(p[3].clone())),
                norm_after: None,
                gate: None,
                params: Params::default(),
            };
            let layer_norm = LayerNorm {
                weight: p[4].clone(),
                bias: p[5].clone(),
                eps,
            };
            adapter.sequential(hidden, input, &layer_norm, dropout.as_ref())
        })?;
        Ok(Some(out))
    }

    pub fn config(&self) -> &BnConfig {
        &self.config
    }

    /// `(down, up)` when the adapter adds nothing but `up(act(down(x))) * scaling` before the
    /// original residual and LayerNorm: sequential, no LayerNorm of its own, ending in the
    /// original LayerNorm (Houlsby's and Pfeiffer's case). Many such adapters side by side run
    /// as one op (`composition/grouped.rs`).
    pub(crate) fn plain_parts(&self) -> Option<(&Linear, &Linear)> {
        let c = &self.config;
        let plain = !c.is_parallel
            && c.original_ln_after
            && self.norm_before.is_none()
            && self.norm_after.is_none()
            && self.gate.is_none();
        plain.then_some((&self.down, &self.up))
    }

    /// A copy whose weights are plain tensors: it runs, but takes no gradient (a frozen
    /// adapter under AdapterFusion).
    pub fn frozen(&self) -> Self {
        Self {
            config: self.config.clone(),
            norm_before: self.norm_before.as_ref().map(LayerNorm::frozen),
            down: frozen_linear(&self.down),
            up: frozen_linear(&self.up),
            norm_after: self.norm_after.as_ref().map(LayerNorm::frozen),
            gate: self.gate.as_ref().map(Gate::frozen),
            params: Params::default(),
        }
    }
}

/// What [`BottleneckAdapter::pre_forward`] prepares.
pub struct PreForward {
    /// The bottleneck's input.
    pub x: Tensor,
    /// The skip connection around the bottleneck.
    pub residual: Tensor,
    /// A fusion layer's query.
    pub query: Tensor,
}

/// One named adapter across all layers of a model: the hooks that run it.
#[derive(Debug, Clone)]
pub struct BottleneckAdapters {
    pub name: String,
    pub config: BnConfig,
    /// Per layer: the adapter after attention and the one after the feed-forward block.
    layers: Vec<[Option<BottleneckAdapter>; 2]>,
    /// Layers whose adapters are skipped at run time (AdapterDrop's `skip_layers`).
    pub skip_layers: BTreeSet<usize>,
}

impl BottleneckAdapters {
    /// A freshly initialised adapter for `model`, drawing its weights from `rng`.
    pub fn new(
        name: &str,
        config: &BnConfig,
        model: &BertConfig,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let invalid = |message: String| Error::input(format!("adapter '{name}': {message}"));
        check_name(name).map_err(invalid)?;
        config
            .validate(model.num_hidden_layers, model.hidden_size)
            .map_err(invalid)?;
        if matches!(config.residual_before_ln, ResidualBeforeLn::PostAdd(_))
            && !config.original_ln_before
        {
            return Err(invalid(
                "residual_before_ln=\"post_add\" needs original_ln_before=true".into(),
            ));
        }
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for layer in 0..model.num_hidden_layers {
            let bottleneck = config
                .bottleneck_size(layer, model.hidden_size)
                .map_err(invalid)?;
            let mut make = |wanted: bool| -> Result<Option<BottleneckAdapter>> {
                if !wanted || config.leave_out.contains(&layer) {
                    return Ok(None);
                }
                BottleneckAdapter::new(config, model.hidden_size, bottleneck, rng, device).map(Some)
            };
            layers.push([make(config.mh_adapter)?, make(config.output_adapter)?]);
        }
        Ok(Self {
            name: name.into(),
            config: config.clone(),
            layers,
            skip_layers: BTreeSet::new(),
        })
    }

    /// A copy with plain-tensor weights (see [`BottleneckAdapter::frozen`]).
    pub fn frozen(&self) -> Self {
        Self {
            layers: self
                .layers
                .iter()
                .map(|places| places.clone().map(|a| a.map(|a| a.frozen())))
                .collect(),
            ..self.clone()
        }
    }

    pub fn get(&self, layer: usize, position: Position) -> Option<&BottleneckAdapter> {
        self.layers.get(layer)?[position.index()].as_ref()
    }

    /// Every parameter under AdapterHub's name, without the model prefix:
    /// `encoder.layer.{i}.{attention.output|output}.adapters.{name}.adapter_down.0.weight`, ...
    pub fn params(&self) -> Params {
        let mut all = Params::default();
        for (prefix, adapter) in self.placed() {
            all.extend_prefixed(&prefix, adapter.params().clone());
        }
        all
    }

    /// Every weight with its full name, frozen or not (what `adapter.safetensors` holds).
    /// AdapterHub registers an `ln_before` norm twice (`adapter_down.0` and
    /// `adapter_norm_before`) and saves both names, so this gives both.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors = Vec::new();
        for (prefix, adapter) in self.placed() {
            for (name, tensor) in adapter.tensors() {
                if self.config.ln_before && name.starts_with("adapter_down.0.") {
                    let alias = name.replace("adapter_down.0.", "adapter_norm_before.");
                    tensors.push((format!("{prefix}.{alias}"), tensor.clone()));
                }
                tensors.push((format!("{prefix}.{name}"), tensor));
            }
        }
        tensors
    }

    /// Each adapter with the name prefix AdapterHub gives its place.
    fn placed(&self) -> impl Iterator<Item = (String, &BottleneckAdapter)> {
        self.layers.iter().enumerate().flat_map(move |(i, places)| {
            Position::BOTH
                .iter()
                .zip(places)
                .filter_map(move |(position, adapter)| {
                    let prefix = format!(
                        "encoder.layer.{i}.{}.adapters.{}",
                        position.module(),
                        self.name
                    );
                    adapter.as_ref().map(|a| (prefix, a))
                })
        })
    }
}

impl LayerHooks for BottleneckAdapters {
    fn sub_layer_output(
        &self,
        layer: usize,
        position: Position,
        hidden: &Tensor,
        input: &Tensor,
        layer_norm: &LayerNorm,
        mode: &mut Mode,
    ) -> CandleResult<Tensor> {
        match self.get(layer, position) {
            Some(adapter) if !self.skip_layers.contains(&layer) => {
                adapter.forward(hidden, input, layer_norm, mode)
            }
            _ => layer_norm.of_sum(&[hidden, input]),
        }
    }
}

/// AdapterHub's name for the down projection: `adapter_down.1` when a LayerNorm comes first
/// (`ln_before`, which takes `adapter_down.0`).
fn down_name(ln_before: bool) -> &'static str {
    if ln_before {
        "adapter_down.1"
    } else {
        "adapter_down.0"
    }
}

/// Names become directory names (a fusion's adapters) and are joined with commas (a fusion's
/// name): letters, digits, `-`, `_` and `.` only, and not `.` or `..`.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let fine = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if fine {
        Ok(())
    } else {
        Err("a name may hold only letters, digits, '-', '_' and '.'".into())
    }
}

#[cfg(test)]
mod tests;
