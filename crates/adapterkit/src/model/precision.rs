//! The precision of the encoder's frozen matrix products (`--dtype`): f32, or bf16 with f32
//! sums. In bf16 each frozen Linear of the fused attention and feed-forward blocks keeps a
//! bf16 copy of its weight, packed once for `kernels::bf16`, and multiplies its input rounded
//! to bf16 (in training also the gradient it passes back, with a transposed copy made on first
//! use); everything else (attention scores, softmax, LayerNorm, GELU, adapters, heads, and any
//! weight that trains, with its optimizer state) stays in f32.

use std::fmt;
use std::str::FromStr;

use candle_core::Result;
use candle_nn::Linear;

use crate::kernels::fused::Bf16Weight;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!("unknown dtype '{other}' (f32 or bf16)")),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

/// bf16 copies of a block's Linears in `precision` (none in f32), in the order given.
pub fn bf16_weights<const N: usize>(
    precision: Precision,
    linears: [&Linear; N],
) -> Result<Option<[Bf16Weight; N]>> {
    if precision == Precision::F32 {
        return Ok(None);
    }
    let packed = linears
        .iter()
        .map(|l| Bf16Weight::pack(l.weight()))
        .collect::<Result<Vec<_>>>()?;
    Ok(packed.try_into().ok())
}
