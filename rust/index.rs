//! The persistent disk tier's index: an append-only log of fixed-size,
//! individually checksummed records next to the data file.
//!
//! File layout: a 64-byte header (magic, version, geometry, the store id of
//! the data file it belongs to, header CRC), then 32-byte records. A `PUT`
//! says "slot S holds block H with checksum C"; a `DEL` says "slot S no
//! longer holds block H". Ordering makes recovery safe after `kill -9` at
//! any moment:
//! - a block's data is written (and the write returned) before its `PUT`;
//! - a slot's `DEL` is appended before the slot is overwritten;
//! - every read verifies the block checksum, so bytes from a torn or
//!   interrupted write are never served even if the log were wrong.
//!
//! A `GHOST` record says "block H was turned away by `disk_admission`"
//! (its slot is 0): the admission's memory of what it turned away, so that
//! a block's second sighting is known across a restart and `kill -9`.
//! Replay keeps them in order (the policy keeps the most recent it has room
//! for); compaction writes the policy's current ones after the live blocks.
//! A dynblock older than them reads one as a damaged record (counted, the
//! log rewritten without it), losing only that memory.
//!
//! The disk tier's eviction order rides along (byte 1: flags, byte 2: an
//! S3-FIFO count; both 0 in records older than them, which recover as
//! before: new blocks of the small queue, in log order):
//! - a `PUT` says which queue the block joined (flag 1: S3-FIFO's main
//!   queue) and its count;
//! - an `ORDER` record (kind 6) says "the block H in slot S" moved to the
//!   back of a queue (flag 2; flag 1 names the queue) and/or has a new
//!   count: LRU's touches, S3-FIFO's counts and moves between queues. The
//!   manager writes the changes since its last append in front of each
//!   append (and before `CLOSE`), so after `kill -9` the order is the one
//!   of the last index write; a record naming a slot that holds another
//!   block by then is ignored;
//! - a `DEL` with flag 1 says the block went into the tier's S3-FIFO ghost
//!   as it left, and a `GHOST` with flag 1 is an entry of that ghost (a
//!   folded key, written by compaction) rather than admission's.
//!
//! Replay puts each live block at the place of its last `PUT` or moving
//! `ORDER`, so compaction (which writes the live blocks in the tier's order
//! with their queues and counts) and a clean close (which compacts) keep
//! the order exactly. A dynblock older than `ORDER` records reads them as
//! damaged records (the log rewritten without them), losing the order
//! only.
//!
//! Two marker records carry no block: `OPEN` (appended when a manager opens
//! the store) and `CLOSE` (appended by a clean `close()`, after everything
//! it wrote), each with the time in seconds since the epoch; the store tool
//! reports from them when the store was last opened and last closed
//! cleanly (closed cleanly: a `CLOSE` with nothing after it). Compaction
//! keeps the `OPEN` of the session that compacts. A dynblock older than the
//! markers reads one at the end as a torn tail and one before other records
//! as a damaged record (counted, the log rewritten without it): a downgrade
//! loses the markers, nothing else.
//!
//! Recovery replays the records in order. A record that fails its CRC (or
//! names an impossible slot or kind) in the middle of the log is skipped and
//! counted, and the log is rewritten without it; bytes after the last good
//! record are a torn tail and cut off. Appends go to the offset the record
//! count says, so a failed append never leaves later records behind torn
//! bytes; it also marks the log as needing a rewrite ([`IndexLog::dirty`]):
//! the manager then rewrites it from memory before the next data write.
//! Rewriting (compaction) writes a fresh file beside the log under a random
//! name, syncs it and renames it over the log; leftovers of a rewrite that
//! died are removed at open.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::files::{
    check_parent, id_hex, open_private, remove_temps_beside, sync_dir, temp_beside,
};
use crate::keys::Key;

pub const MAGIC: &[u8; 8] = b"DYNBLKIX";
pub const VERSION: u32 = 2;
pub const HEADER_LEN: usize = 64;
pub const RECORD_LEN: usize = 32;
const PUT: u8 = 1;
const DEL: u8 = 2;
const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const GHOST: u8 = 5;
const ORDER: u8 = 6;
/// Flag (byte 1) of `PUT`/`ORDER`: S3-FIFO's main queue; of `DEL`: the
/// block went into the tier's S3-FIFO ghost; of `GHOST`: an entry of that
/// ghost (not admission's).
const F_MAIN: u8 = 1;
const F_GHOST: u8 = 1;
/// Flag of `ORDER`: the block moved to the back of its queue.
const F_MOVED: u8 = 2;

