//! G3's block files: the format (pure encode and decode) and the directory they live in.
//!
//! Each block is one file, `<dir>/<layout fingerprint>/<sequence hash>.kvb` (both 16 hex
//! digits), written to a `.tmp` name and renamed, so a crash leaves a whole file or a stray
//! `.tmp` that the next start deletes. The file is a 64-byte header and the block's bytes:
//!
//! ```text
//! offset size field
//!      0    4 magic "KVFB"
//!      4    2 format version (1), little-endian like every field
//!      6    2 header length (64)
//!      8    8 KV layout fingerprint (`KvLayout::fingerprint`)
//!     16    8 sequence hash
//!     24    8 local hash
//!     32    8 parent sequence hash (0 when none)
//!     40    1 1 when the block has a parent, else 0
//!     41    1 1 when another node supplied the block (an import), else 0
//!     42    6 zero
//!     48    8 payload length
//!     56    8 payload checksum (`kvfleet_proto::peer::block_checksum`, XXH3-64)
//!     64    - payload
//! ```
//!
//! The header is enough to rebuild the index at start (the directory is the index: it survives
//! restarts by construction); the checksum is verified on every read. A block another node
//! supplied is not kept across a restart: the scan deletes it, because which node supplied it
//! (an id interned by the worker process) is not on disk, so a revocation could not find it.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use kvfleet_proto::hash::chain;
use kvfleet_proto::peer::block_checksum;
use kvfleet_proto::{BlockHash, LocalBlockHash, SequenceHash};

use super::book::Fault;

/// Bytes before the payload.
pub const HEADER_BYTES: usize = 64;
const MAGIC: &[u8; 4] = b"KVFB";
const VERSION: u16 = 1;

/// A block file's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    /// The layout fingerprint it was written for.
    pub layout: u64,
    /// The block's hashes.
    pub hash: BlockHash,
    /// Its parent.
    pub parent: Option<SequenceHash>,
    /// Payload bytes.
    pub payload_len: u64,
    /// The payload's checksum.
    pub checksum: u64,
    /// Another node supplied it.
    pub supplied: bool,
}

/// A block file's bytes: header then payload.
pub fn encode(
    layout: u64,
    hash: BlockHash,
    parent: Option<SequenceHash>,
    payload: &[u8],
) -> Vec<u8> {
    encode_supplied(layout, hash, parent, payload, false)
}

/// [`encode`], marking the block as supplied by another node when `supplied`.
pub fn encode_supplied(
    layout: u64,
    hash: BlockHash,
    parent: Option<SequenceHash>,
    payload: &[u8],
    supplied: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(HEADER_BYTES as u16).to_le_bytes());
    out.extend_from_slice(&layout.to_le_bytes());
    out.extend_from_slice(&hash.sequence.0.to_le_bytes());
    out.extend_from_slice(&hash.local.0.to_le_bytes());
    out.extend_from_slice(&parent.map_or(0, |p| p.0).to_le_bytes());
    out.push(u8::from(parent.is_some()));
    out.push(u8::from(supplied));
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&block_checksum(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parses and checks a header against what this engine expects: its layout, the block the
/// file is named for, its block size. Never panics.
pub fn decode_header(
    bytes: &[u8],
    layout: u64,
    expect: SequenceHash,
    block_bytes: u64,
) -> Result<BlockHeader, Fault> {
    if bytes.len() < HEADER_BYTES {
        return Err(Fault::Truncated);
    }
    if &bytes[0..4] != MAGIC
        || u16::from_le_bytes([bytes[4], bytes[5]]) != VERSION
        || u16::from_le_bytes([bytes[6], bytes[7]]) as usize != HEADER_BYTES
    {
        return Err(Fault::Header);
    }
    let header = BlockHeader {
        layout: u64_at(bytes, 8),
        hash: BlockHash {
            sequence: SequenceHash(u64_at(bytes, 16)),
            local: LocalBlockHash(u64_at(bytes, 24)),
        },
        parent: (bytes[40] == 1).then(|| SequenceHash(u64_at(bytes, 32))),
        payload_len: u64_at(bytes, 48),
        checksum: u64_at(bytes, 56),
        supplied: bytes[41] == 1,
    };
    if header.layout != layout {
        return Err(Fault::Layout);
    }
    if header.payload_len != block_bytes {
        return Err(Fault::Layout);
    }
    if header.hash.sequence != expect || chain(header.parent, header.hash.local) != expect {
        return Err(Fault::Header);
    }
    Ok(header)
}

/// Checks a whole file's bytes and returns its payload.
pub fn decode(
    bytes: &[u8],
    layout: u64,
    expect: SequenceHash,
    block_bytes: u64,
) -> Result<&[u8], Fault> {
    let header = decode_header(bytes, layout, expect, block_bytes)?;
    let payload = &bytes[HEADER_BYTES..];
    if payload.len() as u64 != header.payload_len {
        return Err(Fault::Truncated);
    }
    if block_checksum(payload) != header.checksum {
        return Err(Fault::Checksum);
    }
    Ok(payload)
}

/// The directory of one layout's block files.
pub fn layout_dir(root: &Path, layout: u64) -> PathBuf {
    root.join(format!("{layout:016x}"))
}

/// The file of one block.
pub fn block_path(dir: &Path, hash: SequenceHash) -> PathBuf {
    dir.join(format!("{:016x}.kvb", hash.0))
}

/// What a start-up scan of the directory found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Usable blocks, oldest (least recently written) first.
    pub blocks: Vec<(BlockHash, Option<SequenceHash>)>,
    /// Files deleted because they were unusable (bad name, header, length, layout; `.tmp`
    /// leftovers of an interrupted write) or held a block another node supplied.
    pub deleted: u64,
}

