//! Running a composition setup ([`Setup`], in `setup.rs`) at each adapter place, as
//! AdapterHub's `compose_*` of `BottleneckLayer` do.

mod setup;

pub use setup::Setup;

use std::collections::BTreeMap;

use candle_core::{Result as CandleResult, Tensor};

use crate::error::{Error, Result};
use crate::methods::bottleneck::{BottleneckAdapter, BottleneckAdapters};
use crate::methods::fusion::Fusion;
use crate::model::hooks::{LayerHooks, Position};
use crate::model::layer_norm::LayerNorm;
use crate::model::Mode;

/// A setup with the adapters and fusion layers it names: the hooks that run it.
#[derive(Debug, Clone)]
pub struct Composition {
    pub setup: Setup,
    pub adapters: BTreeMap<String, BottleneckAdapters>,
    /// Fusion layers by name (`a,b`), for the setup's `Fuse` blocks.
    pub fusions: BTreeMap<String, Fusion>,
}

/// What flows through the blocks at one adapter place (AdapterHub's `BottleneckState`).
#[derive(Clone)]
struct State {
    hidden: Tensor,
    /// The sub-layer's input (the transformer's residual).
    input: Tensor,
    /// The adapters' skip connection.
    residual: Tensor,
    /// The last adapter's up-projection (what a fusion attends over).
    up: Option<Tensor>,
    last: Option<String>,
}

impl State {
    fn slice(&self, start: usize, len: usize) -> CandleResult<Self> {
        Ok(Self {
            hidden: self.hidden.narrow(0, start, len)?,
            input: self.input.narrow(0, start, len)?,
            residual: self.residual.narrow(0, start, len)?,
            up: self
                .up
                .as_ref()
                .map(|u| u.narrow(0, start, len))
                .transpose()?,
            last: self.last.clone(),
        })
    }

    /// Joins the states of consecutive row slices of `whole` (Parallel, BatchSplit). Children
    /// never change the sub-layer input, so `whole`'s is kept; nothing reads `up` after such a
    /// block (a Fuse holds only adapters and stacks), so it is dropped.
    fn join(whole: State, parts: Vec<State>) -> CandleResult<Self> {
        let cat =
            |f: &dyn Fn(&State) -> Tensor| Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0);
        Ok(Self {
            hidden: cat(&|s| s.hidden.clone())?,
            residual: cat(&|s| s.residual.clone())?,
            up: None,
            last: parts.iter().rev().find_map(|s| s.last.clone()),
            input: whole.input,
        })
    }
}

impl Composition {
    /// Checks that every adapter and fusion the setup names is given.
    pub fn new(
        setup: Setup,
        adapters: BTreeMap<String, BottleneckAdapters>,
        fusions: BTreeMap<String, Fusion>,
    ) -> Result<Self> {
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
        setup.visit(&mut |s| {
            if let Setup::Fuse(children) = s {
                fuse_names.push(Setup::fusion_name(children));
            }
        });
        if let Some(missing) = fuse_names.iter().find(|n| !fusions.contains_key(*n)) {
            return Err(Error::input(format!(
                "the setup {setup} fuses '{missing}', but no fusion of those adapters is loaded"
            )));
        }
        Ok(Self {
            setup,
            adapters,
            fusions,
        })
    }

    /// The adapter `name` at this place, unless absent there or skipped (AdapterDrop).
    fn adapter(&self, name: &str, layer: usize, position: Position) -> Option<&BottleneckAdapter> {
        let adapters = self.adapters.get(name)?;
        if adapters.skip_layers.contains(&layer) {
            return None;
        }
        adapters.get(layer, position)
    }

    /// The lowest layer where any adapter of the setup runs: below it the model is the base
    /// model, which parallel channels can share.
    pub fn lowest_active_layer(&self, layers: usize) -> Option<usize> {
        let names = self.setup.names();
        (0..layers).find(|&layer| {
            names.iter().any(|n| {
                Position::BOTH
                    .iter()
                    .any(|p| self.adapter(n, layer, *p).is_some())
            })
        })
    }

    /// AdapterHub's `pre_block`: the first adapter (of `setup`) that is present prepares the
    /// input and the skip connection.
    fn pre_block(
        &self,
        setup: &Setup,
        state: State,
        at: (usize, Position),
        layer_norm: &LayerNorm,
    ) -> CandleResult<State> {
        let first = setup
            .names()
            .into_iter()
            .find_map(|n| self.adapter(n, at.0, at.1));
        let Some(first) = first else {
            return Ok(state);
        };
        let pre = first.pre_forward(&state.hidden, &state.input, layer_norm, false)?;
        Ok(State {
            hidden: pre.x,
            residual: pre.residual,
            ..state
        })
    }

    fn single(
        &self,
        name: &str,
        state: State,
        at: (usize, Position),
        mode: &mut Mode,
    ) -> CandleResult<State> {
        let Some(adapter) = self.adapter(name, at.0, at.1) else {
            return Ok(state);
        };
        let (hidden, up) = adapter.bottleneck(&state.hidden, &state.residual, mode)?;
        Ok(State {
            hidden,
            up: Some(up),
            last: Some(name.to_string()),
            ..state
        })
    }

