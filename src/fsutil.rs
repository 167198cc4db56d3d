//! Crash-safe file writes: temp file in the same directory, fsync, rename,
//! fsync the directory. A reader never sees a half-written file. Also the
//! one hex encoding and file sha256 that manifests and checkpoints record.

use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use sha2::Digest;

/// Lowercase hex of `bytes`, two digits a byte (digests, seeds).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file's contents, lowercase hex, read in 1 MiB blocks.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Rewrite the JSON header of the safetensors file at `path` in place with
/// its keys sorted. The `safetensors` crate takes metadata as a `HashMap`,
/// whose order changes from process to process; sorted, the same tensors and
/// metadata give the same bytes. Offsets are explicit in the header, so only
/// the order of its text changes, never its length.
pub fn sort_safetensors_header(path: &Path) -> io::Result<()> {
    let bad = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {why}", path.display()),
        )
    };
    let mut f = fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let n = usize::try_from(u64::from_le_bytes(len)).map_err(|e| bad(e.to_string()))?;
    let mut header = vec![0u8; n];
    f.read_exact(&mut header)?;
    // serde_json's map is a BTreeMap (no `preserve_order`): keys come out sorted.
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("safetensors header: {e}")))?;
    let mut sorted = serde_json::to_vec(&v).map_err(|e| bad(e.to_string()))?;
    if sorted.len() > n {
        return Err(bad(
            "sorted safetensors header is longer than the original".into()
        ));
    }
    // safetensors pads the header with spaces to its aligned length
    sorted.resize(n, b' ');
    f.seek(io::SeekFrom::Start(8))?;
    f.write_all(&sorted)
}

/// Temporary sibling name used while `path` is being written.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Write `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    commit_temp(&tmp, path)
}

/// Rename a finished, already-fsynced temp file into place and fsync the
/// parent directory so the rename itself is durable.
pub fn commit_temp(tmp: &Path, path: &Path) -> io::Result<()> {
    fs::rename(tmp, path)?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn hex_and_sha256_file() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(sha256_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn sorted_safetensors_headers_are_identical_and_load() {
        use safetensors::tensor::{Dtype, TensorView};
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..24).collect();
        let write = |name: &str| {
            // a fresh HashMap each time: its iteration order differs
            let meta: std::collections::HashMap<String, String> = (0..16)
                .map(|i| (format!("key{i}"), format!("v{i}")))
                .collect();
            let views = [("b", &data[..8]), ("a", &data[8..])]
                .map(|(k, d)| (k, TensorView::new(Dtype::U8, vec![d.len()], d).unwrap()));
            let p = dir.path().join(name);
            safetensors::serialize_to_file(views, Some(meta), &p).unwrap();
            p
        };
        let files: Vec<PathBuf> = (0..4).map(|i| write(&format!("{i}.st"))).collect();
        for p in &files {
            sort_safetensors_header(p).unwrap();
        }
        let bytes: Vec<Vec<u8>> = files.iter().map(|p| fs::read(p).unwrap()).collect();
        assert!(bytes.iter().all(|b| *b == bytes[0]));
        let st = safetensors::SafeTensors::deserialize(&bytes[0]).unwrap();
        assert_eq!(st.tensor("a").unwrap().data(), &data[8..]);
        assert_eq!(st.tensor("b").unwrap().data(), &data[..8]);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes[0]).unwrap();
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta.len(), 16);
        assert_eq!(meta["key7"], "v7");
    }
}
