//! Running a composition setup ([`Setup`], in `setup.rs`) at each adapter place.
//!
//! The batch is first handed out in channels ([`Setup::channels`]): rows and the setup that
//! runs them, with no Parallel or BatchSplit left in it. Each channel then runs on its rows as
//! its setup would alone, so a parallel task gets exactly what its adapter gives alone, whatever
//! the placement and options of the adapters beside it.
//!
//! Within a channel the adapters pass on a *stream*: the sub-layer's output as the adapters so
//! far have left it, before the original residual and LayerNorm. Each adapter is one step on
//! it ([`BottleneckAdapter::step`]) and the last present one finishes the sub-layer
//! ([`BottleneckAdapter::finish`]). For sequential adapters this is AdapterHub's computation;
//! where AdapterHub 1.3 differs (parallel adapters in a stack, Average's extra division, a
//! setup prepared by one adapter's options and finished by another's), docs/ARCHITECTURE.md
//! says how and why.

mod channels;
mod grouped;
mod linear;
mod prefix;
mod setup;

pub use channels::Channel;
pub use setup::Setup;

use std::collections::BTreeMap;

use candle_core::{Result as CandleResult, Tensor};
use candle_nn::Linear;

use crate::error::{Error, Result};
use crate::methods::adapter::Adapter;
use crate::methods::bottleneck::BottleneckAdapter;
use crate::methods::fusion::Fusion;
use crate::model::hooks::{KeyValuePrefix, LayerHooks, LinearChange, LinearSite, Position};
use crate::model::layer_norm::{EncoderLayerNorms, LayerNorm};
use crate::model::Mode;

/// A setup with the adapters and fusion layers it names.
#[derive(Debug, Clone)]
pub struct Composition {
    pub setup: Setup,
    pub adapters: BTreeMap<String, Adapter>,
    /// Fusion layers by name (`a,b`), for the setup's `Fuse` blocks.
    pub fusions: BTreeMap<String, Fusion>,
    /// The encoder's LayerNorms as trained beside these adapters (by name), for adapters that
    /// were trained with them: a channel running such an adapter alone uses them (LayerNorm is
    /// row-wise, so each channel can have its own).
    pub layer_norms: BTreeMap<String, EncoderLayerNorms>,
    /// Run channels that each hold one plain adapter as one op per place (the default;
    /// `grouped.rs`). Off, each channel runs on its own: the same result, slower for many
    /// channels; tests compare the two.
    pub group_adapters: bool,
}

/// Where a channel runs: one adapter place of one layer, with the sub-layer's input and the
/// original LayerNorm.
struct Place<'a> {
    layer: usize,
    position: Position,
    input: &'a Tensor,
    layer_norm: &'a LayerNorm,
}

/// What a setup leaves at a place: the stream, the last adapter that ran (it finishes the
/// sub-layer) and its `up` (what a fusion attends over).
struct Flow<'a> {
    stream: Tensor,
    up: Option<Tensor>,
    last: Option<&'a BottleneckAdapter>,
}

impl Flow<'_> {
    fn untouched(stream: Tensor) -> Self {
        Self {
            stream,
            up: None,
            last: None,
        }
    }
}

impl Composition {
    /// Checks the setup (as [`Setup::parse`] does) and that every adapter and fusion it names
    /// is given.
    pub fn new(
        setup: Setup,
        adapters: BTreeMap<String, Adapter>,
        fusions: BTreeMap<String, Fusion>,
    ) -> Result<Self> {
        setup.validate(0)?;
        if let Some(missing) = setup
            .names()
            .into_iter()
            .find(|n| !adapters.contains_key(*n))
        {
            let known: Vec<&String> = adapters.keys().collect();
            return Err(Error::input(format!(
                "the setup {setup} names adapter '{missing}', which is not loaded (loaded: {known:?})"
            )));
        }
        let mut fuse_names = Vec::new();
        let mut fused = Vec::new();
        setup.visit(&mut |s| {
            if let Setup::Fuse(children) = s {
                fuse_names.push(Setup::fusion_name(children));
                children.iter().for_each(|c| fused.extend(c.names()));
            }
        });
        // AdapterHub fuses bottleneck adapters only (its LoRA layers refuse Fuse).
        if let Some(name) = fused
            .iter()
            .find(|n| adapters[**n].bottleneck().is_none() || adapters[**n].lora().is_some())
        {
            return Err(Error::input(format!(
                "the setup {setup} fuses '{name}', which is not a bottleneck adapter alone; \
                 a fusion weighs bottleneck adapters only"
            )));
        }
        if let Some(missing) = fuse_names.iter().find(|n| !fusions.contains_key(*n)) {
            return Err(Error::input(format!(
                "the setup {setup} fuses '{missing}', but no fusion of those adapters is loaded"
            )));
        }
        let composition = Self {
            setup,
            adapters,
            fusions,
            layer_norms: BTreeMap::new(),
            group_adapters: true,
        };
        composition.check_prefixes()?;
        Ok(composition)
    }