/// What a store was made with; a reopen must match it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u64,
    pub num_blocks: u64,
    /// Fingerprint of the KV layout (0 when none was given).
    pub layout: u64,
    pub checksums: bool,
    /// The data file's store id (its header carries the same).
    pub store_id: [u8; 16],
}

/// A live entry recovered from the log (or written by compaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Live {
    pub key: Key,
    pub slot: u32,
    pub crc: u32,
    /// Its place in the disk tier's order: in S3-FIFO's main queue (LRU:
    /// always false), and its S3-FIFO count.
    pub main: bool,
    pub count: u8,
}

/// What a compaction writes: the live blocks in their tier's order (first
/// to leave first), what disk admission turned away and the tier's S3-FIFO
/// ghost (folded keys), each oldest first.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub live: Vec<Live>,
    pub ghost: Vec<Key>,
    pub order_ghost: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub kind: u8,
    /// Byte 1: the kind's flags (`F_*`).
    pub flags: u8,
    /// Byte 2: an S3-FIFO count (`PUT`, `ORDER`).
    pub count: u8,
    pub slot: u32,
    pub hash: u64,
    pub crc: u32,
    /// The block's namespace (0: the shared one; records older than
    /// namespaces have 0 there).
    pub ns: u32,
}

impl Record {
    pub fn put(key: impl Into<Key>, slot: u32, crc: u32) -> Self {
        let key = key.into();
        Record {
            kind: PUT,
            flags: 0,
            count: 0,
            slot,
            hash: key.hash,
            crc,
            ns: key.ns,
        }
    }
    pub fn del(key: impl Into<Key>, slot: u32) -> Self {
        let key = key.into();
        Record {
            kind: DEL,
            flags: 0,
            count: 0,
            slot,
            hash: key.hash,
            crc: 0,
            ns: key.ns,
        }
    }
    /// Block `key` was turned away by disk admission.
    pub fn ghost(key: impl Into<Key>) -> Self {
        let key = key.into();
        Record {
            kind: GHOST,
            flags: 0,
            count: 0,
            slot: 0,
            hash: key.hash,
            crc: 0,
            ns: key.ns,
        }
    }
    /// A live block's `PUT` with its place in the tier's order.
    pub fn placed(l: &Live) -> Self {
        Record {
            flags: if l.main { F_MAIN } else { 0 },
            count: l.count,
            ..Record::put(l.key, l.slot, l.crc)
        }
    }
    /// The block `l` moved to the back of its queue (`moved`), or only
    /// has a new count.
    pub fn order(l: &Live, moved: bool) -> Self {
        Record {
            kind: ORDER,
            flags: if l.main { F_MAIN } else { 0 } | if moved { F_MOVED } else { 0 },
            count: l.count,
            slot: l.slot,
            hash: l.key.hash,
            crc: 0,
            ns: l.key.ns,
        }
    }
    /// The `DEL` of a block evicted from slot `slot`, which went into the
    /// tier's S3-FIFO ghost as it left if `ghosted`.
    pub fn evicted(key: impl Into<Key>, slot: u32, ghosted: bool) -> Self {
        Record {
            flags: if ghosted { F_GHOST } else { 0 },
            ..Record::del(key, slot)
        }
    }
    /// An entry (a folded key) of the disk tier's S3-FIFO ghost.
    fn order_ghost(folded: u64) -> Self {
        Record {
            flags: F_GHOST,
            ..Record::ghost(Key::new(folded, 0))
        }
    }
    fn key(&self) -> Key {
        Key::new(self.hash, self.ns)
    }
    /// The marker of an open (`closed`: of a clean close) at `at` seconds
    /// since the epoch.
    pub fn marker(closed: bool, at: u64) -> Self {
        Record {
            kind: if closed { CLOSE } else { OPEN },
            flags: 0,
            count: 0,
            slot: 0,
            hash: at,
            crc: 0,
            ns: 0,
        }
    }
    fn encode(&self, gen: u32) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0] = self.kind;
        b[1] = self.flags;
        b[2] = self.count;
        b[4..8].copy_from_slice(&self.slot.to_le_bytes());
        b[8..16].copy_from_slice(&self.hash.to_le_bytes());
        b[16..20].copy_from_slice(&self.crc.to_le_bytes());
        b[20..24].copy_from_slice(&gen.to_le_bytes());
        b[24..28].copy_from_slice(&self.ns.to_le_bytes());
        let c = crate::checksum::crc32c(&b[..28]);
        b[28..32].copy_from_slice(&c.to_le_bytes());
        b
    }
    fn decode(b: &[u8]) -> Option<Record> {
        let c = u32::from_le_bytes(b[28..32].try_into().ok()?);
        if crate::checksum::crc32c(&b[..28]) != c
            || !matches!(b[0], PUT | DEL | OPEN | CLOSE | GHOST | ORDER)
        {
            return None;
        }
        Some(Record {
            kind: b[0],
            flags: b[1],
            count: b[2],
            slot: u32::from_le_bytes(b[4..8].try_into().ok()?),
            hash: u64::from_le_bytes(b[8..16].try_into().ok()?),
            crc: u32::from_le_bytes(b[16..20].try_into().ok()?),
            ns: u32::from_le_bytes(b[24..28].try_into().ok()?),
        })
    }
}