    /// Runs `setup` (a whole setup or one child of a block): an adapter as it is, a block by
    /// its rule.
    fn compose(
        &self,
        setup: &Setup,
        state: State,
        at: (usize, Position),
        layer_norm: &LayerNorm,
        mode: &mut Mode,
    ) -> CandleResult<State> {
        match setup {
            Setup::Adapter(name) => self.single(name, state, at, mode),
            Setup::Stack(children) => {
                let mut state = state;
                for child in children {
                    if let Setup::Adapter(_) = child {
                        state = self.pre_block(child, state, at, layer_norm)?;
                    }
                    state = self.compose(child, state, at, layer_norm, mode)?;
                }
                Ok(state)
            }
            Setup::Fuse(children) => self.fuse(children, state, at, layer_norm, mode),
            Setup::Parallel(children) => {
                let batch = state.hidden.dim(0)?;
                if batch % children.len() != 0 {
                    candle_core::bail!(
                        "a parallel block of {} needs the batch replicated per child, got {batch} rows",
                        children.len()
                    );
                }
                let rows = batch / children.len();
                let state = self.pre_block(setup, state, at, layer_norm)?;
                let states = children
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        self.compose(c, state.slice(i * rows, rows)?, at, layer_norm, mode)
                    })
                    .collect::<CandleResult<Vec<_>>>()?;
                State::join(state, states)
            }
            Setup::BatchSplit {
                children,
                batch_sizes,
            } => {
                let batch = state.hidden.dim(0)?;
                if batch_sizes.iter().sum::<usize>() != batch {
                    candle_core::bail!(
                        "batch_split sizes {batch_sizes:?} do not add up to the batch of {batch}"
                    );
                }
                let state = self.pre_block(setup, state, at, layer_norm)?;
                let mut start = 0;
                let mut states = Vec::new();
                for (child, &rows) in children.iter().zip(batch_sizes) {
                    states.push(self.compose(
                        child,
                        state.slice(start, rows)?,
                        at,
                        layer_norm,
                        mode,
                    )?);
                    start += rows;
                }
                State::join(state, states)
            }
            Setup::Average { children, weights } => {
                let state = self.pre_block(setup, state, at, layer_norm)?;
                let states = children
                    .iter()
                    .map(|c| self.compose(c, state.clone(), at, layer_norm, mode))
                    .collect::<CandleResult<Vec<_>>>()?;
                // AdapterHub 1.3 takes `mean(stack(w_i * h_i))`: the normalised weights are
                // divided by the number of children once more. Matched for interoperability.
                let mut sum = (&states[0].hidden * weights[0])?;
                for (s, w) in states.iter().zip(weights).skip(1) {
                    sum = (sum + (&s.hidden * *w)?)?;
                }
                let first = states[0].clone();
                Ok(State {
                    hidden: (sum / states.len() as f64)?,
                    last: states.iter().rev().find_map(|s| s.last.clone()),
                    ..first
                })
            }
        }
    }

    /// AdapterHub's `compose_fuse`: the last adapter prepares the input and the query, each
    /// child runs on it, the fusion layer weighs their up-projections.
    fn fuse(
        &self,
        children: &[Setup],
        state: State,
        at: (usize, Position),
        layer_norm: &LayerNorm,
        mode: &mut Mode,
    ) -> CandleResult<State> {
        let name = Setup::fusion_name(children);
        let fusion = &self.fusions[&name];
        let last = children.last().expect("validated").last();
        let (Some(last_adapter), Some(layer)) =
            (self.adapter(last, at.0, at.1), fusion.layer(at.0, at.1))
        else {
            return Ok(state);
        };
        let pre = last_adapter.pre_forward(
            &state.hidden,
            &state.input,
            layer_norm,
            fusion.config.query_before_ln,
        )?;
        let state = State {
            hidden: pre.x,
            residual: pre.residual,
            ..state
        };
        let mut ups = Vec::new();
        for child in children {
            if let Some(up) = self.compose(child, state.clone(), at, layer_norm, mode)?.up {
                ups.push(up);
            }
        }
        let (hidden, _) =
            layer.forward(&pre.query, &Tensor::stack(&ups, 2)?, &state.residual, mode)?;
        Ok(State {
            hidden,
            last: Some(last.to_string()),
            ..state
        })
    }
}

impl LayerHooks for Composition {
    fn sub_layer_output(
        &self,
        layer: usize,
        position: Position,
        hidden: &Tensor,
        input: &Tensor,
        layer_norm: &LayerNorm,
        mode: &mut Mode,
    ) -> CandleResult<Tensor> {
        let state = State {
            hidden: hidden.clone(),
            input: input.clone(),
            residual: input.clone(),
            up: None,
            last: None,
        };
        let state = self.compose(&self.setup, state, (layer, position), layer_norm, mode)?;
        match state
            .last
            .as_deref()
            .and_then(|n| self.adapter(n, layer, position))
        {
            // AdapterHub finishes with the last adapter's `post_forward`, for every channel.
            Some(last) => last.post_forward(state.hidden, hidden, &state.input, layer_norm),
            None => layer_norm.of_sum(&[hidden, input]),
        }
    }
}
