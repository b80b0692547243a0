//! # marco-backend-cuda: burn-cuda behind the `cuda` feature (to be filled by the model issue).
#![deny(missing_docs)]
