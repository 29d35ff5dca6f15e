//! The header of a persistent data file: the first `data_offset` bytes
//! (4096, or the filesystem's direct-I/O alignment when larger) before
//! slot 0. It names the file as a dynblock store, records its geometry, and
//! carries a random 16-byte store id that the index repeats, so an index is
//! never replayed against a data file it does not belong to and an
//! unrelated file is never adopted as a store.
//!
//! Layout (little endian): magic `DYNBLKDT` (8), version (4), reserved (4),
//! store id (16), block_size (8), slot stride (8), num_blocks (8),
//! data_offset (8), CRC32C of the previous 64 bytes (4); zeros to
//! `data_offset`.

use std::path::Path;

use crate::error::{Error, Result};

pub const MAGIC: &[u8; 8] = b"DYNBLKDT";
pub const VERSION: u32 = 1;
/// Bytes of the header that carry information.
pub const LEN: usize = 68;
/// The smallest header region (a page).
pub const MIN_REGION: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub store_id: [u8; 16],
    pub block_size: u64,
    pub stride: u64,
    pub num_blocks: u64,
    pub data_offset: u64,
}

impl DataHeader {
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..32].copy_from_slice(&self.store_id);
        b[32..40].copy_from_slice(&self.block_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.stride.to_le_bytes());
        b[48..56].copy_from_slice(&self.num_blocks.to_le_bytes());
        b[56..64].copy_from_slice(&self.data_offset.to_le_bytes());
        let c = crate::checksum::crc32c(&b[..64]);
        b[64..68].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Parse the first bytes of an existing file. `Ok(None)`: the file holds
    /// nothing yet (empty, or only zeros where the header goes: a store
    /// whose creation died before its header was written).
    pub fn decode(path: &Path, b: &[u8]) -> Result<Option<DataHeader>> {
        if b.len() < LEN && b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let refuse = |why: &str| {
            Error::InvalidArgument(format!(
                "{} exists but is not a dynblock data file ({why}); dynblock never overwrites \
                 a file it did not make. Choose another path, or delete the file if it is a \
                 store of an older dynblock",
                path.display()
            ))
        };
        if b.len() < LEN {
            return Err(refuse("shorter than a store header"));
        }
        if &b[..8] != MAGIC {
            return Err(refuse("no dynblock header"));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(refuse(&format!(
                "header version {version}, this dynblock reads {VERSION}"
            )));
        }
        let c = u32::from_le_bytes(b[64..68].try_into().expect("4 bytes"));
        if crate::checksum::crc32c(&b[..64]) != c {
            return Err(refuse("header checksum mismatch"));
        }
        let u = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
        let h = DataHeader {
            store_id: b[16..32].try_into().expect("16 bytes"),
            block_size: u(32..40),
            stride: u(40..48),
            num_blocks: u(48..56),
            data_offset: u(56..64),
        };
        if h.block_size == 0 || h.stride < h.block_size || h.data_offset < LEN as u64 {
            return Err(refuse("impossible geometry in the header"));
        }
        Ok(Some(h))
    }

    /// Bytes the file must hold.
    pub fn file_size(&self) -> Option<u64> {
        self.stride
            .checked_mul(self.num_blocks)
            .and_then(|s| s.checked_add(self.data_offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let h = DataHeader {
            store_id: [7; 16],
            block_size: 5000,
            stride: 5120,
            num_blocks: 9,
            data_offset: 4096,
        };
        let p = Path::new("x");
        assert_eq!(DataHeader::decode(p, &h.encode()).unwrap(), Some(h));
        assert_eq!(DataHeader::decode(p, &[]).unwrap(), None);
        assert_eq!(DataHeader::decode(p, &[0; 10]).unwrap(), None);
        let mut bad = h.encode();
        bad[40] ^= 1;
        assert!(DataHeader::decode(p, &bad).is_err());
        assert!(DataHeader::decode(
            p,
            b"SQLite format 3\0 and more bytes to be long enough for a header, yes"
        )
        .unwrap_err()
        .to_string()
        .contains("not a dynblock data file"));
        assert_eq!(h.file_size(), Some(4096 + 9 * 5120));
    }
}
