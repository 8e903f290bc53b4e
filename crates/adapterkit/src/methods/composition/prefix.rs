//! Prefix tuning in a composition: each channel's prefix prepended to its own rows' keys and
//! values. A channel whose prefix is shorter (or absent) is padded in front with positions the
//! attention mask hides, so each channel attends to exactly what its adapter alone would.
//! (AdapterHub 1.3 pads with the pad token's id and, for BERT's additive mask, a mask value of
//! 1.0, which leaves the padding attended; docs/ARCHITECTURE.md.)

use candle_core::{DType, Result, Tensor};

use super::{ChannelHooks, Composition, Setup};
use crate::methods::prefix_tuning::PrefixTuning;
use crate::model::hooks::{KeyValue, KeyValueChange};
use crate::model::Mode;

impl Composition {
    /// The prefix tuning of the adapter a channel runs alone, if it has one.
    pub(super) fn channel_prefix(&self, setup: &Setup) -> Option<&PrefixTuning> {
        self.adapters.get(setup.single_adapter()?)?.prefix_tuning()
    }

    /// Whether some adapter of `setup` holds a prefix at `layer`.
    pub(super) fn prefix_at(&self, setup: &Setup, layer: usize) -> bool {
        (setup.names().into_iter())
            .filter_map(|n| self.adapters.get(n)?.prefix_tuning())
            .any(|p| p.runs_at(layer))
    }
}

impl ChannelHooks<'_> {
    /// Each channel's prefix at `layer`, prepended to its rows; `None` when no channel has one.
    pub(super) fn prefixes(&self, layer: usize) -> Option<KeyValueChange<'_>> {
        let composition = self.composition;
        let prefixes: Vec<Option<&PrefixTuning>> = (self.channels.iter())
            .map(|c| {
                composition
                    .channel_prefix(&c.setup)
                    .filter(|p| p.runs_at(layer))
            })
            .collect();
        if prefixes.iter().all(Option::is_none) {
            return None;
        }
        Some(Box::new(move |kv: KeyValue, mode: &mut Mode| {
            let (_, _, hidden) = kv.key.dims3()?;
            // Each channel's prefix for its rows, gated by its rows' input.
            let mut parts = Vec::with_capacity(prefixes.len());
            for (channel, prefix) in self.channels.iter().zip(&prefixes) {
                let part = match prefix.map(|p| (p, p.at(layer, mode))) {
                    Some((p, Some(kv_prefix))) => {
                        let (keys, values) = kv_prefix?;
                        let rows = channel.rows.clone();
                        let input = kv.input.narrow(0, rows.start, rows.len())?;
                        Some(p.for_rows(layer, &keys, &values, &input)?)
                    }
                    _ => None,
                };
                parts.push(part);
            }
            let longest = (parts.iter().flatten())
                .map(|(k, _)| k.dim(1))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .max()
                .unwrap_or(0);
            let device = kv.key.device();
            let (mut keys, mut values, mut biases) = (Vec::new(), Vec::new(), Vec::new());
            for (channel, part) in self.channels.iter().zip(&parts) {
                let rows = channel.rows.len();
                let own = match part {
                    Some((k, _)) => k.dim(1)?,
                    None => 0,
                };
                let pad = longest - own;
                let padded = |t: Option<&Tensor>| -> Result<Tensor> {
                    let zeros = Tensor::zeros((rows, pad, hidden), DType::F32, device)?;
                    match t {
                        Some(t) => Tensor::cat(&[&zeros, t], 1),
                        None => Ok(zeros),
                    }
                };
                keys.push(padded(part.as_ref().map(|(k, _)| k))?);
                values.push(padded(part.as_ref().map(|(_, v)| v))?);
                let hidden_positions = Tensor::full(f32::MIN, pad, device)?;
                let shown = Tensor::zeros(own, DType::F32, device)?;
                let bias = Tensor::cat(&[&hidden_positions, &shown], 0)?;
                biases.push(
                    bias.reshape((1, 1, 1, longest))?
                        .expand((rows, 1, 1, longest))?,
                );
            }
            let bias = Tensor::cat(&biases, 0)?.to_dtype(kv.bias.dtype())?;
            Ok(KeyValue {
                key: Tensor::cat(&[&Tensor::cat(&keys, 0)?, &kv.key], 1)?,
                value: Tensor::cat(&[&Tensor::cat(&values, 0)?, &kv.value], 1)?,
                bias: Tensor::cat(&[&bias, &kv.bias], 3)?,
                input: kv.input,
            })
        }))
    }
}
