//! # marco-backend-cuda: burn-cuda behind the `cuda` feature, and a driver probe that never panics
//!
//! With the `cuda` feature this crate re-exports burn-cuda's `Cuda` backend and
//! `CudaDevice`; marco-model implements its kernel seam for them. Building needs no GPU and no
//! CUDA toolkit (cubecl compiles kernels at run time through the driver's NVRTC).
//!
//! burn-cuda's `matmul` runs f32 products on the tensor cores in TF32 (inputs rounded to a
//! 10-bit mantissa: logits move by ~5e-3), and burn 0.21 has no switch to turn that off.
//! [`matmul_exact`] launches cubek's register-tiled ("unit") matmul instead, which keeps f32
//! inputs in f32; marco-model runs the f32 CUDA backend's linear layers and attention through
//! it, and keeps burn's tensor-core matmul for bf16.
//!
//! Running does need the driver, and cudarc panics when `libcuda.so` is missing. Call
//! [`cuda_available`] first: it `dlopen`s the driver library itself, asks it for devices, and
//! answers `false` on any failure, so that tests and examples can skip with a clear message
//! ("skipping: no CUDA driver") instead of aborting.
#![deny(missing_docs)]

#[cfg(feature = "cuda")]
pub use burn_cuda::{Cuda, CudaDevice};

#[cfg(feature = "cuda")]
mod exact_matmul;
#[cfg(feature = "cuda")]
pub use exact_matmul::matmul_exact;

/// What can go wrong in this crate: the driver probe (why CUDA cannot be used on this machine)
/// and the exact matrix product.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    /// No driver library (`libcuda.so.1` / `libcuda.so`) could be loaded.
    #[error("no CUDA driver ({0})")]
    NoDriver(String),
    /// The driver loaded but lacks an entry point marco needs.
    #[error("the CUDA driver has no {0}")]
    MissingSymbol(String),
    /// `cuInit` failed with this CUresult code.
    #[error("cuInit failed with CUresult {0}")]
    InitFailed(i32),
    /// The driver reports no device.
    #[error("the CUDA driver reports no device")]
    NoDevice,
    /// No exact f32 matmul routine accepts the problem (cubek's reason).
    #[error("no exact f32 matmul routine accepts this problem: {0}")]
    MatmulUnavailable(String),
}

/// Probes the CUDA driver: `Ok(device count)` when at least one device can be used.
pub fn probe_cuda() -> Result<usize, CudaError> {
    type CuInit = unsafe extern "C" fn(flags: u32) -> i32;
    type CuDeviceGetCount = unsafe extern "C" fn(count: *mut i32) -> i32;
    // Every name tried and why it failed: the first (`libcuda.so.1`) is the one that matters
    // on Linux, the last (`nvcuda.dll`) on Windows.
    let mut errors = Vec::new();
    for name in ["libcuda.so.1", "libcuda.so", "nvcuda.dll"] {
        // SAFETY: loading the CUDA driver runs its initialisers, which are designed to be
        // loaded into any process; we only resolve and call two entry points with their
        // documented C signatures.
        let library = match unsafe { libloading::Library::new(name) } {
            Ok(library) => library,
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
        };
        // SAFETY: the symbol types match the CUDA driver API declarations of cuInit and
        // cuDeviceGetCount (CUresult is a C int).
        let init: libloading::Symbol<'_, CuInit> =
            unsafe { library.get(b"cuInit\0") }.map_err(|_| CudaError::MissingSymbol("cuInit".into()))?;
        // SAFETY: as above.
        let count: libloading::Symbol<'_, CuDeviceGetCount> = unsafe { library.get(b"cuDeviceGetCount\0") }
            .map_err(|_| CudaError::MissingSymbol("cuDeviceGetCount".into()))?;
        // SAFETY: cuInit takes flags (must be 0) and returns a status code.
        let status = unsafe { init(0) };
        if status != 0 {
            return Err(CudaError::InitFailed(status));
        }
        let mut devices: i32 = 0;
        // SAFETY: cuDeviceGetCount writes one int through a valid pointer.
        let status = unsafe { count(&mut devices) };
        if status != 0 || devices <= 0 {
            return Err(CudaError::NoDevice);
        }
        // Keep the driver loaded: unloading it under a later cudarc user is not worth the risk.
        std::mem::forget(library);
        return Ok(devices as usize);
    }
    Err(CudaError::NoDriver(errors.join("; ")))
}

/// Whether a CUDA driver with at least one device is present. Never panics.
pub fn cuda_available() -> bool {
    probe_cuda().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_answers_without_panicking() {
        // On a machine without a driver this is NoDriver; with one, a device count. Either
        // way the call returns, and both entry points agree.
        match probe_cuda() {
            Ok(devices) => {
                assert!(devices > 0);
                assert!(cuda_available());
            }
            Err(reason) => {
                assert!(!cuda_available());
                assert!(!reason.to_string().is_empty());
                eprintln!("no CUDA here: {reason}");
            }
        }
    }
}