fn encode_header(g: &Geometry) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    b[16..24].copy_from_slice(&g.block_size.to_le_bytes());
    b[24..32].copy_from_slice(&g.num_blocks.to_le_bytes());
    b[32..40].copy_from_slice(&g.layout.to_le_bytes());
    b[40] = g.checksums as u8;
    b[44..60].copy_from_slice(&g.store_id);
    let c = crate::checksum::crc32c(&b[..60]);
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
    if crate::checksum::crc32c(&b[..60]) != c {
        return Err(bad("header checksum mismatch"));
    }
    let u = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
    Ok(Geometry {
        block_size: u(16..24),
        num_blocks: u(24..32),
        layout: u(32..40),
        checksums: b[40] != 0,
        store_id: b[44..60].try_into().expect("16 bytes"),
    })
}

pub struct IndexLog {
    file: File,
    path: PathBuf,
    gen: u32,
    records: u64,
    sync: bool,
    dirty: bool,
    /// When this session opened the store (its `OPEN` marker), if it did.
    opened_at: Option<u64>,
}

/// What `open` found.
#[derive(Debug, Default)]
pub struct Recovered {
    pub live: Vec<Live>,
    /// Blocks disk admission turned away (`GHOST` records), oldest first.
    pub ghost: Vec<Key>,
    /// What the disk tier's S3-FIFO ghost went through, in order: a folded
    /// key added (true) or taken back out (false, as its block joined the
    /// main queue). Replayed in order into an empty ghost, it leaves the
    /// ghost as the log's writer had it (its add counts included).
    pub order_ghost: Vec<(u64, bool)>,
    pub records: u64,
    /// Bytes after the last good record, cut off.
    pub torn_bytes: u64,
    /// Damaged records in the middle of the log, skipped.
    pub bad_records: u64,
    pub created: bool,
    /// Why an existing index was replaced by an empty one, if it was.
    pub reset: Option<String>,
    /// When the store was last opened and last closed cleanly (seconds
    /// since the epoch), as its markers say.
    pub last_open: Option<u64>,
    pub last_close: Option<u64>,
    /// Its last record is a `CLOSE`: closed cleanly, not opened since.
    pub closed_cleanly: bool,
}

/// Create the index (private, 0600) or open the existing one (checked to be
/// a private regular file, no symlink followed): (file, created?).
fn open_index_file(path: &Path) -> Result<(std::fs::File, bool)> {
    match open_private(path, true) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let f = open_private(path, false).map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    Error::InvalidArgument(format!(
                        "{} is a symbolic link; dynblock does not follow links for its index",
                        path.display()
                    ))
                } else {
                    Error::io("open", path, 0, 0, e)
                }
            })?;
            crate::files::check_private_file(f.as_raw_fd(), path, "store index")?;
            Ok((f, false))
        }
        Err(e) => Err(Error::io("open", path, 0, 0, e)),
    }
}

/// Whether the index's header describes this store (`g`): false when it
/// describes a data file that was just created anew (the index is then
/// replaced, `rec.reset` says so); an error when it belongs to another data
/// file or was written with other settings.
fn header_matches(
    path: &Path,
    bytes: &[u8],
    g: &Geometry,
    data_created: bool,
    rec: &mut Recovered,
) -> Result<bool> {
    let found = decode_header(path, bytes)?;
    if found.store_id != g.store_id {
        if !data_created {
            return Err(Error::InvalidArgument(format!(
                "the index {} belongs to another data file (store id {}, the data file's \
                 is {}); dynblock does not replay an index against a file it does not \
                 describe. Restore the matching pair, or delete both to start over",
                path.display(),
                id_hex(&found.store_id),
                id_hex(&g.store_id)
            )));
        }
        rec.reset = Some(format!(
            "the index {} described a data file that no longer exists (its data file \
             was just created anew); it was replaced by an empty index",
            path.display()
        ));
        return Ok(false);
    }
    if found != *g {
        return Err(Error::InvalidArgument(format!(
            "the store at {} was written with layout fingerprint {:#x} and checksums {}; \
             this open asks for layout fingerprint {:#x} and checksums {}. Open it with \
             its own settings, or delete it (data file and index) to start over",
            path.display(),
            found.layout,
            found.checksums,
            g.layout,
            g.checksums
        )));
    }
    Ok(true)
}

