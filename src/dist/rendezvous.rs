//! How the ranks of a job find each other. Rank 0 listens; every other rank
//! opens one TCP connection to it and introduces itself. The address comes
//! from `MASTER_ADDR:MASTER_PORT`, or from a file on a shared filesystem that
//! rank 0 writes (atomically) with the address of an ephemeral port it
//! listens on. The resulting star ([`Link`]) carries small messages: the
//! NCCL unique id, or the tensors of the TCP backend.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{DistEnv, DistError, Result};

const MAGIC: &[u8; 8] = b"RAEDIST1";

/// Where rank 0 can be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitMethod {
    /// `MASTER_ADDR:MASTER_PORT`: rank 0 listens on that port.
    Tcp {
        /// `MASTER_ADDR`.
        addr: String,
        /// `MASTER_PORT`.
        port: u16,
    },
    /// `file:///path`: rank 0 writes `host:port` there.
    File(PathBuf),
}

impl InitMethod {
    /// `file:///abs/path`, `tcp://host:port`.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if let Some(p) = s.strip_prefix("file://") {
            if p.is_empty() {
                return Err(DistError::Env(format!("{s:?}: no file path")));
            }
            return Ok(Self::File(PathBuf::from(p)));
        }
        if let Some(hp) = s.strip_prefix("tcp://") {
            let (h, p) = hp
                .rsplit_once(':')
                .ok_or_else(|| DistError::Env(format!("{s:?}: expected tcp://host:port")))?;
            let port = p
                .parse()
                .map_err(|_| DistError::Env(format!("{s:?}: bad port")))?;
            return Ok(Self::Tcp {
                addr: h.to_string(),
                port,
            });
        }
        Err(DistError::Env(format!(
            "RAE_DIST_INIT={s:?}: expected file:///shared/path or tcp://host:port"
        )))
    }
}

/// The connections of one rank: rank 0 holds one stream per other rank
/// (index `rank - 1`), every other rank one stream to rank 0.
#[derive(Debug)]
pub enum Link {
    /// Rank 0.
    Root {
        /// One stream per other rank, index `rank - 1`.
        peers: Vec<TcpStream>,
    },
    /// Any rank but 0.
    Leaf {
        /// The stream to rank 0.
        root: TcpStream,
    },
}

fn rdv_err(what: impl Into<String>, reason: impl std::fmt::Display) -> DistError {
    DistError::Rendezvous {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// Send one length-prefixed message.
pub fn send_msg(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)?;
    s.flush()
}

/// Receive one length-prefixed message.
pub fn recv_msg(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len) as usize;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// Connect every rank of `env` into a [`Link`]; returns once all ranks are
/// in (rank 0) or rank 0 has accepted us (others).
pub fn connect(env: &DistEnv) -> Result<Link> {
    let deadline = Instant::now() + env.timeout;
    match (&env.init, env.rank) {
        (InitMethod::Tcp { port, .. }, 0) => {
            let l = TcpListener::bind(("0.0.0.0", *port))
                .map_err(|e| rdv_err(format!("listen on port {port}"), e))?;
            accept_all(&l, env, deadline)
        }
        (InitMethod::Tcp { addr, port }, _) => {
            let target = format!("{addr}:{port}");
            join(env, deadline, || Ok(Some(target.clone())))
        }
        (InitMethod::File(path), 0) => {
            let l = TcpListener::bind(("0.0.0.0", 0))
                .map_err(|e| rdv_err("listen on an ephemeral port", e))?;
            let port = l
                .local_addr()
                .map_err(|e| rdv_err("listen address", e))?
                .port();
            let host = advertised_host(env);
            let text = format!("{host}:{port} {}\n", env.world_size);
            crate::fsutil::write_atomic(path, text.as_bytes())
                .map_err(|e| rdv_err(path.display().to_string(), e))?;
            let link = accept_all(&l, env, deadline);
            // Everyone is connected (or we failed): nobody needs the file.
            let _ = std::fs::remove_file(path);
            link
        }
        (InitMethod::File(path), _) => join(env, deadline, || read_file(path, env.world_size)),
    }
}

/// The host name other machines reach rank 0 by: `RAE_DIST_HOST`, else the
/// kernel's host name, else loopback.
fn advertised_host(env: &DistEnv) -> String {
    if let Some(h) = &env.advertise_host {
        return h.clone();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "127.0.0.1".into())
}

/// `Ok(None)` while the file does not exist yet.
fn read_file(path: &Path, world: usize) -> Result<Option<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(rdv_err(path.display().to_string(), e)),
    };
    let mut it = text.split_whitespace();
    let (Some(addr), Some(w)) = (it.next(), it.next()) else {
        // rank 0 writes atomically; a short file is not ours
        return Err(rdv_err(
            path.display().to_string(),
            format!("unexpected contents {text:?}"),
        ));
    };
    if w != world.to_string() {
        return Err(rdv_err(
            path.display().to_string(),
            format!("written for world size {w}, this rank has {world}"),
        ));
    }
    Ok(Some(addr.to_string()))
}

