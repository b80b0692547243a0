//! # marco-backend-cpu: the NdArray backend and its own kernels (to be filled by the model issue).
#![deny(missing_docs)]
