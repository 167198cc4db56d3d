//! PyTorch's legacy (pre-1.6, non-zip) `torch.save` format, which candle's
//! pickle reader (zip only) does not open. Files published before 2020,
//! such as FID Inception weights, may use it.
//!
//! The zip format is read here too (tensor records by candle's pickle
//! reader, bytes gathered here), because candle's own loader refuses views
//! that are not contiguous, which `torch.save` writes for sliced tensors.
//!
//! Legacy layout (torch/serialization.py `_legacy_save`): five pickles in a row:
//! the magic number, the protocol version, sys_info, the object (tensors
//! refer to storages through persistent ids `('storage', FloatStorage,
//! key, location, numel, ...)`), the sorted list of storage keys; then for
//! each key in that order an i64 element count and the raw little-endian
//! storage bytes.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use super::FeatureError;

/// The magic-number pickle: PROTO 2, LONG1 10 bytes 0x1950a86a20f9469cfc6c, STOP.
const MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];

fn err(path: &Path, reason: impl Into<String>) -> FeatureError {
    FeatureError::Weights {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Whether the file starts with the legacy magic number.
pub fn is_legacy(path: &Path) -> bool {
    let mut head = [0u8; 15];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && head == MAGIC
}

fn read_pickle<R: BufRead>(r: &mut R, path: &Path, what: &str) -> Result<Object, FeatureError> {
    let mut stack = Stack::empty();
    stack
        .read_loop(r)
        .and_then(|_| stack.finalize())
        .map_err(|e| {
            err(
                path,
                format!("legacy torch file: cannot read the {what} pickle: {e}"),
            )
        })
}

/// Every tensor of the top-level dict (a state dict) of a legacy file, on
/// `device`, dtype as stored.
pub fn read_legacy(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>, FeatureError> {
    let file = std::fs::File::open(path).map_err(|e| err(path, e.to_string()))?;
    let mut r = BufReader::new(file);
    let mut head = [0u8; 15];
    r.read_exact(&mut head)
        .map_err(|e| err(path, e.to_string()))?;
    if head != MAGIC {
        return Err(err(path, "not a legacy torch.save file (bad magic number)"));
    }
    read_pickle(&mut r, path, "protocol")?;
    read_pickle(&mut r, path, "sys_info")?;
    let obj = read_pickle(&mut r, path, "state dict")?;
    let keys = match read_pickle(&mut r, path, "storage keys")? {
        Object::List(v) => v
            .into_iter()
            .map(|k| {
                k.unicode()
                    .map_err(|_| err(path, "storage key is not a string"))
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err(err(path, "storage key list is not a list")),
    };
    // The element size of each storage: its class in the persistent id.
    let mut elem: HashMap<String, usize> = HashMap::new();
    storage_sizes(&obj, &mut elem);
    let Object::Dict(entries) = obj else {
        return Err(err(path, "the saved object is not a dict of tensors"));
    };
    let mut infos = Vec::new();
    for (name, value) in entries {
        if let Some(info) = value
            .into_tensor_info(name, Path::new(""))
            .map_err(|e| err(path, e.to_string()))?
        {
            infos.push(info);
        }
    }
    // The storages, in key order: i64 element count, then the bytes.
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for key in keys {
        let mut n = [0u8; 8];
        r.read_exact(&mut n)
            .map_err(|e| err(path, format!("storage {key}: {e}")))?;
        let numel = i64::from_le_bytes(n);
        let es = *elem
            .get(&key)
            .ok_or_else(|| err(path, format!("storage {key}: unknown element type")))?;
        let len = usize::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(es))
            .ok_or_else(|| err(path, format!("storage {key}: bad size {numel}")))?;
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf)
            .map_err(|e| err(path, format!("storage {key}: truncated ({e})")))?;
        storages.insert(key, buf);
    }
    infos
        .into_iter()
        .map(|i| {
            let key = i.path.trim_start_matches('/');
            let bytes = storages
                .get(key)
                .ok_or_else(|| err(path, format!("{}: storage {key} missing", i.name)))?;
            let t = strided(bytes, i.dtype, &i.layout, device)
                .map_err(|e| err(path, format!("{}: {e}", i.name)))?;
            Ok((i.name, t))
        })
        .collect()
}

/// Element size of every storage named by a persistent id
/// `('storage', <module>.<Type>Storage, key, location, numel, ...)` in `obj`.
fn storage_sizes(obj: &Object, out: &mut HashMap<String, usize>) {
    match obj {
        Object::PersistentLoad(id) => {
            if let Object::Tuple(t) = id.as_ref()
                && let (Some(Object::Class { class_name, .. }), Some(Object::Unicode(key))) =
                    (t.get(1), t.get(2))
            {
                let size = match class_name.as_str() {
                    "DoubleStorage" | "LongStorage" => 8,
                    "FloatStorage" | "IntStorage" => 4,
                    "HalfStorage" | "BFloat16Storage" | "ShortStorage" => 2,
                    _ => 1,
                };
                out.insert(key.clone(), size);
            }
        }
        Object::Tuple(v) | Object::List(v) => v.iter().for_each(|o| storage_sizes(o, out)),
        Object::Dict(kv) => kv.iter().for_each(|(k, v)| {
            storage_sizes(k, out);
            storage_sizes(v, out);
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            storage_sizes(callable, out);
            storage_sizes(args, out);
        }
        _ => {}
    }
}

/// Every tensor of the top-level dict of a PyTorch zip checkpoint.
pub fn read_zip(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>, FeatureError> {
    let infos = candle_core::pickle::read_pth_tensor_info(path, false, None)
        .map_err(|e| err(path, format!("PyTorch zip checkpoint: {e}")))?;
    let file = std::fs::File::open(path).map_err(|e| err(path, e.to_string()))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| err(path, format!("PyTorch zip checkpoint: {e}")))?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(infos.len());
    for i in infos {
        if !storages.contains_key(&i.path) {
            let mut buf = Vec::new();
            zip.by_name(&i.path)
                .and_then(|mut f| f.read_to_end(&mut buf).map_err(Into::into))
                .map_err(|e| err(path, format!("{}: storage {}: {e}", i.name, i.path)))?;
            storages.insert(i.path.clone(), buf);
        }
        let t = strided(&storages[&i.path], i.dtype, &i.layout, device)
            .map_err(|e| err(path, format!("{}: {e}", i.name)))?;
        out.push((i.name, t));
    }
    Ok(out)
}

/// Gather a (possibly strided, offset) view of a raw storage into a
/// contiguous tensor.
fn strided(
    bytes: &[u8],
    dtype: DType,
    layout: &candle_core::Layout,
    device: &Device,
) -> Result<Tensor, String> {
    let es = dtype.size_in_bytes();
    let dims = layout.dims();
    let stride = layout.stride();
    let numel: usize = dims.iter().product();
    let mut out = Vec::with_capacity(numel * es);
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..numel {
        let off =
            layout.start_offset() + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>() * es;
        let src = bytes
            .get(off..off + es)
            .ok_or_else(|| format!("view {dims:?} / {stride:?} runs past its storage"))?;
        out.extend_from_slice(src);
        for d in (0..dims.len()).rev() {
            idx[d] += 1;
            if idx[d] < dims[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Tensor::from_raw_buffer(&out, dtype, dims, device).map_err(|e| e.to_string())
}