    /// The hooks that run the setup on a batch of `rows` rows (the batch replicated once per
    /// parallel channel).
    pub fn on_rows(&self, rows: usize) -> Result<ChannelHooks<'_>> {
        let channels = self.setup.channels(0..rows)?;
        let layer_norms = (channels.iter())
            .map(|c| self.channel_layer_norms(&c.setup))
            .collect::<Result<_>>()?;
        Ok(ChannelHooks {
            composition: self,
            channels,
            layer_norms,
        })
    }

    /// The LayerNorms a channel runs with, when not the encoder's: those of the adapter it runs
    /// alone. Adapters that bring LayerNorms of their own cannot share a channel with others:
    /// which LayerNorms would then be the right ones is not defined.
    fn channel_layer_norms(&self, setup: &Setup) -> Result<Option<&EncoderLayerNorms>> {
        if let Some(name) = setup.single_adapter() {
            return Ok(self.layer_norms.get(name));
        }
        match setup
            .names()
            .into_iter()
            .find(|n| self.layer_norms.contains_key(*n))
        {
            Some(name) => Err(Error::input(format!(
                "the setup {setup} runs '{name}' together with other adapters, but '{name}' was \
                 trained with the encoder's LayerNorms, which it cannot share; run it alone (in \
                 its own parallel or batch_split channel), or train it with --freeze-layer-norms"
            ))),
            None => Ok(None),
        }
    }

    /// The adapter `name` at this place, unless absent there or skipped (AdapterDrop).
    fn adapter(&self, name: &str, layer: usize, position: Position) -> Option<&BottleneckAdapter> {
        let adapters = self.adapters.get(name)?.bottleneck()?;
        if adapters.skip_layers.contains(&layer) {
            return None;
        }
        adapters.get(layer, position)
    }

    /// The lowest layer where any adapter of the setup runs: below it the model is the base
    /// model, which parallel channels can share.
    pub fn lowest_active_layer(&self, layers: usize) -> Option<usize> {
        let names = self.setup.names();
        // LayerNorms of an adapter's own differ from the base from the embeddings on.
        if names.iter().any(|n| self.layer_norms.contains_key(*n)) {
            return Some(0).filter(|_| layers > 0);
        }
        (0..layers).find(|&layer| {
            let linears = LinearSite::ALL.iter();
            linears
                .clone()
                .any(|s| self.changes_linear(&self.setup, layer, *s))
                || names.iter().any(|n| {
                    Position::BOTH
                        .iter()
                        .any(|p| self.adapter(n, layer, *p).is_some())
                })
                || self.prefix_at(&self.setup, layer)
        })
    }

    /// One channel's setup on its rows (`hidden`: the sub-layer's output), the sub-layer
    /// finished.
    fn run_channel(
        &self,
        setup: &Setup,
        hidden: &Tensor,
        place: &Place,
        mode: &mut Mode,
    ) -> CandleResult<Tensor> {
        let (input, layer_norm) = (place.input, place.layer_norm);
        // One adapter alone takes the path it takes outside a composition, to the bit.
        if let Some(name) = setup.single_adapter() {
            return match self.adapter(name, place.layer, place.position) {
                Some(adapter) => adapter.forward(hidden, input, layer_norm, mode),
                None => layer_norm.of_sum(&[hidden, input]),
            };
        }
        let flow = self.run(setup, hidden.clone(), place, mode)?;
        match flow.last {
            Some(last) => last.finish(&flow.stream, input, layer_norm),
            None => layer_norm.of_sum(&[&flow.stream, input]),
        }
    }

    /// `setup` (a channel's, or a block of it) on `stream`.
    fn run<'a>(
        &'a self,
        setup: &Setup,
        stream: Tensor,
        place: &Place,
        mode: &mut Mode,
    ) -> CandleResult<Flow<'a>> {
        match setup {
            Setup::Adapter(name) => {
                let Some(adapter) = self.adapter(name, place.layer, place.position) else {
                    return Ok(Flow::untouched(stream));
                };
                let (stream, up) = adapter.step(&stream, place.input, place.layer_norm, mode)?;
                Ok(Flow {
                    stream,
                    up: Some(up),
                    last: Some(adapter),
                })
            }
            Setup::Stack(children) => {
                let mut flow = Flow::untouched(stream);
                for child in children {
                    let next = self.run(child, flow.stream, place, mode)?;
                    flow = Flow {
                        stream: next.stream,
                        up: next.up.or(flow.up),
                        last: next.last.or(flow.last),
                    };
                }
                Ok(flow)
            }
            Setup::Average { children, weights } => {
                self.average(setup, children, weights, stream, place, mode)
            }
            Setup::Fuse(children) => self.fuse(children, stream, place, mode),
            Setup::Parallel(_) | Setup::BatchSplit { .. } => candle_core::bail!(
                "{setup} runs only after the batch is handed out in channels (Setup::channels)"
            ),
        }
    }

    /// The weighted mean of what each child makes of the stream (a child with no adapter at
    /// this place leaves it as it is). The children must finish the sub-layer alike.
    fn average<'a>(
        &'a self,
        setup: &Setup,
        children: &[Setup],
        weights: &[f64],
        stream: Tensor,
        place: &Place,
        mode: &mut Mode,
    ) -> CandleResult<Flow<'a>> {
        let flows = children
            .iter()
            .map(|c| self.run(c, stream.clone(), place, mode))
            .collect::<CandleResult<Vec<_>>>()?;
        let ends_with_layer_norm = |f: &Flow| f.last.is_none_or(|a| a.config().original_ln_after);
        if flows
            .iter()
            .any(|f| ends_with_layer_norm(f) != ends_with_layer_norm(&flows[0]))
        {
            candle_core::bail!(
                "{setup} at layer {} ({}): its adapters end the sub-layer differently \
                 (original_ln_after differs), so their outputs cannot be averaged",
                place.layer,
                place.position.module()
            );
        }
        let mut sum = (&flows[0].stream * weights[0])?;
        for (flow, w) in flows.iter().zip(weights).skip(1) {
            sum = (sum + (&flow.stream * *w)?)?;
        }
        Ok(Flow {
            stream: sum,
            up: None,
            last: flows.iter().rev().find_map(|f| f.last),
        })
    }

    /// AdapterHub's `compose_fuse`: the last adapter prepares the input and the query, each
    /// child runs on it, the fusion layer weighs their up-projections.
    fn fuse<'a>(
        &'a self,
        children: &[Setup],
        stream: Tensor,
        place: &Place,
        mode: &mut Mode,
    ) -> CandleResult<Flow<'a>> {
        let fusion = &self.fusions[&Setup::fusion_name(children)];
        let last = children.last().expect("validated").last();
        let (Some(last), Some(layer)) = (
            self.adapter(last, place.layer, place.position),
            fusion.layer(place.layer, place.position),
        ) else {
            return Ok(Flow::untouched(stream));
        };
        let pre = last.pre_forward(
            &stream,
            place.input,
            place.layer_norm,
            fusion.config.query_before_ln,
        )?;
        let mut ups = Vec::new();
        for child in children {
            let up = match child {
                Setup::Adapter(name) => self
                    .adapter(name, place.layer, place.position)
                    .map(|a| a.bottleneck(&pre.x, &pre.residual, mode))
                    .transpose()?
                    .map(|(_, up)| up),
                stack => self.run(stack, pre.x.clone(), place, mode)?.up,
            };
            ups.extend(up);
        }
        let (fused, _) =
            layer.forward(&pre.query, &Tensor::stack(&ups, 2)?, &pre.residual, mode)?;
        Ok(Flow {
            stream: last.into_stream(fused, &stream)?,
            up: None,
            last: Some(last),
        })
    }
}

