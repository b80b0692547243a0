//! # marco-search: search policies over a model's own reasoning
//!
//! MCTS with confidence reward, beam search and greedy decoding with reflection, all written
//! against `marco_core::LanguageModel` (to be filled by the foundation issue).
#![deny(missing_docs)]
