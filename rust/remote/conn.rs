//! One connection to one Redis/Valkey node, on which every call is bounded
//! by a deadline and every reply by a size.
//!
//! redis-rs speaks the protocol (commands are packed by `redis::Cmd`,
//! replies parsed by `redis::Parser`); this module owns the socket under it,
//! which redis-rs's own connections do not let a caller bound: their
//! timeouts apply to each socket read, so a server that trickles a reply a
//! byte at a time holds a call forever, and a reply's announced length is
//! buffered before anything checks it. Here:
//! - every read and write (TCP connect and TLS handshake included) gets the
//!   time left until the call's [`Deadline`], and fails once it has passed;
//! - every reply is read through a byte budget ([`Conn::recv`]'s `limit`
//!   plus one read-ahead), so a 6 GiB announced value costs at most one
//!   block of memory before the connection is dropped;
//! - a GET's value of the expected length is read straight into its
//!   destination ([`Conn::recv_value_into`]): the socket's bytes are copied
//!   once, by the kernel, and checked piece by piece as they land, while
//!   they are still in the CPU cache. Only the `$<length>` line in front of
//!   it is read here; every other reply is parsed by redis-rs.
//!
//! A connection that failed in any way is dropped by its owner, never
//! reused (a late answer could be read as the next command's).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Parser, Value};

/// Bytes one socket read asks for at most: also how far a reply's reading
/// may run ahead into the next reply.
const READ_AHEAD: usize = 64 << 10;
/// Bytes the reader of a large value asks for with its `$<length>` line:
/// little, so that the value itself is read straight into its destination.
const LINE_READ: usize = 4 << 10;
/// Bytes of a value one socket read lands in its destination at most (each
/// piece is checked right after it lands, while it is in the CPU cache).
const PIECE: usize = 256 << 10;

/// The moment a call's remote work must end: the tier's own
/// (`remote_timeout_ms` after the call began: missing it says the server is
/// slow) or a caller's sooner one (missing it says only that the caller
/// asked for little time).
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    at: Instant,
    own: bool,
}

impl Deadline {
    /// A caller's deadline, `d` from now.
    pub fn after(d: Duration) -> Self {
        Deadline {
            at: Instant::now() + d,
            own: false,
        }
    }

    /// The tier's own deadline, `d` from now.
    pub(crate) fn own(d: Duration) -> Self {
        Deadline {
            at: Instant::now() + d,
            own: true,
        }
    }

    /// Whether this is the tier's own deadline (see the type's docs).
    pub(crate) fn is_own(&self) -> bool {
        self.own
    }

    /// The earlier of two deadlines.
    pub fn min(self, other: Deadline) -> Self {
        if other.at < self.at {
            other
        } else {
            self
        }
    }

    /// Time left, or a `TimedOut` error once the deadline has passed.
    pub fn left(&self) -> io::Result<Duration> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the call's remote_timeout_ms passed",
            ))
        } else {
            Ok(left)
        }
    }
}

/// Why a call on a connection failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The connection failed, the server broke the protocol, or the deadline
    /// passed (`timed_out`).
    Io { what: String, timed_out: bool },
    /// Reply `at` (of the round trip) was longer than its limit: the
    /// connection was dropped after reading at most that many bytes.
    Oversized { at: usize },
}

impl Failure {
    pub(crate) fn io(e: &dyn std::fmt::Display, timed_out: bool) -> Self {
        Failure::Io {
            what: e.to_string(),
            timed_out,
        }
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        let timed_out = matches!(
            e.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        );
        Failure::io(&e, timed_out)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Io { what, .. } => f.write_str(what),
            Failure::Oversized { .. } => f.write_str("a reply was longer than a block's value"),
        }
    }
}

/// What every connection of one tier shares: TLS settings and credentials.
pub(crate) struct Dialer {
    /// TLS client settings (None: plain TCP).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<(rustls::ClientConnection, TcpStream)>),
}

/// A socket read or write that hit its timeout says `WouldBlock` on Linux.
fn timed(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the call's remote_timeout_ms passed",
        )
    } else {
        e
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Send what TLS has ready, each write bounded by the deadline.
fn flush_tls(c: &mut rustls::ClientConnection, s: &mut TcpStream, d: &Deadline) -> io::Result<()> {
    while c.wants_write() {
        s.set_write_timeout(Some(d.left()?))?;
        match c.write_tls(s) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timed(e)),
        }
    }
    Ok(())
}

