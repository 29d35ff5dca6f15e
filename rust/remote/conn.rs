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
//!   block of memory before the connection is dropped.
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
/// `timed_out`) and after `budget` bytes (setting `over`).
struct Bounded<'a> {
    stream: &'a mut Stream,
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
        let n = self
            .stream
            .read(&mut buf[..cap], self.deadline)
            .inspect_err(|e| self.timed_out = e.kind() == io::ErrorKind::TimedOut)?;
        self.budget -= n;
        Ok(n)
    }
}

/// One connection (see the module docs).
pub(crate) struct Conn {
    stream: Stream,
    parser: Parser,
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
