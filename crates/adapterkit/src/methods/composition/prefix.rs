//! Prefix tuning in a composition: each channel's prefixes put in front of its own rows' keys
//! and values, those of a stack in AdapterHub's order (each adapter's in front of what the ones
//! before it put there). A channel whose prefixes are shorter (or absent) is padded in front
//! with positions the attention mask hides, so each channel attends to exactly what its setup
//! alone would. (AdapterHub 1.3 pads with the pad token's id and, for BERT's additive mask, a
//! mask value of 1.0, which leaves the padding attended; docs/ARCHITECTURE.md.)

use candle_core::{DType, Result, Tensor};

use super::{ChannelHooks, Composition, Setup};
use crate::error::{Error, Result as AdapterResult};
use crate::methods::prefix_tuning::PrefixTuning;
use crate::model::hooks::KeyValuePrefix;
use crate::model::Mode;

impl Composition {
    /// The prefix tunings a channel's setup (which holds no Parallel or BatchSplit) runs, in
    /// the order they are put in front of the keys: a stack's first adapter first.
    pub(super) fn channel_prefixes(&self, setup: &Setup) -> Vec<&PrefixTuning> {
        match setup {
            Setup::Adapter(name) => (self.adapters.get(name))
                .and_then(|a| a.prefix_tuning())
                .into_iter()
                .collect(),
            Setup::Stack(children) => (children.iter())
                .flat_map(|c| self.channel_prefixes(c))
                .collect(),
            // `new` refuses prefixes under Average and Fuse, unless alone.
            _ => match setup.single_adapter() {
                Some(name) => self.channel_prefixes(&Setup::Adapter(name.to_string())),
                None => Vec::new(),
            },
        }
    }

    /// Whether some adapter of `setup` holds a prefix at `layer`.
    pub(super) fn prefix_at(&self, setup: &Setup, layer: usize) -> bool {
        (setup.names().into_iter())
            .filter_map(|n| self.adapters.get(n)?.prefix_tuning())
            .any(|p| p.runs_at(layer))
    }

    /// Refuses a prefix tuning averaged with other adapters, whose keys and values an average
    /// does not define (AdapterHub 1.3 raises `NotImplementedError`). A fusion refuses it as
    /// it refuses every adapter that is not a bottleneck adapter alone.
    pub(super) fn check_prefixes(&self) -> AdapterResult<()> {
        let mut averaged: Vec<&str> = Vec::new();
        self.setup.visit(&mut |s| {
            if matches!(s, Setup::Average { .. }) && s.single_adapter().is_none() {
                averaged.extend(s.names());
            }
        });
        let prefix =
            |n: &&str| (self.adapters.get(*n)).is_some_and(|a| a.prefix_tuning().is_some());
        let averaged = averaged.into_iter().find(prefix);
        match averaged {
            Some(name) => Err(Error::input(format!(
                "the setup {} averages the prefix tuning '{name}' with other adapters: an \
                 average of prefixes is not defined (AdapterHub refuses it too); stack it or \
                 run it in its own parallel or batch_split channel",
                self.setup
            ))),
            None => Ok(()),
        }
    }
}

impl ChannelHooks<'_> {
    /// Each channel's prefixes at `layer` for its rows of `input` (gated by them), in front of
    /// its keys and values; `None` when no channel has one there.
    pub(super) fn prefixes(
        &self,
        layer: usize,
        input: &Tensor,
        mode: &mut Mode,
    ) -> Result<Option<KeyValuePrefix>> {
        // Each channel's prefixes for its rows, the last adapter's in front.
        let mut parts: Vec<Vec<KeyValuePrefix>> = Vec::with_capacity(self.channels.len());
        for channel in &self.channels {
            let rows = input.narrow(0, channel.rows.start, channel.rows.len())?;
            let mut own = Vec::new();
            for prefix in self
                .composition
                .channel_prefixes(&channel.setup)
                .iter()
                .rev()
            {
                own.extend(prefix.key_value_prefix(layer, &rows, mode)?);
            }
            parts.push(own);
        }
        if parts.iter().all(Vec::is_empty) {
            return Ok(None);
        }
        let lengths = (parts.iter())
            .map(|own| own.iter().map(|p| p.keys.dim(1)).sum::<Result<usize>>())
            .collect::<Result<Vec<_>>>()?;
        let longest = lengths.iter().copied().max().unwrap_or(0);
        let (_, _, hidden) = input.dims3()?;
        let device = input.device();
        let (mut keys, mut values, mut biases) = (Vec::new(), Vec::new(), Vec::new());
        for ((channel, parts), own) in self.channels.iter().zip(&parts).zip(lengths) {
            let rows = channel.rows.len();
            let pad = longest - own;
            let padded = |pick: fn(&KeyValuePrefix) -> &Tensor| -> Result<Tensor> {
                let mut all = Vec::with_capacity(parts.len() + 1);
                if pad > 0 {
                    all.push(Tensor::zeros((rows, pad, hidden), DType::F32, device)?);
                }
                all.extend(parts.iter().map(|p| pick(p).clone()));
                Tensor::cat(&all, 1)
            };
            keys.push(padded(|p| &p.keys)?);
            values.push(padded(|p| &p.values)?);
            let hidden_positions = Tensor::full(f32::MIN, pad, device)?;
            let shown = Tensor::zeros(own, DType::F32, device)?;
            let bias = Tensor::cat(&[&hidden_positions, &shown], 0)?;
            biases.push(
                bias.reshape((1, 1, 1, longest))?
                    .expand((rows, 1, 1, longest))?,
            );
        }
        Ok(Some(KeyValuePrefix {
            keys: Tensor::cat(&keys, 0)?,
            values: Tensor::cat(&values, 0)?,
            bias: Tensor::cat(&biases, 0)?,
        }))
    }
}
