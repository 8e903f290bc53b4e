//! What a channel's setup does to one Linear: the LoRA and (IA)³ modules of its adapters, as
//! AdapterHub's `LoRALinear` composes them. Each module's output is the next one's input in a
//! Stack (a stack of LoRAs chains, it does not sum), Average takes the weighted sum of its
//! children's, and the last module that ran joins the result with the Linear's output (added
//! for a LoRA, multiplied for (IA)³).

use candle_core::{Result, Tensor};

use super::{Composition, Setup};
use crate::methods::lora::{self, CompositionMode};
use crate::model::hooks::LinearSite;
use crate::model::Mode;

/// What the modules so far made, and how the last of them joins the Linear's output.
struct Chain {
    hidden: Option<Tensor>,
    last: Option<CompositionMode>,
}

impl Composition {
    /// Whether any adapter `setup` names has a module on `site`'s Linear in `layer`.
    pub(super) fn changes_linear(&self, setup: &Setup, layer: usize, site: LinearSite) -> bool {
        setup.names().into_iter().any(|name| {
            let lora = self.adapters.get(name).and_then(|a| a.lora());
            lora.is_some_and(|l| l.get(layer, site).is_some())
        })
    }

    /// The Linear's output `out` on input `x` as a channel running `setup` changes it.
    pub(super) fn change_linear(
        &self,
        setup: &Setup,
        layer: usize,
        site: LinearSite,
        x: &Tensor,
        out: Tensor,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let start = Chain {
            hidden: None,
            last: None,
        };
        match self.chain(setup, layer, site, x, start, mode)? {
            Chain {
                hidden: Some(hidden),
                last: Some(last),
            } => lora::compose(out, &hidden, last),
            _ => Ok(out),
        }
    }

    fn chain(
        &self,
        setup: &Setup,
        layer: usize,
        site: LinearSite,
        x: &Tensor,
        chain: Chain,
        mode: &mut Mode,
    ) -> Result<Chain> {
        match setup {
            Setup::Adapter(name) => {
                let lora = self.adapters.get(name).and_then(|a| a.lora());
                let Some((lora, module)) = lora.and_then(|l| Some((l, l.get(layer, site)?))) else {
                    return Ok(chain);
                };
                Ok(Chain {
                    hidden: Some(module.forward(&lora.config, x, chain.hidden, mode)?),
                    last: Some(lora.config.composition_mode),
                })
            }
            Setup::Stack(children) => children.iter().try_fold(chain, |chain, child| {
                self.chain(child, layer, site, x, chain, mode)
            }),
            Setup::Average { children, weights } => {
                let mut parts = Vec::new();
                for child in children {
                    let before = Chain {
                        hidden: chain.hidden.clone(),
                        last: chain.last,
                    };
                    parts.push(self.chain(child, layer, site, x, before, mode)?);
                }
                let modes: Vec<CompositionMode> = parts.iter().filter_map(|p| p.last).collect();
                let Some(&last) = modes.last() else {
                    return Ok(chain);
                };
                if modes.iter().any(|m| *m != last) {
                    candle_core::bail!(
                        "{setup} at layer {layer} ({}): it averages a LoRA with an (IA)³ \
                         vector, which join the Linear's output differently",
                        site.module()
                    );
                }
                // A child that changed nothing passes on what it was given; with nothing
                // given, it is the identity of the join (no update, or a scale of one).
                let mut sum: Option<Tensor> = None;
                for (part, w) in parts.iter().zip(weights) {
                    let term = match (&part.hidden, last) {
                        (Some(h), _) => (h * *w)?,
                        (None, CompositionMode::Add) => continue,
                        (None, CompositionMode::Scale) => Tensor::new(*w as f32, x.device())?,
                    };
                    sum = Some(match sum {
                        Some(s) => s.broadcast_add(&term)?,
                        None => term,
                    });
                }
                Ok(Chain {
                    hidden: sum,
                    last: Some(last),
                })
            }
            // A fusion weighs bottleneck adapters only (checked in `Composition::new`).
            Setup::Fuse(_) => Ok(chain),
            Setup::Parallel(_) | Setup::BatchSplit { .. } => candle_core::bail!(
                "{setup} runs only after the batch is handed out in channels (Setup::channels)"
            ),
        }
    }
}
