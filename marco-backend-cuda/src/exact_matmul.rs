//! An f32 matrix product that stays f32 on CUDA.
//!
//! burn-cubecl's `matmul` takes cubek's default strategy, whose tensor-core tiles convert f32
//! inputs to TF32 (`cubek-matmul`'s `adjust_dtypes`). The "unit" routines multiply in
//! registers with f32 fused multiply-adds, so their only difference from an exact product is
//! the summation order. This module launches `Strategy::SimpleUnit` the way burn-cubecl
//! launches its own (same bindings, same output allocation), and `Strategy::Naive` (one
//! thread per output, which cubek's own fallback assumes always launches) where the unit
//! routine declines the problem.

use burn_cubecl::kernel::matmul::init_matmul_output;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek::matmul::launch::{launch_ref, Strategy};
use cubek::std::InputBinding;

use crate::CudaError;

/// `lhs · rhs` (batched over leading dimensions, as burn's `matmul`) with f32 inputs kept in
/// f32: no tensor cores, no TF32. Both operands must have the same float type; the result has
/// it too.
pub fn matmul_exact<R: CubeRuntime>(lhs: CubeTensor<R>, rhs: CubeTensor<R>) -> Result<CubeTensor<R>, CudaError> {
    let dtype = lhs.dtype;
    let out = init_matmul_output(&lhs, &rhs, dtype);
    let client = out.client.clone();
    let launch = |strategy: &Strategy| {
        let mut dtypes =
            MatmulElems::from_globals(&MatmulGlobalElems { lhs: dtype.into(), rhs: dtype.into(), out: dtype.into() });
        launch_ref(
            strategy,
            &client,
            InputBinding::new(lhs.clone().binding(), dtype.into()),
            InputBinding::new(rhs.clone().binding(), dtype.into()),
            out.clone().binding(),
            &mut dtypes,
        )
    };
    match launch(&Strategy::SimpleUnit(Default::default())) {
        Ok(()) => Ok(out),
        Err(_) => match launch(&Strategy::Naive) {
            Ok(()) => Ok(out),
            Err(e) => Err(CudaError::MatmulUnavailable(format!("{e:?}"))),
        },
    }
}
