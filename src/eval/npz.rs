//! Reading `.npz` files: ADM sample batches (`arr_0` uint8 `[N,H,W,3]`,
//! streamed, never whole in memory) and ADM reference batches (`mu`,
//! `sigma`, `mu_s`, `sigma_s` f64/f32, plus `arr_0`). Stored (`np.savez`)
//! and deflated (`np.savez_compressed`) members both work.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use super::EvalError;

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyHeader {
    /// dtype, e.g. `<f8`, `|u1`.
    pub descr: String,
    /// Fortran order (not supported for data reads).
    pub fortran: bool,
    /// Shape.
    pub shape: Vec<usize>,
}

impl NpyHeader {
    /// Elements in the array.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether the array has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn field<'a>(dict: &'a str, key: &str) -> Option<&'a str> {
    let at = dict.find(&format!("'{key}'"))? + key.len() + 2;
    Some(dict[at..].trim_start().strip_prefix(':')?.trim_start())
}

/// Parse the magic, version and header dict of a `.npy` stream.
pub fn read_npy_header(r: &mut impl Read, what: &Path) -> Result<NpyHeader, EvalError> {
    let bad = |why: String| EvalError::format(what, why);
    let mut pre = [0u8; 8];
    r.read_exact(&mut pre).map_err(|e| EvalError::io(what, e))?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy member (bad magic)".into()));
    }
    let len = if pre[6] == 1 {
        let mut b = [0u8; 2];
        r.read_exact(&mut b).map_err(|e| EvalError::io(what, e))?;
        u16::from_le_bytes(b) as usize
    } else {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).map_err(|e| EvalError::io(what, e))?;
        u32::from_le_bytes(b) as usize
    };
    let mut dict = vec![0u8; len];
    r.read_exact(&mut dict)
        .map_err(|e| EvalError::io(what, e))?;
    let dict = String::from_utf8_lossy(&dict).into_owned();
    let descr = field(&dict, "descr")
        .and_then(|s| s.strip_prefix('\''))
        .and_then(|s| s.split('\'').next())
        .ok_or_else(|| bad(format!("npy header without descr: {dict}")))?
        .to_string();
    let fortran = field(&dict, "fortran_order").is_some_and(|s| s.starts_with("True"));
    let shape_txt = field(&dict, "shape")
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad(format!("npy header without shape: {dict}")))?;
    let shape = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("npy shape {shape_txt:?}: {e}")))?;
    Ok(NpyHeader {
        descr,
        fortran,
        shape,
    })
}

fn archive(path: &Path) -> Result<zip::ZipArchive<BufReader<File>>, EvalError> {
    let f = File::open(path).map_err(|e| EvalError::io(path, e))?;
    zip::ZipArchive::new(BufReader::with_capacity(1 << 20, f))
        .map_err(|e| EvalError::format(path, format!("not an npz (zip) file: {e}")))
}

/// The array names in an `.npz` (without `.npy`).
pub fn names(path: &Path) -> Result<Vec<String>, EvalError> {
    let a = archive(path)?;
    Ok(a.file_names()
        .filter_map(|n| n.ok().map(|n| n.trim_end_matches(".npy").to_string()))
        .collect())
}

/// Calls `f` with the header and a reader positioned at the data of `name`.
pub fn with_array<T>(
    path: &Path,
    name: &str,
    f: impl FnOnce(&NpyHeader, &mut dyn Read) -> Result<T, EvalError>,
) -> Result<T, EvalError> {
    let mut a = archive(path)?;
    let mut member = a
        .by_name(&format!("{name}.npy"))
        .map_err(|_| EvalError::format(path, format!("no array {name:?} in the npz")))?;
    let h = read_npy_header(&mut member, path)?;
    if h.fortran {
        return Err(EvalError::format(
            path,
            format!("{name}: Fortran-order arrays are not supported"),
        ));
    }
    f(&h, &mut member)
}