/// A composition on a batch of known rows: the hooks that run it.
pub struct ChannelHooks<'a> {
    composition: &'a Composition,
    channels: Vec<Channel>,
    /// Per channel: its adapter's own LayerNorms, if it brings them.
    layer_norms: Vec<Option<&'a EncoderLayerNorms>>,
}

impl ChannelHooks<'_> {
    pub fn channels(&self) -> &[Channel] {
        &self.channels
    }

    /// Whether some channel runs with LayerNorms of its own (see
    /// [`Composition::layer_norms`]).
    pub fn has_own_layer_norms(&self) -> bool {
        self.layer_norms.iter().any(Option::is_some)
    }

    /// The embeddings' LayerNorm and dropout on `summed` embeddings (`[rows, seq, hidden]`),
    /// each channel's rows with its own LayerNorm or `base`.
    pub fn embeddings(
        &self,
        encoder: &crate::model::BertModel,
        summed: &Tensor,
        mode: &mut Mode,
    ) -> CandleResult<Tensor> {
        let base = &encoder.embeddings.layer_norm;
        let mut outputs = Vec::with_capacity(self.channels.len());
        for (channel, own) in self.channels.iter().zip(&self.layer_norms) {
            let rows = summed.narrow(0, channel.rows.start, channel.rows.len())?;
            let layer_norm = own.map_or(base, |n| &n.embeddings);
            outputs.push(encoder.embeddings.finish(&rows, layer_norm, mode)?);
        }
        Tensor::cat(&outputs, 0)
    }
}

