//! The remote tier: KV blocks in Redis or Valkey (one server, or a cluster),
//! below the host and disk tiers, shared by every process that names the
//! same server, prefix and layout.
//!
//! - **Keys** `"{prefix}:{layout:016x}:{block_size}:{hash:016x}"`: two
//!   models (layout fingerprints) or two block sizes never share a key. In a
//!   cluster the keys spread over every master by their hash slot
//!   ([`cluster`]).
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
//!   size bound (a value longer than a block's is refused while it is read,
//!   the connection dropped, the event counted as `remote_oversized`). A
//!   missed deadline (`remote_deadline_missed`) or a failed connection marks
//!   the tier down for a backoff (250 ms, doubling to 10 s) during which
//!   calls skip it at once (counted as `remote_skipped` for writes); one
//!   warning per change of state.
//! - **Secrets**: the password (from the URL) and the MAC secret never
//!   appear in [`RemoteTier::display_url`], counters, warnings or errors:
//!   every message is scrubbed of them.
//! - **Writes in the background**: [`RemoteTier::enqueue`] queues hashes
//!   (bounded by `queue_bytes` of blocks) for one writer thread, which
//!   reads each block from the local tiers straight into the command that
//!   carries it and streams pipelined batches; when the queue is full,
//!   blocks are skipped and counted, and the caller never waits.
//!
//! `unsafe` here only reads and writes callers' blocks given as addresses
//! (the manager checked them, as for the local tiers).
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use redis::Value;

use crate::error::{Error, Result};
use crate::manager::block_crc;

mod cluster;
mod conn;

pub use conn::Deadline;
use conn::{Conn, Dialer, Failure};

const MAGIC: &[u8; 4] = b"DYNR";
/// Values checked by CRC32C.
const VERSION_CRC: u16 = 1;
/// Values authenticated by a keyed BLAKE3 MAC.
const VERSION_MAC: u16 = 2;
/// Bytes of a CRC32C value's header before the block.
pub const HEADER: usize = 32;
/// Bytes of a MAC value's header before the block (its last 32: the MAC).
pub const HEADER_MAC: usize = 64;
/// Bytes a reply may add to a value (`$<length>\r\n` ... `\r\n`).
const FRAMING: usize = 32;
/// Commands per pipelined round trip.
const PIPELINE: usize = 64;
/// Bytes of commands gathered before each socket write when storing.
const STREAM_BYTES: usize = 1 << 20;
/// Connections one fetch uses at once.
const FETCH_THREADS: usize = 4;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// How `put` reaches the remote tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteWrite {
    /// Queued and written by a background thread; the caller never waits.
    Async,
    /// Written before `put` returns.
    Sync,
    /// Never written (the remote is read only).
    Off,
}

impl RemoteWrite {
    pub fn parse(v: &str) -> Result<Self> {
        match v {
            "async" => Ok(RemoteWrite::Async),
            "sync" => Ok(RemoteWrite::Sync),
            "off" => Ok(RemoteWrite::Off),
            other => Err(Error::InvalidArgument(format!(
                "remote_write must be \"async\", \"sync\" or \"off\", got {other:?}"
            ))),
        }
    }
}

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
}

/// A server: (host, port).
type Node = (String, u16);

/// Connections kept per server for later calls.
const POOL_PER_NODE: usize = 16;

/// The servers (one, or a cluster's masters) and pooled connections to them.
struct Net {
    dial: Dialer,
    /// The server, or a cluster's seed nodes.
    seeds: Vec<Node>,
    cluster: bool,
    slots: Mutex<cluster::SlotMap>,
    pools: Mutex<std::collections::HashMap<Node, Vec<Conn>>>,
}

#[derive(Default)]
struct Health {
    /// Connections fail: every call skips the tier during the backoff.
    down: Backoff,
    /// The server answers but refuses writes (OOM at `maxmemory`, a
    /// read-only replica, ...): writes skip it during the backoff, reads go on.
    refusing: Backoff,
}

/// A state entered on failure and left on the next success, skipped for a
/// backoff of 250 ms doubling to 10 s while failures go on.
#[derive(Default)]
struct Backoff {
    on: bool,
    until: Option<Instant>,
    step: Duration,
}

