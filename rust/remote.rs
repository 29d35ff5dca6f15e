//! The remote tier: KV blocks in Redis or Valkey (one server, or a cluster),
//! below the host and disk tiers, shared by every process that names the
//! same server, prefix and layout.
//!
//! - **Keys** `"{prefix}:{layout:016x}:{block_size}:{hash:016x}"`: two
//!   models (layout fingerprints) or two block sizes never share a key. In a
//!   cluster the keys spread over every master by their hash slot.
//! - **Values**: a 32-byte header (magic `DYNR`, version, header length,
//!   block size, CRC32C of the hash and the bytes, the hash, the layout)
//!   then the block. A value that fails any check is a miss, counted
//!   (`remote_corrupt`) and deleted, never served.
//! - **Failure**: every connect, read and write gives up after
//!   `timeout_ms`. An error marks the tier down for a backoff (250 ms,
//!   doubling to 10 s) during which calls skip it at once (counted as
//!   `remote_skipped` for writes); one warning per change of state.
//! - **Secrets**: the password (from the URL) never appears in
//!   [`RemoteTier::display_url`], counters, warnings or errors: every
//!   message is scrubbed of it.
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

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::{Client, Connection, RedisResult};

use crate::error::{Error, Result};
use crate::manager::block_crc;

const MAGIC: &[u8; 4] = b"DYNR";
const VERSION: u16 = 1;
/// Bytes of the value header before the block.
pub const HEADER: usize = 32;
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

/// How to reach the remote and what to store there.
#[derive(Clone, Debug)]
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
}

enum Clients {
    One(Client),
    Cluster(ClusterClient),
}

