//! The reference statistics file written by `rae-cache eval-ref` (a
//! `.safetensors`), so an evaluation needs no second pass over the
//! reference set, and ADM reference batches (`.npz`) read as references.
//!
//! Tensors: `<set>.mu` f64 `[d]`, `<set>.sigma` f64 `[d, d]`, `<set>.count`
//! i64 `[1]` for each Gaussian set (`fid`, `sfid`, `fd_dinov2`,
//! `latent_pooled`, `latent_tokens`); `<name>.features` f16 or f32 `[n, d]`
//! for precision/recall (`pr`: Inception pool3, `latent_pr`: pooled
//! latents); `latent_stats.mean` / `.var` f32 `[C, H, W]` (the cache's
//! stats.safetensors, for the drift). One metadata key,
//! `rae_cache.eval_ref`, holds the provenance JSON (extractor, weights
//! sha256, resize mode, counts, source).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::latent::LatentReference;
use super::{EvalError, Gaussian, npz};
use crate::shards::LatentStats;

/// The metadata key of the provenance JSON.
pub const META_KEY: &str = "rae_cache.eval_ref";

/// Feature rows kept for precision/recall.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureRows {
    /// Feature dimension.
    pub dim: usize,
    /// `rows x dim`, row-major.
    pub data: Vec<f32>,
}

/// Reference statistics and their provenance.
#[derive(Debug, Clone, Default)]
pub struct Reference {
    /// Gaussian statistics by set name.
    pub sets: BTreeMap<String, Gaussian>,
    /// Feature rows by name.
    pub features: BTreeMap<String, FeatureRows>,
    /// The cache's per-element statistics.
    pub latent_stats: Option<LatentStats>,
    /// Provenance (a JSON object).
    pub provenance: serde_json::Map<String, serde_json::Value>,
}

fn bytes_f64(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> Result<TensorView<'_>, EvalError> {
    TensorView::new(dtype, shape, data).map_err(|e| EvalError::Invalid(format!("reference: {e}")))
}

impl Reference {
    /// Latent statistics, if the reference has them.
    pub fn latent(&self) -> Option<LatentReference> {
        let pooled = self.sets.get("latent_pooled")?.clone();
        let shape = self.provenance.get("latent")?;
        Some(LatentReference {
            pooled,
            tokens: self.sets.get("latent_tokens").cloned(),
            pooled_rows: self.features.get("latent_pr").map(|f| f.data.clone()),
            stats: self.latent_stats.clone(),
            token_count: shape.get("tokens")?.as_u64()? as usize,
            channels: shape.get("channels")?.as_u64()? as usize,
        })
    }

    /// Store latent statistics (the inverse of [`latent`](Self::latent)).
    pub fn set_latent(&mut self, l: LatentReference) {
        self.sets.insert("latent_pooled".into(), l.pooled);
        if let Some(t) = l.tokens {
            self.sets.insert("latent_tokens".into(), t);
        }
        if let Some(rows) = l.pooled_rows {
            self.features.insert(
                "latent_pr".into(),
                FeatureRows {
                    dim: l.channels,
                    data: rows,
                },
            );
        }
        self.latent_stats = l.stats;
        self.provenance.insert(
            "latent".into(),
            serde_json::json!({"tokens": l.token_count, "channels": l.channels}),
        );
    }