impl Backoff {
    /// A failure: (re)start the backoff; true when the state begins now.
    fn fail(&mut self) -> bool {
        self.step = if self.on {
            (self.step * 2).min(BACKOFF_MAX)
        } else {
            BACKOFF_MIN
        };
        self.until = Some(Instant::now() + self.step);
        !std::mem::replace(&mut self.on, true)
    }

    /// A success: true when the state ends now.
    fn clear(&mut self) -> bool {
        std::mem::take(self).on
    }

    /// Whether calls skip now.
    fn active(&self) -> bool {
        self.on && self.until.is_some_and(|u| Instant::now() < u)
    }
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
}

#[derive(Default)]
struct Queue {
    /// Hashes to send; the writer reads their bytes from the local tiers.
    items: VecDeque<u64>,
    busy: bool,
    stop: bool,
}

/// Where the background writer reads the bytes of the blocks it sends: the
/// local tiers of the manager the remote belongs to.
pub trait LocalSource: Send + Sync {
    /// Hand block `h`'s bytes to `f` when the local tiers hold it, changing
    /// nothing else (no recency, no promotion): a host-tier block in place
    /// (its slot held meanwhile), a disk-tier block read into `scratch`.
    /// False when the block is not held.
    fn with_local(&self, h: u64, scratch: &mut Vec<u8>, f: &mut dyn FnMut(&[u8])) -> bool;
}

/// `read(i, f)`: hand block `i`'s bytes to `f`; false when it is gone.
type ReadBlock<'a> = dyn FnMut(usize, &mut dyn FnMut(&[u8])) -> bool + 'a;

/// Buffers a storing thread reuses from batch to batch (no allocation or
/// page fault per block once they have grown).
#[derive(Default)]
struct Writer {
    cmd: redis::Cmd,
    packed: Vec<u8>,
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

/// `url` parsed.
struct Parsed {
    cluster: bool,
    tls: bool,
    user: Option<String>,
    /// Percent-decoded.
    password: Option<String>,
    /// As written in the URL (to scrub it from messages too).
    password_raw: Option<String>,
    hosts: Vec<Node>,
    db: i64,
}

/// Percent-decoding of a URL's user or password.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn parse_url(url: &str) -> Result<Parsed> {
    let bad = |why: &str| {
        Error::InvalidArgument(format!(
            "remote must be redis://[user:password@]host:port[/db], rediss://... (TLS) or \
             redis+cluster://host:port[,host:port...]; {why}"
        ))
    };
    let encode = "percent-encode the user and password (in Python: \
                  urllib.parse.quote(password, safe=''))";
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let (cluster, tls) = match scheme {
        "redis" => (false, false),
        "rediss" => (false, true),
        "redis+cluster" => (true, false),
        "rediss+cluster" => (true, true),
        other => return Err(bad(&format!("the scheme is {other:?}"))),
    };
    // The authority ends at the first '/': a '/' in a raw password ends it early.
    let (authority, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if tail.contains('@') {
        return Err(bad(&format!(
            "the user or password holds a '/' (or the part after the host holds '@'): {encode}"
        )));
    }
    let (auth, hostpart) = match authority.split_once('@') {
        Some((_, r)) if r.contains('@') => {
            return Err(bad(&format!("the user or password holds an '@': {encode}")))
        }
        Some((a, r)) => (Some(a), r),
        None => (None, authority),
    };
    let decode = |what: &str, s: &str| {
        percent_decode(s).ok_or_else(|| {
            bad(&format!(
                "the {what} is not percent-encoded (a '%' not followed by two hex digits): {encode}"
            ))
        })
    };
    let (user, password, password_raw) = match auth {
        None => (None, None, None),
        Some(a) => match a.split_once(':') {
            Some((u, p)) => (
                (!u.is_empty()).then(|| decode("user", u)).transpose()?,
                Some(decode("password", p)?),
                Some(p.to_string()),
            ),
            None => (Some(decode("user", a)?), None, None),
        },
    };
    let mut hosts = Vec::new();
    for h in hostpart.split(',').filter(|h| !h.is_empty()) {
        let Some((host, port)) = h.rsplit_once(':') else {
            return Err(bad(&format!("{h:?} has no port")));
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match port.parse::<u16>() {
            Ok(port) if !host.is_empty() => hosts.push((host.to_string(), port)),
            _ => return Err(bad(&format!("{h:?} is not host:port"))),
        }
    }
    if hosts.is_empty() {
        return Err(bad("no host"));
    }
    if !cluster && hosts.len() > 1 {
        return Err(bad("several hosts need redis+cluster://"));
    }
    let db = match tail.trim_start_matches('/') {
        "" => 0,
        d => match d.parse::<i64>() {
            Ok(n) if n >= 0 => n,
            _ => return Err(bad(&format!("the database {d:?} is not a number"))),
        },
    };
    if cluster && db != 0 {
        return Err(bad("a cluster has database 0 only"));
    }
    Ok(Parsed {
        cluster,
        tls,
        user,
        password,
        password_raw,
        hosts,
        db,
    })
}

/// `url` with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let (auth, host) = rest.rsplit_once('@').expect("has @");
            let user = auth.split_once(':').map_or(auth, |(u, _)| u);
            if auth.contains(':') {
                format!("{scheme}://{user}:***@{host}")
            } else {
                format!("{scheme}://{user}@{host}")
            }
        }
        _ => url.to_string(),
    }
}

