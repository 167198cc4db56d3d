//! Helpers shared by the unit tests.

use candle_core::{DType, Tensor};

/// max |a - b| over all elements, compared in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    (f(a) - f(b))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