impl LayerHooks for ChannelHooks<'_> {
    fn key_value_prefix(
        &self,
        layer: usize,
        input: &Tensor,
        mode: &mut Mode,
    ) -> CandleResult<Option<KeyValuePrefix>> {
        self.prefixes(layer, input, mode)
    }

    fn linear(&self, layer: usize, site: LinearSite, base: &Linear) -> Option<LinearChange<'_>> {
        let composition = self.composition;
        let changes = |c: &Channel| composition.changes_linear(&c.setup, layer, site);
        if !self.channels.iter().any(changes) {
            return None;
        }
        // One channel over the whole batch: its frozen modules may fold into the weights for
        // the pass, which then runs as fast as the bare model's.
        if let [channel] = &self.channels[..] {
            if let Some(merged) = composition.merged_linear(&channel.setup, layer, site, base) {
                return Some(LinearChange::Weights(merged));
            }
        }
        Some(LinearChange::Apply(Box::new(
            move |x: &Tensor, out: Tensor, mode: &mut Mode| {
                let rows = out.dim(0)?;
                if let [channel] = &self.channels[..] {
                    if channel.rows == (0..rows) {
                        return composition.change_linear(
                            &channel.setup,
                            layer,
                            site,
                            x,
                            out,
                            mode,
                        );
                    }
                }
                let mut outputs = Vec::with_capacity(self.channels.len());
                for channel in &self.channels {
                    let (start, len) = (channel.rows.start, channel.rows.len());
                    let (x, out) = (x.narrow(0, start, len)?, out.narrow(0, start, len)?);
                    outputs.push(composition.change_linear(
                        &channel.setup,
                        layer,
                        site,
                        &x,
                        out,
                        mode,
                    )?);
                }
                Tensor::cat(&outputs, 0)
            },
        )))
    }

    fn sub_layer_output(
        &self,
        layer: usize,
        position: Position,
        hidden: &Tensor,
        input: &Tensor,
        layer_norm: &LayerNorm,
        mode: &mut Mode,
    ) -> CandleResult<Tensor> {
        let composition = self.composition;
        let rows = hidden.dim(0)?;
        let own = |i: usize| {
            let own: Option<&EncoderLayerNorms> = self.layer_norms[i];
            own.map_or(layer_norm, |n| &n.layers[layer][position.index()])
        };
        if let [channel] = &self.channels[..] {
            if channel.rows == (0..rows) {
                let place = Place {
                    layer,
                    position,
                    input,
                    layer_norm: own(0),
                };
                return composition.run_channel(&channel.setup, hidden, &place, mode);
            }
        }
        // No adapter of any channel here and no LayerNorms of their own: the base model's
        // sub-layer, once for all rows (layers that every adapter drops are shared so).
        let names = || self.channels.iter().flat_map(|c| c.setup.names());
        if self.layer_norms.iter().all(Option::is_none)
            && names().all(|n| composition.adapter(n, layer, position).is_none())
        {
            return layer_norm.of_sum(&[hidden, input]);
        }
        if let Some(out) = composition.grouped_output(
            &self.channels,
            &self.layer_norms,
            layer,
            position,
            hidden,
            input,
            layer_norm,
            mode,
        ) {
            return out;
        }
        let mut outputs = Vec::with_capacity(self.channels.len());
        for (i, channel) in self.channels.iter().enumerate() {
            let (start, len) = (channel.rows.start, channel.rows.len());
            let input = input.narrow(0, start, len)?;
            let place = Place {
                layer,
                position,
                input: &input,
                layer_norm: own(i),
            };
            let hidden = hidden.narrow(0, start, len)?;
            outputs.push(composition.run_channel(&channel.setup, &hidden, &place, mode)?);
        }
        Tensor::cat(&outputs, 0)
    }
}