fn accept_all(l: &TcpListener, env: &DistEnv, deadline: Instant) -> Result<Link> {
    l.set_nonblocking(true)
        .map_err(|e| rdv_err("listener", e))?;
    let mut peers: Vec<Option<TcpStream>> = (1..env.world_size).map(|_| None).collect();
    let mut missing = env.world_size - 1;
    while missing > 0 {
        match l.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false).map_err(|e| rdv_err("accept", e))?;
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .map_err(|e| rdv_err("accept", e))?;
                let mut hello = [0u8; 16];
                if s.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                    tracing::warn!("rendezvous: ignoring a stray connection from {from}");
                    continue;
                }
                let rank = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]) as usize;
                let world =
                    u32::from_le_bytes([hello[12], hello[13], hello[14], hello[15]]) as usize;
                let problem = if world != env.world_size {
                    Some(format!(
                        "rank {rank} at {from} has world size {world}, rank 0 has {}",
                        env.world_size
                    ))
                } else if rank == 0 || rank >= env.world_size {
                    Some(format!("{from} claims rank {rank} of {world}"))
                } else if peers[rank - 1].is_some() {
                    Some(format!("rank {rank} joined twice (second from {from})"))
                } else {
                    None
                };
                if let Some(p) = problem {
                    let _ = send_msg(&mut s, p.as_bytes());
                    return Err(rdv_err("join", p));
                }
                send_msg(&mut s, b"").map_err(|e| rdv_err(format!("rank {rank}"), e))?;
                s.set_read_timeout(None).map_err(|e| rdv_err("accept", e))?;
                let _ = s.set_nodelay(true);
                peers[rank - 1] = Some(s);
                missing -= 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let absent: Vec<String> = peers
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect();
                    return Err(rdv_err(
                        "waiting for the other ranks",
                        format!(
                            "ranks {} did not join in {:?}",
                            absent.join(", "),
                            env.timeout
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(rdv_err("accept", e)),
        }
    }
    Ok(Link::Root {
        peers: peers.into_iter().flatten().collect(),
    })
}

