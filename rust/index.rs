//! The persistent disk tier's index: an append-only log of fixed-size,
//! individually checksummed records next to the data file.
//!
//! File layout: a 64-byte header (magic, version, geometry, header CRC), then
//! 32-byte records. A `PUT` says "slot S holds block H with checksum C"; a
//! `DEL` says "slot S no longer holds block H". Ordering makes recovery
//! safe after `kill -9` at any moment:
//! - a block's data is written (and the write returned) before its `PUT`;
//! - a slot's `DEL` is appended before the slot is overwritten;
//! - every read verifies the block checksum, so bytes from a torn or
//!   interrupted write are never served even if the log were wrong.
//!
//! Recovery reads the records in order and stops at the first record whose
//! CRC does not match (a torn tail), truncating it away. When the log holds
//! many more records than live blocks it is compacted: a fresh file is
//! written beside it, synced, and renamed over it.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const MAGIC: &[u8; 8] = b"DYNBLKIX";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
pub const RECORD_LEN: usize = 32;
const PUT: u8 = 1;
const DEL: u8 = 2;

/// What a store was made with; a reopen must match it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u64,
    pub slot_stride: u64,
    pub num_blocks: u64,
    /// Fingerprint of the KV layout (0 when none was given).
    pub layout: u64,
    pub checksums: bool,
}

/// A live entry recovered from the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    pub hash: u64,
    pub slot: u32,
    pub crc: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub kind: u8,
    pub slot: u32,
    pub hash: u64,
    pub crc: u32,
}

impl Record {
    pub fn put(hash: u64, slot: u32, crc: u32) -> Self {
        Record {
            kind: PUT,
            slot,
            hash,
            crc,
        }
    }
    pub fn del(hash: u64, slot: u32) -> Self {
        Record {
            kind: DEL,
            slot,
            hash,
            crc: 0,
        }
    }
    fn encode(&self, gen: u32) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0] = self.kind;
        b[4..8].copy_from_slice(&self.slot.to_le_bytes());
        b[8..16].copy_from_slice(&self.hash.to_le_bytes());
        b[16..20].copy_from_slice(&self.crc.to_le_bytes());
        b[20..24].copy_from_slice(&gen.to_le_bytes());
        let c = crc32c::crc32c(&b[..28]);
        b[28..32].copy_from_slice(&c.to_le_bytes());
        b
    }
    fn decode(b: &[u8]) -> Option<Record> {
        let c = u32::from_le_bytes(b[28..32].try_into().ok()?);
        if crc32c::crc32c(&b[..28]) != c || !matches!(b[0], PUT | DEL) {
            return None;
        }
        Some(Record {
            kind: b[0],
            slot: u32::from_le_bytes(b[4..8].try_into().ok()?),
            hash: u64::from_le_bytes(b[8..16].try_into().ok()?),
            crc: u32::from_le_bytes(b[16..20].try_into().ok()?),
        })
    }
}

fn encode_header(g: &Geometry) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    b[16..24].copy_from_slice(&g.block_size.to_le_bytes());
    b[24..32].copy_from_slice(&g.slot_stride.to_le_bytes());
    b[32..40].copy_from_slice(&g.num_blocks.to_le_bytes());
    b[40..48].copy_from_slice(&g.layout.to_le_bytes());
    b[48] = g.checksums as u8;
    let c = crc32c::crc32c(&b[..60]);
    b[60..64].copy_from_slice(&c.to_le_bytes());
    b
}

fn decode_header(path: &Path, b: &[u8]) -> Result<Geometry> {
    let bad = |why: &str| {
        Error::InvalidArgument(format!(
            "{} is not a usable dynblock index ({why}); move it away or delete it together with \
             its data file to start an empty store",
            path.display()
        ))
    };
    if b.len() < HEADER_LEN {
        return Err(bad("shorter than its header"));
    }
    if &b[..8] != MAGIC {
        return Err(bad("wrong magic number"));
    }
    let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(bad(&format!(
            "version {version}, this dynblock reads {VERSION}"
        )));
    }
    let c = u32::from_le_bytes(b[60..64].try_into().expect("4 bytes"));
    if crc32c::crc32c(&b[..60]) != c {
        return Err(bad("header checksum mismatch"));
    }
    let u = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
    Ok(Geometry {
        block_size: u(16..24),
        slot_stride: u(24..32),
        num_blocks: u(32..40),
        layout: u(40..48),
        checksums: b[48] != 0,
    })
}

/// Refuse a directory that others could use to swap our files: world-
/// writable without the sticky bit, or owned by another (non-root) user.
pub fn check_parent(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let md = std::fs::metadata(&parent).map_err(|e| Error::io("stat", &parent, 0, 0, e))?;
    let mode = md.permissions().mode();
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        return Err(Error::InvalidArgument(format!(
            "{} is world-writable without the sticky bit; a persistent store there could be \
             replaced by another user. Use a private directory (chmod o-w or chmod +t)",
            parent.display()
        )));
    }
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if md.uid() != me && md.uid() != 0 {
        return Err(Error::InvalidArgument(format!(
            "{} is owned by uid {}, not by this process (uid {me}); a persistent store must live in \
             a directory owned by its user or root",
            parent.display(),
            md.uid()
        )));
    }
    Ok(())
}

