//! The CPU kernels under the encoder's ops, in f32: custom candle ops with hand-written backward
//! passes for Linear, GELU, softmax, LayerNorm (`fused`, `layer_norm`), attention (`attention`),
//! whole frozen attention and feed-forward blocks (`attention_block`, `feed_forward`), many plain
//! bottleneck adapters side by side (`grouped_bottleneck`), the strided matrix products they call
//! (`matmul`), bf16 products of frozen weights (`bf16`, behind `--dtype bf16`), int8 ones
//! (`int8`, behind `--dtype int8`), the
//! vectorised maths (`simd`), dropout masks (`dropout`) and how the work is split over threads
//! (`parallel`). `model/` builds BERT from them; elsewhere (other devices and dtypes) its ops are
//! composed from candle's.

pub mod attention;
pub mod attention_block;
pub mod bf16;
pub mod dropout;
pub mod feed_forward;
pub mod fused;
pub mod grouped_bottleneck;
pub mod int8;
pub mod layer_norm;
mod matmul;
mod panels;
pub(crate) mod parallel;
mod simd;
