//! Data-parallel training across processes: who we are ([`DistEnv`], read
//! from the torchrun-style environment), how the processes find each other
//! ([`rendezvous`]), and the collectives the trainer needs ([`Collective`]:
//! sum-all-reduce and broadcast of tensors).
//!
//! Backends: [`tcp::TcpGroup`] stages tensors through the host and sums on
//! rank 0 over TCP (any device; meant for CPU runs and tests), and, with the
//! `nccl` feature, `nccl::NcclGroup` all-reduces on the GPUs.

pub mod rendezvous;
pub mod tcp;

#[cfg(feature = "nccl")]
pub mod nccl;

use std::path::PathBuf;
use std::time::Duration;

use candle_core::Tensor;

pub use rendezvous::InitMethod;

/// Errors of rendezvous and collectives.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A missing or malformed torchrun variable.
    #[error("distributed environment: {0}")]
    Env(String),
    /// Connecting the ranks failed.
    #[error("rendezvous ({what}): {reason}")]
    Rendezvous {
        /// The step that failed (listen, connect, handshake, ...).
        what: String,
        /// The underlying error.
        reason: String,
    },
    /// A collective failed after the group was up.
    #[error("collective {op} failed: {reason}")]
    Collective {
        /// The collective (`all_reduce_sum`, `broadcast`, ...).
        op: &'static str,
        /// The underlying error.
        reason: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Results of this module.
pub type Result<T, E = DistError> = std::result::Result<T, E>;

/// The collectives of data-parallel training. Every rank calls each method
/// in the same order with tensors of the same shape and dtype.
pub trait Collective: Send {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// Number of processes in the group.
    fn world_size(&self) -> usize;
    /// Element-wise sum over all ranks; every rank gets the same result.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// `root`'s tensor on every rank.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Name of the transport, for logs (`single`, `tcp`, `nccl`).
    fn backend(&self) -> &'static str;
}

/// The single-process case: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn backend(&self) -> &'static str {
        "single"
    }
}

/// This process's place in a data-parallel job, as torchrun (or Slurm via a
/// wrapper) describes it: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, and either
/// `MASTER_ADDR`/`MASTER_PORT` or `RAE_DIST_INIT=file:///shared/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// `RANK`: this process's global index.
    pub rank: usize,
    /// `WORLD_SIZE`: processes in the job.
    pub world_size: usize,
    /// GPU index on this machine (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    /// Where to meet rank 0.
    pub init: InitMethod,
    /// How long to wait for the other ranks.
    pub timeout: Duration,
    /// With a file rendezvous: the name rank 0 writes for itself
    /// (`RAE_DIST_HOST`; default the machine's host name).
    pub advertise_host: Option<String>,
    /// `RAE_DIST_BACKEND=tcp|nccl` forces a backend (default: NCCL on CUDA
    /// when built with it, else TCP). TCP lets several ranks share one GPU.
    pub backend: Option<String>,
}

/// Default wait for the other ranks at the rendezvous.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

impl DistEnv {
    /// Read the environment; `None` when `WORLD_SIZE` is unset or 1.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`DistEnv::from_env`] over any variable lookup (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| DistError::Env(format!("{k}={v:?} is not a number"))),
            }
        };
        let world_size = match num("WORLD_SIZE")? {
            None | Some(1) => return Ok(None),
            Some(0) => return Err(DistError::Env("WORLD_SIZE=0".into())),
            Some(w) => w,
        };
        let rank = num("RANK")?
            .ok_or_else(|| DistError::Env(format!("WORLD_SIZE={world_size} but RANK is unset")))?;
        if rank >= world_size {
            return Err(DistError::Env(format!(
                "RANK={rank} is not below WORLD_SIZE={world_size}"
            )));
        }
        let local_rank = num("LOCAL_RANK")?.unwrap_or(rank);
        let init = match get("RAE_DIST_INIT").filter(|s| !s.trim().is_empty()) {
            Some(s) => InitMethod::parse(&s)?,
            None => {
                let addr = get("MASTER_ADDR").ok_or_else(|| {
                    DistError::Env(
                        "WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT, or RAE_DIST_INIT=file:///shared/path"
                            .into(),
                    )
                })?;
                let port = num("MASTER_PORT")?.ok_or_else(|| {
                    DistError::Env("MASTER_ADDR is set but MASTER_PORT is not".into())
                })?;
                let port = u16::try_from(port)
                    .map_err(|_| DistError::Env(format!("MASTER_PORT={port} is not a port")))?;
                // torchrun's agent already serves its own store on
                // MASTER_PORT; ours takes the next port.
                let port = if get("TORCHELASTIC_RUN_ID").is_some() {
                    port.checked_add(1)
                        .ok_or_else(|| DistError::Env("MASTER_PORT + 1 overflows".into()))?
                } else {
                    port
                };
                InitMethod::Tcp { addr, port }
            }
        };
        let timeout = match num("RAE_DIST_TIMEOUT")? {
            Some(s) => Duration::from_secs(s as u64),
            None => DEFAULT_TIMEOUT,
        };
        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
            init,
            timeout,
            advertise_host: get("RAE_DIST_HOST").filter(|s| !s.trim().is_empty()),
            backend: match get("RAE_DIST_BACKEND").map(|s| s.trim().to_ascii_lowercase()) {
                None => None,
                Some(b) if b.is_empty() => None,
                Some(b) if b == "tcp" || b == "nccl" => Some(b),
                Some(b) => {
                    return Err(DistError::Env(format!(
                        "RAE_DIST_BACKEND={b:?}: expected tcp or nccl"
                    )));
                }
            },
        }))
    }

    /// The device string this rank should use when the user gave `auto`.
    pub fn default_device(&self) -> String {
        format!("cuda:{}", self.local_rank)
    }
}

