//! Keys and values: `prefix:layout:block_size:hash` keys; a value is a
//! header (magic, version, block size, hash, layout, and a CRC32C or a MAC)
//! then the block.

use super::RemoteTier;
use crate::checksum::block_crc;

pub(super) const MAGIC: &[u8; 4] = b"DYNR";
/// Values checked by CRC32C.
pub(super) const VERSION_CRC: u16 = 1;
/// Values authenticated by a keyed BLAKE3 MAC.
pub(super) const VERSION_MAC: u16 = 2;
/// Bytes of a CRC32C value's header before the block.
pub const HEADER: usize = 32;
/// Bytes of a MAC value's header before the block (its last 32: the MAC).
pub const HEADER_MAC: usize = 64;

/// Why a fetched value was not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Bad {
    Missing,
    Corrupt,
    /// No valid MAC (with a secret), or a value of the other kind.
    Unauthenticated,
    Oversized,
}

impl RemoteTier {
    pub(super) fn key(&self, h: u64) -> String {
        format!(
            "{}:{:016x}:{}:{h:016x}",
            self.opts.prefix, self.opts.layout, self.opts.block_size
        )
    }

    /// Bytes of one block's value.
    pub(super) fn value_len(&self) -> usize {
        self.header_len() + self.opts.block_size
    }

    pub(super) fn header_len(&self) -> usize {
        if self.mac_key.is_some() {
            HEADER_MAC
        } else {
            HEADER
        }
    }

    /// The value version this tier writes and serves.
    fn version(&self) -> u16 {
        if self.mac_key.is_some() {
            VERSION_MAC
        } else {
            VERSION_CRC
        }
    }

    /// The MAC of block `h`'s value: keyed BLAKE3 over its key, the first
    /// 32 header bytes and the block.
    fn mac(&self, key: &[u8; 32], name: &str, head: &[u8], block: &[u8]) -> blake3::Hash {
        let mut m = blake3::Hasher::new_keyed(key);
        m.update(&(name.len() as u64).to_le_bytes());
        m.update(name.as_bytes());
        m.update(head);
        m.update(block);
        m.finalize()
    }

    /// The header of block `h`'s value (`header_len()` bytes).
    pub(super) fn header(&self, h: u64, name: &str, block: &[u8]) -> [u8; HEADER_MAC] {
        let mut v = [0u8; HEADER_MAC];
        let len = self.header_len();
        v[..4].copy_from_slice(MAGIC);
        v[4..6].copy_from_slice(&self.version().to_le_bytes());
        v[6..8].copy_from_slice(&(len as u16).to_le_bytes());
        v[8..12].copy_from_slice(&(self.opts.block_size as u32).to_le_bytes());
        v[16..24].copy_from_slice(&h.to_le_bytes());
        v[24..32].copy_from_slice(&self.opts.layout.to_le_bytes());
        match &self.mac_key {
            Some(k) => {
                let mac = self.mac(k, name, &v[..HEADER], block);
                v[HEADER..].copy_from_slice(mac.as_bytes());
            }
            None => v[12..16].copy_from_slice(&block_crc(h, block).to_le_bytes()),
        }
        v
    }

    /// `cmd` becomes `SET name value [EX ttl]` for block `h` (`name` is
    /// its [`Self::key`]): the header and the block written straight into
    /// the command's buffer (one copy).
    pub(super) fn set_command(&self, cmd: &mut redis::Cmd, h: u64, name: &str, block: &[u8]) {
        use redis::RedisWrite;
        use std::io::Write;
        let head = self.header(h, name, block);
        cmd.clear();
        cmd.arg("SET").arg(name);
        {
            let mut w = cmd.writer_for_next_arg();
            // Writing into a Vec cannot fail.
            let _ = w.write_all(&head[..self.header_len()]);
            let _ = w.write_all(block);
        }
        if let Some(s) = self.opts.ttl_s {
            cmd.arg("EX").arg(s);
        }
    }

    /// The block in a value, if every check passes.
    pub(super) fn decode<'a>(
        &self,
        h: u64,
        name: &str,
        v: &'a [u8],
    ) -> std::result::Result<&'a [u8], Bad> {
        let bs = self.opts.block_size;
        let u16_at = |i: usize| u16::from_le_bytes([v[i], v[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(v[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(v[i..i + 8].try_into().expect("8 bytes"));
        if v.len() < HEADER || &v[..4] != MAGIC {
            return Err(Bad::Corrupt);
        }
        let version = u16_at(4);
        // A value of the other kind (with or without a MAC) is not ours to
        // judge or delete: another writer's, or a misconfigured one.
        let want = self.version();
        if version != want && matches!(version, VERSION_CRC | VERSION_MAC) {
            return Err(Bad::Unauthenticated);
        }
        let hl = self.header_len();
        if v.len() != hl + bs
            || version != want
            || u16_at(6) as usize != hl
            || u32_at(8) as usize != bs
            || u64_at(16) != h
            || u64_at(24) != self.opts.layout
        {
            return Err(Bad::Corrupt);
        }
        let block = &v[hl..];
        match &self.mac_key {
            Some(k) => {
                let want: [u8; 32] = v[HEADER..HEADER_MAC].try_into().expect("32 bytes");
                // blake3::Hash compares in constant time.
                if self.mac(k, name, &v[..HEADER], block) == blake3::Hash::from(want) {
                    Ok(block)
                } else {
                    Err(Bad::Unauthenticated)
                }
            }
            None if u32_at(12) == block_crc(h, block) => Ok(block),
            None => Err(Bad::Corrupt),
        }
    }
}