/// Replay the records after the header into `rec` (its live blocks, oldest
/// first, and its damaged-record count): returns (end of the last good
/// record, records replayed). Records after the last good one are a torn
/// tail; bad records before a good one were damaged in the middle.
fn replay(bytes: &[u8], g: &Geometry, rec: &mut Recovered) -> (usize, u64) {
    // key -> (its live entry, the seq of its place in the order)
    let mut live: HashMap<Key, (Live, u64)> = HashMap::new();
    let mut slot_owner: HashMap<u32, Key> = HashMap::new();
    // Folded keys the S3-FIFO ghost was given (a take of another is moot).
    let mut ghosted: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let mut off = HEADER_LEN;
    let mut good_end = HEADER_LEN;
    let mut pending_bad = 0u64;
    let mut seq = 0u64;
    while off + RECORD_LEN <= bytes.len() {
        let r = Record::decode(&bytes[off..off + RECORD_LEN])
            .filter(|r| (r.slot as u64) < g.num_blocks);
        off += RECORD_LEN;
        let Some(r) = r else {
            pending_bad += 1;
            continue;
        };
        // A good record: any bad ones before it were in the middle.
        rec.bad_records += pending_bad;
        pending_bad = 0;
        good_end = off;
        rec.closed_cleanly = r.kind == CLOSE;
        match r.kind {
            OPEN => rec.last_open = Some(r.hash),
            CLOSE => rec.last_close = Some(r.hash),
            GHOST if r.flags & F_GHOST != 0 => {
                ghosted.insert(r.hash);
                rec.order_ghost.push((r.hash, true));
            }
            GHOST => rec.ghost.push(r.key()),
            PUT => {
                if let Some(old) = slot_owner.insert(r.slot, r.key()) {
                    if old != r.key() {
                        live.remove(&old);
                    }
                }
                let l = Live {
                    key: r.key(),
                    slot: r.slot,
                    crc: r.crc,
                    main: r.flags & F_MAIN != 0,
                    count: r.count,
                };
                if l.main && ghosted.remove(&l.key.fold()) {
                    // It joined the main queue, from the ghost if it was there.
                    rec.order_ghost.push((l.key.fold(), false));
                }
                if let Some((old, _)) = live.insert(r.key(), (l, seq)) {
                    if old.slot != r.slot {
                        slot_owner.remove(&old.slot);
                    }
                }
            }
            ORDER => {
                if slot_owner.get(&r.slot) == Some(&r.key()) {
                    let (l, at) = live.get_mut(&r.key()).expect("owners are live");
                    l.count = r.count;
                    if r.flags & F_MOVED != 0 {
                        l.main = r.flags & F_MAIN != 0;
                        *at = seq;
                    }
                }
            }
            _ => {
                // A DEL says whether the block is in the S3-FIFO ghost as it
                // leaves: in it (a victim of the small queue), or not (taken
                // out when it rejoined the main queue from the ghost earlier
                // in the same batch, whose PUT was never written: it left again).
                let f = r.key().fold();
                if r.flags & F_GHOST != 0 {
                    ghosted.insert(f);
                    rec.order_ghost.push((f, true));
                } else if ghosted.remove(&f) {
                    rec.order_ghost.push((f, false));
                }
                if slot_owner.get(&r.slot) == Some(&r.key()) {
                    slot_owner.remove(&r.slot);
                    live.remove(&r.key());
                }
            }
        }
        seq += 1;
    }
    let mut list: Vec<(Live, u64)> = live.into_values().collect();
    list.sort_unstable_by_key(|x| x.1);
    rec.live = list.into_iter().map(|x| x.0).collect();
    (good_end, seq)
}

