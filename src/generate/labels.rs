//! Class labels for N samples.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::GenerateError;

/// How labels are assigned to samples 0..N.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelSpec {
    /// Sample i gets class i mod num_classes.
    All,
    /// Every class N / num_classes times (the remainder spread over the
    /// first classes), in a seeded random order (reference `equal`).
    Equal,
    /// Explicit labels, one per sample.
    List(Vec<u32>),
}

impl LabelSpec {
    /// `all`, `equal` or a comma-separated list of class indices.
    pub fn parse(s: &str) -> Result<Self, GenerateError> {
        match s.trim() {
            "all" => Ok(Self::All),
            "equal" => Ok(Self::Equal),
            list => list
                .split(',')
                .map(|p| {
                    p.trim().parse::<u32>().map_err(|_| {
                        GenerateError::Invalid(format!(
                            "--labels: {p:?} is not a class index (expected all, equal or a comma list)"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Self::List),
        }
    }

    /// The labels of samples 0..n, each checked against `num_classes`.
    pub fn labels(
        &self,
        n: usize,
        num_classes: usize,
        seed: u64,
    ) -> Result<Vec<u32>, GenerateError> {
        if num_classes == 0 {
            return Err(GenerateError::Invalid("model has no classes".into()));
        }
        let k = num_classes as u32;
        let out = match self {
            Self::All => (0..n).map(|i| (i % num_classes) as u32).collect(),
            Self::Equal => {
                let mut v: Vec<u32> = (0..n).map(|i| (i % num_classes) as u32).collect();
                // own stream: independent of the noise seeds
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6c61_6265_6c73);
                v.shuffle(&mut rng);
                v
            }
            Self::List(v) => {
                if v.len() != n {
                    return Err(GenerateError::Invalid(format!(
                        "--labels lists {} labels for {n} samples",
                        v.len()
                    )));
                }
                v.clone()
            }
        };
        if let Some(bad) = out.iter().find(|&&l| l >= k) {
            return Err(GenerateError::Invalid(format!(
                "label {bad} out of range: the model has {num_classes} classes"
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(LabelSpec::All.labels(5, 3, 0).unwrap(), vec![0, 1, 2, 0, 1]);
        let e = LabelSpec::Equal.labels(9, 3, 1).unwrap();
        for c in 0..3 {
            assert_eq!(e.iter().filter(|&&l| l == c).count(), 3);
        }
        assert_eq!(e, LabelSpec::Equal.labels(9, 3, 1).unwrap());
        assert_eq!(
            LabelSpec::parse("1, 2").unwrap(),
            LabelSpec::List(vec![1, 2])
        );
        assert!(LabelSpec::parse("1,x").is_err());
        assert!(LabelSpec::List(vec![1, 5]).labels(2, 3, 0).is_err());
        assert!(LabelSpec::List(vec![1]).labels(2, 3, 0).is_err());
    }
}
