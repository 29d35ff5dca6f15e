//! The remote tier: KV blocks in Redis or Valkey (one server, or a cluster),
//! below the host and disk tiers, shared by every process that names the
//! same server, prefix and layout.
//!
//! - **Keys** `"{prefix}:{layout:016x}:{block_size}:{hash:016x}"`: two
//!   models (layout fingerprints) or two block sizes never share a key. A
//!   named namespace's keys carry a tag derived from its name
//!   (`"...:{block_size}:n{tag}:{hash:016x}"`, [`Space`]), so two namespaces
//!   never share one either. In a cluster the keys spread over every master
//!   by their hash slot ([`cluster`]).
//! - **Values**: a header (magic `DYNR`, version, header length, block size,
//!   the hash, the layout, and a check of the key and the bytes) then the
//!   block. The check is CRC32C (version 1, a 32-byte header), or with a
//!   secret (`remote_secret`) a keyed BLAKE3 MAC over the key, the header
//!   and the block (version 2, a 64-byte header): a value nobody holding
//!   the secret wrote is never served. A value that fails any check is a
//!   miss, counted (`remote_corrupt`; `remote_unauthenticated` for a MAC)
//!   and, unless it fails only the MAC, deleted.
//! - **Deadlines**: every call's remote work (connect, TLS handshake, every
//!   round trip of the call together) ends by one deadline,
//!   `timeout_ms` after it starts ([`conn`]); every reply is read through a
//!   size bound (a value longer than a block's is refused before or while it
//!   is read, the connection dropped, the event counted as
//!   `remote_oversized`). A fetched value lands straight in its destination
//!   and is checked as it arrives ([`conn::Conn::recv_value_into`]). A
//!   failed connection or a missed deadline of the tier's own (counted as
//!   `remote_deadline_missed`; a caller's shorter one is only counted) marks
//!   the tier down for a backoff (250 ms, doubling to 10 s) during which
//!   calls skip it at once (counted as `remote_skipped` for writes); one
//!   warning per change of state.
//! - **Secrets**: the password (from the URL) and the MAC secret never
//!   appear in [`RemoteTier::display_url`], counters, warnings or errors:
//!   every message is scrubbed of them.
//! - **Deletions**: [`RemoteTier::purge`] deletes a namespace's keys (`SCAN`
//!   with a pattern of their exact shape on every master, `UNLINK`),
//!   [`RemoteTier::remove`] given blocks', before the caller's deadline
//!   ([`purge`]).
//! - **Writes in the background**: [`RemoteTier::enqueue`] queues hashes
//!   (bounded by `queue_bytes` of blocks) for one writer thread, which
//!   reads each block from the local tiers straight into the command that
//!   carries it and streams pipelined batches; when the queue is full,
//!   blocks are skipped and counted, and the caller never waits.
//!
//! `unsafe` here only reads and writes callers' blocks given as addresses
//! (the manager checked them, as for the local tiers).
#![allow(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use redis::Value;

use crate::error::{Error, Result};
use crate::keys::Key;

mod cluster;
mod codec;
mod conn;
mod health;
mod purge;
mod side;
mod url;
mod writer;

use std::cell::Cell;
use std::sync::mpsc;

use codec::Bad;
pub use codec::Space;
pub use conn::Deadline;
use conn::{Conn, Dialer, Failure, Landed};
use health::Health;
pub use url::redact;
use writer::Queue;

/// Bytes a reply may add to a value (`$<length>\r\n` ... `\r\n`).
const FRAMING: usize = 32;
/// Commands per pipelined round trip.
const PIPELINE: usize = 64;
/// Bytes of commands gathered before each socket write when storing.
const STREAM_BYTES: usize = 1 << 20;
/// Connections one fetch uses at once.
const FETCH_THREADS: usize = 4;

pub use crate::settings::RemoteWrite;