/// Connect this process to its job: the NCCL backend on a CUDA device when
/// built with `nccl`, else TCP through rank 0.
pub fn connect(env: &DistEnv, device: &candle_core::Device) -> Result<Box<dyn Collective>> {
    let forced = env.backend.as_deref();
    #[cfg(feature = "nccl")]
    if let (candle_core::Device::Cuda(d), None | Some("nccl")) = (device, forced) {
        return Ok(Box::new(nccl::NcclGroup::connect(env, d)?));
    }
    if forced == Some("nccl") {
        return Err(DistError::Env(
            "RAE_DIST_BACKEND=nccl needs a CUDA device and a build with `--features nccl`".into(),
        ));
    }
    if device.is_cuda() && forced.is_none() {
        tracing::warn!(
            "this binary has no NCCL (`--features nccl`): gradients go through the host over TCP, which is slow"
        );
    }
    Ok(Box::new(tcp::TcpGroup::connect(env)?))
}

/// A path for a file rendezvous beside a run directory (tests, launchers).
pub fn default_init_file(run_dir: &std::path::Path) -> PathBuf {
    run_dir.join(".rendezvous")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<DistEnv>> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn single_process_without_world_size() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
    }

    #[test]
    fn torchrun_variables() {
        let e = env(&[
            ("WORLD_SIZE", "8"),
            ("RANK", "5"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (5, 8, 1));
        assert_eq!(
            e.init,
            InitMethod::Tcp {
                addr: "node0".into(),
                port: 29500
            }
        );
        assert_eq!(e.default_device(), "cuda:1");
        // under torchrun the agent holds MASTER_PORT
        let e = env(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_RUN_ID", "x"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            e.init,
            InitMethod::Tcp {
                addr: "h".into(),
                port: 29501
            }
        );
    }

    #[test]
    fn backend_override() {
        let base = [
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("RAE_DIST_INIT", "file:///x"),
        ];
        let with = |b: &str| {
            let mut v = base.to_vec();
            v.push(("RAE_DIST_BACKEND", b));
            env(&v)
        };
        assert_eq!(env(&base).unwrap().unwrap().backend, None);
        assert_eq!(
            with("TCP").unwrap().unwrap().backend.as_deref(),
            Some("tcp")
        );
        assert!(with("gloo").is_err());
    }

    #[test]
    fn file_init_and_errors() {
        let e = env(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("RAE_DIST_INIT", "file:///tmp/x/rdv"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(e.init, InitMethod::File("/tmp/x/rdv".into()));
        assert_eq!(e.local_rank, 1);
        for bad in [
            vec![("WORLD_SIZE", "2")],
            vec![
                ("WORLD_SIZE", "2"),
                ("RANK", "2"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "1"),
            ],
            vec![("WORLD_SIZE", "2"), ("RANK", "0")],
            vec![("WORLD_SIZE", "two"), ("RANK", "0")],
            vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h")],
            vec![
                ("WORLD_SIZE", "2"),
                ("RANK", "0"),
                ("RAE_DIST_INIT", "nfs://x"),
            ],
        ] {
            assert!(env(&bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn single_process_collectives_are_identity() {
        let t = Tensor::new(&[1f32, 2., 3.], &candle_core::Device::Cpu).unwrap();
        let s = SingleProcess;
        assert_eq!(
            s.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap(),
            vec![1., 2., 3.]
        );
        assert_eq!(
            s.broadcast(&t, 0).unwrap().to_vec1::<f32>().unwrap(),
            vec![1., 2., 3.]
        );
    }
}
