//! Fast path for the latent (and scale) columns: decode the column chunk
//! straight from its Parquet pages into f32, fusing BYTE_STREAM_SPLIT
//! un-splitting with dequantisation, and skipping the generic Arrow list
//! reader (which walks levels element by element and is ~4x slower here).
//!
//! Only the layout our writer produces is handled: data pages (v1 or v2)
//! with BYTE_STREAM_SPLIT or PLAIN values, no dictionary, every definition
//! level at its maximum (no nulls). Anything else returns `Err` and the
//! caller falls back to the generic reader.

use std::sync::Arc;

use half::f16;
use half::slice::HalfFloatSliceExt;
use parquet::basic::Encoding;
use parquet::column::page::{Page, PageReader};
use parquet::file::metadata::ColumnChunkMetaData;
use parquet::file::reader::ChunkReader;
use parquet::file::serialized_reader::SerializedPageReader;

/// How stored values map to f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// FIXED_LEN_BYTE_ARRAY(2) float16.
    F16,
    /// FLOAT.
    F32,
    /// INT32 holding a uint16 bf16 bit pattern.
    Bf16InI32,
    /// INT32 holding an int8 (dequantised later by the caller).
    I8InI32,
}

impl Kind {
    fn width(self) -> usize {
        match self {
            Kind::F16 => 2,
            _ => 4,
        }
    }
}

/// Decode all values of one leaf column chunk into `dst` (whose length is
/// the number of values expected). `max_def`/`max_rep` are the column's
/// maximum definition and repetition levels.
pub(crate) fn read_column<R: ChunkReader + 'static>(
    reader: Arc<R>,
    col: &ColumnChunkMetaData,
    rows: usize,
    max_def: i16,
    max_rep: i16,
    kind: Kind,
    dst: &mut [f32],
) -> Result<(), String> {
    let mut pages =
        SerializedPageReader::new(reader, col, rows, None).map_err(|e| e.to_string())?;
    let mut done = 0usize;
    while let Some(page) = pages.get_next_page().map_err(|e| e.to_string())? {
        let (values, n, encoding) = match &page {
            Page::DataPage {
                buf,
                num_values,
                encoding,
                def_level_encoding,
                rep_level_encoding,
                ..
            } => {
                let n = *num_values as usize;
                let mut pos = 0usize;
                if max_rep > 0 {
                    if *rep_level_encoding != Encoding::RLE {
                        return Err(format!("rep levels encoded as {rep_level_encoding}"));
                    }
                    pos += 4 + prefixed_len(buf, pos)?;
                }
                if max_def > 0 {
                    if *def_level_encoding != Encoding::RLE {
                        return Err(format!("def levels encoded as {def_level_encoding}"));
                    }
                    let len = prefixed_len(buf, pos)?;
                    let levels = buf
                        .get(pos + 4..pos + 4 + len)
                        .ok_or("truncated def levels")?;
                    if !levels_all_equal(levels, bit_width(max_def), n, max_def as u32) {
                        return Err("page has null or empty entries".into());
                    }
                    pos += 4 + len;
                }
                (buf.slice(pos..), n, *encoding)
            }
            Page::DataPageV2 {
                buf,
                num_values,
                num_nulls,
                encoding,
                def_levels_byte_len,
                rep_levels_byte_len,
                ..
            } => {
                if *num_nulls != 0 {
                    return Err("page has null entries".into());
                }
                let pos = (*def_levels_byte_len + *rep_levels_byte_len) as usize;
                if pos > buf.len() {
                    return Err("truncated levels".into());
                }
                (buf.slice(pos..), *num_values as usize, *encoding)
            }
            Page::DictionaryPage { .. } => return Err("dictionary-encoded column".into()),
        };
        let out = dst
            .get_mut(done..done + n)
            .ok_or("more values than rows*list size")?;
        decode(&values, n, encoding, kind, out)?;
        done += n;
    }
    if done != dst.len() {
        return Err(format!("{done} values, expected {}", dst.len()));
    }
    Ok(())
}