/// Connect to rank 0, retrying (it may start later) until the deadline.
fn join(
    env: &DistEnv,
    deadline: Instant,
    target: impl Fn() -> Result<Option<String>>,
) -> Result<Link> {
    let mut last = String::from("rank 0 not reachable yet");
    loop {
        if let Some(addr) = target()? {
            match try_join(&addr, env) {
                Ok(s) => return Ok(Link::Leaf { root: s }),
                Err(JoinError::Refused(why)) => return Err(rdv_err("join", why)),
                Err(JoinError::Retry(why)) => last = format!("{addr}: {why}"),
            }
        }
        if Instant::now() > deadline {
            return Err(rdv_err(
                format!("rank {} joining rank 0", env.rank),
                format!("gave up after {:?}: {last}", env.timeout),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

enum JoinError {
    Retry(String),
    Refused(String),
}

fn try_join(addr: &str, env: &DistEnv) -> Result<TcpStream, JoinError> {
    let retry = |e: std::io::Error| JoinError::Retry(e.to_string());
    let sa = addr
        .to_socket_addrs()
        .map_err(retry)?
        .next()
        .ok_or_else(|| JoinError::Retry("no address".into()))?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(5)).map_err(retry)?;
    let mut hello = Vec::with_capacity(16);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(env.rank as u32).to_le_bytes());
    hello.extend_from_slice(&(env.world_size as u32).to_le_bytes());
    s.write_all(&hello).map_err(retry)?;
    let answer = recv_msg(&mut s).map_err(retry)?;
    if !answer.is_empty() {
        return Err(JoinError::Refused(String::from_utf8_lossy(&answer).into()));
    }
    let _ = s.set_nodelay(true);
    Ok(s)
}

impl Link {
    /// Rank 0 sends `payload` to every rank; every rank returns it.
    pub fn share_from_root(&mut self, payload: Option<&[u8]>) -> Result<Vec<u8>> {
        match self {
            Link::Root { peers } => {
                let p = payload.ok_or_else(|| rdv_err("share", "rank 0 has nothing to share"))?;
                for (i, s) in peers.iter_mut().enumerate() {
                    send_msg(s, p).map_err(|e| rdv_err(format!("send to rank {}", i + 1), e))?;
                }
                Ok(p.to_vec())
            }
            Link::Leaf { root } => recv_msg(root).map_err(|e| rdv_err("receive from rank 0", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn envs(world: usize, init: InitMethod) -> Vec<DistEnv> {
        (0..world)
            .map(|rank| DistEnv {
                rank,
                world_size: world,
                local_rank: rank,
                init: init.clone(),
                timeout: Duration::from_secs(20),
                advertise_host: None,
                backend: None,
            })
            .collect()
    }

    fn share_all(envs: Vec<DistEnv>) -> Vec<Vec<u8>> {
        let hs: Vec<_> = envs
            .into_iter()
            .map(|e| {
                std::thread::spawn(move || {
                    let mut link = connect(&e).unwrap();
                    let p = format!("hello from {}", e.rank);
                    link.share_from_root(Some(p.as_bytes())).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn tcp_rendezvous_shares_root_payload() {
        let init = InitMethod::Tcp {
            addr: "127.0.0.1".into(),
            port: free_port(),
        };
        for got in share_all(envs(3, init)) {
            assert_eq!(got, b"hello from 0");
        }
    }

    #[test]
    fn file_rendezvous_shares_root_payload_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("rae-rdv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("rdv");
        let mut es = envs(2, InitMethod::File(f.clone()));
        // the machine's host name need not resolve inside a sandbox
        es[0].advertise_host = Some("127.0.0.1".into());
        for got in share_all(es) {
            assert_eq!(got, b"hello from 0");
        }
        assert!(!f.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_ranks_time_out_with_their_numbers() {
        let mut es = envs(
            3,
            InitMethod::Tcp {
                addr: "127.0.0.1".into(),
                port: free_port(),
            },
        );
        es[0].timeout = Duration::from_millis(300);
        let e = connect(&es[0]).unwrap_err().to_string();
        assert!(e.contains("ranks 1, 2 did not join"), "{e}");
    }

    #[test]
    fn init_method_parsing() {
        assert_eq!(
            InitMethod::parse("tcp://10.0.0.1:29500").unwrap(),
            InitMethod::Tcp {
                addr: "10.0.0.1".into(),
                port: 29500
            }
        );
        assert!(InitMethod::parse("tcp://h").is_err());
        assert!(InitMethod::parse("file://").is_err());
    }
}
