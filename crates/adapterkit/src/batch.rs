//! A padded batch of tokenized texts, as the encoder reads it.

use candle_core::{Device, Result, Tensor};

#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, seq]`, u32
    pub input_ids: Tensor,
    /// `[batch, seq]`, u32: 0 for `A` segments, 1 for `B`
    pub token_type_ids: Tensor,
    /// `[batch, seq]`, u32: 1 for real tokens, 0 for padding
    pub attention_mask: Tensor,
}

/// One tokenized text (or text pair), unpadded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl Batch {
    /// Pads `rows` on the right with `pad_id` to the longest row.
    pub fn pad(rows: &[Encoded], pad_id: u32, device: &Device) -> Result<Self> {
        let seq = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let n = rows.len();
        let mut ids = Vec::with_capacity(n * seq);
        let mut types = Vec::with_capacity(n * seq);
        let mut mask = Vec::with_capacity(n * seq);
        for row in rows {
            let pad = seq - row.ids.len();
            ids.extend(
                row.ids
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad_id, pad)),
            );
            types.extend(
                row.type_ids
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, pad)),
            );
            mask.extend(
                std::iter::repeat_n(1u32, row.ids.len()).chain(std::iter::repeat_n(0, pad)),
            );
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (n, seq), device)?,
            token_type_ids: Tensor::from_vec(types, (n, seq), device)?,
            attention_mask: Tensor::from_vec(mask, (n, seq), device)?,
        })
    }

    /// `len` rows from `start`.
    pub fn rows(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            input_ids: self.input_ids.narrow(0, start, len)?,
            token_type_ids: self.token_type_ids.narrow(0, start, len)?,
            attention_mask: self.attention_mask.narrow(0, start, len)?,
        })
    }

    pub fn len(&self) -> usize {
        self.input_ids.dims().first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
