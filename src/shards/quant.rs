//! Latent buffer conversions between f32 and the stored element types.
//! Whole-slice loops (half's slice conversions use F16C when present) so
//! that nothing costs more than a few instructions per element.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Symmetric int8 range: q in [-127, 127] so that the scale is exact both ways.
pub const INT8_MAX: f32 = 127.0;

/// Append `src` as f16 (round to nearest even).
pub fn push_f16(dst: &mut Vec<f16>, src: &[f32]) {
    let start = dst.len();
    dst.resize(start + src.len(), f16::ZERO);
    dst[start..].convert_from_f32_slice(src);
}

/// Append `src` as bf16 bit patterns (round to nearest even).
pub fn push_bf16_bits(dst: &mut Vec<u16>, src: &[f32]) {
    let start = dst.len();
    dst.resize(start + src.len(), 0);
    let out: &mut [half::bf16] = bytemuck::cast_slice_mut(&mut dst[start..]);
    out.convert_from_f32_slice(src);
}

/// Append `src` ([tokens, channels], token-major) quantised per token:
/// scale = absmax / 127, q = round(x / scale) clamped to [-127, 127];
/// an all-zero token gets scale 0 and q = 0.
pub fn push_int8(q: &mut Vec<i8>, scales: &mut Vec<f32>, src: &[f32], channels: usize) {
    q.reserve(src.len());
    for token in src.chunks_exact(channels) {
        let absmax = token.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        if absmax > 0.0 && absmax.is_finite() {
            let scale = absmax / INT8_MAX;
            // `as i8` saturates, NaN -> 0; the clamp keeps -128 out.
            q.extend(
                token
                    .iter()
                    .map(|&x| (x / scale).round().clamp(-INT8_MAX, INT8_MAX) as i8),
            );
            scales.push(scale);
        } else {
            q.extend(std::iter::repeat_n(0i8, token.len()));
            scales.push(0.0);
        }
    }
}

/// f16 -> f32 into `dst` (same length).
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    src.convert_to_f32_slice(dst);
}

/// bf16 bit patterns -> f32 (exact: bf16 is the top half of an f32).
pub fn bf16_bits_to_f32(src: &[u16], dst: &mut [f32]) {
    for (d, &b) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((b as u32) << 16);
    }
}

/// int8 values with one scale per `channels` values -> f32.
pub fn int8_to_f32(src: &[i8], scales: &[f32], channels: usize, dst: &mut [f32]) {
    for ((d, s), &scale) in dst
        .chunks_exact_mut(channels)
        .zip(src.chunks_exact(channels))
        .zip(scales)
    {
        for (d, &q) in d.iter_mut().zip(s) {
            *d = q as f32 * scale;
        }
    }
}

/// What a reader returns for `src` (one row, `[tokens, channels]`) stored
/// as `dtype`: quantised, then dequantised as the readers do. Lets a writer
/// take statistics of what training will see without reading the shard back.
pub fn round_trip(dtype: super::LatentDType, src: &[f32], channels: usize) -> Vec<f32> {
    use super::LatentDType;
    let mut out = vec![0f32; src.len()];
    match dtype {
        LatentDType::F32 => out.copy_from_slice(src),
        LatentDType::F16 => {
            let mut h = Vec::with_capacity(src.len());
            push_f16(&mut h, src);
            f16_to_f32(&h, &mut out);
        }
        LatentDType::Bf16 => {
            let mut b = Vec::with_capacity(src.len());
            push_bf16_bits(&mut b, src);
            bf16_bits_to_f32(&b, &mut out);
        }
        LatentDType::Int8 => {
            let (mut q, mut scales) = (Vec::new(), Vec::new());
            push_int8(&mut q, &mut scales, src, channels);
            int8_to_f32(&q, &scales, channels, &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_round_trip_within_half_step() {
        let src: Vec<f32> = (0..24)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.37)
            .collect();
        let (mut q, mut s) = (Vec::new(), Vec::new());
        push_int8(&mut q, &mut s, &src, 8);
        assert_eq!(s.len(), 3);
        let mut back = vec![0.0; src.len()];
        int8_to_f32(&q, &s, 8, &mut back);
        for (t, (a, b)) in src.chunks(8).zip(back.chunks(8)).enumerate() {
            let absmax = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(q[t * 8..t * 8 + 8].iter().any(|v| v.abs() == 127));
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= absmax / 127.0 * 0.5 * 1.0001, "{x} {y}");
            }
        }
    }

    #[test]
    fn zero_token_has_zero_scale() {
        let (mut q, mut s) = (Vec::new(), Vec::new());
        push_int8(&mut q, &mut s, &[0.0; 4], 4);
        assert_eq!(s, vec![0.0]);
        assert_eq!(q, vec![0; 4]);
    }

    #[test]
    fn bf16_bits_match_half() {
        let src = [1.0f32, -2.5, 3.25159, 1e-3, 65504.0];
        let mut bits = Vec::new();
        push_bf16_bits(&mut bits, &src);
        let mut back = [0f32; 5];
        bf16_bits_to_f32(&bits, &mut back);
        for (x, y) in src.iter().zip(back) {
            assert_eq!(half::bf16::from_f32(*x).to_f32(), y);
        }
    }
}
