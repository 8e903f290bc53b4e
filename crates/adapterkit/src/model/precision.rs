//! The precision of the encoder's frozen matrix products (`--dtype`): f32; bf16 with f32 sums;
//! or int8 for inference. In bf16 or int8 each frozen Linear of the fused attention and
//! feed-forward blocks keeps a copy of its weight packed once (`kernels::fused::PackedWeight`)
//! and multiplies its input converted on the fly:
//! - bf16 (`kernels::bf16`): the input rounded to bf16. In training the gradient passed back
//!   (`g W`) stays f32: with it in bf16 too (a transposed copy), Houlsby adapters trained
//!   13% faster but ended 0.37 and 0.28 points under f32 on TREC-6 and movie_sentiment
//!   (3 seeds), against -0.06 and -0.09 this way (docs/RESULTS.md). The frozen blocks keep
//!   nothing for the backward pass: it recomputes their products, at the bf16 rate
//!   (`ops::block_activations`; docs/BENCHMARKS.md has the memory).
//! - int8 (`kernels::int8`): each row of the input quantised with its own scale, the weight
//!   per output column, exact integer sums scaled back; for inference (training refuses it).
//!
//! Everything else (attention scores, softmax, LayerNorm, GELU, adapters, heads, and any
//! weight that trains, with its optimizer state) stays in f32.

use std::fmt;
use std::str::FromStr;

use candle_core::Result;
use candle_nn::Linear;

use crate::kernels::fused::PackedWeight;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    Int8,
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "int8" => Ok(Self::Int8),
            other => Err(format!("unknown dtype '{other}' (f32, bf16 or int8)")),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
        })
    }
}

/// A block's Linears' weights packed for `precision` (none in f32), in the order given.
pub fn packed_weights<const N: usize>(
    precision: Precision,
    linears: [&Linear; N],
) -> Result<Option<[PackedWeight; N]>> {
    let pack = match precision {
        Precision::F32 => return Ok(None),
        Precision::Bf16 => PackedWeight::bf16,
        Precision::Int8 => PackedWeight::int8,
    };
    let packed = linears
        .iter()
        .map(|l| pack(l.weight()))
        .collect::<Result<Vec<_>>>()?;
    Ok(packed.try_into().ok())
}