/// The keys a ghost's adds and takes (see [`Recovered::order_ghost`]) leave
/// in it, oldest first, as far as it had room.
fn ghost_left(ops: &[(u64, bool)]) -> Vec<u64> {
    let mut at: HashMap<u64, usize> = HashMap::new();
    for (i, &(h, add)) in ops.iter().enumerate() {
        if add {
            at.insert(h, i);
        } else {
            at.remove(&h);
        }
    }
    let mut left: Vec<(usize, u64)> = at.into_iter().map(|(h, i)| (i, h)).collect();
    left.sort_unstable();
    left.into_iter().map(|x| x.1).collect()
}

/// What an index file says, read without changing it (nor taking any
/// lock): the store tool's `info`. A writer appending meanwhile is a torn
/// tail here, as after a crash.
#[derive(Debug)]
pub struct Inspection {
    pub geometry: Geometry,
    /// Live blocks (oldest first), records, torn bytes and damaged records.
    pub recovered: Recovered,
    /// Bytes of the index file.
    pub bytes: u64,
}

/// Read the index at `path` (see [`Inspection`]).
pub fn inspect(path: &Path) -> Result<Inspection> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, 0, 0, e))?;
    if bytes.len() < HEADER_LEN {
        return Err(Error::InvalidArgument(format!(
            "{} is not a dynblock index (shorter than its {HEADER_LEN}-byte header)",
            path.display()
        )));
    }
    let geometry = decode_header(path, &bytes)?;
    let mut recovered = Recovered::default();
    let (good_end, seq) = replay(&bytes, &geometry, &mut recovered);
    recovered.records = seq;
    recovered.torn_bytes = (bytes.len() - good_end) as u64;
    Ok(Inspection {
        geometry,
        recovered,
        bytes: bytes.len() as u64,
    })
}

