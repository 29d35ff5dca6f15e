//! Keys and values: `prefix:layout:block_size:hash` keys (a named
//! namespace's: `prefix:layout:block_size:n<tag>:hash`); a value is a
//! header (magic, version, block size, hash, layout, and a CRC32C or a MAC)
//! then the block.

use std::sync::Arc;

use super::RemoteTier;
use crate::checksum::{block_crc, block_crc_start};

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

/// Whose keys a call names in the remote store: the shared namespace's, or
/// a named namespace's, whose keys carry a tag derived from its name
/// ([`RemoteTier::space`]): the same name gives the same keys in every
/// process that names the same server, prefix and layout (and secret),
/// and the name itself never reaches the server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Space(Option<Arc<str>>);

impl Space {
    /// The shared namespace's keys.
    pub const SHARED: Space = Space(None);

    /// A named namespace's tag in its keys (None: the shared namespace).
    pub(super) fn tag(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl RemoteTier {
    /// The keys of namespace `name` (None: the shared one). A named one's
    /// tag is 128 bits of BLAKE3 keyed by a key derived from the
    /// `remote_secret` (or from nothing without one) over the name: a
    /// server's keys do not say which names they belong to.
    pub fn space(&self, name: Option<&str>) -> Space {
        Space(name.map(|n| {
            let d = blake3::keyed_hash(&self.tag_key, n.as_bytes());
            let tag: [u8; 16] = d.as_bytes()[..16].try_into().expect("16 bytes");
            Arc::from(crate::files::id_hex(&tag).as_str())
        }))
    }

    pub(super) fn key(&self, space: &Space, h: u64) -> String {
        let (p, l, b) = (&self.opts.prefix, self.opts.layout, self.opts.block_size);
        match space.tag() {
            None => format!("{p}:{l:016x}:{b}:{h:016x}"),
            Some(tag) => format!("{p}:{l:016x}:{b}:n{tag}:{h:016x}"),
        }
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

    /// The keyed BLAKE3 state of block `name`'s value after its key and
    /// the first 32 header bytes (the MAC goes on over the block).
    fn mac_start(key: &[u8; 32], name: &str, head: &[u8]) -> blake3::Hasher {
        let mut m = blake3::Hasher::new_keyed(key);
        m.update(&(name.len() as u64).to_le_bytes());
        m.update(name.as_bytes());
        m.update(&head[..HEADER]);
        m
    }

    /// The header of block `h`'s value (`header_len()` bytes).
    pub(super) fn header(&self, h: u64, name: &str, block: &[u8]) -> [u8; HEADER_MAC] {
        let mut v = self.header_fields(h);
        match &self.mac_key {
            Some(k) => {
                let mut m = Self::mac_start(k, name, &v);
                m.update(block);
                v[HEADER..].copy_from_slice(m.finalize().as_bytes());
            }
            None => v[12..16].copy_from_slice(&block_crc(h, block).to_le_bytes()),
        }
        v
    }

    /// The header of block `h`'s value from its checksum `crc` (its
    /// [`block_crc`], known already), without reading the block. None with
    /// a secret: the MAC has to read it.
    pub(super) fn header_with_crc(&self, h: u64, crc: u32) -> Option<[u8; HEADER_MAC]> {
        if self.mac_key.is_some() {
            return None;
        }
        let mut v = self.header_fields(h);
        v[12..16].copy_from_slice(&crc.to_le_bytes());
        Some(v)
    }

    /// A header's fields other than its checksum or MAC.
    fn header_fields(&self, h: u64) -> [u8; HEADER_MAC] {
        let mut v = [0u8; HEADER_MAC];
        let len = self.header_len();
        v[..4].copy_from_slice(MAGIC);
        v[4..6].copy_from_slice(&self.version().to_le_bytes());
        v[6..8].copy_from_slice(&(len as u16).to_le_bytes());
        v[8..12].copy_from_slice(&(self.opts.block_size as u32).to_le_bytes());
        v[16..24].copy_from_slice(&h.to_le_bytes());
        v[24..32].copy_from_slice(&self.opts.layout.to_le_bytes());
        v
    }

    /// `cmd` becomes `SET name value [EX ttl]` for block `h` (`name` is
    /// its [`Self::key`]): the header and the block written straight into
    /// the command's buffer (one copy).
    pub(super) fn set_command(
        &self,
        cmd: &mut redis::Cmd,
        h: u64,
        name: &str,
        block: &[u8],
        head: Option<&[u8; HEADER_MAC]>,
    ) {
        use redis::RedisWrite;
        use std::io::Write;
        let head = match head {
            Some(head) => *head,
            None => self.header(h, name, block),
        };
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

    /// Why a value of another length than this tier's values is refused: a
    /// value of the other kind (with or without a MAC) is `Unauthenticated`,
    /// anything else `Corrupt`.
    pub(super) fn refuse(&self, h: u64, name: &str, v: &[u8]) -> Bad {
        let head = &v[..v.len().min(self.header_len())];
        match self.begin_check(h, name, head, v.len()) {
            Err(bad) => bad,
            Ok(_) => Bad::Corrupt, // cannot be: its length is checked there
        }
    }

    /// The check of a value `len` bytes long, from its header (`head`: its
    /// first `header_len()` bytes, or all of it if shorter), before its
    /// block arrives: the block then goes through [`Check::update`] (in
    /// pieces, as they land) and [`Check::finish`].
    pub(super) fn begin_check(
        &self,
        h: u64,
        name: &str,
        head: &[u8],
        len: usize,
    ) -> std::result::Result<Check, Bad> {
        let bs = self.opts.block_size;
        let u16_at = |i: usize| u16::from_le_bytes([head[i], head[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
        if head.len() < HEADER || &head[..4] != MAGIC {
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
        if len != hl + bs
            || head.len() != hl
            || version != want
            || u16_at(6) as usize != hl
            || u32_at(8) as usize != bs
            || u64_at(16) != h
            || u64_at(24) != self.opts.layout
        {
            return Err(Bad::Corrupt);
        }
        let kind = match &self.mac_key {
            Some(k) => CheckKind::Mac {
                m: Box::new(Self::mac_start(k, name, head)),
                want: head[HEADER..HEADER_MAC].try_into().expect("32 bytes"),
            },
            None => CheckKind::Crc {
                got: Box::new(block_crc_start(h)),
                want: u32_at(12),
            },
        };
        Ok(Check { kind, done: 0 })
    }
}

/// A value's check, run over its block as it arrives (see
/// [`RemoteTier::begin_check`]): the same as [`block_crc`] or the MAC of
/// the whole block, however the block arrives.
pub(super) struct Check {
    kind: CheckKind,
    /// Bytes of the block already checked.
    done: usize,
}

enum CheckKind {
    Crc {
        got: Box<crc_fast::Digest>,
        want: u32,
    },
    Mac {
        m: Box<blake3::Hasher>,
        want: [u8; 32],
    },
}

/// The MAC is fed in whole runs of this many bytes of its input (from the
/// start of the input), so that BLAKE3 hashes full-width SIMD batches of
/// its 1 KiB chunks rather than odd pieces of them.
const MAC_RUN: usize = 16 << 10;

impl Check {
    /// `landed`: the block's first bytes, as far as they have arrived (more
    /// at each call); checks what it can of them now, while they are in the
    /// CPU cache.
    pub(super) fn update(&mut self, landed: &[u8]) {
        let to = match &self.kind {
            CheckKind::Crc { .. } => landed.len(),
            CheckKind::Mac { m, .. } => {
                // Bytes the MAC took before the block (key and header).
                let before = m.count() as usize - self.done;
                ((before + landed.len()) / MAC_RUN * MAC_RUN).saturating_sub(before)
            }
        };
        if to > self.done {
            self.feed(&landed[self.done..to]);
            self.done = to;
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        match &mut self.kind {
            CheckKind::Crc { got, .. } => got.update(bytes),
            CheckKind::Mac { m, .. } => {
                m.update(bytes);
            }
        }
    }

    /// Whether `block` (all of it, now) passed: a wrong CRC is `Corrupt`, a
    /// wrong MAC `Unauthenticated`.
    pub(super) fn finish(mut self, block: &[u8]) -> std::result::Result<(), Bad> {
        self.feed(&block[self.done..]);
        match self.kind {
            CheckKind::Crc { got, want } if got.finalize() as u32 == want => Ok(()),
            CheckKind::Crc { .. } => Err(Bad::Corrupt),
            // blake3::Hash compares in constant time.
            CheckKind::Mac { m, want, .. } if m.finalize() == blake3::Hash::from(want) => Ok(()),
            CheckKind::Mac { .. } => Err(Bad::Unauthenticated),
        }
    }
}