/// A float array (`<f8`, `<f4` or `<f2`) as f64, with its shape.
pub fn read_f64(path: &Path, name: &str) -> Result<(Vec<f64>, Vec<usize>), EvalError> {
    with_array(path, name, |h, r| {
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes)
            .map_err(|e| EvalError::io(path, e))?;
        let v: Vec<f64> = match h.descr.as_str() {
            "<f8" => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            "<f4" => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as f64)
                .collect(),
            "<f2" => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            d => {
                return Err(EvalError::format(
                    path,
                    format!("{name}: dtype {d}, expected a float array"),
                ));
            }
        };
        if v.len() != h.len() {
            return Err(EvalError::format(
                path,
                format!(
                    "{name}: {} values for shape {:?} (truncated?)",
                    v.len(),
                    h.shape
                ),
            ));
        }
        Ok((v, h.shape.clone()))
    })
}

/// Shape `[N, H, W]` of the uint8 RGB images `arr_0`.
pub fn image_shape(path: &Path) -> Result<(usize, usize, usize), EvalError> {
    with_array(path, "arr_0", |h, _| check_images(path, h))
}

fn check_images(path: &Path, h: &NpyHeader) -> Result<(usize, usize, usize), EvalError> {
    match (h.descr.as_str(), h.shape.as_slice()) {
        ("|u1", &[n, hh, w, 3]) => Ok((n, hh, w)),
        (d, s) => Err(EvalError::format(
            path,
            format!("arr_0 is {d} {s:?}, expected uint8 [N, H, W, 3] images"),
        )),
    }
}

/// Streams `arr_0` (at most `limit` images) in batches of `batch` images:
/// `f(pixels NHWC, n, height, width)`.
pub fn for_each_image_batch(
    path: &Path,
    batch: usize,
    limit: Option<usize>,
    mut f: impl FnMut(&[u8], usize, usize, usize) -> Result<(), EvalError>,
) -> Result<usize, EvalError> {
    with_array(path, "arr_0", |h, r| {
        let (n, hh, w) = check_images(path, h)?;
        let n = limit.map_or(n, |l| l.min(n));
        let per = hh * w * 3;
        let mut buf = vec![0u8; batch.max(1) * per];
        let mut done = 0;
        while done < n {
            let b = batch.max(1).min(n - done);
            r.read_exact(&mut buf[..b * per]).map_err(|e| {
                EvalError::format(path, format!("arr_0: image {done}: {e} (truncated?)"))
            })?;
            f(&buf[..b * per], b, hh, w)?;
            done += b;
        }
        Ok(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_what_the_npz_writer_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npz");
        let mut w = crate::generate::npz::NpzWriter::create(&p, 3, 2, 2).unwrap();
        for i in 0..3u8 {
            w.push(&[i; 12]).unwrap();
        }
        w.finish().unwrap();
        assert_eq!(image_shape(&p).unwrap(), (3, 2, 2));
        let mut seen = Vec::new();
        let n = for_each_image_batch(&p, 2, None, |px, n, _, _| {
            seen.push((n, px[0], px[px.len() - 1]));
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 3);
        assert_eq!(seen, vec![(2, 0, 1), (1, 2, 2)]);
        assert!(
            read_f64(&p, "mu")
                .unwrap_err()
                .to_string()
                .contains("no array")
        );
        // a deflated f64 member (np.savez_compressed)
        let q = dir.path().join("b.npz");
        let mut z = zip::ZipWriter::new(File::create(&q).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        z.start_file("mu.npy", opts).unwrap();
        z.write_all(&crate::generate::npz::npy_header("<f8", &[2]))
            .unwrap();
        z.write_all(&1.5f64.to_le_bytes()).unwrap();
        z.write_all(&(-2.0f64).to_le_bytes()).unwrap();
        z.finish().unwrap();
        assert_eq!(read_f64(&q, "mu").unwrap(), (vec![1.5, -2.0], vec![2]));
        assert!(image_shape(&q).is_err());
    }
}
