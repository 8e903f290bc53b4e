//! What a channel's setup does to one Linear: the LoRA and (IA)³ modules of its adapters, as
//! AdapterHub's `LoRALinear` composes them. Each module's output is the next one's input in a
//! Stack (a stack of LoRAs chains, it does not sum), Average takes the weighted sum of its
//! children's, and the last module that ran joins the result with the Linear's output (added
//! for a LoRA, multiplied for (IA)³).

use candle_core::{Result, Tensor};
use candle_nn::Linear;

use super::{Composition, Setup};
use crate::methods::lora::{self, CompositionMode};
use crate::model::hooks::LinearSite;
use crate::model::Mode;

/// What a chain of frozen modules makes of a Linear's input `x`, `U V x + constant` (`U`
/// `[out, k]`, `V` `[k, in]`, `constant` `[out]`; either part may be absent): every module is
/// affine in what it is given (a LoRA multiplies it by `B A · scaling`, an (IA)³ vector scales
/// its rows), so a chain is. The matrix stays in low-rank factors, so a chain costs
/// `out · in · k`, not `out · in · in`, per module.
#[derive(Clone)]
struct Affine {
    matrix: Option<(Tensor, Tensor)>,
    constant: Option<Tensor>,
}

/// [`Affine`] chains and the last module's way of joining the Linear's output.
#[derive(Clone)]
struct AffineChain {
    hidden: Option<Affine>,
    last: Option<CompositionMode>,
}

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

    /// The Linear with `setup`'s modules on it folded in, when they are frozen, without
    /// dropout, and join the output as an affine map of `x` would: a chain of LoRAs (added),
    /// a chain of (IA)³ vectors (scaling), weighted sums of those, a LoRA of an (IA)³ vector.
    /// `None` otherwise (a scale that depends on `x`, such as `stack(lora, ia3)`).
    pub(super) fn merged_linear(
        &self,
        setup: &Setup,
        layer: usize,
        site: LinearSite,
        base: &Linear,
    ) -> Option<Linear> {
        let start = AffineChain {
            hidden: None,
            last: None,
        };
        let chain = self.affine(setup, layer, site, start).ok()??;
        let (Some(hidden), Some(last)) = (chain.hidden, chain.last) else {
            return Some(base.clone());
        };
        let fold = || -> Result<Option<Linear>> {
            let (weight, bias) = (base.weight(), base.bias());
            Ok(match last {
                CompositionMode::Add => {
                    let weight = match &hidden.matrix {
                        Some((u, v)) => (weight + u.matmul(v)?)?,
                        None => weight.clone(),
                    };
                    let bias = match (bias, &hidden.constant) {
                        (Some(b), Some(c)) => Some((b + c)?),
                        (b, _) => b.cloned(),
                    };
                    Some(Linear::new(weight, bias))
                }
                CompositionMode::Scale => match (&hidden.matrix, &hidden.constant) {
                    (None, Some(v)) => Some(Linear::new(
                        weight.broadcast_mul(&v.unsqueeze(1)?)?,
                        bias.map(|b| b * v).transpose()?,
                    )),
                    _ => None,
                },
            })
        };
        fold().ok().flatten()
    }

    /// [`chain`](Self::chain) as affine maps; `Ok(None)` when it is not one.
    fn affine(
        &self,
        setup: &Setup,
        layer: usize,
        site: LinearSite,
        chain: AffineChain,
    ) -> Result<Option<AffineChain>> {
        match setup {
            Setup::Adapter(name) => {
                let lora = self.adapters.get(name).and_then(|a| a.lora());
                let Some((lora, module)) = lora.and_then(|l| Some((l, l.get(layer, site)?))) else {
                    return Ok(Some(chain));
                };
                if !module.folds() || lora.config.dropout > 0.0 {
                    return Ok(None);
                }
                let scaling = lora.config.scaling();
                let hidden = match (module.matrices(), chain.hidden) {
                    // LoRA: `B A · scaling` times what it is given (x itself at first).
                    ((Some(a), b), before) => {
                        let b = (b * scaling)?;
                        match before {
                            None => Affine {
                                matrix: Some((b, a.clone())),
                                constant: None,
                            },
                            Some(before) => Affine {
                                matrix: before
                                    .matrix
                                    .map(|(u, v)| {
                                        Ok::<_, candle_core::Error>((b.matmul(&a.matmul(&u)?)?, v))
                                    })
                                    .transpose()?,
                                constant: before
                                    .constant
                                    .map(|c| b.matmul(&a.matmul(&c.unsqueeze(1)?)?)?.squeeze(1))
                                    .transpose()?,
                            },
                        }
                    }
                    // (IA)³: the vector `l · scaling` scales what it is given, or is it.
                    ((None, b), before) => {
                        let scale = (b.flatten_all()? * scaling)?;
                        match before {
                            None => Affine {
                                matrix: None,
                                constant: Some(scale),
                            },
                            Some(before) => Affine {
                                matrix: before
                                    .matrix
                                    .map(|(u, v)| {
                                        Ok::<_, candle_core::Error>((
                                            u.broadcast_mul(&scale.unsqueeze(1)?)?,
                                            v,
                                        ))
                                    })
                                    .transpose()?,
                                constant: before.constant.map(|c| c * &scale).transpose()?,
                            },
                        }
                    }
                };
                Ok(Some(AffineChain {
                    hidden: Some(hidden),
                    last: Some(lora.config.composition_mode),
                }))
            }
            Setup::Stack(children) => {
                let mut chain = chain;
                for child in children {
                    match self.affine(child, layer, site, chain)? {
                        Some(next) => chain = next,
                        None => return Ok(None),
                    }
                }
                Ok(Some(chain))
            }
            Setup::Average { children, weights } => {
                let mut parts = Vec::new();
                for child in children {
                    match self.affine(child, layer, site, chain.clone())? {
                        Some(part) => parts.push(part),
                        None => return Ok(None),
                    }
                }
                let modes: Vec<CompositionMode> = parts.iter().filter_map(|p| p.last).collect();
                let Some(&last) = modes.last() else {
                    return Ok(Some(chain));
                };
                if modes.iter().any(|m| *m != last) {
                    return Ok(None); // the node-by-node path names the problem
                }
                // Factors side by side: `Σ w_i U_i V_i = [w_1 U_1 | w_2 U_2 ...] [V_1; V_2 ...]`.
                let (mut us, mut vs, mut constant) = (Vec::new(), Vec::new(), None::<Tensor>);
                for (part, w) in parts.iter().zip(weights) {
                    let term = match (&part.hidden, last) {
                        (Some(h), _) => {
                            if let Some((u, v)) = &h.matrix {
                                us.push((u * *w)?);
                                vs.push(v.clone());
                            }
                            h.constant.as_ref().map(|c| c * *w).transpose()?
                        }
                        (None, CompositionMode::Add) => None,
                        (None, CompositionMode::Scale) => {
                            Some(Tensor::new(*w as f32, &candle_core::Device::Cpu)?)
                        }
                    };
                    if let Some(term) = term {
                        constant = Some(match constant {
                            Some(c) => c.broadcast_add(&term)?,
                            None => term,
                        });
                    }
                }
                let matrix = match us.is_empty() {
                    true => None,
                    false => Some((Tensor::cat(&us, 1)?, Tensor::cat(&vs, 0)?)),
                };
                Ok(Some(AffineChain {
                    hidden: Some(Affine { matrix, constant }),
                    last: Some(last),
                }))
            }
            Setup::Fuse(_) => Ok(Some(chain)),
            Setup::Parallel(_) | Setup::BatchSplit { .. } => Ok(None),
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
