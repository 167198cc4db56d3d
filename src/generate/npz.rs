//! `.npy` headers and the ADM evaluator's `.npz`: `arr_0` = uint8
//! `[N,H,W,3]`, as `np.savez` writes it (a zip of `.npy` files, stored, no
//! compression). Rows are streamed, so N x 196 KiB never sits in memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use zip::write::SimpleFileOptions;

use super::GenerateError;

/// A version 1.0 `.npy` header for a C-order array (`descr` e.g. `|u1`,
/// `<f4`), padded with spaces to a multiple of 64 bytes, newline-terminated.
pub fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    let pre = 10; // magic (6) + version (2) + header length (2)
    let total = (pre + dict.len() + 1).div_ceil(64) * 64;
    let mut h = Vec::with_capacity(total);
    h.extend_from_slice(b"\x93NUMPY\x01\x00");
    h.extend_from_slice(&((total - pre) as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h.resize(total - 1, b' ');
    h.push(b'\n');
    h
}

/// Streams `N` uint8 images `[H,W,3]` into `<path>` as `arr_0`.
pub struct NpzWriter {
    zip: zip::ZipWriter<BufWriter<File>>,
    path: PathBuf,
    expected: usize,
    image_bytes: usize,
    written: usize,
}

impl NpzWriter {
    /// Start an `.npz` at `path` for `n` images of `h x w` RGB8.
    pub fn create(path: &Path, n: usize, h: usize, w: usize) -> Result<Self, GenerateError> {
        let file = File::create(path).map_err(|e| GenerateError::io(path, e))?;
        let mut zip = zip::ZipWriter::new(BufWriter::with_capacity(1 << 20, file));
        let image_bytes = h * w * 3;
        let opts = SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            // zip64 once the member can pass 4 GiB (50k 256px images do)
            .large_file((n * image_bytes) as u64 + 128 >= u32::MAX as u64);
        zip.start_file("arr_0.npy", opts)
            .map_err(|e| zip_err(path, e))?;
        zip.write_all(&npy_header("|u1", &[n, h, w, 3]))
            .map_err(|e| GenerateError::io(path, e))?;
        Ok(Self {
            zip,
            path: path.to_path_buf(),
            expected: n,
            image_bytes,
            written: 0,
        })
    }

    /// Append one image, `h*w*3` bytes, HWC.
    pub fn push(&mut self, hwc: &[u8]) -> Result<(), GenerateError> {
        if hwc.len() != self.image_bytes || self.written == self.expected {
            return Err(GenerateError::Invalid(format!(
                "{}: image {} of {} bytes does not fit the declared array",
                self.path.display(),
                self.written,
                hwc.len()
            )));
        }
        self.zip
            .write_all(hwc)
            .map_err(|e| GenerateError::io(&self.path, e))?;
        self.written += 1;
        Ok(())
    }

    /// Close the archive; fails unless exactly `n` images were pushed.
    pub fn finish(self) -> Result<(), GenerateError> {
        if self.written != self.expected {
            return Err(GenerateError::Invalid(format!(
                "{}: {} images written, {} declared",
                self.path.display(),
                self.written,
                self.expected
            )));
        }
        let path = self.path;
        let mut w = self.zip.finish().map_err(|e| zip_err(&path, e))?;
        w.flush().map_err(|e| GenerateError::io(&path, e))?;
        Ok(())
    }
}

fn zip_err(path: &Path, e: zip::result::ZipError) -> GenerateError {
    GenerateError::Invalid(format!("{}: zip: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_aligned_and_parsable() {
        let h = npy_header("|u1", &[2, 4, 4, 3]);
        assert_eq!(h.len() % 64, 0);
        assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
        let len = u16::from_le_bytes([h[8], h[9]]) as usize;
        assert_eq!(len + 10, h.len());
        let dict = std::str::from_utf8(&h[10..]).unwrap();
        assert!(dict.contains("'shape': (2, 4, 4, 3)"));
        assert!(dict.ends_with('\n'));
        assert!(
            std::str::from_utf8(&npy_header("<f4", &[5])[10..])
                .unwrap()
                .contains("(5,)")
        );
    }
}