enum Conn {
    One(Connection),
    Cluster(Box<ClusterConnection>),
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
    clients: Clients,
    pool: Mutex<Vec<Conn>>,
    opts: RemoteOptions,
    shown: String,
    secret: Option<String>,
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

/// `url` parsed: (cluster, tls, user, password, hosts as `host:port`, db path).
struct Parsed {
    cluster: bool,
    tls: bool,
    user: Option<String>,
    password: Option<String>,
    hosts: Vec<String>,
    tail: String,
}

fn parse_url(url: &str) -> Result<Parsed> {
    let bad = |why: &str| {
        Error::InvalidArgument(format!(
            "remote must be redis://[user:password@]host:port[/db], rediss://... (TLS) or \
             redis+cluster://host:port[,host:port...]; {why}"
        ))
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let (cluster, tls) = match scheme {
        "redis" => (false, false),
        "rediss" => (false, true),
        "redis+cluster" => (true, false),
        "rediss+cluster" => (true, true),
        other => return Err(bad(&format!("the scheme is {other:?}"))),
    };
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((a, r)) => (Some(a), r),
        None => (None, rest),
    };
    let (user, password) = match auth {
        None => (None, None),
        Some(a) => match a.split_once(':') {
            Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(p.to_string())),
            None => (Some(a.to_string()), None),
        },
    };
    let (hostpart, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, String::new()),
    };
    let hosts: Vec<String> = hostpart
        .split(',')
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .collect();
    if hosts.is_empty() {
        return Err(bad("no host"));
    }
    if !cluster && hosts.len() > 1 {
        return Err(bad("several hosts need redis+cluster://"));
    }
    for h in &hosts {
        let Some((host, port)) = h.rsplit_once(':') else {
            return Err(bad(&format!("{h:?} has no port")));
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad(&format!("{h:?} is not host:port")));
        }
    }
    Ok(Parsed {
        cluster,
        tls,
        user,
        password,
        hosts,
        tail,
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
    /// Connect (and check the connection with a PING): a wrong password, an
    /// untrusted certificate or an unreachable server is an error here,
    /// naming the URL without its password.
    pub fn open(opts: RemoteOptions) -> Result<Arc<Self>> {
        let p = parse_url(&opts.url)?;
        let shown = redact(&opts.url);
        let secret = p.password.clone().filter(|s| !s.is_empty());
        let scrub = |e: &dyn std::fmt::Display| scrub(&e.to_string(), secret.as_deref());
        let certs = match &opts.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "remote_ca_file {}: {e}; give the PEM file of the CA that signed the \
                         server's certificate",
                        path.display()
                    ))
                })?;
                Some(redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                })
            }
            None => None,
        };
        if certs.is_some() && !p.tls {
            return Err(Error::InvalidArgument(format!(
                "remote_ca_file is set but {shown} is not a TLS URL (rediss://)"
            )));
        }
        install_crypto_provider();
        let timeout = Duration::from_millis(opts.timeout_ms.max(1));
        let scheme = if p.tls { "rediss" } else { "redis" };
        let clients = if p.cluster {
            let nodes: Vec<String> = p.hosts.iter().map(|h| format!("{scheme}://{h}")).collect();
            let mut b = ClusterClient::builder(nodes)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(1);
            if let Some(u) = &p.user {
                b = b.username(u);
            }
            if let Some(pw) = &p.password {
                b = b.password(pw);
            }
            if let Some(c) = certs {
                b = b.certs(c);
            }
            Clients::Cluster(
                b.build()
                    .map_err(|e| Error::Remote(format!("remote {shown}: {}", scrub(&e))))?,
            )
        } else {
            let auth = match (&p.user, &p.password) {
                (Some(u), Some(pw)) => format!("{u}:{pw}@"),
                (None, Some(pw)) => format!(":{pw}@"),
                (Some(u), None) => format!("{u}@"),
                (None, None) => String::new(),
            };
            let url = format!("{scheme}://{auth}{}{}", p.hosts[0], p.tail);
            let c = match certs {
                Some(c) => Client::build_with_tls(url.as_str(), c),
                None => Client::open(url.as_str()),
            }
            .map_err(|e| Error::Remote(format!("remote {shown}: {}", scrub(&e))))?;
            Clients::One(c)
        };
        let tier = Arc::new(RemoteTier {
            clients,
            pool: Mutex::new(Vec::new()),
            opts,
            shown,
            secret,
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
        let mut conn = tier
            .connect()
            .map_err(|e| Error::Remote(format!("remote {}: {}", tier.shown, tier.scrub(&e))))?;
        let pong: RedisResult<String> = match &mut conn {
            Conn::One(c) => redis::cmd("PING").query(c),
            Conn::Cluster(c) => redis::cmd("PING").query(c.as_mut()),
        };
        pong.map_err(|e| Error::Remote(format!("remote {}: {}", tier.shown, tier.scrub(&e))))?;
        tier.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
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
        matches!(self.clients, Clients::Cluster(_))
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
        scrub(&e.to_string(), self.secret.as_deref())
    }

    fn key(&self, h: u64) -> String {
        format!(
            "{}:{:016x}:{}:{h:016x}",
            self.opts.prefix, self.opts.layout, self.opts.block_size
        )
    }

    fn connect(&self) -> RedisResult<Conn> {
        let timeout = Duration::from_millis(self.opts.timeout_ms.max(1));
        match &self.clients {
            Clients::One(c) => {
                let conn = c.get_connection_with_timeout(timeout)?;
                conn.set_read_timeout(Some(timeout))?;
                conn.set_write_timeout(Some(timeout))?;
                Ok(Conn::One(conn))
            }
            Clients::Cluster(c) => Ok(Conn::Cluster(Box::new(c.get_connection()?))),
        }
    }

    /// Run `f` on a pooled connection; `None` when the tier is down (or
    /// went down on this call: the error is counted and logged once).
    fn with_conn<T>(&self, f: impl FnOnce(&mut Conn) -> RedisResult<T>) -> Option<T> {
        if self
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .down
            .active()
        {
            return None;
        }
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => match self.connect() {
                Ok(c) => c,
                Err(e) => {
                    self.went_down(&e);
                    return None;
                }
            },
        };
        match f(&mut conn) {
            Ok(v) => {
                self.pool
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(conn);
                self.came_up();
                Some(v)
            }
            Err(e) => {
                // The connection may hold a late answer: never reuse it.
                drop(conn);
                self.went_down(&e);
                None
            }
        }
    }

    fn went_down(&self, e: &dyn std::fmt::Display) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.down.fail() {
            self.pool.lock().unwrap_or_else(|p| p.into_inner()).clear();
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

    /// The header of block `h`'s value.
    fn header(&self, h: u64, block: &[u8]) -> [u8; HEADER] {
        let mut v = [0u8; HEADER];
        v[..4].copy_from_slice(MAGIC);
        v[4..6].copy_from_slice(&VERSION.to_le_bytes());
        v[6..8].copy_from_slice(&(HEADER as u16).to_le_bytes());
        v[8..12].copy_from_slice(&(self.opts.block_size as u32).to_le_bytes());
        v[12..16].copy_from_slice(&block_crc(h, block).to_le_bytes());
        v[16..24].copy_from_slice(&h.to_le_bytes());
        v[24..32].copy_from_slice(&self.opts.layout.to_le_bytes());
        v
    }

    /// `cmd` becomes `SET key value [EX ttl]` for block `h`: the header and
    /// the block written straight into the command's buffer (one copy).
    fn set_command(&self, cmd: &mut redis::Cmd, h: u64, block: &[u8]) {
        use redis::RedisWrite;
        use std::io::Write;
        cmd.clear();
        cmd.arg("SET").arg(self.key(h));
        {
            let mut w = cmd.writer_for_next_arg();
            // Writing into a Vec cannot fail.
            let _ = w.write_all(&self.header(h, block));
            let _ = w.write_all(block);
        }
        if let Some(s) = self.opts.ttl_s {
            cmd.arg("EX").arg(s);
        }
    }

    /// The block in a value, if every check passes.
    fn decode<'a>(&self, h: u64, v: &'a [u8]) -> Option<&'a [u8]> {
        let bs = self.opts.block_size;
        if v.len() != HEADER + bs || &v[..4] != MAGIC {
            return None;
        }
        let u16_at = |i: usize| u16::from_le_bytes([v[i], v[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(v[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(v[i..i + 8].try_into().expect("8 bytes"));
        let block = &v[HEADER..];
        (u16_at(4) == VERSION
            && u16_at(6) as usize == HEADER
            && u32_at(8) as usize == bs
            && u64_at(16) == h
            && u64_at(24) == self.opts.layout
            && u32_at(12) == block_crc(h, block))
        .then_some(block)
    }

    /// Length of the longest prefix of `hashes` the remote holds (one
    /// pipelined round trip per 64 hashes, stopping at the first miss).
    pub fn count_prefix(&self, hashes: &[u64]) -> usize {
        let mut n = 0;
        for chunk in hashes.chunks(self.chunk_len()) {
            let keys: Vec<String> = chunk.iter().map(|&h| self.key(h)).collect();
            let Some(found) = self.with_conn(|c| pipelined::<Vec<bool>>(c, "EXISTS", &keys)) else {
                return n;
            };
            let k = found.iter().take_while(|&&x| x).count();
            n += k;
            if k < chunk.len() {
                break;
            }
        }
        n
    }

    /// Fetch the longest prefix of `hashes` the remote holds, verified,
    /// block `i` into `dst[i]` (each `block_size` bytes); returns its
    /// length. A value that fails verification ends the prefix, is counted
    /// and deleted.
    ///
    /// # Safety
    /// Every `dst[i]` is valid for writes of `block_size` bytes, distinct,
    /// and untouched by others for the whole call.
    pub unsafe fn fetch(&self, hashes: &[u64], dst: &[usize]) -> usize {
        let bs = self.opts.block_size;
        let per = self.chunk_len();
        let chunks: Vec<&[u64]> = hashes.chunks(per).collect();
        let threads = self.fetch_threads();
        let mut n = 0;
        for (gi, group) in chunks.chunks(threads).enumerate() {
            let results: Vec<Option<Vec<Option<Vec<u8>>>>> = if group.len() == 1 {
                vec![self.get_chunk(group[0])]
            } else {
                std::thread::scope(|sc| {
                    let hs: Vec<_> = group
                        .iter()
                        .map(|c| sc.spawn(move || self.get_chunk(c)))
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap_or(None)).collect()
                })
            };
            // Checked and copied in order (each group's values are dropped
            // before the next round trips): only the prefix counts.
            for (k, values) in results.into_iter().enumerate() {
                let ci = gi * threads + k;
                let Some(values) = values else { return n };
                for (j, v) in values.iter().enumerate() {
                    let h = chunks[ci][j];
                    let Some(v) = v else {
                        self.stats.misses.fetch_add(1, Ordering::Relaxed);
                        return n;
                    };
                    let Some(block) = self.decode(h, v) else {
                        self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                        self.warnings.push(format!(
                            "remote block {h:#018x} at {} failed verification (wrong size, \
                                 header or checksum); deleted and counted as a miss",
                            self.shown
                        ));
                        let key = self.key(h);
                        self.with_conn(|c| del(c, &key));
                        return n;
                    };
                    // SAFETY: the caller guarantees dst[ci * per + j] is valid
                    // for writes of block_size bytes; `block` is bs bytes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            block.as_ptr(),
                            dst[ci * per + j] as *mut u8,
                            bs,
                        )
                    };
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            }
        }
        n
    }

    /// One pipelined round trip of GETs (None: the tier is down).
    fn get_chunk(&self, chunk: &[u64]) -> Option<Vec<Option<Vec<u8>>>> {
        let keys: Vec<String> = chunk.iter().map(|&h| self.key(h)).collect();
        self.with_conn(|c| pipelined(c, "GET", &keys))
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
            ((8 << 20) / (HEADER + bs)).clamp(1, PIPELINE)
        } else {
            PIPELINE
        }
    }

    /// Nice value of the background writer thread (the manager's
    /// `worker_nice`), applied before its next batch.
    pub fn set_writer_nice(&self, nice: u32) {
        self.writer_nice.store(nice, Ordering::Relaxed);
    }

    /// Store blocks now (`remote_write="sync"`), in pipelined batches;
    /// returns how many were stored (0 when the remote is down).
    ///
    /// # Safety
    /// Every `src[i]` is valid for reads of `block_size` bytes.
    pub unsafe fn store(&self, hashes: &[u64], src: &[usize]) -> usize {
        let bs = self.opts.block_size;
        let mut w = Writer::default();
        self.store_from(&mut w, hashes, &mut |i, f| {
            // SAFETY: forwarded from the caller.
            f(unsafe { std::slice::from_raw_parts(src[i] as *const u8, bs) });
            true
        })
    }

    /// Store `hashes` in pipelined batches, block `i`'s bytes being what
    /// `read(i, f)` hands to `f` (false: the block is gone, skipped). Each
    /// value is built once, in the command that carries it; to one server
    /// the commands stream out in ~1 MiB writes (a buffer that stays in
    /// cache) and the answers are read after each batch. Returns how many
    /// were stored; the rest are counted as skipped.
    fn store_from(&self, w: &mut Writer, hashes: &[u64], read: &mut ReadBlock<'_>) -> usize {
        let mut stored = 0;
        let mut start = 0;
        let mut refusal = None;
        for chunk in hashes.chunks(self.chunk_len()) {
            if self.writes_paused() {
                break;
            }
            // (blocks the server took, its first refusal)
            let done = self.with_conn(|c| {
                let mut sent = 0;
                let mut refused: Option<String> = None;
                match c {
                    Conn::One(con) => {
                        w.packed.clear();
                        for (k, &h) in chunk.iter().enumerate() {
                            let ok = read(start + k, &mut |block| {
                                self.set_command(&mut w.cmd, h, block);
                                w.cmd.write_packed_command(&mut w.packed);
                            });
                            if !ok {
                                continue;
                            }
                            sent += 1;
                            if w.packed.len() >= STREAM_BYTES {
                                con.send_packed_command(&w.packed)?;
                                w.packed.clear();
                            }
                        }
                        if !w.packed.is_empty() {
                            con.send_packed_command(&w.packed)?;
                        }
                        // Every answer is read (the connection stays in step);
                        // the ones that are errors were refused.
                        let n = sent;
                        let mut failure = None;
                        for _ in 0..n {
                            if let Err(e) = con.recv_response()?.extract_error() {
                                sent -= 1;
                                if !is_refusal(&e) {
                                    failure.get_or_insert(e);
                                } else if refused.is_none() {
                                    refused = Some(refusal_text(e, 1).1);
                                }
                            }
                        }
                        if let Some(e) = failure {
                            return Err(e);
                        }
                    }
                    Conn::Cluster(c) => {
                        let mut p = redis::cluster::cluster_pipe();
                        for (k, &h) in chunk.iter().enumerate() {
                            let mut cmd = redis::Cmd::new();
                            if !read(start + k, &mut |block| self.set_command(&mut cmd, h, block)) {
                                continue;
                            }
                            p.add_command(cmd).ignore();
                            sent += 1;
                        }
                        if sent > 0 {
                            if let Err(e) = p.query::<()>(c.as_mut()) {
                                if !is_refusal(&e) {
                                    return Err(e);
                                }
                                // The error lists the commands refused.
                                let (failed, why) = refusal_text(e, sent);
                                sent -= failed;
                                refused = Some(why);
                            }
                        }
                    }
                }
                Ok((sent, refused))
            });
            let Some((sent, refused)) = done else {
                // Down (or went down now): the rest is skipped.
                break;
            };
            stored += sent;
            start += chunk.len();
            if let Some(why) = refused {
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
        let cap = (self.opts.queue_bytes / (HEADER + self.opts.block_size)).max(1);
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
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).clear();
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
        t.store_from(&mut w, &batch, &mut |i, f| {
            source
                .as_ref()
                .is_some_and(|s| s.with_local(batch[i], &mut scratch, f))
        });
        drop(source);
        let mut q = t.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.busy = false;
        drop(q);
        t.queue_cv.notify_all();
    }
}

/// An error the server answered a write with while the connection stays
/// usable (OOM at `maxmemory`, READONLY, NOPERM, MISCONF, ...), as opposed
/// to a failed connection, a timeout or a cluster that cannot serve.
fn is_refusal(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    matches!(
        e.kind(),
        ErrorKind::Extension
            | ErrorKind::Server(
                ServerErrorKind::ResponseError
                    | ServerErrorKind::ReadOnly
                    | ServerErrorKind::NoPerm
            )
    ) && !e.is_io_error()
        && !e.is_timeout()
        && !e.is_connection_dropped()
}

/// (commands refused, a line saying why) for a refusal of `sent` writes:
/// the first server error, and how many more there were.
fn refusal_text(e: redis::RedisError, sent: usize) -> (usize, String) {
    let whole = e.to_string();
    match e.into_server_errors() {
        Some(list) if !list.is_empty() => {
            let (_, first) = &list[0];
            let mut why = format!("{} {}", first.code(), first.details().unwrap_or(""));
            if list.len() > 1 {
                why.push_str(&format!(" (and {} more refused)", list.len() - 1));
            }
            (list.len().min(sent), why.trim().to_string())
        }
        _ => (sent, whole),
    }
}

fn scrub(text: &str, secret: Option<&str>) -> String {
    match secret {
        Some(s) if !s.is_empty() => text.replace(s, "***"),
        _ => text.to_string(),
    }
}

fn install_crypto_provider() {
    // rustls needs one process-wide provider; another library may have
    // installed one already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `name key` for each of `keys`, pipelined in one round trip (a cluster's
/// pipeline sends each key to its master).
fn pipelined<T: redis::FromRedisValue>(
    c: &mut Conn,
    name: &str,
    keys: &[String],
) -> RedisResult<T> {
    let cmds = keys.iter().map(|k| {
        let mut cmd = redis::cmd(name);
        cmd.arg(k);
        cmd
    });
    match c {
        Conn::One(c) => {
            let mut p = redis::pipe();
            cmds.for_each(|cmd| {
                p.add_command(cmd);
            });
            p.query(c)
        }
        Conn::Cluster(c) => {
            let mut p = redis::cluster::cluster_pipe();
            cmds.for_each(|cmd| {
                p.add_command(cmd);
            });
            p.query(c.as_mut())
        }
    }
}

fn del(c: &mut Conn, key: &str) -> RedisResult<()> {
    match c {
        Conn::One(c) => redis::cmd("DEL").arg(key).query(c),
        Conn::Cluster(c) => redis::cmd("DEL").arg(key).query(c.as_mut()),
    }
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
        assert_eq!(p.hosts, vec!["127.0.0.1:6379"]);
        assert_eq!(p.tail, "/2");
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
        assert_eq!(scrub("bad s3cret here", Some("s3cret")), "bad *** here");
    }
}
