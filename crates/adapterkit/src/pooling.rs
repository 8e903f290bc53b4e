//! From token states to one vector per text.

use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The first token's state (`[CLS]`).
    Cls,
    /// The mean over real (unpadded) tokens, as sentence-transformers does.
    Mean,
}

impl Pooling {
    /// `hidden`: `[batch, seq, hidden]`; `attention_mask`: `[batch, seq]` -> `[batch, hidden]`.
    pub fn pool(self, hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        match self {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
            Pooling::Mean => {
                let mask = attention_mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
                let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
                // sentence-transformers clamps the count at 1e-9; an empty row then gives zeros.
                let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
                summed.broadcast_div(&counts)
            }
        }
    }
}

/// Each row of `pooled` (`[batch, hidden]`) scaled to unit length (a zero row stays zero).
pub fn normalize(pooled: &Tensor) -> Result<Tensor> {
    let norm = pooled
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    pooled.broadcast_div(&norm)
}
