//! Memory-mapped model files: the one place this crate maps a file (and so the one place,
//! besides the SIMD kernels, with `unsafe`).
//!
//! A GGUF file is mapped read-only and its weights are used in place: a worker's resident
//! memory is the file's pages plus its KV cache, and every worker of the same model on a node
//! shares the same page-cache pages. [`Bytes`] is a cheap, clonable view of part of a mapping
//! (or of an owned buffer, for tests and formats that are converted at load).
#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn as_slice(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// Part of a mapped file or of an owned buffer.
#[derive(Clone)]
pub(crate) struct Bytes {
    storage: Arc<Storage>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bytes")
            .field("mapped", &self.is_mapped())
            .field("start", &self.start)
            .field("len", &self.len)
            .finish()
    }
}

impl Bytes {
    /// Maps `path` read-only, pages read in ahead (so the first requests do not fault them in
    /// one by one).
    ///
    /// The file must not be modified or truncated while mapped: replace model files by writing
    /// a new file and renaming it over the old one (the mapping keeps the old inode alive), as
    /// package managers and `cp --remove-destination` do.
    pub(crate) fn map(path: &Path) -> std::io::Result<Bytes> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            // mmap(2) refuses empty mappings; an empty file is simply no bytes.
            return Ok(Bytes::from_vec(Vec::new()));
        }
        // SAFETY: the mapping is read-only and we never create a mutable view of it. What Rust
        // cannot rule out is another process truncating or rewriting the file while it is
        // mapped (a read of a truncated page raises SIGBUS, a rewrite changes bytes under
        // shared references); model files are treated as immutable while served, which the
        // function's documentation requires of operators, as llama.cpp and vLLM require it.
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file)? };
        let len = map.len();
        Ok(Bytes {
            storage: Arc::new(Storage::Mapped(map)),
            start: 0,
            len,
        })
    }

    /// An owned buffer.
    pub(crate) fn from_vec(v: Vec<u8>) -> Bytes {
        let len = v.len();
        Bytes {
            storage: Arc::new(Storage::Owned(v)),
            start: 0,
            len,
        }
    }

    /// The bytes.
    #[inline]
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.storage.as_slice()[self.start..self.start + self.len]
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the bytes live in a file mapping.
    pub(crate) fn is_mapped(&self) -> bool {
        matches!(*self.storage, Storage::Mapped(_))
    }

    /// A sub-range; `None` when it is out of bounds.
    pub(crate) fn slice(&self, range: Range<usize>) -> Option<Bytes> {
        (range.start <= range.end && range.end <= self.len).then(|| Bytes {
            storage: Arc::clone(&self.storage),
            start: self.start + range.start,
            len: range.end - range.start,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_a_file_and_slices_it() {
        let dir = std::env::temp_dir().join(format!("kvfleet-mmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.bin");
        std::fs::write(&path, (0u8..=255).collect::<Vec<_>>()).unwrap();
        let b = Bytes::map(&path).unwrap();
        assert!(b.is_mapped());
        assert_eq!(b.len(), 256);
        let s = b.slice(10..20).unwrap();
        assert_eq!(s.as_slice(), &(10u8..20).collect::<Vec<_>>()[..]);
        assert_eq!(s.slice(2..4).unwrap().as_slice(), &[12, 13]);
        assert!(s.slice(5..11).is_none());
        std::fs::write(dir.join("empty"), b"").unwrap();
        assert_eq!(Bytes::map(&dir.join("empty")).unwrap().len(), 0);
        assert!(Bytes::map(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