impl IndexLog {
    /// Open or create the index at `path` for a store of geometry `g`.
    /// `data_created`: the data file was made by this open (so an existing
    /// index belongs to a data file that is gone). Returns the live entries
    /// in log order (oldest first).
    pub fn open(
        path: &Path,
        g: &Geometry,
        sync: bool,
        data_created: bool,
    ) -> Result<(Self, Recovered)> {
        check_parent(path)?;
        remove_temps_beside(path, "compact"); // compactions that died
        let mut rec = Recovered::default();
        let (mut file, created) = open_index_file(path)?;
        rec.created = created;
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io("seek", path, 0, 0, e))?;
        file.read_to_end(&mut bytes)
            .map_err(|e| Error::io("read", path, 0, 0, e))?;
        let fresh =
            bytes.len() < HEADER_LEN || !header_matches(path, &bytes, g, data_created, &mut rec)?;
        if fresh {
            // New, or created by a process that died before its header was
            // complete (no record can follow an incomplete header), or stale.
            let h = encode_header(g);
            file.set_len(0)
                .and_then(|()| file.write_all_at(&h, 0))
                .and_then(|()| file.sync_all())
                .map_err(|e| Error::io("write(index header)", path, 0, HEADER_LEN as u64, e))?;
            if rec.created {
                sync_dir(path);
            }
            bytes.clear();
            bytes.extend_from_slice(&h);
        }
        let (good_end, seq) = replay(&bytes, g, &mut rec);
        rec.records = seq;
        rec.torn_bytes = (bytes.len() - good_end) as u64;
        if rec.torn_bytes > 0 {
            file.set_len(good_end as u64)
                .map_err(|e| Error::io("ftruncate", path, good_end as u64, 0, e))?;
        }
        let mut log = IndexLog {
            file,
            path: path.to_path_buf(),
            gen: seq as u32,
            records: ((good_end - HEADER_LEN) / RECORD_LEN) as u64,
            sync,
            dirty: false,
            opened_at: None,
        };
        if rec.bad_records > 0 {
            // Rewrite without the damaged records, so they are reported once.
            let snap = Snapshot {
                live: rec.live.clone(),
                ghost: rec.ghost.clone(),
                order_ghost: ghost_left(&rec.order_ghost),
            };
            if log.compact(g, &snap).is_err() {
                log.dirty = true;
            }
        }
        Ok((log, rec))
    }

    /// Append records in one write at the end of the good records (and
    /// fdatasync when the store is in "sync" durability). On failure the
    /// file is cut back to the good records where possible, and the log is
    /// marked dirty: it must be rewritten before any slot is reused.
    pub fn append(&mut self, recs: &[Record]) -> Result<()> {
        if recs.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(recs.len() * RECORD_LEN);
        let mut gen = self.gen;
        for r in recs {
            gen = gen.wrapping_add(1);
            buf.extend_from_slice(&r.encode(gen));
        }
        let off = HEADER_LEN as u64 + self.records * RECORD_LEN as u64;
        let r = self
            .file
            .write_all_at(&buf, off)
            .map_err(|e| Error::io("write(index)", &self.path, off, buf.len() as u64, e))
            .and_then(|()| if self.sync { self.sync() } else { Ok(()) });
        if let Err(e) = r {
            self.dirty = true;
            // Cut back what may have reached the file (best effort: a
            // rewrite follows anyway).
            if self.file.set_len(off).is_ok() && self.sync {
                let _ = self.sync();
            }
            return Err(e);
        }
        self.gen = gen;
        self.records += recs.len() as u64;
        Ok(())
    }

    /// Append the `OPEN` (`closed`: `CLOSE`) marker with the time now, and
    /// fdatasync it.
    pub fn mark(&mut self, closed: bool) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.append(&[Record::marker(closed, now)])?;
        if !closed {
            self.opened_at = Some(now);
        }
        self.sync()
    }

    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync(index)", &self.path, 0, 0, e))
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    /// An append failed since the last rewrite: the file may say a slot
    /// holds a block that memory has freed. Rewrite before reusing slots.
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// Rewrite the log as one PUT per live entry (with its place in the
    /// order), then one GHOST per entry of each ghost (write beside under a
    /// random name, fsync, rename over, fsync the directory). On failure the
    /// old log stays in place and in use.
    pub fn compact(&mut self, g: &Geometry, snap: &Snapshot) -> Result<()> {
        let (live, ghost) = (&snap.live, &snap.ghost);
        let kept = live.len() + ghost.len() + snap.order_ghost.len();
        let tmp = temp_beside(&self.path, "compact");
        let mut f = open_private(&tmp, true).map_err(|e| Error::io("open", &tmp, 0, 0, e))?;
        let mut buf = Vec::with_capacity(HEADER_LEN + (kept + 1) * RECORD_LEN);
        buf.extend_from_slice(&encode_header(g));
        let mut gen = 0u32;
        let records = live
            .iter()
            .map(Record::placed)
            .chain(ghost.iter().map(|&h| Record::ghost(h)))
            .chain(snap.order_ghost.iter().map(|&h| Record::order_ghost(h)));
        for r in records {
            gen = gen.wrapping_add(1);
            buf.extend_from_slice(&r.encode(gen));
        }
        let marker = self.opened_at.map(|at| Record::marker(false, at));
        if let Some(m) = marker {
            gen = gen.wrapping_add(1);
            buf.extend_from_slice(&m.encode(gen));
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
        self.records = kept as u64 + marker.is_some() as u64;
        self.gen = gen;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::PermissionsExt;

    fn geo() -> Geometry {
        Geometry {
            block_size: 4096,
            num_blocks: 8,
            layout: 0,
            checksums: true,
            store_id: [1; 16],
        }
    }

    fn open(p: &Path) -> (IndexLog, Recovered) {
        IndexLog::open(p, &geo(), false, false).unwrap()
    }

    /// A snapshot of live blocks and no ghosts.
    fn live_only(live: Vec<Live>) -> Snapshot {
        Snapshot {
            live,
            ..Default::default()
        }
    }

    #[test]
    fn open_and_close_markers_say_whether_the_store_was_closed_cleanly() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kv.index");
        {
            let (mut log, rec) = open(&p);
            assert!(!rec.closed_cleanly && rec.last_open.is_none());
            log.mark(false).unwrap();
            log.append(&[Record::put(10, 0, 111)]).unwrap();
            log.mark(true).unwrap();
        }
        let ins = inspect(&p).unwrap();
        assert!(ins.recovered.closed_cleanly);
        assert!(ins.recovered.last_close >= ins.recovered.last_open);
        assert!(ins.recovered.last_open.is_some());
        assert_eq!(ins.recovered.live.len(), 1);
        assert_eq!((ins.recovered.records, ins.recovered.bad_records), (3, 0));
        {
            // Opened again, a block written, never closed: not closed cleanly.
            let (mut log, rec) = open(&p);
            assert!(rec.closed_cleanly);
            log.mark(false).unwrap();
            log.append(&[Record::put(11, 1, 222)]).unwrap();
            // Compaction keeps this session's open marker.
            let live = inspect(&p).unwrap().recovered.live;
            log.compact(&geo(), &live_only(live)).unwrap();
        }
        let ins = inspect(&p).unwrap();
        assert!(!ins.recovered.closed_cleanly && ins.recovered.last_open.is_some());
        assert_eq!((ins.recovered.records, ins.recovered.live.len()), (3, 2));
    }

    #[test]
    fn replay_put_del_and_reuse() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kv.index");
        {
            let (mut log, rec) = open(&p);
            assert!(rec.created && rec.live.is_empty());
            log.append(&[Record::put(10, 0, 111), Record::put(11, 1, 222)])
                .unwrap();
            log.append(&[Record::del(10, 0), Record::put(12, 0, 333)])
                .unwrap();
        }
        let (_log, rec) = open(&p);
        assert_eq!(
            rec.live,
            vec![
                Live {
                    key: 11.into(),
                    slot: 1,
                    crc: 222,
                    ..Live::default()
                },
                Live {
                    key: 12.into(),
                    slot: 0,
                    crc: 333,
                    ..Live::default()
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
            let (mut log, _) = open(&p);
            log.append(&[Record::put(1, 0, 5), Record::put(2, 1, 6)])
                .unwrap();
        }
        let len = std::fs::metadata(&p).unwrap().len();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len - 7).unwrap(); // half a record
        let (_, rec) = open(&p);
        assert_eq!(rec.live.len(), 1);
        assert_eq!(rec.torn_bytes, (RECORD_LEN - 7) as u64);
        std::fs::write(
            &p,
            b"garbage garbage garbage garbage garbage garbage garbage garbage!",
        )
        .unwrap();
        assert!(
            matches!(IndexLog::open(&p, &geo(), false, false), Err(Error::InvalidArgument(m)) if m.contains("magic"))
        );
        let other = Geometry {
            checksums: false,
            ..geo()
        };
        let p2 = d.path().join("b.index");
        open(&p2);
        match IndexLog::open(&p2, &other, false, false) {
            Err(Error::InvalidArgument(m)) => {
                assert!(
                    m.contains("checksums true") && m.contains("checksums false"),
                    "{m}"
                )
            }
            _ => panic!("geometry mismatch accepted"),
        }
    }

    #[test]
    fn a_bad_record_in_the_middle_is_skipped_not_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kv.index");
        {
            let (mut log, _) = open(&p);
            for h in 0..8u64 {
                log.append(&[Record::put(h, h as u32, h as u32)]).unwrap();
            }
        }
        // Flip a bit in record 2 of 8.
        let mut b = std::fs::read(&p).unwrap();
        b[HEADER_LEN + 2 * RECORD_LEN + 10] ^= 1;
        std::fs::write(&p, &b).unwrap();
        let (_, rec) = open(&p);
        assert_eq!(rec.bad_records, 1);
        assert_eq!(rec.torn_bytes, 0);
        let hashes: Vec<u64> = rec.live.iter().map(|l| l.key.hash).collect();
        assert_eq!(hashes, vec![0, 1, 3, 4, 5, 6, 7]);
        // Rewritten without it: the next open finds nothing to skip.
        let (_, rec) = open(&p);
        assert_eq!((rec.bad_records, rec.live.len()), (0, 7));
    }

    #[test]
    fn a_failed_append_leaves_no_torn_bytes_behind_later_records() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kv.index");
        let (mut log, _) = open(&p);
        log.append(&[Record::put(1, 0, 1)]).unwrap();
        // Half a record of garbage where the next append goes, as a short
        // write followed by an error would leave it.
        let end = (HEADER_LEN + RECORD_LEN) as u64;
        log.file.write_all_at(&[0xAB; 16], end).unwrap();
        log.append(&[Record::put(2, 1, 2)]).unwrap();
        drop(log);
        let (_, rec) = open(&p);
        assert_eq!(rec.live.len(), 2);
        assert_eq!((rec.torn_bytes, rec.bad_records), (0, 0));
    }

    #[test]
    fn the_index_is_bound_to_its_data_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kv.index");
        {
            let (mut log, _) = open(&p);
            log.append(&[Record::put(1, 0, 1)]).unwrap();
        }
        let other = Geometry {
            store_id: [2; 16],
            ..geo()
        };
        // Another data file, not new: refused, naming both ids.
        match IndexLog::open(&p, &other, false, false) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("belongs to another data file")),
            _ => panic!("an index of another data file was accepted"),
        }
        // Its data file was made anew: the stale index is replaced.
        let (_, rec) = IndexLog::open(&p, &other, false, true).unwrap();
        assert!(rec.live.is_empty() && rec.reset.is_some());
        let (_, rec) = IndexLog::open(&p, &other, false, false).unwrap();
        assert!(rec.live.is_empty() && rec.reset.is_none());
    }

    #[test]
    fn a_header_cut_short_by_a_crash_is_rewritten() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kv.index");
        std::fs::write(&p, &encode_header(&geo())[..20]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (_, rec) = open(&p);
        assert!(rec.live.is_empty());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), HEADER_LEN as u64);
    }

    #[test]
    fn ghost_records_replay_in_order_and_survive_compaction() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kv.index");
        let (mut log, _) = open(&p);
        log.append(&[Record::ghost(7), Record::put(1, 0, 11), Record::ghost(8)])
            .unwrap();
        drop(log);
        let (mut log, rec) = open(&p);
        assert_eq!(
            (rec.ghost.as_slice(), rec.live.len()),
            (&[Key::from(7), 8.into()][..], 1)
        );
        assert_eq!(rec.bad_records, 0);
        let snap = Snapshot {
            live: rec.live,
            ghost: vec![Key::from(8), 9.into()],
            order_ghost: Vec::new(),
        };
        log.compact(&geo(), &snap).unwrap();
        assert_eq!(log.records(), 3);
        drop(log);
        let (_, rec) = open(&p);
        assert_eq!(rec.ghost, vec![Key::from(8), 9.into()]);
        assert_eq!(rec.live[0].key, 1.into());
    }

    #[test]
    fn compaction_keeps_live_entries_and_leftovers_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kv.index");
        let (mut log, _) = open(&p);
        for i in 0..100u64 {
            log.append(&[Record::put(i, (i % 8) as u32, i as u32)])
                .unwrap();
        }
        let live: Vec<Live> = (92..100u64)
            .map(|i| Live {
                key: i.into(),
                slot: (i % 8) as u32,
                crc: i as u32,
                ..Live::default()
            })
            .collect();
        log.compact(&geo(), &live_only(live)).unwrap();
        log.append(&[Record::del(99, 3)]).unwrap();
        drop(log);
        let stale = d.path().join("kv.index.compact-dead");
        std::fs::write(&stale, b"half a compaction").unwrap();
        let (_, rec) = open(&p);
        assert_eq!(rec.live.len(), 7);
        assert_eq!(rec.records, 9);
        assert!(!stale.exists());
    }

    #[test]
    fn order_records_replay_places_counts_and_the_s3fifo_ghost() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kv.index");
        let at = |key: u64, slot: u32, main: bool, count: u8| Live {
            key: key.into(),
            slot,
            crc: 0,
            main,
            count,
        };
        let (mut log, _) = open(&p);
        log.append(&[
            Record::put(1, 0, 0),
            Record::put(2, 1, 0),
            Record::put(3, 2, 0),
            // 1 moves to the back of the main queue with count 2; 2 only
            // gets a count; 3 leaves into the ghost, 4 takes its slot.
            Record::order(&at(1, 0, true, 2), true),
            Record::order(&at(2, 1, false, 1), false),
            Record::evicted(3, 2, true),
            Record::put(4, 2, 0),
            // A record naming a slot another block holds is ignored.
            Record::order(&at(3, 2, true, 3), true),
            // 5 leaves into the ghost and comes back into the main queue:
            // the ghost forgets it.
            Record::put(5, 3, 0),
            Record::evicted(5, 3, true),
            Record::placed(&at(5, 3, true, 0)),
            // 6 leaves into the ghost, comes back into the main queue and
            // leaves it again in the same batch (its PUT never written):
            // the ghost forgets it too.
            Record::put(6, 4, 0),
            Record::evicted(6, 4, true),
            Record::evicted(6, 4, false),
        ])
        .unwrap();
        drop(log);
        let (mut log, rec) = open(&p);
        assert_eq!(rec.bad_records, 0);
        let want = vec![
            at(2, 1, false, 1),
            at(1, 0, true, 2),
            at(4, 2, false, 0),
            at(5, 3, true, 0),
        ];
        assert_eq!(rec.live, want);
        assert_eq!(
            rec.order_ghost,
            vec![(3, true), (5, true), (5, false), (6, true), (6, false)]
        );
        // Compaction writes the same places and counts, and the ghost.
        let snap = Snapshot {
            live: rec.live.clone(),
            ghost: vec![Key::from(9)],
            order_ghost: vec![3],
        };
        log.compact(&geo(), &snap).unwrap();
        drop(log);
        let (_, rec) = open(&p);
        assert_eq!(
            (rec.live, rec.ghost, rec.order_ghost),
            (want, vec![Key::from(9)], vec![(3, true)])
        );
    }
}