/// How to reach the remote and what to store there. (No `Debug`: the URL
/// and the secret hold credentials.)
#[derive(Clone)]
pub struct RemoteOptions {
    /// `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS),
    /// `redis+cluster://[user:password@]host:port[,host:port...]` (or
    /// `rediss+cluster://` for a TLS cluster).
    pub url: String,
    pub prefix: String,
    /// Expiry of every stored value (None: none).
    pub ttl_s: Option<u64>,
    pub timeout_ms: u64,
    /// PEM file of the CA that signed the server's certificate (TLS);
    /// None: the system's roots.
    pub ca_file: Option<PathBuf>,
    pub block_size: usize,
    /// The layout fingerprint (0: none), part of every key and value.
    pub layout: u64,
    /// Bound of the background write queue, in bytes.
    pub queue_bytes: usize,
    /// With a secret, values carry a keyed BLAKE3 MAC instead of a CRC32C:
    /// only writers holding the secret can make a value this tier serves.
    pub secret: Option<String>,
    /// Side threads that compute or check values' checksums or MACs while
    /// a batch moves (None: by the machine's cores; see `side.rs`).
    pub check_threads: Option<usize>,
}

/// A server: (host, port).
pub(crate) type Node = (String, u16);

/// Connections kept per server for later calls.
const POOL_PER_NODE: usize = 16;

/// How [`RemoteTier::round_trip`] reads each reply.
enum Replies<'a> {
    /// Parsed whole, each of at most this many bytes.
    Parsed(usize),
    /// `read(conn, i)` reads reply `i` itself: `None` when it kept the
    /// reply (a value landed in place), else the reply as a value.
    Into(&'a mut ReadReply<'a>),
}

/// See [`Replies::Into`].
type ReadReply<'a> =
    dyn FnMut(&mut Conn, usize) -> std::result::Result<Option<Value>, Failure> + 'a;

/// The servers (one, or a cluster's masters) and pooled connections to them.
struct Net {
    dial: Dialer,
    /// The server, or a cluster's seed nodes.
    seeds: Vec<Node>,
    cluster: bool,
    slots: Mutex<cluster::SlotMap>,
    pools: Mutex<std::collections::HashMap<Node, Vec<Conn>>>,
    /// Each server's addresses, resolved once (by the system resolver, with
    /// its own timeouts: a name is not bounded by a call's deadline) rather
    /// than for every new connection; forgotten when the tier goes down.
    addrs: Mutex<std::collections::HashMap<Node, Vec<std::net::SocketAddr>>>,
}

/// Counters, as `stats()` shows them.
#[derive(Default)]
pub struct RemoteStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub errors: AtomicU64,
    pub skipped: AtomicU64,
    pub corrupt: AtomicU64,
    pub stored: AtomicU64,
    /// Values that lacked a valid MAC (with `remote_secret`): never served.
    pub unauthenticated: AtomicU64,
    /// Replies refused while being read for being longer than a value.
    pub oversized: AtomicU64,
    /// Calls whose remote work ran into its deadline.
    pub deadline_missed: AtomicU64,
    /// Keys deleted by purges of a namespace and removals of blocks.
    pub deleted: AtomicU64,
}

/// Where the background writer reads the bytes of the blocks it sends: the
/// local tiers of the manager the remote belongs to.
pub trait LocalSource: Send + Sync {
    /// Hand block `key`'s bytes to `f` when the local tiers hold it,
    /// changing nothing else (no recency, no promotion): a host-tier block
    /// in place (its slot held meanwhile), a disk-tier block read into
    /// `scratch`, with its checksum ([`crate::checksum::block_crc`]) where
    /// the tier knows it without reading the bytes again. False when the
    /// block is not held.
    fn with_local(
        &self,
        key: Key,
        scratch: &mut Vec<u8>,
        f: &mut dyn FnMut(&[u8], Option<u32>),
    ) -> bool;
}

