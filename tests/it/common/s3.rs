//! A real S3-compatible server on 127.0.0.1 for the object-store tests:
//! moto's standalone server (`pip install 'moto[server]'`), started on a
//! free port per test and killed when dropped. Found as `$MOTO_SERVER`,
//! `moto_server` on the PATH, or `.venv-moto/bin/moto_server` in the
//! repository. Without it the tests skip with a message, unless
//! `RAE_S3_TEST=1` (CI) makes its absence a failure.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rae_cache::store::Remote;

/// Access key the tests use (moto accepts any unless auth is on).
pub const KEY_ID: &str = "rae-test-key";
pub const SECRET: &str = "rae-test-secret";

pub struct S3Server {
    child: Child,
    pub port: u16,
}

fn moto_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("moto_server");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-moto/bin/moto_server");
    local.is_file().then_some(local)
}

impl S3Server {
    /// Start a server, or `None` (after saying why) when moto is not
    /// installed and `RAE_S3_TEST` is not set.
    pub fn start() -> Option<Self> {
        Self::start_with_env(&[])
    }

    /// Start a server with extra environment (e.g. moto's
    /// `INITIAL_NO_AUTH_ACTION_COUNT` to turn on credential checks).
    pub fn start_with_env(env: &[(&str, &str)]) -> Option<Self> {
        let Some(bin) = moto_binary() else {
            if std::env::var_os("RAE_S3_TEST").is_some() {
                panic!(
                    "RAE_S3_TEST is set but no moto_server was found (MOTO_SERVER, PATH, .venv-moto)"
                );
            }
            eprintln!(
                "SKIPPED: no S3-compatible server: install one with `python3 -m venv .venv-moto && .venv-moto/bin/pip install 'moto[server]'` (or set MOTO_SERVER)"
            );
            return None;
        };
        let port = super::free_port();
        let mut cmd = Command::new(&bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let server = Self { child, port };
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "moto_server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(server)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Create a bucket (a plain unsigned PUT, which moto accepts; the code
    /// under test has no bucket-creating call).
    pub fn create_bucket(&self, name: &str) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
    }

    /// The environment the CLI needs to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
            // Fail fast in tests (the default retries for minutes).
            ("RAE_STORE_MAX_RETRIES".into(), "2".into()),
            ("RAE_STORE_RETRY_TIMEOUT".into(), "10".into()),
        ]
    }

    /// A `rae-cache` command with [`S3Server::env`] and a private
    /// read-through cache directory.
    pub fn command(&self, cache_dir: &Path) -> Command {
        let mut cmd = Command::new(super::exe());
        cmd.envs(self.env()).env("RAE_CACHE_DIR", cache_dir);
        cmd
    }

    /// The library's client on `url` of this server (the tests read and
    /// write the store through the same real client, never a mock).
    pub fn remote(&self, url: &str) -> Remote {
        let endpoint = self.endpoint();
        Remote::open_with(
            url,
            &[
                ("aws_access_key_id", KEY_ID),
                ("aws_secret_access_key", SECRET),
                ("aws_region", "us-east-1"),
                ("aws_endpoint", &endpoint),
                ("aws_allow_http", "true"),
            ],
        )
        .unwrap()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Download every object under `remote` into `dir` (same relative names).
pub fn download_all(remote: &Remote, dir: &Path) {
    for (name, _) in remote.list("").unwrap() {
        let to = dir.join(&name);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        remote.download(&name, &to).unwrap().unwrap();
    }
}

/// Upload every file under `dir` to `remote` (same relative names).
pub fn upload_all(remote: &Remote, dir: &Path) {
    fn walk(base: &Path, d: &Path, remote: &Remote) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, remote);
            } else {
                let rel = p
                    .strip_prefix(base)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .replace('\\', "/");
                remote.upload_file(&rel, &p).unwrap();
            }
        }
    }
    walk(dir, dir, remote);
}
