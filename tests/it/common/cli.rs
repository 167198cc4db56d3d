//! The `rae-cache` binary under test, for the tests that go through the CLI.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The binary under test: `$RAE_CACHE_BIN` when set (e.g. a copy, when a
/// shared target directory may be rebuilt by another checkout meanwhile),
/// else the one cargo built for this test binary. Resolved once.
pub fn exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        std::env::var_os("RAE_CACHE_BIN")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_rae-cache").into())
    })
}

/// A command for the binary, logging at `warn` (`RAE_LOG`; a test may
/// override it with `.env`).
pub fn bin() -> Command {
    let mut c = Command::new(exe());
    c.env("RAE_LOG", "warn");
    c
}

/// Run `rae-cache ARGS` (as [`bin`]) and assert it succeeded, showing its
/// stderr when not; returns its output.
pub fn run_ok<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = bin().args(&args).output().expect("spawn rae-cache");
    assert!(
        out.status.success(),
        "rae-cache {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A run's stdout as UTF-8.
pub fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf8 stdout")
}

/// A run's stdout as JSON (`bench` prints one JSON line, `--json` commands
/// one object, possibly pretty-printed).
pub fn json(out: &Output) -> serde_json::Value {
    let s = stdout(out);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// `rae-cache build IMAGES --encoder <the tiny fixture DINOv2> --out OUT
/// EXTRA...`, asserted to succeed.
pub fn build_fixture_cache(images: &Path, out: &Path, extra: &[&str]) -> Output {
    let encoder = super::fixture("encoder-dinov2reg");
    let mut args: Vec<OsString> = vec!["build".into(), images.into(), "--encoder".into()];
    args.extend([encoder.into_os_string(), "--out".into(), out.into()]);
    args.extend(extra.iter().map(OsString::from));
    run_ok(args)
}