/// One remote store (see the module docs).
pub struct RemoteTier {
    net: Net,
    opts: RemoteOptions,
    shown: String,
    /// Texts no message may show: the password (as given and decoded), the MAC secret.
    secrets: Vec<String>,
    /// The MAC key (from `opts.secret`).
    mac_key: Option<[u8; 32]>,
    /// The key of namespaces' tags (from `opts.secret`, or from nothing).
    tag_key: [u8; 32],
    health: Mutex<Health>,
    pub stats: RemoteStats,
    warnings: crate::error::Warnings,
    queue: Mutex<Queue>,
    queue_cv: Condvar,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    closed: AtomicBool,
    source: std::sync::OnceLock<std::sync::Weak<dyn LocalSource>>,
    writer_nice: std::sync::atomic::AtomicU32,
}

impl RemoteTier {
    /// Connect (and check the connection: a PING, or a cluster's slot map):
    /// a wrong password, an untrusted certificate or an unreachable server
    /// is an error here, naming the URL without its password.
    pub fn open(opts: RemoteOptions) -> Result<Arc<Self>> {
        // The integer settings are checked against the one settings table (no clamping).
        use crate::settings::{check_int, check_usize};
        check_usize("block_size", opts.block_size)?;
        check_int("remote_timeout_ms", opts.timeout_ms)?;
        if let Some(t) = opts.ttl_s {
            check_int("remote_ttl_s", t)?;
        }
        check_usize("remote_queue_bytes", opts.queue_bytes)?;
        if let Some(t) = opts.check_threads {
            check_usize("remote_check_threads", t)?;
        }
        if opts.queue_bytes < opts.block_size + codec::HEADER_MAC {
            return Err(Error::InvalidArgument(format!(
                "remote_queue_bytes ({}) holds no block of {} bytes: give at least one block's \
                 value ({} bytes)",
                opts.queue_bytes,
                opts.block_size,
                opts.block_size + codec::HEADER_MAC
            )));
        }
        let p = url::parse_url(&opts.url)?;
        let shown = redact(&opts.url);
        let mut secrets: Vec<String> = [p.password.clone(), p.password_raw.clone()]
            .into_iter()
            .flatten()
            .filter(|s| !s.is_empty())
            .collect();
        if let Some(s) = &opts.secret {
            if s.is_empty() {
                return Err(Error::InvalidArgument(
                    "remote_secret must not be empty (leave it unset for CRC32C-checked values)"
                        .into(),
                ));
            }
            secrets.push(s.clone());
        }
        let pem = match &opts.ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                Error::InvalidArgument(format!(
                    "remote_ca_file {}: {e}; give the PEM file of the CA that signed the \
                     server's certificate",
                    path.display()
                ))
            })?),
            None => None,
        };
        if pem.is_some() && !p.tls {
            return Err(Error::InvalidArgument(format!(
                "remote_ca_file is set but {shown} is not a TLS URL (rediss://)"
            )));
        }
        let tls = if p.tls {
            Some(conn::tls_config(pem.as_deref()).map_err(|e| {
                Error::InvalidArgument(format!(
                    "remote_ca_file {}: {e}",
                    opts.ca_file
                        .as_ref()
                        .map_or("(system roots)".into(), |f| f.display().to_string())
                ))
            })?)
        } else {
            None
        };
        let mac_key = opts
            .secret
            .as_ref()
            .map(|s| blake3::derive_key("dynblock remote value MAC v2", s.as_bytes()));
        let tag_key = blake3::derive_key(
            "dynblock remote namespace tag v1",
            opts.secret.as_deref().unwrap_or("").as_bytes(),
        );
        let tier = Arc::new(RemoteTier {
            net: Net {
                dial: Dialer {
                    tls,
                    user: p.user.clone(),
                    password: p.password.clone(),
                    db: p.db,
                },
                seeds: p.hosts.clone(),
                cluster: p.cluster,
                slots: Mutex::new(cluster::SlotMap::default()),
                pools: Mutex::new(std::collections::HashMap::new()),
                addrs: Mutex::new(std::collections::HashMap::new()),
            },
            opts,
            shown,
            secrets,
            mac_key,
            tag_key,
            health: Mutex::new(Health::default()),
            stats: RemoteStats::default(),
            warnings: crate::error::Warnings::default(),
            queue: Mutex::new(Queue::default()),
            queue_cv: Condvar::new(),
            writer: Mutex::new(None),
            closed: AtomicBool::new(false),
            source: std::sync::OnceLock::new(),
            writer_nice: std::sync::atomic::AtomicU32::new(0),
        });
        // Check now: a wrong password or CA is a clear error at open.
        let d = tier.deadline();
        let checked = if tier.net.cluster {
            tier.refresh_slots(&d)
        } else {
            let node = tier.net.seeds[0].clone();
            tier.take_conn(&node, &d).and_then(|mut c| {
                c.send(&redis::cmd("PING").get_packed_command(), &d)?;
                match c.recv(1024, &d, 0)? {
                    Value::ServerError(e) => Err(Failure::io(&conn::describe(&e), false)),
                    _ => {
                        tier.give_conn(node, c);
                        Ok(())
                    }
                }
            })
        };
        checked.map_err(|e| Error::Remote(format!("remote {}: {}", tier.shown, tier.scrub(&e))))?;
        let weak = Arc::downgrade(&tier);
        let h = std::thread::Builder::new()
            .name("dynblock-remote".into())
            .spawn(move || writer::writer_loop(weak))
            .map_err(|e| Error::Remote(format!("cannot start the remote writer thread: {e}")))?;
        *tier.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        Ok(tier)
    }

    /// The URL without its password.
    pub fn display_url(&self) -> &str {
        &self.shown
    }

    pub fn is_cluster(&self) -> bool {
        self.net.cluster
    }

    /// The deadline of a call's remote work that starts now:
    /// `timeout_ms` from now.
    pub fn deadline(&self) -> Deadline {
        Deadline::own(Duration::from_millis(self.opts.timeout_ms))
    }

    pub fn take_warnings(&self) -> Vec<String> {
        self.warnings.take()
    }

    fn scrub(&self, e: &dyn std::fmt::Display) -> String {
        let mut text = e.to_string();
        for s in &self.secrets {
            text = text.replace(s.as_str(), "***");
        }
        text
    }

    /// A pooled connection to `node`, or a new one (before the deadline).
    fn take_conn(&self, node: &Node, d: &Deadline) -> std::result::Result<Conn, Failure> {
        let pooled = self
            .net
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(node)
            .and_then(Vec::pop);
        match pooled {
            Some(c) => Ok(c),
            None => Conn::open(&node.0, &self.addrs_of(node)?, &self.net.dial, d),
        }
    }

    /// `node`'s addresses, resolved on first use.
    fn addrs_of(&self, node: &Node) -> std::result::Result<Vec<std::net::SocketAddr>, Failure> {
        use std::net::ToSocketAddrs;
        let known = self
            .net
            .addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned();
        if let Some(a) = known {
            return Ok(a);
        }
        let a: Vec<_> = (node.0.as_str(), node.1).to_socket_addrs()?.collect();
        if !a.is_empty() {
            self.net
                .addrs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node.clone(), a.clone());
        }
        Ok(a)
    }

    /// Keep a connection that finished its round trips in step.
    fn give_conn(&self, node: Node, c: Conn) {
        let mut pools = self.net.pools.lock().unwrap_or_else(|p| p.into_inner());
        let pool = pools.entry(node).or_default();
        if pool.len() < POOL_PER_NODE {
            pool.push(c);
        }
    }

    /// Ask a cluster for its slot map: the seed nodes of the URL in turn,
    /// until one answers.
    fn refresh_slots(&self, d: &Deadline) -> std::result::Result<(), Failure> {
        let mut last = Failure::io(&"no cluster node answered", false);
        for node in &self.net.seeds {
            let got = self.take_conn(node, d).and_then(|mut c| {
                c.send(&redis::cmd("CLUSTER").arg("SLOTS").get_packed_command(), d)?;
                let v = c.recv(1 << 20, d, 0)?;
                if let Value::ServerError(e) = &v {
                    return Err(Failure::io(&conn::describe(e), false));
                }
                let map =
                    cluster::SlotMap::parse(&v, &node.0).map_err(|e| Failure::io(&e, false))?;
                self.give_conn(node.clone(), c);
                Ok(map)
            });
            match got {
                Ok(map) => {
                    *self.net.slots.lock().unwrap_or_else(|p| p.into_inner()) = map;
                    return Ok(());
                }
                Err(e) => {
                    if d.left().is_err() {
                        return Err(e);
                    }
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// The indices `todo` of `keys` grouped by the server that holds them.
    fn route(
        &self,
        keys: &[String],
        todo: &[usize],
        d: &Deadline,
    ) -> std::result::Result<Vec<(Node, Vec<usize>)>, Failure> {
        if !self.net.cluster {
            return Ok(vec![(self.net.seeds[0].clone(), todo.to_vec())]);
        }
        for attempt in 0..2 {
            let mut groups: Vec<(Node, Vec<usize>)> = Vec::new();
            let mut unserved = None;
            let empty = {
                let map = self.net.slots.lock().unwrap_or_else(|p| p.into_inner());
                for &i in todo {
                    let slot = cluster::slot(keys[i].as_bytes());
                    match map.master(slot) {
                        Some(n) => match groups.iter_mut().find(|g| &g.0 == n) {
                            Some(g) => g.1.push(i),
                            None => groups.push((n.clone(), vec![i])),
                        },
                        None => {
                            unserved = Some(slot);
                            break;
                        }
                    }
                }
                map.is_empty()
            };
            match unserved {
                None if !empty => return Ok(groups),
                _ if attempt == 0 => self.refresh_slots(d)?,
                Some(slot) => {
                    return Err(Failure::io(
                        &format!("no cluster node serves slot {slot}"),
                        false,
                    ))
                }
                None => return Err(Failure::io(&"the cluster serves no slots", false)),
            }
        }
        unreachable!("the second attempt returns")
    }

    /// One pipelined round trip per server for commands `0..keys.len()`
    /// (command `i` is about `keys[i]`): `pack(i, buf)` appends command
    /// `i` (false: nothing to send for `i`), each server's commands go out
    /// in ~1 MiB writes, and its replies (at most `limit` bytes each) are
    /// handed in order to `reply(i, value)`, all before the deadline (with
    /// [`Replies::Into`], a reply it does not hand back is not handed on). A
    /// cluster's MOVED/ASK/TRYAGAIN/CLUSTERDOWN replies refresh its slot map
    /// and those commands are sent once more; a second such reply is handed
    /// over as it is. A connection that failed is dropped.
    fn round_trip(
        &self,
        keys: &[String],
        mut replies: Replies,
        d: &Deadline,
        buf: &mut Vec<u8>,
        pack: &mut dyn FnMut(usize, &mut Vec<u8>) -> bool,
        reply: &mut dyn FnMut(usize, Value),
    ) -> std::result::Result<(), Failure> {
        let mut todo: Vec<usize> = (0..keys.len()).collect();
        for attempt in 0..2 {
            let mut again = Vec::new();
            for (node, idx) in self.route(keys, &todo, d)? {
                let mut c = self.take_conn(&node, d)?;
                buf.clear();
                let mut sent = Vec::with_capacity(idx.len());
                for &i in &idx {
                    if pack(i, buf) {
                        sent.push(i);
                    }
                    if buf.len() >= STREAM_BYTES {
                        c.send(buf, d)?;
                        buf.clear();
                    }
                }
                if !buf.is_empty() {
                    c.send(buf, d)?;
                    buf.clear();
                }
                for &i in &sent {
                    let v = match &mut replies {
                        Replies::Parsed(limit) => c.recv(*limit, d, i)?,
                        Replies::Into(read) => match read(&mut c, i)? {
                            Some(v) => v,
                            None => continue,
                        },
                    };
                    if self.net.cluster && attempt == 0 && is_redirect(&v) {
                        again.push(i);
                    } else {
                        reply(i, v);
                    }
                }
                self.give_conn(node, c);
            }
            if again.is_empty() {
                break;
            }
            again.sort_unstable();
            self.refresh_slots(d)?;
            todo = again;
        }
        Ok(())
    }

    /// Length of the longest prefix of `hashes` (in `space`) the remote
    /// holds (one pipelined round trip per 64 hashes, stopping at the first
    /// miss), all before the deadline.
    pub fn count_prefix(&self, space: &Space, hashes: &[u64], d: Deadline) -> usize {
        if self.skipped_now() || d.left().is_err() {
            return 0;
        }
        let mut n = 0;
        let mut buf = Vec::new();
        for chunk in hashes.chunks(self.chunk_len()) {
            let keys: Vec<String> = chunk.iter().map(|&h| self.key(space, h)).collect();
            let mut found = vec![false; chunk.len()];
            let r = self.round_trip(
                &keys,
                Replies::Parsed(64),
                &d,
                &mut buf,
                &mut |i, b| {
                    redis::cmd("EXISTS").arg(&keys[i]).write_packed_command(b);
                    true
                },
                &mut |i, v| found[i] = matches!(v, Value::Int(1)),
            );
            if let Err(e) = r {
                self.failed(&e, &d);
                return n;
            }
            self.came_up();
            let k = found.iter().take_while(|&&x| x).count();
            n += k;
            if k < chunk.len() {
                break;
            }
        }
        n
    }

    /// Fetch the longest prefix of `hashes` (in `space`) the remote holds, verified,
    /// block `i` into `dst[i]` (each `block_size` bytes), all before the
    /// deadline; returns its length. A value that fails verification ends
    /// the prefix and is counted (and deleted, unless it failed only the
    /// MAC); so does a reply longer than a value.
    ///
    /// # Safety
    /// Every `dst[i]` is valid for writes of `block_size` bytes, distinct,
    /// and untouched by others for the whole call.
    pub unsafe fn fetch(&self, space: &Space, hashes: &[u64], dst: &[usize], d: Deadline) -> usize {
        if self.skipped_now() || d.left().is_err() {
            return 0;
        }
        let per = self.chunk_len();
        let chunks: Vec<&[u64]> = hashes.chunks(per).collect();
        let threads = self.fetch_threads();
        let mut n = 0;
        for (gi, group) in chunks.chunks(threads).enumerate() {
            let first = gi * threads;
            // Chunk k's destinations are dst[(first + k) * per..]: distinct per chunk.
            let got: Vec<usize> = if group.len() == 1 {
                // SAFETY: valid, distinct destinations, as the caller guarantees.
                vec![unsafe { self.get_chunk(space, group[0], &dst[first * per..], &d) }]
            } else {
                std::thread::scope(|sc| {
                    let hs: Vec<_> = group
                        .iter()
                        .enumerate()
                        .map(|(k, c)| {
                            let out = &dst[(first + k) * per..];
                            // SAFETY: each thread writes its own chunk's
                            // destinations, valid as the caller guarantees.
                            sc.spawn(move || unsafe { self.get_chunk(space, c, out, &d) })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap_or(0)).collect()
                })
            };
            for (k, g) in got.into_iter().enumerate() {
                n += g;
                if g < group[k].len() {
                    return n;
                }
            }
        }
        n
    }

    /// One pipelined round trip of GETs for `chunk`, each verified value
    /// copied to its `dst`; returns how many leading blocks arrived.
    ///
    /// # Safety
    /// As for [`Self::fetch`], for `dst[..chunk.len()]`.
    unsafe fn get_chunk(&self, space: &Space, chunk: &[u64], dst: &[usize], d: &Deadline) -> usize {
        let bs = self.opts.block_size;
        let hl = self.header_len();
        // Values of either kind (with a MAC or a CRC) are read whole and
        // judged; only a reply longer than the longer kind is refused.
        let limit = codec::HEADER_MAC + bs + FRAMING;
        let keys: Vec<String> = chunk.iter().map(|&h| self.key(space, h)).collect();
        // Each block's fate: None once it arrived whole and passed its checks.
        let fate: Vec<Cell<Option<Bad>>> = vec![Cell::new(Some(Bad::Missing)); chunk.len()];
        let mut head = [0u8; codec::HEADER_MAC];
        let mut buf = Vec::new();
        // With cores to spare, each value that landed whole is checked on a
        // side thread while the next one lands; else piece by piece as it
        // lands, while it is in the CPU cache.
        // (A fetch over several connections at once has its parallelism.)
        let side = if self.fetch_threads() > 1 {
            0
        } else {
            side::side_threads(bs, self.opts.check_threads)
        };
        let r = std::thread::scope(|sc| {
            let (done_tx, done_rx) = mpsc::sync_channel::<(usize, Option<Bad>)>(chunk.len());
            let mut work: Vec<mpsc::SyncSender<(usize, codec::Check)>> = (0..side)
                .map(|_| {
                    let (tx, rx) = mpsc::sync_channel::<(usize, codec::Check)>(chunk.len());
                    let done_tx = done_tx.clone();
                    sc.spawn(move || {
                        for (i, check) in rx {
                            // SAFETY: dst[i] is valid for block_size bytes (the
                            // caller guarantees it) and whole: the receiving
                            // thread sent it here after its last write to it.
                            let block =
                                unsafe { std::slice::from_raw_parts(dst[i] as *const u8, bs) };
                            let _ = done_tx.send((i, check.finish(block).err()));
                        }
                    });
                    tx
                })
                .collect();
            drop(done_tx);
            // A value of the right length lands in place: its block straight
            // in dst[i].
            let mut into = |c: &mut Conn, i: usize| {
                // SAFETY: the caller guarantees dst[i] is valid for writes of
                // block_size bytes, distinct, and not touched by others.
                let block = unsafe { std::slice::from_raw_parts_mut(dst[i] as *mut u8, bs) };
                let mut check = Err(Bad::Corrupt);
                let got =
                    c.recv_value_into(&mut head[..hl], block, limit, d, i, &mut |part| match (
                        part, &mut check,
                    ) {
                        (Landed::Head(head), _) => {
                            check = self.begin_check(chunk[i], &keys[i], head, hl + bs)
                        }
                        (Landed::Body(upto), Ok(c)) if side == 0 => c.update(upto),
                        (Landed::Body(_), _) => {}
                    })?;
                if got.is_none() {
                    match check {
                        Ok(c) if side > 0 => {
                            // Bounded: at most chunk.len() values a channel.
                            if let Err(mpsc::SendError((i, c))) = work[i % side].send((i, c)) {
                                fate[i].set(c.finish(block).err());
                            }
                        }
                        check => fate[i].set(check.and_then(|c| c.finish(block)).err()),
                    }
                }
                Ok(got)
            };
            let r = self.round_trip(
                &keys,
                Replies::Into(&mut into),
                d,
                &mut buf,
                &mut |i, b| {
                    redis::cmd("GET").arg(&keys[i]).write_packed_command(b);
                    true
                },
                // Any other reply: a value of another length is refused.
                &mut |i, v| {
                    if let Value::BulkString(v) = v {
                        fate[i].set(Some(self.refuse(chunk[i], &keys[i], &v)));
                    }
                },
            );
            // The side threads end once their channels close and they have
            // checked what they were sent.
            work.clear();
            for (i, f) in done_rx {
                fate[i].set(f);
            }
            r
        });
        let mut fate: Vec<Option<Bad>> = fate.into_iter().map(Cell::into_inner).collect();
        let mut n = fate.iter().take_while(|f| f.is_none()).count();
        match r {
            Ok(()) => self.came_up(),
            Err(Failure::Oversized { at }) => {
                // Reply `at` never arrived whole, so the prefix ends there.
                self.failed(&Failure::Oversized { at }, d);
                fate[at] = Some(Bad::Oversized);
                n = n.min(at);
            }
            Err(e) => {
                // The blocks verified before the failure are kept.
                self.failed(&e, d);
                return n;
            }
        }
        self.stats.hits.fetch_add(n as u64, Ordering::Relaxed);
        let Some(Some(why)) = fate.get(n) else {
            return n;
        };
        let h = chunk[n];
        match why {
            Bad::Missing => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
            }
            Bad::Unauthenticated => {
                self.stats.unauthenticated.fetch_add(1, Ordering::Relaxed);
                self.warnings.push(format!(
                    "remote block {h:#018x} at {} has no valid MAC for this remote_secret \
                     (written without it, with another secret, or forged): not served",
                    self.shown
                ));
            }
            Bad::Corrupt | Bad::Oversized => {
                self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                self.warnings.push(format!(
                    "remote block {h:#018x} at {} failed verification (wrong size, \
                         header or checksum); deleted and counted as a miss",
                    self.shown
                ));
                self.delete(&keys[n], d);
            }
        }
        n
    }

    /// Delete one key (a value that failed verification), if time is left.
    fn delete(&self, key: &str, d: &Deadline) {
        let mut buf = Vec::new();
        let r = self.round_trip(
            &[key.to_string()],
            Replies::Parsed(1024),
            d,
            &mut buf,
            &mut |_, b| {
                redis::cmd("DEL").arg(key).write_packed_command(b);
                true
            },
            &mut |_, _| {},
        );
        if let Err(e) = r {
            self.failed(&e, d);
        }
    }

    /// Round trips one `fetch` runs side by side: large values are parsed
    /// and copied at CPU speed, so they are spread over a few connections;
    /// small ones are latency-bound: one pipeline is best.
    fn fetch_threads(&self) -> usize {
        if self.opts.block_size >= 1 << 20 {
            FETCH_THREADS
        } else {
            1
        }
    }

    /// Blocks one `fetch` moves per step (its round trips side by side): a
    /// caller staging a long fetch needs a buffer of this many blocks.
    pub fn fetch_piece(&self) -> usize {
        self.chunk_len() * self.fetch_threads()
    }

    /// Blocks per pipelined round trip: 64, or about 8 MiB of blocks of
    /// 1 MiB and more (those round trips run side by side in `fetch`).
    fn chunk_len(&self) -> usize {
        let bs = self.opts.block_size;
        if bs >= 1 << 20 {
            ((8 << 20) / self.value_len()).clamp(1, PIPELINE)
        } else {
            PIPELINE
        }
    }

    /// Write what is queued (for up to `timeout`), stop the writer, drop
    /// the connections.
    pub fn close(&self, timeout: Duration) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.flush(timeout);
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.stop = true;
            let dropped = q.items.len() as u64;
            self.stats.skipped.fetch_add(dropped, Ordering::Relaxed);
            q.items.clear();
        }
        self.queue_cv.notify_all();
        let h = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = h {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
        self.net
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl Drop for RemoteTier {
    fn drop(&mut self) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.stop = true;
        drop(q);
        self.queue_cv.notify_all();
    }
}

/// A cluster reply that says the key lives elsewhere (or not yet).
fn is_redirect(v: &Value) -> bool {
    matches!(v, Value::ServerError(e)
        if matches!(e.code(), "MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN"))
}
