//! Host implementations of the non-linear parts of a decoder layer (RMSNorm, rotary
//! embeddings, attention over a chain of KV segments, SwiGLU) on row-major f32 slices.
