//! Latent statistics for the build: per-shard f64 accumulators, folded in
//! shard order.
//!
//! Each shard's rows are accumulated (Welford, f64, in row order) into their
//! own accumulator, saved next to the manifest as `state/stats-NNNNN.safetensors`.
//! The cache's statistics are the left fold, in global shard order, of those
//! per-shard accumulators with the parallel (Chan et al.) merge. A whole
//! build, a resumed build and a merge of parts therefore perform exactly the
//! same floating-point operations in the same order: their `stats.safetensors`
//! are byte-identical.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::shards::StatsAccumulator;

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format {
        path: std::path::PathBuf,
        reason: String,
    },
}

pub fn empty(len: usize) -> StatsAccumulator {
    StatsAccumulator {
        count: 0,
        mean: vec![0.0; len],
        m2: vec![0.0; len],
    }
}

/// Add one row (Welford, f64).
pub fn push_row(acc: &mut StatsAccumulator, row: &[f32]) {
    debug_assert_eq!(row.len(), acc.mean.len());
    acc.count += 1;
    let n = acc.count as f64;
    for ((m, s), &x) in acc.mean.iter_mut().zip(acc.m2.iter_mut()).zip(row) {
        let x = x as f64;
        let d = x - *m;
        *m += d / n;
        *s += d * (x - *m);
    }
}