/// Read one TLS record's worth from the socket (bounded by the deadline);
/// false at end of stream.
fn fill_tls(c: &mut rustls::ClientConnection, s: &mut TcpStream, d: &Deadline) -> io::Result<bool> {
    loop {
        s.set_read_timeout(Some(d.left()?))?;
        match c.read_tls(s) {
            Ok(0) => return Ok(false),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timed(e)),
        }
    }
    c.process_new_packets().map_err(tls_error)?;
    flush_tls(c, s, d)?;
    Ok(true)
}

impl Stream {
    fn write_all(&mut self, mut buf: &[u8], d: &Deadline) -> io::Result<()> {
        match self {
            Stream::Plain(s) => {
                while !buf.is_empty() {
                    s.set_write_timeout(Some(d.left()?))?;
                    match s.write(buf) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => buf = &buf[n..],
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(timed(e)),
                    }
                }
                Ok(())
            }
            Stream::Tls(b) => {
                let (c, s) = &mut **b;
                while !buf.is_empty() {
                    let n = c.writer().write(buf)?;
                    buf = &buf[n..];
                    flush_tls(c, s, d)?;
                }
                Ok(())
            }
        }
    }

    fn read(&mut self, buf: &mut [u8], d: &Deadline) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => loop {
                s.set_read_timeout(Some(d.left()?))?;
                match s.read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    r => return r.map_err(timed),
                }
            },
            Stream::Tls(b) => {
                let (c, s) = &mut **b;
                loop {
                    match c.reader().read(buf) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    if !fill_tls(c, s, d)? {
                        return Ok(0);
                    }
                }
            }
        }
    }
}

/// A reader over the stream that stops at the deadline (setting
/// `timed_out`) and after `budget` bytes (setting `over`); it first hands
/// out what [`Conn::recv_value_into`] read ahead.
struct Bounded<'a> {
    stream: &'a mut Stream,
    ahead: &'a mut Ahead,
    deadline: &'a Deadline,
    budget: usize,
    over: bool,
    timed_out: bool,
}

impl Read for Bounded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.budget == 0 {
            self.over = true;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the reply is longer than a block's value",
            ));
        }
        let cap = buf.len().min(READ_AHEAD).min(self.budget);
        let n = if self.ahead.is_empty() {
            self.stream
                .read(&mut buf[..cap], self.deadline)
                .inspect_err(|e| self.timed_out = e.kind() == io::ErrorKind::TimedOut)?
        } else {
            self.ahead.take(&mut buf[..cap])
        };
        self.budget -= n;
        Ok(n)
    }
}

/// Bytes read from the socket and not yet consumed: `buf[pos..end]`.
struct Ahead {
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

impl Ahead {
    fn is_empty(&self) -> bool {
        self.pos == self.end
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    /// Move up to `out.len()` bytes out; returns how many.
    fn take(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.end - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        n
    }

    /// Read up to `want` more bytes from the stream (at least one, or an
    /// error: end of stream is `UnexpectedEof`), before the deadline.
    fn fill(&mut self, s: &mut Stream, want: usize, d: &Deadline) -> io::Result<()> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        let to = (self.end + want).min(self.buf.len());
        if to == self.end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a reply line is too long",
            ));
        }
        match s.read(&mut self.buf[self.end..to], d)? {
            0 => Err(io::ErrorKind::UnexpectedEof.into()),
            n => {
                self.end += n;
                Ok(())
            }
        }
    }
}

