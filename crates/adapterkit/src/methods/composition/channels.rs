//! Handing the batch out: which rows of the (replicated) batch each part of a setup runs on.
//! A channel is some rows and a setup with no Parallel or BatchSplit left in it, so that each
//! channel can run as its setup alone would ([`super::ChannelHooks`]).

use std::ops::Range;

use super::Setup;
use crate::error::{Error, Result};

/// Some rows of the batch the encoder runs (replicated once per parallel channel) and the
/// setup that runs them, which holds no Parallel or BatchSplit block any more.
#[derive(Debug, Clone, PartialEq)]
pub struct Channel {
    pub rows: Range<usize>,
    pub setup: Setup,
}

impl Setup {
    /// The head a channel's output goes to (see [`channels`](Self::channels)): the one named
    /// after its last adapter, or after the fusion that ends it.
    pub fn head_name(&self) -> String {
        match self {
            Setup::Adapter(name) => name.clone(),
            Setup::Fuse(children) => Setup::fusion_name(children),
            block => block.children().last().expect("validated").head_name(),
        }
    }

    /// The adapter this setup runs alone, if that is all it does: `a`, `stack(a)`,
    /// `average(a)`, nested or not.
    pub fn single_adapter(&self) -> Option<&str> {
        match self {
            Setup::Adapter(name) => Some(name),
            Setup::Stack(children) | Setup::Average { children, .. } if children.len() == 1 => {
                children[0].single_adapter()
            }
            _ => None,
        }
    }

    /// Hands `rows` out to the setups that run them. Parallel splits its rows evenly between
    /// its children, BatchSplit by its sizes; Stack and Average give every child all their rows
    /// and cut them wherever any child's channels are cut (`stack(a,parallel(b,c))` runs
    /// `stack(a,b)` on the first half and `stack(a,c)` on the second); a Fuse holds only
    /// adapters and stacks of adapters, so it is one channel.
    ///
    /// So each channel computes what its setup computes alone, whatever the other channels
    /// hold: AdapterHub 1.3 instead prepares every channel with the first adapter's options
    /// and finishes it with the last one's.
    pub fn channels(&self, rows: Range<usize>) -> Result<Vec<Channel>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let n = rows.len();
        Ok(match self {
            Setup::Adapter(_) | Setup::Fuse(_) => vec![Channel {
                rows,
                setup: self.clone(),
            }],
            Setup::Parallel(children) => {
                let k = children.len();
                if !n.is_multiple_of(k) {
                    return Err(Error::input(format!(
                        "{self} needs the batch once per child: {n} rows do not split into {k} equal parts"
                    )));
                }
                split_rows(children, rows, &vec![n / k; k])?
            }
            Setup::BatchSplit {
                children,
                batch_sizes,
            } => {
                let total: usize = batch_sizes.iter().sum();
                if total != n {
                    return Err(Error::input(format!(
                        "{self}: the batch sizes add up to {total}, but the batch has {n} rows"
                    )));
                }
                split_rows(children, rows, batch_sizes)?
            }
            Setup::Stack(children) => every_child_on_all(children, rows, Setup::Stack)?,
            Setup::Average { children, weights } => {
                every_child_on_all(children, rows, |children| Setup::Average {
                    children,
                    weights: weights.clone(),
                })?
            }
        })
    }
}

/// Every child on all of `rows` (Stack, Average): the children's channels cut wherever any
/// child's are, each piece run by `block` over the children's setups for it.
fn every_child_on_all(
    children: &[Setup],
    rows: Range<usize>,
    block: impl Fn(Vec<Setup>) -> Setup,
) -> Result<Vec<Channel>> {
    let per_child = children
        .iter()
        .map(|c| c.channels(rows.clone()))
        .collect::<Result<Vec<_>>>()?;
    let mut cuts: Vec<usize> = per_child
        .iter()
        .flatten()
        .map(|c| c.rows.start)
        .chain([rows.end])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    Ok(cuts
        .windows(2)
        .map(|cut| Channel {
            rows: cut[0]..cut[1],
            setup: block(
                per_child
                    .iter()
                    .map(|channels| {
                        let covering = channels.iter().find(|c| c.rows.contains(&cut[0]));
                        covering
                            .expect("a child's channels cover its rows")
                            .setup
                            .clone()
                    })
                    .collect(),
            ),
        })
        .collect())
}

/// Consecutive parts of `rows`, of these sizes, to the children in turn.
fn split_rows(children: &[Setup], rows: Range<usize>, sizes: &[usize]) -> Result<Vec<Channel>> {
    let mut start = rows.start;
    let mut channels = Vec::new();
    for (child, size) in children.iter().zip(sizes) {
        channels.extend(child.channels(start..start + size)?);
        start += size;
    }
    Ok(channels)
}