    /// Write atomically; feature rows as f16 when `f16_features`.
    pub fn save(&self, path: &Path, f16_features: bool) -> Result<(), EvalError> {
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, g) in &self.sets {
            g.validate(name)?;
            let d = g.dim();
            owned.push((format!("{name}.mu"), Dtype::F64, vec![d], bytes_f64(&g.mu)));
            owned.push((
                format!("{name}.sigma"),
                Dtype::F64,
                vec![d, d],
                bytes_f64(&g.sigma),
            ));
            owned.push((
                format!("{name}.count"),
                Dtype::I64,
                vec![1],
                (g.count as i64).to_le_bytes().to_vec(),
            ));
        }
        for (name, f) in &self.features {
            let rows = f.data.len() / f.dim.max(1);
            let (dt, b) = if f16_features {
                let b = f
                    .data
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect();
                (Dtype::F16, b)
            } else {
                (
                    Dtype::F32,
                    f.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )
            };
            owned.push((format!("{name}.features"), dt, vec![rows, f.dim], b));
        }
        if let Some(s) = &self.latent_stats {
            let shape = vec![s.channels, s.height, s.width];
            let f32b = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            owned.push((
                "latent_stats.mean".into(),
                Dtype::F32,
                shape.clone(),
                f32b(&s.mean),
            ));
            owned.push(("latent_stats.var".into(), Dtype::F32, shape, f32b(&s.var)));
            owned.push((
                "latent_stats.count".into(),
                Dtype::I64,
                vec![1],
                (s.count as i64).to_le_bytes().to_vec(),
            ));
        }
        let views = owned
            .iter()
            .map(|(n, dt, shape, b)| Ok((n.as_str(), view(*dt, shape.clone(), b)?)))
            .collect::<Result<Vec<_>, EvalError>>()?;
        let meta = HashMap::from([(
            META_KEY.to_string(),
            serde_json::Value::Object(self.provenance.clone()).to_string(),
        )]);
        let bytes = safetensors::serialize(views, Some(meta))
            .map_err(|e| EvalError::format(path, e.to_string()))?;
        crate::fsutil::write_atomic(path, &bytes).map_err(|e| EvalError::io(path, e))
    }

    /// Read a file written by [`save`](Self::save).
    pub fn load(path: &Path) -> Result<Self, EvalError> {
        let bytes = std::fs::read(path).map_err(|e| EvalError::io(path, e))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| EvalError::format(path, e.to_string()))?;
        let st =
            SafeTensors::deserialize(&bytes).map_err(|e| EvalError::format(path, e.to_string()))?;
        let prov = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| {
                EvalError::format(
                    path,
                    format!("not an eval-ref file (no {META_KEY} metadata)"),
                )
            })?;
        let provenance = match serde_json::from_str(prov) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return Err(EvalError::format(path, "bad provenance JSON")),
        };
        let mut r = Reference {
            provenance,
            ..Default::default()
        };
        let get = |name: &str| {
            st.tensor(name)
                .map_err(|e| EvalError::format(path, format!("{name}: {e}")))
        };
        let f64s = |name: &str| -> Result<(Vec<f64>, Vec<usize>), EvalError> {
            let t = get(name)?;
            if t.dtype() != Dtype::F64 {
                return Err(EvalError::format(
                    path,
                    format!("{name} is {:?}, expected F64", t.dtype()),
                ));
            }
            let v = t
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
            Ok((v, t.shape().to_vec()))
        };
        let i64_of = |name: &str| -> u64 {
            get(name)
                .ok()
                .and_then(|t| {
                    t.data()
                        .get(..8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])).max(0) as u64)
                })
                .unwrap_or(0)
        };
        for name in st.names() {
            if let Some(set) = name.strip_suffix(".mu") {
                let (mu, _) = f64s(name)?;
                let (sigma, _) = f64s(&format!("{set}.sigma"))?;
                let g = Gaussian {
                    mu,
                    sigma,
                    count: i64_of(&format!("{set}.count")),
                };
                g.validate(&format!("{}: {set}", path.display()))?;
                r.sets.insert(set.to_string(), g);
            } else if let Some(feat) = name.strip_suffix(".features") {
                let t = get(name)?;
                let dim = t.shape().get(1).copied().unwrap_or(0);
                let data: Vec<f32> = match t.dtype() {
                    Dtype::F32 => t
                        .data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                    Dtype::F16 => t
                        .data()
                        .chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect(),
                    d => {
                        return Err(EvalError::format(
                            path,
                            format!("{name} is {d:?}, expected F16/F32"),
                        ));
                    }
                };
                r.features
                    .insert(feat.to_string(), FeatureRows { dim, data });
            }
        }
        if st.names().contains(&"latent_stats.mean") {
            let t = get("latent_stats.mean")?;
            let shape = t.shape().to_vec();
            let f32s = |n: &str| -> Result<Vec<f32>, EvalError> {
                Ok(get(n)?
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            };
            if shape.len() != 3 {
                return Err(EvalError::format(
                    path,
                    format!("latent_stats.mean shape {shape:?}, expected [C,H,W]"),
                ));
            }
            r.latent_stats = Some(LatentStats {
                mean: f32s("latent_stats.mean")?,
                var: f32s("latent_stats.var")?,
                count: i64_of("latent_stats.count"),
                channels: shape[0],
                height: shape[1],
                width: shape[2],
            });
        }
        Ok(r)
    }

    /// An ADM reference batch: its precomputed `mu`/`sigma` (FID) and
    /// `mu_s`/`sigma_s` (sFID); its images `arr_0` serve precision/recall
    /// (they need the Inception network). Without `mu`, the statistics
    /// must come from the images (as ADM's `read_statistics` does).
    pub fn from_adm_npz(path: &Path) -> Result<Self, EvalError> {
        let names = npz::names(path)?;
        let mut r = Reference::default();
        for (set, mu, sigma) in [("fid", "mu", "sigma"), ("sfid", "mu_s", "sigma_s")] {
            if !names.iter().any(|n| n == mu) {
                continue;
            }
            let (m, ms) = npz::read_f64(path, mu)?;
            let (s, ss) = npz::read_f64(path, sigma)?;
            if ms.len() != 1 || ss != [ms[0], ms[0]] {
                return Err(EvalError::format(
                    path,
                    format!("{mu} {ms:?} / {sigma} {ss:?}: expected [d] and [d, d]"),
                ));
            }
            let g = Gaussian {
                mu: m,
                sigma: s,
                count: 0,
            };
            g.validate(&format!("{}: {set}", path.display()))?;
            r.sets.insert(set.into(), g);
        }
        r.provenance.insert("kind".into(), "adm-npz".into());
        r.provenance
            .insert("source".into(), path.display().to_string().into());
        r.provenance.insert(
            "has_images".into(),
            names.iter().any(|n| n == "arr_0").into(),
        );
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ref.safetensors");
        let mut r = Reference::default();
        r.sets.insert(
            "fid".into(),
            Gaussian {
                mu: vec![1.0, 2.0],
                sigma: vec![2.0, 0.5, 0.5, 1.0],
                count: 7,
            },
        );
        r.features.insert(
            "pr".into(),
            FeatureRows {
                dim: 2,
                data: vec![0.5, 1.5, -2.0, 3.25],
            },
        );
        r.provenance.insert("extractor".into(), "test".into());
        r.save(&p, true).unwrap();
        let back = Reference::load(&p).unwrap();
        assert_eq!(back.sets["fid"], r.sets["fid"]);
        assert_eq!(back.features["pr"], r.features["pr"]);
        assert_eq!(back.provenance["extractor"], "test");
        // NaN statistics are refused, and nothing is written
        r.sets.get_mut("fid").unwrap().mu[0] = f64::NAN;
        let q = dir.path().join("bad.safetensors");
        assert!(
            r.save(&q, false)
                .unwrap_err()
                .to_string()
                .contains("non-finite")
        );
        assert!(!q.exists());
    }
}
