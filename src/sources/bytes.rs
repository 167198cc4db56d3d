//! Where a source's bytes come from. Archives and Parquet files are read
//! through [`ByteSource`] (length + positioned reads), never through a local
//! path, so an object in a store (see `sources::remote`) stands in for a
//! local file without touching the tar and Parquet readers.

use crate::error::FileError;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A read-only byte object: a local file or an object-store object.
pub trait ByteSource: Send + Sync {
    /// Its name in messages and listings (a path or URL).
    fn name(&self) -> &str;
    /// Its length in bytes, as seen when it was opened.
    fn len(&self) -> u64;
    /// Whether it holds no byte.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fill `buf` from `offset`; an `UnexpectedEof` error when the object
    /// ends first (a truncated archive).
    /// Reads are expected to move forward (an archive read in order), so a
    /// store object streams ahead from here.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The bytes `offset..offset + len` read on their own (a Parquet
    /// column chunk): a store object asks for exactly them. Same errors as
    /// [`ByteSource::read_exact_at`].
    fn read_range(&self, offset: u64, len: usize) -> io::Result<bytes::Bytes> {
        let mut buf = vec![0u8; len];
        self.read_exact_at(offset, &mut buf)?;
        Ok(buf.into())
    }
}

/// A local file, read with positioned reads (thread-safe, no shared cursor).
pub struct LocalFile {
    name: String,
    file: File,
    len: u64,
}

impl LocalFile {
    /// Open `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            name: path.display().to_string(),
            file,
            len,
        })
    }
}

impl ByteSource for LocalFile {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        #[cfg(unix)]
        {
            std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
        }
        #[cfg(not(unix))]
        {
            let mut f = self.file.try_clone()?;
            f.seek(SeekFrom::Start(offset))?;
            f.read_exact(buf)
        }
    }
}

/// Open a local path as a [`ByteSource`].
pub fn open_local(path: &Path) -> Result<Arc<dyn ByteSource>, super::SourceError> {
    LocalFile::open(path)
        .map(|f| Arc::new(f) as Arc<dyn ByteSource>)
        .map_err(|source| super::SourceError::from(FileError::io(PathBuf::from(path), source)))
}

/// `Read + Seek` over the region `start..start + len` of a [`ByteSource`]
/// (an archive, or a tar nested in one). Reads past the region's end, or
/// past the object's end, return 0 bytes (end of file).
pub struct RegionReader {
    src: Arc<dyn ByteSource>,
    start: u64,
    len: u64,
    pos: u64,
}

impl RegionReader {
    /// The region `start..start + len`, clipped to the object's length.
    pub fn new(src: Arc<dyn ByteSource>, start: u64, len: u64) -> Self {
        let len = len.min(src.len().saturating_sub(start));
        Self {
            src,
            start,
            len,
            pos: 0,
        }
    }

    /// Length of the region (after clipping).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Read for RegionReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.src
            .read_exact_at(self.start + self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for RegionReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
        };
        self.pos = target
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

/// A [`ByteSource`] as Parquet's `ChunkReader`, so the Parquet reader works
/// on any source (footer and row groups are positioned reads). Byte ranges
/// fetched ahead ([`ParquetChunks::prefetch`]: the column chunks a read
/// needs, one request each) are served from memory, so a store object is
/// read with a few range requests rather than one per page.
#[derive(Clone)]
pub struct ParquetChunks {
    src: Arc<dyn ByteSource>,
    /// (offset, bytes), sorted by offset.
    fetched: Arc<Vec<(u64, bytes::Bytes)>>,
}

impl ParquetChunks {
    /// Read `src` as it is.
    pub fn new(src: Arc<dyn ByteSource>) -> Self {
        Self {
            src,
            fetched: Arc::default(),
        }
    }

    /// These chunks with `ranges` (offset, length) read now, each at once
    /// (adjacent ranges merged).
    pub fn prefetch(&self, ranges: impl IntoIterator<Item = (u64, u64)>) -> io::Result<Self> {
        let mut ranges: Vec<(u64, u64)> = ranges.into_iter().filter(|r| r.1 > 0).collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (o, l) in ranges {
            match merged.last_mut() {
                Some((mo, ml)) if o <= *mo + *ml => *ml = (*ml).max(o + l - *mo),
                _ => merged.push((o, l)),
            }
        }
        let fetched = merged
            .into_iter()
            .map(|(o, l)| Ok((o, self.src.read_range(o, l as usize)?)))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            src: self.src.clone(),
            fetched: Arc::new(fetched),
        })
    }

    /// The fetched bytes from `start` to the end of their range, if fetched.
    fn fetched_from(&self, start: u64) -> Option<bytes::Bytes> {
        let i = self.fetched.partition_point(|(o, _)| *o <= start);
        let (o, b) = self.fetched.get(i.checked_sub(1)?)?;
        let at = (start - o) as usize;
        (at < b.len()).then(|| b.slice(at..))
    }
}

impl parquet::file::reader::Length for ParquetChunks {
    fn len(&self) -> u64 {
        self.src.len()
    }
}

/// Either fetched bytes or the source itself.
pub enum ChunkRead {
    /// Bytes already in memory.
    Fetched(bytes::buf::Reader<bytes::Bytes>),
    /// A buffered read of the source.
    Source(io::BufReader<RegionReader>),
}

impl Read for ChunkRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ChunkRead::Fetched(r) => r.read(buf),
            ChunkRead::Source(r) => r.read(buf),
        }
    }
}

impl parquet::file::reader::ChunkReader for ParquetChunks {
    type T = ChunkRead;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        if let Some(b) = self.fetched_from(start) {
            return Ok(ChunkRead::Fetched(bytes::Buf::reader(b)));
        }
        let len = self.src.len().saturating_sub(start);
        Ok(ChunkRead::Source(io::BufReader::with_capacity(
            1 << 16,
            RegionReader::new(self.src.clone(), start, len),
        )))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        if let Some(b) = self.fetched_from(start).filter(|b| b.len() >= length) {
            return Ok(b.slice(..length));
        }
        self.src
            .read_range(start, length)
            .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u8>);
    impl ByteSource for Mem {
        fn name(&self) -> &str {
            "mem"
        }
        fn len(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let o = offset as usize;
            match self.0.get(o..o + buf.len()) {
                Some(s) => {
                    buf.copy_from_slice(s);
                    Ok(())
                }
                None => Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
    }

    #[test]
    fn region_reads_and_seeks_within_bounds() {
        let src: Arc<dyn ByteSource> = Arc::new(Mem((0u8..100).collect()));
        let mut r = RegionReader::new(src.clone(), 10, 20);
        let mut v = Vec::new();
        r.read_to_end(&mut v).unwrap();
        assert_eq!(v, (10u8..30).collect::<Vec<_>>());
        r.seek(SeekFrom::Start(18)).unwrap();
        let mut b = [0u8; 8];
        assert_eq!(r.read(&mut b).unwrap(), 2);
        assert_eq!(&b[..2], &[28, 29]);
        // Clipped at the object's end (a truncated nested tar).
        let r = RegionReader::new(src, 90, 50);
        assert_eq!(r.len(), 10);
    }
}
