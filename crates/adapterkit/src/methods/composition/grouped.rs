//! Channels that each run one plain bottleneck adapter (a `batch_split` or `parallel` of
//! adapters, as `adapterkit serve` runs them) as one op per place
//! ([`GroupedBottleneckOp`]), in evaluation: what each channel's adapter computes alone, with
//! its own LayerNorms if it brings them.

use candle_core::{Result, Tensor};

use super::{Channel, Composition};
use crate::kernels::fused::FrozenLinear;
use crate::kernels::grouped_bottleneck::{GroupedBottleneckOp, Residual, Slice};
use crate::methods::bottleneck_config::ResidualBeforeLn;
use crate::model::hooks::Position;
use crate::model::layer_norm::{EncoderLayerNorms, LayerNorm};
use crate::model::ops::fused_applies;
use crate::model::Mode;

impl Composition {
    /// Whether the channels of a batch of `rows` rows run as one op at this place (in
    /// evaluation, on CPU in f32).
    pub fn grouped_at(&self, rows: usize, layer: usize, position: Position) -> crate::Result<bool> {
        let hooks = self.on_rows(rows)?;
        let base = LayerNorm {
            weight: Tensor::ones(1, candle_core::DType::F32, &candle_core::Device::Cpu)?,
            bias: Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu)?,
            eps: 1e-12,
        };
        let norms = vec![None; hooks.channels().len()];
        Ok(self
            .grouped_op(hooks.channels(), &norms, layer, position, &base, 1)
            .is_some())
    }

    /// The op that runs every channel's adapter at this place, when there are several channels,
    /// each runs one adapter alone, and the adapters here are plain
    /// ([`BottleneckAdapter::plain_parts`](crate::methods::bottleneck::BottleneckAdapter::plain_parts),
    /// frozen) and read their input and skip connection alike; `None` otherwise.
    fn grouped_op(
        &self,
        channels: &[Channel],
        layer_norms: &[Option<&EncoderLayerNorms>],
        layer: usize,
        position: Position,
        layer_norm: &LayerNorm,
        seq: usize,
    ) -> Option<GroupedBottleneckOp> {
        if channels.len() < 2 {
            return None;
        }
        let mut shape = None;
        let mut slices = Vec::with_capacity(channels.len());
        for (channel, own) in channels.iter().zip(layer_norms) {
            let name = channel.setup.single_adapter()?;
            let norm = own.map_or(layer_norm, |n| &n.layers[layer][position.index()]);
            let adapter = match self.adapter(name, layer, position) {
                None => None,
                Some(adapter) => {
                    let c = adapter.config();
                    let (down, up) = adapter.plain_parts()?;
                    let residual = match c.residual_before_ln {
                        ResidualBeforeLn::Flag(true) => Residual::Hidden,
                        ResidualBeforeLn::PostAdd(_) => Residual::Sum,
                        ResidualBeforeLn::Flag(false) => Residual::Normed,
                    };
                    let this = (c.original_ln_before, residual, c.non_linearity);
                    match shape {
                        None => shape = Some(this),
                        Some(s) if s == this => {}
                        Some(_) => return None,
                    }
                    let (down, up) = (FrozenLinear::of(down)?, FrozenLinear::of(up)?);
                    Some((down, up, c.scaling as f32))
                }
            };
            slices.push(Slice {
                rows: channel.rows.start * seq..channel.rows.end * seq,
                adapter,
                norm: (norm.weight.clone(), norm.bias.clone()),
            });
        }
        let (norm_before, residual, activation) = shape?;
        Some(GroupedBottleneckOp {
            slices,
            activation,
            norm_before,
            residual,
            eps: layer_norm.eps,
        })
    }

    /// Every channel's adapter at this place as one op, if [`grouped_op`](Self::grouped_op)
    /// allows it (and grouping is on, in evaluation, on CPU in f32); `None`: the channels run
    /// one by one.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn grouped_output(
        &self,
        channels: &[Channel],
        layer_norms: &[Option<&EncoderLayerNorms>],
        layer: usize,
        position: Position,
        hidden: &Tensor,
        input: &Tensor,
        layer_norm: &LayerNorm,
        mode: &Mode,
    ) -> Option<Result<Tensor>> {
        let frozen = !layer_norm.weight.track_op() && !layer_norm.bias.track_op();
        if !self.group_adapters || !matches!(mode, Mode::Eval) || !fused_applies(hidden) || !frozen
        {
            return None;
        }
        let seq = hidden.dims().get(1).copied()?;
        let op = self.grouped_op(channels, layer_norms, layer, position, layer_norm, seq)?;
        Some((|| {
            hidden.contiguous()?.apply_op2(&input.contiguous()?, op)
        })())
    }
}
