//! Collectives over the rendezvous star: every rank sends its tensor to
//! rank 0, which sums in rank order (so the result is deterministic and the
//! same on every rank) and sends the sum back. Tensors travel as f32 through
//! the host. Bandwidth-bound on rank 0: right for CPU runs, tests and small
//! models; GPUs want the NCCL backend.

use std::net::TcpStream;
use std::sync::Mutex;

use candle_core::{DType, Tensor};

use super::rendezvous::{self, Link, recv_msg, send_msg};
use super::{Collective, DistEnv, DistError, Result};

/// Collectives over plain TCP through rank 0 (no GPU transport needed;
/// several ranks may share a device).
pub struct TcpGroup {
    rank: usize,
    world_size: usize,
    link: Mutex<Link>,
}

fn coll_err(op: &'static str, reason: impl std::fmt::Display) -> DistError {
    DistError::Collective {
        op,
        reason: reason.to_string(),
    }
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_bytes(op: &'static str, b: &[u8], want: usize) -> Result<Vec<f32>> {
    if b.len() != want * 4 {
        return Err(coll_err(
            op,
            format!(
                "a peer sent {} bytes, expected {} (shapes differ across ranks?)",
                b.len(),
                want * 4
            ),
        ));
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

fn like(v: Vec<f32>, t: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())?)
}

impl TcpGroup {
    /// Rendezvous with the other ranks of `env`.
    pub fn connect(env: &DistEnv) -> Result<Self> {
        let link = rendezvous::connect(env)?;
        Ok(Self::from_link(env.rank, env.world_size, link))
    }

    /// A group over streams that are already connected.
    pub fn from_link(rank: usize, world_size: usize, link: Link) -> Self {
        Self {
            rank,
            world_size,
            link: Mutex::new(link),
        }
    }

    fn with_link<T>(&self, op: &'static str, f: impl FnOnce(&mut Link) -> Result<T>) -> Result<T> {
        let mut g = self
            .link
            .lock()
            .map_err(|_| coll_err(op, "connection lock poisoned by an earlier failure"))?;
        f(&mut g)
    }
}

impl TcpGroup {
    /// Every rank's `mine`, in rank order, on rank 0 (`None` elsewhere):
    /// small results (lists of written files) collected for one writer.
    pub fn gather_to_root(&self, mine: &[u8]) -> Result<Option<Vec<Vec<u8>>>> {
        const OP: &str = "gather";
        self.with_link(OP, |link| match link {
            Link::Root { peers } => {
                let mut all = vec![mine.to_vec()];
                for r in 1..self.world_size {
                    all.push(
                        recv_msg(peer(peers, r))
                            .map_err(|e| coll_err(OP, format!("rank {r}: {e}")))?,
                    );
                }
                Ok(Some(all))
            }
            Link::Leaf { root } => {
                send_msg(root, mine).map_err(|e| coll_err(OP, format!("rank 0: {e}")))?;
                Ok(None)
            }
        })
    }
}

fn peer(peers: &mut [TcpStream], rank: usize) -> &mut TcpStream {
    &mut peers[rank - 1]
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_reduce";
        let mine = host_f32(t)?;
        let n = mine.len();
        let sum = self.with_link(OP, |link| match link {
            Link::Root { peers } => {
                let mut acc = mine;
                for r in 1..self.world_size {
                    let b = recv_msg(peer(peers, r))
                        .map_err(|e| coll_err(OP, format!("rank {r}: {e}")))?;
                    for (a, x) in acc.iter_mut().zip(from_bytes(OP, &b, n)?) {
                        *a += x;
                    }
                }
                let bytes = to_bytes(&acc);
                for r in 1..self.world_size {
                    send_msg(peer(peers, r), &bytes)
                        .map_err(|e| coll_err(OP, format!("rank {r}: {e}")))?;
                }
                Ok(acc)
            }
            Link::Leaf { root } => {
                send_msg(root, &to_bytes(&mine))
                    .map_err(|e| coll_err(OP, format!("rank 0: {e}")))?;
                let b = recv_msg(root).map_err(|e| coll_err(OP, format!("rank 0: {e}")))?;
                from_bytes(OP, &b, n)
            }
        })?;
        like(sum, t)
    }

    fn broadcast(&self, t: &Tensor, root_rank: usize) -> Result<Tensor> {
        const OP: &str = "broadcast";
        if root_rank >= self.world_size {
            return Err(coll_err(
                OP,
                format!("root {root_rank} of {}", self.world_size),
            ));
        }
        let n = t.elem_count();
        let v = self.with_link(OP, |link| match link {
            Link::Root { peers } => {
                // A non-zero root sends to rank 0 first, which relays.
                let v = if root_rank == 0 {
                    host_f32(t)?
                } else {
                    let b = recv_msg(peer(peers, root_rank))
                        .map_err(|e| coll_err(OP, format!("rank {root_rank}: {e}")))?;
                    from_bytes(OP, &b, n)?
                };
                let bytes = to_bytes(&v);
                for r in (1..self.world_size).filter(|&r| r != root_rank) {
                    send_msg(peer(peers, r), &bytes)
                        .map_err(|e| coll_err(OP, format!("rank {r}: {e}")))?;
                }
                Ok(v)
            }
            Link::Leaf { root } => {
                if self.rank == root_rank {
                    let v = host_f32(t)?;
                    send_msg(root, &to_bytes(&v))
                        .map_err(|e| coll_err(OP, format!("rank 0: {e}")))?;
                    Ok(v)
                } else {
                    let b = recv_msg(root).map_err(|e| coll_err(OP, format!("rank 0: {e}")))?;
                    from_bytes(OP, &b, n)
                }
            }
        })?;
        like(v, t)
    }

    fn barrier(&self) -> Result<()> {
        let one = Tensor::ones(1, DType::F32, &candle_core::Device::Cpu)?;
        self.all_reduce_sum(&one).map(|_| ())
    }

    fn backend(&self) -> &'static str {
        "tcp"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::InitMethod;
    use std::time::Duration;

    /// `world` connected groups, one per thread, handed to `f`.
    pub(crate) fn run_group<T: Send + 'static>(
        world: usize,
        f: impl Fn(TcpGroup) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let hs: Vec<_> = (0..world)
            .map(|rank| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let env = DistEnv {
                        rank,
                        world_size: world,
                        local_rank: rank,
                        init: InitMethod::Tcp {
                            addr: "127.0.0.1".into(),
                            port,
                        },
                        timeout: Duration::from_secs(20),
                        advertise_host: None,
                        backend: None,
                    };
                    f(TcpGroup::connect(&env).unwrap())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_in_rank_order_and_broadcast_copies() {
        let out = run_group(3, |g| {
            let dev = candle_core::Device::Cpu;
            let r = g.rank() as f32;
            let t = Tensor::new(&[[r, 1.0], [10.0 * r, -r]], &dev).unwrap();
            let s = g.all_reduce_sum(&t).unwrap();
            assert_eq!(s.dims(), &[2, 2]);
            let b = g.broadcast(&t, 2).unwrap();
            let h = Tensor::new(&[r], &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let hb = g.broadcast(&h, 0).unwrap();
            assert_eq!(hb.dtype(), DType::BF16);
            g.barrier().unwrap();
            let got = g.gather_to_root(&[g.rank() as u8; 3]).unwrap();
            if g.rank() == 0 {
                assert_eq!(got.unwrap(), vec![vec![0; 3], vec![1; 3], vec![2; 3]]);
            } else {
                assert!(got.is_none());
            }
            (
                s.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        });
        for (s, b) in out {
            assert_eq!(s, vec![3.0, 3.0, 30.0, -3.0]);
            assert_eq!(b, vec![2.0, 1.0, 20.0, -2.0]);
        }
    }

    #[test]
    fn shape_mismatch_is_an_error_not_a_hang() {
        let out = run_group(2, |g| {
            let n = 2 + g.rank();
            let t = Tensor::zeros(n, DType::F32, &candle_core::Device::Cpu).unwrap();
            g.all_reduce_sum(&t).map(|_| ()).map_err(|e| e.to_string())
        });
        assert!(
            out[0].as_ref().is_err_and(|e| e.contains("shapes differ")),
            "{out:?}"
        );
    }
}