/// Reads every block file's header in `dir` (creating it if absent), deletes what is
/// unusable, and returns the rest oldest first. Payload checksums are checked on reads, not
/// here: a scan of a full disk reads 64 bytes per block.
pub fn scan(dir: &Path, layout: u64, block_bytes: u64) -> io::Result<Scan> {
    fs::create_dir_all(dir)?;
    let mut found = Vec::new();
    let mut scan = Scan::default();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let parsed = name
            .strip_suffix(".kvb")
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .map(SequenceHash);
        let usable = parsed.and_then(|seq| {
            let meta = entry.metadata().ok()?;
            if !meta.is_file() || meta.len() != HEADER_BYTES as u64 + block_bytes {
                return None;
            }
            let mut header = [0u8; HEADER_BYTES];
            fs::File::open(&path).ok()?.read_exact(&mut header).ok()?;
            let h = decode_header(&header, layout, seq, block_bytes).ok()?;
            // A supplied block's origin is gone with the process that interned it.
            if h.supplied {
                return None;
            }
            Some((meta.modified().ok(), h.hash, h.parent))
        });
        match usable {
            Some(block) => found.push(block),
            None => {
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    let _ = fs::remove_file(&path);
                    scan.deleted += 1;
                }
            }
        }
    }
    found.sort_by_key(|(mtime, hash, _)| (*mtime, hash.sequence.0));
    scan.blocks = found.into_iter().map(|(_, h, p)| (h, p)).collect();
    Ok(scan)
}

/// Reads one block's payload, checked.
pub fn read(
    dir: &Path,
    layout: u64,
    hash: SequenceHash,
    block_bytes: u64,
) -> Result<Vec<u8>, Fault> {
    let mut bytes = match fs::read(block_path(dir, hash)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Fault::Missing),
        Err(_) => return Err(Fault::Io),
    };
    decode(&bytes, layout, hash, block_bytes)?;
    bytes.drain(..HEADER_BYTES);
    Ok(bytes)
}

/// Writes one block file (temporary name, then rename).
pub fn write(dir: &Path, file: &[u8], hash: SequenceHash) -> Result<(), Fault> {
    let path = block_path(dir, hash);
    let tmp = path.with_extension("tmp");
    let result = fs::write(&tmp, file).and_then(|()| fs::rename(&tmp, &path));
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        if e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) {
            Fault::NoSpace
        } else {
            Fault::Io
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfleet_proto::BlockSize;
    use kvfleet_proto::hash::block_hashes;

    #[test]
    fn round_trip_and_every_damage_is_named() {
        let h = block_hashes(&(0..8).collect::<Vec<u32>>(), BlockSize::new(4).unwrap());
        let payload: Vec<u8> = (0..32u8).collect();
        let file = encode(7, h[1], Some(h[0].sequence), &payload);
        assert_eq!(decode(&file, 7, h[1].sequence, 32), Ok(&payload[..]));
        let header = decode_header(&file, 7, h[1].sequence, 32).unwrap();
        assert_eq!(header.parent, Some(h[0].sequence));

        let mut flipped = file.clone();
        flipped[HEADER_BYTES + 3] ^= 1;
        assert_eq!(decode(&flipped, 7, h[1].sequence, 32), Err(Fault::Checksum));
        assert_eq!(
            decode(&file[..file.len() - 1], 7, h[1].sequence, 32),
            Err(Fault::Truncated)
        );
        assert_eq!(
            decode(&file[..10], 7, h[1].sequence, 32),
            Err(Fault::Truncated)
        );
        assert_eq!(decode(&file, 8, h[1].sequence, 32), Err(Fault::Layout));
        assert_eq!(decode(&file, 7, h[1].sequence, 64), Err(Fault::Layout));
        assert_eq!(decode(&file, 7, h[0].sequence, 32), Err(Fault::Header));
        let mut magic = file.clone();
        magic[0] = b'X';
        assert_eq!(decode(&magic, 7, h[1].sequence, 32), Err(Fault::Header));
        // A header whose hashes do not chain is refused even when the name matches.
        let forged = encode(7, h[1], None, &payload);
        assert_eq!(decode(&forged, 7, h[1].sequence, 32), Err(Fault::Header));
    }

    proptest::proptest! {
        /// Decoding arbitrary bytes never panics.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = decode(&bytes, 1, SequenceHash(2), 16);
        }
    }
}