impl RemoteTier {
    /// Connect (and check the connection: a PING, or a cluster's slot map):
    /// a wrong password, an untrusted certificate or an unreachable server
    /// is an error here, naming the URL without its password.
    pub fn open(opts: RemoteOptions) -> Result<Arc<Self>> {
        let p = parse_url(&opts.url)?;
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
            },
            opts,
            shown,
            secrets,
            mac_key,
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
                    Value::ServerError(e) => Err(Failure::io(
                        &format!("{} {}", e.code(), e.details().unwrap_or("")),
                        false,
                    )),
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
            .spawn(move || writer_loop(weak))
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

    /// Whether values carry a MAC (a secret is set).
    pub fn authenticated(&self) -> bool {
        self.mac_key.is_some()
    }

    /// The deadline of a call's remote work that starts now:
    /// `timeout_ms` from now.
    pub fn deadline(&self) -> Deadline {
        Deadline::own(Duration::from_millis(self.opts.timeout_ms.max(1)))
    }

    /// Whether the tier is marked down (calls skip it until the backoff ends).
    pub fn is_down(&self) -> bool {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .down
            .on
    }

    /// Whether the server refused the last writes (see [`Self::store`]).
    pub fn is_refusing_writes(&self) -> bool {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refusing
            .on
    }

    /// Calls skip the tier now (it is down, within its backoff).
    fn skipped_now(&self) -> bool {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .down
            .active()
    }

    /// Writes are skipped now: the tier is down or refusing them.
    fn writes_paused(&self) -> bool {
        let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.down.active() || h.refusing.active()
    }