/// A part of a value as [`Conn::recv_value_into`] lands it.
pub(crate) enum Landed<'a> {
    /// Its header, whole, before any of its block.
    Head(&'a [u8]),
    /// Its block's first bytes, as far as they have arrived (longer at
    /// each call).
    Body(&'a [u8]),
}

/// One connection (see the module docs).
pub(crate) struct Conn {
    stream: Stream,
    parser: Parser,
    ahead: Ahead,
}

impl Conn {
    /// Connect to `host` at one of its addresses `addrs` (TLS and
    /// AUTH/SELECT as `dial` says), all of it before the deadline.
    pub(crate) fn open(
        host: &str,
        addrs: &[SocketAddr],
        dial: &Dialer,
        d: &Deadline,
    ) -> Result<Conn, Failure> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect_timeout(a, d.left()?) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = timed(e),
            }
        }
        let tcp = tcp.ok_or(last)?;
        tcp.set_nodelay(true)?;
        let stream = match &dial.tls {
            None => Stream::Plain(tcp),
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| Failure::io(&format!("TLS server name {host:?}: {e}"), false))?;
                let mut c = rustls::ClientConnection::new(cfg.clone(), name)
                    .map_err(|e| Failure::io(&e, false))?;
                let mut s = tcp;
                while c.is_handshaking() {
                    if c.wants_write() {
                        flush_tls(&mut c, &mut s, d)?;
                    } else if !fill_tls(&mut c, &mut s, d)? {
                        return Err(Failure::io(&"the server closed the TLS handshake", false));
                    }
                }
                flush_tls(&mut c, &mut s, d)?;
                Stream::Tls(Box::new((c, s)))
            }
        };
        let mut conn = Conn {
            stream,
            parser: Parser::new(),
            ahead: Ahead {
                buf: vec![0; READ_AHEAD].into_boxed_slice(),
                pos: 0,
                end: 0,
            },
        };
        let mut setup = redis::pipe();
        if let Some(pw) = &dial.password {
            match &dial.user {
                Some(u) => setup.cmd("AUTH").arg(u).arg(pw),
                None => setup.cmd("AUTH").arg(pw),
            };
        }
        if dial.db != 0 {
            setup.cmd("SELECT").arg(dial.db);
        }
        if !setup.is_empty() {
            conn.send(&setup.get_packed_pipeline(), d)?;
            for _ in 0..setup.len() {
                if let Value::ServerError(e) = conn.recv(4096, d, 0)? {
                    let what = match e.code() {
                        "WRONGPASS" => "Password authentication failed (WRONGPASS)".to_string(),
                        _ => describe(&e),
                    };
                    return Err(Failure::io(&what, false));
                }
            }
        }
        Ok(conn)
    }

    /// Send bytes (packed commands) before the deadline.
    pub(crate) fn send(&mut self, bytes: &[u8], d: &Deadline) -> Result<(), Failure> {
        Ok(self.stream.write_all(bytes, d)?)
    }

    /// Read one reply of at most `limit` bytes before the deadline (`at`:
    /// its place in the round trip, for [`Failure::Oversized`]).
    pub(crate) fn recv(&mut self, limit: usize, d: &Deadline, at: usize) -> Result<Value, Failure> {
        let mut r = Bounded {
            stream: &mut self.stream,
            ahead: &mut self.ahead,
            deadline: d,
            budget: limit + READ_AHEAD,
            over: false,
            timed_out: false,
        };
        match self.parser.parse_value(&mut r) {
            Ok(v) => Ok(v),
            Err(_) if r.over => Err(Failure::Oversized { at }),
            Err(e) => Err(Failure::io(&e, r.timed_out)),
        }
    }

    /// Read the reply to a GET whose value is expected to be
    /// `head.len() + body.len()` bytes, before the deadline (`at`: its place
    /// in the round trip). Such a value lands in place: its header in
    /// `head`, its block straight in `body` (read from the socket into it),
    /// each part handed to `landed` as it arrives; returns `None`. Any other
    /// reply is returned as a value: nil, an error (a cluster's redirect), or
    /// a value of another length of at most `limit` bytes (read whole); one
    /// announcing more is [`Failure::Oversized`] before any of it is read.
    /// If this fails, `head` and `body` hold whatever arrived.
    pub(crate) fn recv_value_into(
        &mut self,
        head: &mut [u8],
        body: &mut [u8],
        limit: usize,
        d: &Deadline,
        at: usize,
        landed: &mut dyn FnMut(Landed),
    ) -> Result<Option<Value>, Failure> {
        let want = head.len() + body.len();
        // A large value is read mostly into its destination; small ones
        // (several per socket read) mostly through the read-ahead.
        let fill = if want >= READ_AHEAD {
            LINE_READ
        } else {
            READ_AHEAD
        };
        let line = self
            .line(limit.min(READ_AHEAD), fill, d)
            .map_err(|e| match e {
                LineError::TooLong => Failure::Oversized { at },
                LineError::Io(e) => e.into(),
            })?;
        if line.first() != Some(&b'$') {
            // Nil (RESP3), an error, or a reply no GET sends: redis-rs parses
            // the line (an aggregate, incomplete in one line, fails here).
            return match redis::parse_redis_value(&line) {
                Ok(v) => Ok(Some(v)),
                Err(e) => Err(Failure::io(&format!("unexpected reply to GET: {e}"), false)),
            };
        }
        let len = std::str::from_utf8(&line[1..line.len() - 2])
            .ok()
            .and_then(|t| t.parse::<i64>().ok())
            .ok_or_else(|| Failure::io(&"a malformed bulk string length", false))?;
        if len < 0 {
            return Ok(Some(Value::Nil));
        }
        let len = len as usize;
        if len.saturating_add(line.len() + 2) > limit {
            return Err(Failure::Oversized { at });
        }
        if len != want {
            let mut v = vec![0; len];
            self.exact(&mut v, d, &mut |_| {})?;
            self.crlf(d)?;
            return Ok(Some(Value::BulkString(v)));
        }
        self.exact(head, d, &mut |_| {})?;
        landed(Landed::Head(head));
        self.exact(body, d, &mut |upto| landed(Landed::Body(upto)))?;
        self.crlf(d)?;
        Ok(None)
    }

    /// One reply line with its CRLF, at most `max` bytes, read ahead
    /// `fill` bytes at a time.
    fn line(&mut self, max: usize, fill: usize, d: &Deadline) -> Result<Vec<u8>, LineError> {
        let mut seen: usize = 0;
        loop {
            let b = self.ahead.bytes();
            if let Some(i) = b[seen.saturating_sub(1)..]
                .windows(2)
                .position(|w| w == b"\r\n")
            {
                let end = seen.saturating_sub(1) + i + 2;
                let line = b[..end].to_vec();
                self.ahead.pos += end;
                return Ok(line);
            }
            seen = b.len();
            if seen >= max {
                return Err(LineError::TooLong);
            }
            self.ahead
                .fill(&mut self.stream, fill.min(max - seen + 1), d)
                .map_err(|e| LineError::Io(timed(e)))?;
        }
    }

    /// Fill `out` from the read-ahead, then straight from the socket,
    /// handing `landed` the part of `out` filled so far after each read.
    fn exact(
        &mut self,
        out: &mut [u8],
        d: &Deadline,
        landed: &mut dyn FnMut(&[u8]),
    ) -> Result<(), Failure> {
        let mut off = self.ahead.take(out);
        if off > 0 {
            landed(&out[..off]);
        }
        while off < out.len() {
            let to = (off + PIECE).min(out.len());
            match self.stream.read(&mut out[off..to], d)? {
                0 => return Err(Failure::io(&"the server closed the connection", false)),
                n => {
                    off += n;
                    landed(&out[..off]);
                }
            }
        }
        Ok(())
    }

    /// The CRLF that ends a bulk string.
    fn crlf(&mut self, d: &Deadline) -> Result<(), Failure> {
        let mut end = [0u8; 2];
        self.exact(&mut end, d, &mut |_| {})?;
        if &end != b"\r\n" {
            return Err(Failure::io(&"a bulk string without its CRLF", false));
        }
        Ok(())
    }
}

enum LineError {
    TooLong,
    Io(io::Error),
}

/// A server's error reply as one line: its code and details.
pub(crate) fn describe(e: &redis::ServerError) -> String {
    format!("{} {}", e.code(), e.details().unwrap_or(""))
        .trim()
        .to_string()
}

/// The TLS client settings: the CA in `ca_pem` (PEM), or the system's roots.
pub(crate) fn tls_config(ca_pem: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("cannot read the CA's PEM: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("not a usable CA certificate: {e}"))?;
            }
            if roots.is_empty() {
                return Err("it holds no certificate".into());
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}