pub struct IndexLog {
    file: File,
    path: PathBuf,
    gen: u32,
    records: u64,
    sync: bool,
}

/// What `open` found.
pub struct Recovered {
    pub live: Vec<Live>,
    pub records: u64,
    pub torn_bytes: u64,
    pub created: bool,
}

impl IndexLog {
    /// Open or create the index at `path` for a store of geometry `g`.
    /// Returns the live entries in log order (oldest first).
    pub fn open(path: &Path, g: &Geometry, sync: bool) -> Result<(Self, Recovered)> {
        check_parent(path)?;
        let created;
        let mut file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(mut f) => {
                created = true;
                f.write_all(&encode_header(g))
                    .map_err(|e| Error::io("write", path, 0, 64, e))?;
                f.sync_all()
                    .map_err(|e| Error::io("fsync", path, 0, 0, e))?;
                sync_dir(path);
                f
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                created = false;
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(path)
                    .map_err(|e| Error::io("open", path, 0, 0, e))?
            }
            Err(e) => return Err(Error::io("open", path, 0, 0, e)),
        };
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io("seek", path, 0, 0, e))?;
        file.read_to_end(&mut bytes)
            .map_err(|e| Error::io("read", path, 0, 0, e))?;
        if bytes.is_empty() {
            // Created by a process that died before writing the header.
            file.write_all(&encode_header(g))
                .map_err(|e| Error::io("write", path, 0, 64, e))?;
            file.sync_all()
                .map_err(|e| Error::io("fsync", path, 0, 0, e))?;
            bytes.extend_from_slice(&encode_header(g));
        }
        let found = decode_header(path, &bytes)?;
        if found != *g {
            return Err(Error::InvalidArgument(format!(
                "the store at {} was written with block_size {}, slot_stride {}, num_blocks {}, \
                 layout fingerprint {:#x}, checksums {}; this open asks for block_size {}, \
                 slot_stride {}, num_blocks {}, layout fingerprint {:#x}, checksums {}. Open it \
                 with its own geometry, or delete it (data file and index) to start over",
                path.display(),
                found.block_size,
                found.slot_stride,
                found.num_blocks,
                found.layout,
                found.checksums,
                g.block_size,
                g.slot_stride,
                g.num_blocks,
                g.layout,
                g.checksums
            )));
        }
        // Replay.
        let mut live: HashMap<u64, (u32, u32, u64)> = HashMap::new(); // hash -> (slot, crc, seq)
        let mut slot_owner: HashMap<u32, u64> = HashMap::new();
        let mut off = HEADER_LEN;
        let mut records = 0u64;
        let mut seq = 0u64;
        while off + RECORD_LEN <= bytes.len() {
            let Some(r) = Record::decode(&bytes[off..off + RECORD_LEN]) else {
                break;
            };
            if r.slot as u64 >= g.num_blocks {
                break; // cannot be ours: treat as the torn tail
            }
            match r.kind {
                PUT => {
                    if let Some(old) = slot_owner.insert(r.slot, r.hash) {
                        if old != r.hash {
                            live.remove(&old);
                        }
                    }
                    if let Some((old_slot, _, _)) = live.insert(r.hash, (r.slot, r.crc, seq)) {
                        if old_slot != r.slot {
                            slot_owner.remove(&old_slot);
                        }
                    }
                }
                _ => {
                    if slot_owner.get(&r.slot) == Some(&r.hash) {
                        slot_owner.remove(&r.slot);
                        live.remove(&r.hash);
                    }
                }
            }
            seq += 1;
            records += 1;
            off += RECORD_LEN;
        }
        let torn = (bytes.len() - off) as u64;
        if torn > 0 {
            file.set_len(off as u64)
                .map_err(|e| Error::io("ftruncate", path, off as u64, 0, e))?;
        }
        file.seek(SeekFrom::End(0))
            .map_err(|e| Error::io("seek", path, 0, 0, e))?;
        let mut list: Vec<(u64, Live)> = live
            .into_iter()
            .map(|(hash, (slot, crc, s))| (s, Live { hash, slot, crc }))
            .collect();
        list.sort_unstable_by_key(|x| x.0);
        let recovered = Recovered {
            live: list.into_iter().map(|x| x.1).collect(),
            records,
            torn_bytes: torn,
            created,
        };
        Ok((
            IndexLog {
                file,
                path: path.to_path_buf(),
                gen: records as u32,
                records,
                sync,
            },
            recovered,
        ))
    }

    /// Append records in one write (and fdatasync when the store is in
    /// "sync" durability).
    pub fn append(&mut self, recs: &[Record]) -> Result<()> {
        if recs.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(recs.len() * RECORD_LEN);
        for r in recs {
            self.gen = self.gen.wrapping_add(1);
            buf.extend_from_slice(&r.encode(self.gen));
        }
        let off = HEADER_LEN as u64 + self.records * RECORD_LEN as u64;
        self.file
            .write_all(&buf)
            .map_err(|e| Error::io("write(index)", &self.path, off, buf.len() as u64, e))?;
        self.records += recs.len() as u64;
        if self.sync {
            self.sync()?;
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        // SAFETY: fdatasync on our own descriptor.
        if unsafe { libc::fdatasync(self.file.as_raw_fd()) } != 0 {
            return Err(Error::last_os("fdatasync(index)", &self.path, 0, 0));
        }
        Ok(())
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    /// Rewrite the log as one PUT per live entry (write beside, fsync,
    /// rename over, fsync the directory).
    pub fn compact(&mut self, g: &Geometry, live: &[Live]) -> Result<()> {
        let tmp = self.path.with_extension("index.compact");
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| Error::io("open", &tmp, 0, 0, e))?;
        let mut buf = Vec::with_capacity(HEADER_LEN + live.len() * RECORD_LEN);
        buf.extend_from_slice(&encode_header(g));
        let mut gen = 0u32;
        for l in live {
            gen = gen.wrapping_add(1);
            buf.extend_from_slice(&Record::put(l.hash, l.slot, l.crc).encode(gen));
        }
        let res = f
            .write_all(&buf)
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io("write(index)", &tmp, 0, buf.len() as u64, e))
            .and_then(|_| {
                std::fs::rename(&tmp, &self.path).map_err(|e| Error::io("rename", &tmp, 0, 0, e))
            });
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        sync_dir(&self.path);
        f.seek(SeekFrom::End(0))
            .map_err(|e| Error::io("seek", &self.path, 0, 0, e))?;
        self.file = f;
        self.records = live.len() as u64;
        self.gen = gen;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry {
            block_size: 4096,
            slot_stride: 4096,
            num_blocks: 8,
            layout: 0,
            checksums: true,
        }
    }

    #[test]
    fn replay_put_del_and_reuse() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kv.index");
        {
            let (mut log, rec) = IndexLog::open(&p, &geo(), false).unwrap();
            assert!(rec.created && rec.live.is_empty());
            log.append(&[Record::put(10, 0, 111), Record::put(11, 1, 222)])
                .unwrap();
            log.append(&[Record::del(10, 0), Record::put(12, 0, 333)])
                .unwrap();
        }
        let (_log, rec) = IndexLog::open(&p, &geo(), false).unwrap();
        assert_eq!(
            rec.live,
            vec![
                Live {
                    hash: 11,
                    slot: 1,
                    crc: 222
                },
                Live {
                    hash: 12,
                    slot: 0,
                    crc: 333
                }
            ]
        );
        assert_eq!(rec.records, 4);
    }

    #[test]
    fn torn_tail_is_cut_and_garbage_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kv.index");
        {
            let (mut log, _) = IndexLog::open(&p, &geo(), false).unwrap();
            log.append(&[Record::put(1, 0, 5), Record::put(2, 1, 6)])
                .unwrap();
        }
        let len = std::fs::metadata(&p).unwrap().len();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len - 7).unwrap(); // half a record
        let (_, rec) = IndexLog::open(&p, &geo(), false).unwrap();
        assert_eq!(rec.live.len(), 1);
        assert_eq!(rec.torn_bytes, (RECORD_LEN - 7) as u64);
        std::fs::write(
            &p,
            b"garbage garbage garbage garbage garbage garbage garbage garbage!",
        )
        .unwrap();
        assert!(
            matches!(IndexLog::open(&p, &geo(), false), Err(Error::InvalidArgument(m)) if m.contains("magic"))
        );
        let other = Geometry {
            block_size: 8192,
            ..geo()
        };
        let p2 = d.path().join("b.index");
        IndexLog::open(&p2, &geo(), false).unwrap();
        match IndexLog::open(&p2, &other, false) {
            Err(Error::InvalidArgument(m)) => {
                assert!(m.contains("block_size 4096") && m.contains("block_size 8192"))
            }
            _ => panic!("geometry mismatch accepted"),
        }
    }

    #[test]
    fn compaction_keeps_live_entries() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kv.index");
        let (mut log, _) = IndexLog::open(&p, &geo(), false).unwrap();
        for i in 0..100u64 {
            log.append(&[Record::put(i, (i % 8) as u32, i as u32)])
                .unwrap();
        }
        let live: Vec<Live> = (92..100u64)
            .map(|i| Live {
                hash: i,
                slot: (i % 8) as u32,
                crc: i as u32,
            })
            .collect();
        log.compact(&geo(), &live).unwrap();
        log.append(&[Record::del(99, 3)]).unwrap();
        drop(log);
        let (_, rec) = IndexLog::open(&p, &geo(), false).unwrap();
        assert_eq!(rec.live.len(), 7);
        assert_eq!(rec.records, 9);
    }
}