    /// The server answered a write with an error: skip writes for a backoff
    /// (250 ms, doubling to 10 s while it keeps refusing); one warning.
    fn refused(&self, why: &str) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.refusing.fail() {
            self.warnings.push(format!(
                "remote tier {} refuses writes ({}): blocks are not sent there for a while \
                     (retried with backoff); reads go on. A server used as a cache wants \
                     `maxmemory-policy allkeys-lru` (or remote_ttl_s with a volatile-* policy)",
                self.shown,
                self.scrub(&why)
            ));
        }
    }

    fn accepted(&self) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.refusing.clear() {
            self.warnings
                .push(format!("remote tier {} accepts writes again", self.shown));
        }
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

    fn key(&self, h: u64) -> String {
        format!(
            "{}:{:016x}:{}:{h:016x}",
            self.opts.prefix, self.opts.layout, self.opts.block_size
        )
    }

    /// Bytes of one block's value.
    fn value_len(&self) -> usize {
        self.header_len() + self.opts.block_size
    }

    fn header_len(&self) -> usize {
        if self.mac_key.is_some() {
            HEADER_MAC
        } else {
            HEADER
        }
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
            None => Conn::open(&node.0, node.1, &self.net.dial, d),
        }
    }

    /// Keep a connection that finished its round trips in step.
    fn give_conn(&self, node: Node, c: Conn) {
        let mut pools = self.net.pools.lock().unwrap_or_else(|p| p.into_inner());
        let pool = pools.entry(node).or_default();
        if pool.len() < POOL_PER_NODE {
            pool.push(c);
        }
    }

    /// Ask a cluster for its slot map (a seed, or a master already known).
    fn refresh_slots(&self, d: &Deadline) -> std::result::Result<(), Failure> {
        let mut nodes = self.net.seeds.clone();
        let mut last = Failure::io(&"no cluster node answered", false);
        for node in nodes.drain(..) {
            let got = self.take_conn(&node, d).and_then(|mut c| {
                c.send(&redis::cmd("CLUSTER").arg("SLOTS").get_packed_command(), d)?;
                let v = c.recv(1 << 20, d, 0)?;
                if let Value::ServerError(e) = &v {
                    return Err(Failure::io(
                        &format!("{} {}", e.code(), e.details().unwrap_or("")),
                        false,
                    ));
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
            let map = self
                .net
                .slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let mut groups: Vec<(Node, Vec<usize>)> = Vec::new();
            let mut unserved = None;
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
            match unserved {
                None if !map.is_empty() => return Ok(groups),
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
    /// handed in order to `reply(i, value)`, all before the deadline. A
    /// cluster's MOVED/ASK/TRYAGAIN/CLUSTERDOWN replies refresh its slot map
    /// and those commands are sent once more; a second such reply is handed
    /// over as it is. A connection that failed is dropped.
    fn round_trip(
        &self,
        keys: &[String],
        limit: usize,
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
                    let v = c.recv(limit, d, i)?;
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

    /// A call's remote work failed: a failed connection or a missed
    /// deadline of the tier's own marks the tier down (counted, one
    /// warning); a caller's shorter deadline missed is only counted; an
    /// oversized reply is counted and warned about.
    fn failed(&self, e: &Failure, d: &Deadline) {
        match e {
            Failure::Io { timed_out, .. } => {
                if *timed_out {
                    self.stats.deadline_missed.fetch_add(1, Ordering::Relaxed);
                    if !d.is_own() {
                        return;
                    }
                }
                self.went_down(e);
            }
            Failure::Oversized { .. } => {
                self.stats.oversized.fetch_add(1, Ordering::Relaxed);
                self.warnings.push(format!(
                    "remote tier {} sent a reply longer than a block's value ({} bytes): \
                     refused while reading it, connection dropped",
                    self.shown,
                    self.value_len()
                ));
            }
        }
    }

    fn went_down(&self, e: &dyn std::fmt::Display) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.down.fail() {
            self.net
                .pools
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            self.warnings.push(format!(
                "remote tier {} is unavailable ({}): the local tiers keep serving; \
                     retrying with backoff",
                self.shown,
                self.scrub(e)
            ));
        }
    }

    fn came_up(&self) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.down.clear() {
            self.warnings
                .push(format!("remote tier {} is reachable again", self.shown));
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
    fn header(&self, h: u64, name: &str, block: &[u8]) -> [u8; HEADER_MAC] {
        let mut v = [0u8; HEADER_MAC];
        let len = self.header_len();
        v[..4].copy_from_slice(MAGIC);
        let version = if self.mac_key.is_some() {
            VERSION_MAC
        } else {
            VERSION_CRC
        };
        v[4..6].copy_from_slice(&version.to_le_bytes());
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

    /// `cmd` becomes `SET key value [EX ttl]` for block `h`: the header and
    /// the block written straight into the command's buffer (one copy).
    fn set_command(&self, cmd: &mut redis::Cmd, h: u64, block: &[u8]) {
        use redis::RedisWrite;
        use std::io::Write;
        let name = self.key(h);
        let head = self.header(h, &name, block);
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
    fn decode<'a>(&self, h: u64, name: &str, v: &'a [u8]) -> std::result::Result<&'a [u8], Bad> {
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
        let want = if self.mac_key.is_some() {
            VERSION_MAC
        } else {
            VERSION_CRC
        };
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

    /// Length of the longest prefix of `hashes` the remote holds (one
    /// pipelined round trip per 64 hashes, stopping at the first miss), all
    /// before the deadline.
    pub fn count_prefix(&self, hashes: &[u64], d: Deadline) -> usize {
        if self.skipped_now() || d.left().is_err() {
            return 0;
        }
        let mut n = 0;
        let mut buf = Vec::new();
        for chunk in hashes.chunks(self.chunk_len()) {
            let keys: Vec<String> = chunk.iter().map(|&h| self.key(h)).collect();
            let mut found = vec![false; chunk.len()];
            let r = self.round_trip(
                &keys,
                64,
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

    /// Fetch the longest prefix of `hashes` the remote holds, verified,
    /// block `i` into `dst[i]` (each `block_size` bytes), all before the
    /// deadline; returns its length. A value that fails verification ends
    /// the prefix and is counted (and deleted, unless it failed only the
    /// MAC); so does a reply longer than a value.
    ///
    /// # Safety
    /// Every `dst[i]` is valid for writes of `block_size` bytes, distinct,
    /// and untouched by others for the whole call.
    pub unsafe fn fetch(&self, hashes: &[u64], dst: &[usize], d: Deadline) -> usize {
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
                vec![unsafe { self.get_chunk(group[0], &dst[first * per..], &d) }]
            } else {
                std::thread::scope(|sc| {
                    let hs: Vec<_> = group
                        .iter()
                        .enumerate()
                        .map(|(k, c)| {
                            let out = &dst[(first + k) * per..];
                            // SAFETY: each thread writes its own chunk's
                            // destinations, valid as the caller guarantees.
                            sc.spawn(move || unsafe { self.get_chunk(c, out, &d) })
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
    unsafe fn get_chunk(&self, chunk: &[u64], dst: &[usize], d: &Deadline) -> usize {
        let bs = self.opts.block_size;
        let keys: Vec<String> = chunk.iter().map(|&h| self.key(h)).collect();
        let mut fate: Vec<Option<Bad>> = vec![Some(Bad::Missing); chunk.len()];
        let mut buf = Vec::new();
        let r = self.round_trip(
            &keys,
            self.value_len() + FRAMING,
            d,
            &mut buf,
            &mut |i, b| {
                redis::cmd("GET").arg(&keys[i]).write_packed_command(b);
                true
            },
            &mut |i, v| {
                let Value::BulkString(v) = v else { return };
                match self.decode(chunk[i], &keys[i], &v) {
                    Ok(block) => {
                        // SAFETY: the caller guarantees dst[i] is valid for
                        // writes of block_size bytes; `block` is bs bytes.
                        unsafe {
                            std::ptr::copy_nonoverlapping(block.as_ptr(), dst[i] as *mut u8, bs)
                        };
                        fate[i] = None;
                    }
                    Err(bad) => fate[i] = Some(bad),
                }
            },
        );
        let mut n = fate.iter().take_while(|f| f.is_none()).count();
        match r {
            Ok(()) => self.came_up(),
            Err(Failure::Oversized { at }) => {
                self.failed(&Failure::Oversized { at }, d);
                if at >= n {
                    fate[at] = Some(Bad::Oversized);
                }
                n = n.min(at);
            }
            Err(e) => {
                // The blocks verified before the failure are kept.
                self.failed(&e, d);
                return n;
            }
        }
        let Some(Some(why)) = fate.get(n) else {
            self.stats.hits.fetch_add(n as u64, Ordering::Relaxed);
            return n;
        };
        self.stats.hits.fetch_add(n as u64, Ordering::Relaxed);
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
            1024,
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

    /// Nice value of the background writer thread (the manager's
    /// `worker_nice`), applied before its next batch.
    pub fn set_writer_nice(&self, nice: u32) {
        self.writer_nice.store(nice, Ordering::Relaxed);
    }

    /// Store blocks now (`remote_write="sync"`), in pipelined batches, all
    /// before the deadline; returns how many were stored (0 when the remote
    /// is down).
    ///
    /// # Safety
    /// Every `src[i]` is valid for reads of `block_size` bytes.
    pub unsafe fn store(&self, hashes: &[u64], src: &[usize], d: Deadline) -> usize {
        let bs = self.opts.block_size;
        let mut w = Writer::default();
        self.store_from(
            &mut w,
            hashes,
            &mut |i, f| {
                // SAFETY: forwarded from the caller.
                f(unsafe { std::slice::from_raw_parts(src[i] as *const u8, bs) });
                true
            },
            d,
        )
    }

    /// Store `hashes` in pipelined batches, block `i`'s bytes being what
    /// `read(i, f)` hands to `f` (false: the block is gone, skipped). Each
    /// value is built once, in the command that carries it; the commands
    /// stream out in ~1 MiB writes (a buffer that stays in cache) and the
    /// answers are read after each batch. Returns how many were stored; the
    /// rest are counted as skipped.
    fn store_from(
        &self,
        w: &mut Writer,
        hashes: &[u64],
        read: &mut ReadBlock<'_>,
        d: Deadline,
    ) -> usize {
        let mut stored = 0;
        let mut start = 0;
        let mut refusal = None;
        for chunk in hashes.chunks(self.chunk_len()) {
            if self.writes_paused() {
                break;
            }
            let keys: Vec<String> = chunk.iter().map(|&h| self.key(h)).collect();
            let mut took = 0;
            let mut refused: Option<(usize, String)> = None;
            let Writer { cmd, packed } = w;
            let r = self.round_trip(
                &keys,
                1024,
                &d,
                packed,
                &mut |i, b| {
                    read(start + i, &mut |block| {
                        self.set_command(cmd, chunk[i], block);
                        cmd.write_packed_command(b);
                    })
                },
                &mut |_, v| match v {
                    Value::ServerError(e) => {
                        let r = refused.get_or_insert((0, String::new()));
                        if r.0 == 0 {
                            r.1 = format!("{} {}", e.code(), e.details().unwrap_or(""))
                                .trim()
                                .to_string();
                        }
                        r.0 += 1;
                    }
                    _ => took += 1,
                },
            );
            stored += took;
            if let Err(e) = r {
                // Down (or went down now): the rest is skipped.
                self.failed(&e, &d);
                break;
            }
            self.came_up();
            start += chunk.len();
            if let Some((count, mut why)) = refused {
                if count > 1 {
                    why.push_str(&format!(" (and {} more refused)", count - 1));
                }
                refusal = Some(why);
                break;
            }
        }
        match refusal {
            Some(why) => self.refused(&why),
            None if stored > 0 => self.accepted(),
            None => {}
        }
        let skipped = hashes.len() - stored;
        self.stats
            .stored
            .fetch_add(stored as u64, Ordering::Relaxed);
        self.stats
            .skipped
            .fetch_add(skipped as u64, Ordering::Relaxed);
        stored
    }

    /// Where the background writer reads queued blocks (set once).
    pub fn set_source(&self, source: std::sync::Weak<dyn LocalSource>) {
        let _ = self.source.set(source);
    }

    /// Queue blocks for the background writer, which reads their bytes
    /// back from the local tiers (the caller copies nothing and never waits
    /// for the network). Blocks that do not fit the queue (`queue_bytes`),
    /// or arrive while the tier is down, are skipped and counted.
    pub fn enqueue(&self, hashes: &[u64]) -> usize {
        if self.writes_paused() || self.source.get().is_none() {
            self.stats
                .skipped
                .fetch_add(hashes.len() as u64, Ordering::Relaxed);
            return 0;
        }
        let cap = (self.opts.queue_bytes / self.value_len()).max(1);
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let room = cap.saturating_sub(q.items.len()).min(hashes.len());
        q.items.extend(&hashes[..room]);
        drop(q);
        if room < hashes.len() {
            self.stats
                .skipped
                .fetch_add((hashes.len() - room) as u64, Ordering::Relaxed);
        }
        self.queue_cv.notify_all();
        room
    }

    /// Wait until the background queue is written (or given up on); false
    /// after `timeout`.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while !q.items.is_empty() || q.busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = self
                .queue_cv
                .wait_timeout(q, left.min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Blocks waiting in the background queue.
    pub fn queued(&self) -> usize {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .items
            .len()
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

fn writer_loop(weak: std::sync::Weak<RemoteTier>) {
    let mut w = Writer::default();
    let mut scratch = Vec::new();
    loop {
        let Some(t) = weak.upgrade() else { return };
        let batch: Vec<u64> = {
            let mut q = t.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.stop {
                return;
            }
            if q.items.is_empty() {
                q.busy = false;
                t.queue_cv.notify_all();
                let (g, _) = t
                    .queue_cv
                    .wait_timeout(q, Duration::from_millis(200))
                    .unwrap_or_else(|p| p.into_inner());
                drop(g);
                continue;
            }
            let n = q.items.len().min(t.chunk_len());
            q.busy = true;
            q.items.drain(..n).collect()
        };
        crate::io::lower_priority(t.writer_nice.load(Ordering::Relaxed));
        let source = t.source.get().and_then(|s| s.upgrade());
        // Each block goes from the local tiers straight into its command; a
        // block gone from them before its turn is skipped.
        t.store_from(
            &mut w,
            &batch,
            &mut |i, f| {
                source
                    .as_ref()
                    .is_some_and(|s| s.with_local(batch[i], &mut scratch, f))
            },
            t.deadline(),
        );
        drop(source);
        let mut q = t.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.busy = false;
        drop(q);
        t.queue_cv.notify_all();
    }
}

/// Why a fetched value was not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bad {
    Missing,
    Corrupt,
    /// No valid MAC (with a secret), or a value of the other kind.
    Unauthenticated,
    Oversized,
}

/// A cluster reply that says the key lives elsewhere (or not yet).
fn is_redirect(v: &Value) -> bool {
    matches!(v, Value::ServerError(e)
        if matches!(e.code(), "MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_clears_once() {
        let mut b = Backoff::default();
        assert!(!b.active() && !b.clear());
        assert!(b.fail()); // the state begins
        assert!(b.active() && b.step == BACKOFF_MIN);
        assert!(!b.fail()); // already on: no second start
        assert_eq!(b.step, BACKOFF_MIN * 2);
        for _ in 0..10 {
            b.fail();
        }
        assert_eq!(b.step, BACKOFF_MAX);
        assert!(b.clear()); // ends once
        assert!(!b.on && !b.active() && !b.clear());
        assert!(b.fail() && b.step == BACKOFF_MIN); // a new start begins small again
    }

    #[test]
    fn urls_parse_and_redact() {
        let p = parse_url("redis://alice:s3cret@127.0.0.1:6379/2").unwrap();
        assert!(!p.cluster && !p.tls);
        assert_eq!(p.user.as_deref(), Some("alice"));
        assert_eq!(p.password.as_deref(), Some("s3cret"));
        assert_eq!(p.hosts, vec![("127.0.0.1".to_string(), 6379)]);
        assert_eq!(p.db, 2);
        let c = parse_url("redis+cluster://h1:7000,h2:7001").unwrap();
        assert!(c.cluster && c.hosts.len() == 2);
        assert!(parse_url("rediss://:pw@h:1").unwrap().tls);
        for bad in [
            "http://h:1",
            "redis://",
            "redis://h",
            "redis://h:x",
            "redis://a:1,b:2",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert_eq!(
            redact("redis://alice:s3cret@h:1/0"),
            "redis://alice:***@h:1/0"
        );
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        // A password is percent-decoded; raw '/' or '@' in it is refused, saying to encode it.
        let p = parse_url("redis://default:pa%3Ass%40w%2Frd%25@127.0.0.1:1").unwrap();
        assert_eq!(p.password.as_deref(), Some("pa:ss@w/rd%"));
        for raw in [
            "redis://default:pa:ss@w/rd%@127.0.0.1:1",
            "redis://u:a@b@h:1",
            "redis://u:a%zz@h:1",
        ] {
            let e = parse_url(raw).err().expect(raw).to_string();
            assert!(e.contains("percent-encode"), "{raw}: {e}");
        }
        assert!(parse_url("redis://h:1/x").is_err());
        assert!(parse_url("redis+cluster://h:1/2").is_err());
    }
}
