//! Initial noise per sample, derived from (seed, sample index) only, so a
//! sample does not change with the batch size or the batch it lands in.

use candle_core::{Device, Result, Tensor};

use crate::diffusion::NoiseRng;

/// SplitMix64 finaliser: decorrelates nearby (seed, index) pairs.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of sample `index`'s noise stream.
pub fn sample_seed(seed: u64, index: u64) -> u64 {
    mix(mix(seed) ^ index)
}

/// Standard normal noise `[indices.len(), shape...]` (f32), row i from
/// `sample_seed(seed, indices[i])`.
pub fn noise_for(
    seed: u64,
    indices: std::ops::Range<u64>,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let rows: Vec<Tensor> = indices
        .map(|i| NoiseRng::new(sample_seed(seed, i)).randn(shape, &Device::Cpu))
        .collect::<Result<_>>()?;
    Tensor::stack(&rows, 0)?.to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_does_not_depend_on_batching() {
        let d = Device::Cpu;
        let all = noise_for(3, 0..6, &[2, 2], &d).unwrap();
        let tail = noise_for(3, 4..6, &[2, 2], &d).unwrap();
        let a: Vec<f32> = all
            .narrow(0, 4, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = tail.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
        let other = noise_for(4, 4..6, &[2, 2], &d).unwrap();
        assert_ne!(b, other.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
}
