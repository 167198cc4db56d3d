//! Where a source's bytes come from. Archives and Parquet files are read
//! through [`ByteSource`] (length + positioned reads), never through a local
//! path, so a store that answers range requests (object storage) can stand
//! in for a local file without touching the tar and Parquet readers.

use crate::error::FileError;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A read-only byte object: a local file today, an object-store object later.
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
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
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
/// on any source (footer and row groups are positioned reads).
#[derive(Clone)]
pub struct ParquetChunks(pub Arc<dyn ByteSource>);

impl parquet::file::reader::Length for ParquetChunks {
    fn len(&self) -> u64 {
        self.0.len()
    }
}

impl parquet::file::reader::ChunkReader for ParquetChunks {
    type T = io::BufReader<RegionReader>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let len = self.0.len().saturating_sub(start);
        Ok(io::BufReader::with_capacity(
            1 << 16,
            RegionReader::new(self.0.clone(), start, len),
        ))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        let mut buf = vec![0u8; length];
        self.0
            .read_exact_at(start, &mut buf)
            .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?;
        Ok(buf.into())
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