fn prefixed_len(buf: &[u8], pos: usize) -> Result<usize, String> {
    let b = buf.get(pos..pos + 4).ok_or("truncated level length")?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

fn bit_width(max: i16) -> u8 {
    (16 - (max as u16).leading_zeros()) as u8
}

/// True if the RLE/bit-packed hybrid `data` holds `count` levels all equal
/// to `value`. Our files hold one RLE run per page; bit-packed groups are
/// checked value by value.
fn levels_all_equal(data: &[u8], bw: u8, count: usize, value: u32) -> bool {
    let mut pos = 0usize;
    let mut seen = 0usize;
    let vbytes = (bw as usize).div_ceil(8);
    while seen < count {
        let Some((header, used)) = uleb128(&data[pos.min(data.len())..]) else {
            return false;
        };
        pos += used;
        if header & 1 == 0 {
            let run = (header >> 1) as usize;
            let Some(b) = data.get(pos..pos + vbytes) else {
                return false;
            };
            let v = b.iter().rev().fold(0u32, |acc, &x| (acc << 8) | x as u32);
            if v != value || run == 0 {
                return false;
            }
            seen += run;
            pos += vbytes;
        } else {
            let groups = (header >> 1) as usize;
            let nbytes = groups * bw as usize;
            let Some(bytes) = data.get(pos..pos + nbytes) else {
                return false;
            };
            let take = (groups * 8).min(count - seen);
            for i in 0..take {
                let bit = i * bw as usize;
                let mut v = 0u32;
                for k in 0..bw as usize {
                    let b = bit + k;
                    v |= (((bytes[b / 8] >> (b % 8)) & 1) as u32) << k;
                }
                if v != value {
                    return false;
                }
            }
            seen += groups * 8;
            pos += nbytes;
        }
    }
    true
}

fn uleb128(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &x) in b.iter().enumerate().take(10) {
        v |= ((x & 0x7f) as u64) << (7 * i);
        if x & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Values of one page -> f32.
fn decode(
    values: &[u8],
    n: usize,
    encoding: Encoding,
    kind: Kind,
    dst: &mut [f32],
) -> Result<(), String> {
    let w = kind.width();
    if values.len() < n * w {
        return Err(format!(
            "page holds {} value bytes, expected {}",
            values.len(),
            n * w
        ));
    }
    // Byte j of value i: BSS at j*n + i, PLAIN at i*w + j. Work in chunks
    // through a small u16/u32 scratch so every loop is a plain gather.
    const CHUNK: usize = 4096;
    let mut scratch16 = [0u16; CHUNK];
    let mut start = 0;
    while start < n {
        let m = CHUNK.min(n - start);
        let out = &mut dst[start..start + m];
        match (encoding, kind) {
            (Encoding::BYTE_STREAM_SPLIT, Kind::F16) => {
                let (s0, s1) = (&values[start..start + m], &values[n + start..n + start + m]);
                for ((d, &a), &b) in scratch16[..m].iter_mut().zip(s0).zip(s1) {
                    *d = u16::from_le_bytes([a, b]);
                }
                let h: &[f16] = bytemuck::cast_slice(&scratch16[..m]);
                h.convert_to_f32_slice(out);
            }
            (Encoding::PLAIN, Kind::F16) => {
                for (d, c) in scratch16[..m]
                    .iter_mut()
                    .zip(values[start * 2..(start + m) * 2].chunks_exact(2))
                {
                    *d = u16::from_le_bytes([c[0], c[1]]);
                }
                let h: &[f16] = bytemuck::cast_slice(&scratch16[..m]);
                h.convert_to_f32_slice(out);
            }
            (Encoding::BYTE_STREAM_SPLIT, _) => {
                let s = |j: usize| &values[j * n + start..j * n + start + m];
                let (s0, s1, s2, s3) = (s(0), s(1), s(2), s(3));
                match kind {
                    Kind::F32 => {
                        for i in 0..m {
                            out[i] = f32::from_le_bytes([s0[i], s1[i], s2[i], s3[i]]);
                        }
                    }
                    Kind::Bf16InI32 => {
                        for i in 0..m {
                            out[i] = f32::from_bits(u32::from_le_bytes([0, 0, s0[i], s1[i]]));
                        }
                    }
                    Kind::I8InI32 => {
                        for i in 0..m {
                            out[i] = s0[i] as i8 as f32;
                        }
                    }
                    Kind::F16 => unreachable!("handled above"),
                }
            }
            (Encoding::PLAIN, _) => {
                let bytes = &values[start * 4..(start + m) * 4];
                for (d, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = match kind {
                        Kind::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                        Kind::Bf16InI32 => f32::from_bits(u32::from_le_bytes([0, 0, c[0], c[1]])),
                        _ => c[0] as i8 as f32,
                    };
                }
            }
            (e, _) => return Err(format!("values encoded as {e}")),
        }
        start += m;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rle_levels() {
        // RLE run of 100 x value 2 (bit width 2): header 100<<1, value byte.
        assert!(levels_all_equal(&[200, 1, 2], 2, 100, 2));
        assert!(!levels_all_equal(&[200, 1, 1], 2, 100, 2));
        // One bit-packed group of 8 values of 2 (0b10 each): 0xAA 0xAA.
        assert!(levels_all_equal(&[0b11, 0xAA, 0xAA], 2, 8, 2));
        assert!(!levels_all_equal(&[0b11, 0xAA, 0xA2], 2, 8, 2));
        assert!(!levels_all_equal(&[], 2, 1, 2));
        assert_eq!(bit_width(2), 2);
        assert_eq!(bit_width(1), 1);
    }
}