/// `a <- a ⊕ b` (Chan et al. parallel merge). Merging into an empty
/// accumulator copies `b` exactly, so a fold may start from empty.
pub fn merge_into(a: &mut StatsAccumulator, b: &StatsAccumulator) {
    if b.count == 0 {
        return;
    }
    if a.count == 0 {
        *a = b.clone();
        return;
    }
    let na = a.count as f64;
    let nb = b.count as f64;
    let n = na + nb;
    let wb = nb / n;
    let w2 = na * nb / n;
    for i in 0..a.mean.len() {
        let d = b.mean[i] - a.mean[i];
        a.mean[i] += d * wb;
        a.m2[i] += b.m2[i] + d * d * w2;
    }
    a.count += b.count;
}

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn serialize(tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>) -> Result<Vec<u8>, String> {
    let views: Result<Vec<(String, TensorView<'_>)>, _> = tensors
        .iter()
        .map(|(name, dt, shape, bytes)| {
            TensorView::new(*dt, shape.clone(), bytes).map(|v| (name.to_string(), v))
        })
        .collect();
    let views = views.map_err(|e| e.to_string())?;
    let map: HashMap<String, TensorView<'_>> = views.into_iter().collect();
    safetensors::serialize(&map, None).map_err(|e| e.to_string())
}

/// Save an accumulator's exact f64 state (atomically).
pub fn save_state(acc: &StatsAccumulator, path: &Path) -> Result<(), StatsError> {
    let n = acc.mean.len();
    let bytes = serialize(vec![
        (
            "count",
            Dtype::U64,
            vec![1],
            acc.count.to_le_bytes().to_vec(),
        ),
        ("mean", Dtype::F64, vec![n], f64_bytes(&acc.mean)),
        ("m2", Dtype::F64, vec![n], f64_bytes(&acc.m2)),
    ])
    .map_err(|reason| StatsError::Format {
        path: path.into(),
        reason,
    })?;
    crate::fsutil::write_atomic(path, &bytes).map_err(|source| StatsError::Io {
        path: path.into(),
        source,
    })
}

pub fn load_state(path: &Path, len: usize) -> Result<StatsAccumulator, StatsError> {
    let fmt = |reason: String| StatsError::Format {
        path: path.into(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| StatsError::Io {
        path: path.into(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| fmt(e.to_string()))?;
    let get = |name: &str, dt: Dtype, n: usize| -> Result<Vec<u8>, StatsError> {
        let t = st.tensor(name).map_err(|e| fmt(e.to_string()))?;
        if t.dtype() != dt || t.shape() != [n] {
            return Err(fmt(format!(
                "{name}: expected {dt:?} [{n}], found {:?} {:?}",
                t.dtype(),
                t.shape()
            )));
        }
        Ok(t.data().to_vec())
    };
    let count = u64::from_le_bytes(
        get("count", Dtype::U64, 1)?
            .try_into()
            .map_err(|_| fmt("count".into()))?,
    );
    let f64s = |b: Vec<u8>| -> Vec<f64> {
        b.chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect()
    };
    let mean = f64s(get("mean", Dtype::F64, len)?);
    let m2 = f64s(get("m2", Dtype::F64, len)?);
    Ok(StatsAccumulator { count, mean, m2 })
}

/// Final statistics as the reference `stat.pt`: mean and (population)
/// variance, f32, shape [C, H, W] with H = W = sqrt(tokens).
pub struct FinalStats {
    pub count: u64,
    pub shape: [usize; 3],
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
}

/// Token-major accumulator ([tokens, C]) -> channel-major [C, h, w].
pub fn finalize(
    acc: &StatsAccumulator,
    tokens: usize,
    channels: usize,
) -> Result<FinalStats, String> {
    if acc.mean.len() != tokens * channels {
        return Err(format!(
            "accumulator has {} elements, expected {tokens}x{channels}",
            acc.mean.len()
        ));
    }
    let side = (tokens as f64).sqrt().round() as usize;
    let (h, w) = if side * side == tokens {
        (side, side)
    } else {
        (1, tokens)
    };
    let n = acc.count.max(1) as f64;
    let mut mean = vec![0f32; tokens * channels];
    let mut var = vec![0f32; tokens * channels];
    for t in 0..tokens {
        for c in 0..channels {
            let src = t * channels + c;
            let dst = c * tokens + t;
            mean[dst] = acc.mean[src] as f32;
            var[dst] = if acc.count == 0 {
                0.0
            } else {
                (acc.m2[src] / n) as f32
            };
        }
    }
    Ok(FinalStats {
        count: acc.count,
        shape: [channels, h, w],
        mean,
        var,
    })
}

/// Write `stats.safetensors`: `mean`, `var` f32 [C, H, W] and `count` i64 [1].
pub fn save_final(stats: &FinalStats, path: &Path) -> Result<(), StatsError> {
    let shape = stats.shape.to_vec();
    let bytes = serialize(vec![
        ("mean", Dtype::F32, shape.clone(), f32_bytes(&stats.mean)),
        ("var", Dtype::F32, shape, f32_bytes(&stats.var)),
        (
            "count",
            Dtype::I64,
            vec![1],
            (stats.count as i64).to_le_bytes().to_vec(),
        ),
    ])
    .map_err(|reason| StatsError::Format {
        path: path.into(),
        reason,
    })?;
    crate::fsutil::write_atomic(path, &bytes).map_err(|source| StatsError::Io {
        path: path.into(),
        source,
    })
}

/// Read `stats.safetensors` back (mean, var, count).
pub fn load_final(path: &Path) -> Result<FinalStats, StatsError> {
    let fmt = |reason: String| StatsError::Format {
        path: path.into(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| StatsError::Io {
        path: path.into(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| fmt(e.to_string()))?;
    let f32s = |name: &str| -> Result<(Vec<usize>, Vec<f32>), StatsError> {
        let t = st.tensor(name).map_err(|e| fmt(e.to_string()))?;
        if t.dtype() != Dtype::F32 {
            return Err(fmt(format!("{name}: expected F32, found {:?}", t.dtype())));
        }
        let v = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((t.shape().to_vec(), v))
    };
    let (shape, mean) = f32s("mean")?;
    let (vshape, var) = f32s("var")?;
    if shape.len() != 3 || vshape != shape {
        return Err(fmt(format!(
            "mean {shape:?} / var {vshape:?}: expected two equal [C, H, W] shapes"
        )));
    }
    let count = match st.tensor("count") {
        Ok(t) if t.dtype() == Dtype::I64 && t.data().len() == 8 => {
            i64::from_le_bytes(t.data().try_into().map_err(|_| fmt("count".into()))?) as u64
        }
        _ => return Err(fmt("missing or malformed `count` (i64 [1])".into())),
    };
    Ok(FinalStats {
        count,
        shape: [shape[0], shape[1], shape[2]],
        mean,
        var,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Vec<f32>> {
        (0..7)
            .map(|r| {
                (0..6)
                    .map(|i| ((r * 7 + i * 3) % 11) as f32 * 0.37 - 1.5)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn welford_matches_two_pass() {
        let rows = rows();
        let mut acc = empty(6);
        for r in &rows {
            push_row(&mut acc, r);
        }
        for i in 0..6 {
            let n = rows.len() as f64;
            let m: f64 = rows.iter().map(|r| r[i] as f64).sum::<f64>() / n;
            let v: f64 = rows.iter().map(|r| (r[i] as f64 - m).powi(2)).sum::<f64>() / n;
            assert!((acc.mean[i] - m).abs() < 1e-12);
            assert!((acc.m2[i] / n - v).abs() < 1e-12);
        }
    }

    #[test]
    fn merge_equals_sequential_and_empty_is_identity() {
        let rows = rows();
        let mut whole = empty(6);
        rows.iter().for_each(|r| push_row(&mut whole, r));
        let (mut a, mut b) = (empty(6), empty(6));
        rows[..3].iter().for_each(|r| push_row(&mut a, r));
        rows[3..].iter().for_each(|r| push_row(&mut b, r));
        let mut folded = empty(6);
        merge_into(&mut folded, &a);
        assert_eq!(folded.mean, a.mean);
        merge_into(&mut folded, &b);
        for i in 0..6 {
            assert!((folded.mean[i] - whole.mean[i]).abs() < 1e-12);
            assert!((folded.m2[i] - whole.m2[i]).abs() < 1e-12);
        }
    }

    #[test]
    fn state_round_trips_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut acc = empty(6);
        rows().iter().for_each(|r| push_row(&mut acc, r));
        let p = dir.path().join("s.safetensors");
        save_state(&acc, &p).unwrap();
        let back = load_state(&p, 6).unwrap();
        assert_eq!(back.count, acc.count);
        assert_eq!(back.mean, acc.mean);
        assert_eq!(back.m2, acc.m2);
        assert!(load_state(&p, 5).is_err());
    }

    #[test]
    fn final_is_channel_major() {
        // tokens = 4 (2x2), channels = 2: element (t, c) has value 10 t + c.
        let mut acc = empty(8);
        let row: Vec<f32> = (0..4)
            .flat_map(|t| (0..2).map(move |c| (10 * t + c) as f32))
            .collect();
        push_row(&mut acc, &row);
        let f = finalize(&acc, 4, 2).unwrap();
        assert_eq!(f.shape, [2, 2, 2]);
        assert_eq!(f.mean, vec![0.0, 10.0, 20.0, 30.0, 1.0, 11.0, 21.0, 31.0]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("stats.safetensors");
        save_final(&f, &p).unwrap();
        let back = load_final(&p).unwrap();
        assert_eq!(back.mean, f.mean);
        assert_eq!(back.count, 1);
    }
}
