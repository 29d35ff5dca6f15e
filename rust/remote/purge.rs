//! Deleting keys from the server: a namespace's ([`RemoteTier::purge`]:
//! `SCAN ... MATCH` on every master, `UNLINK` of what each step finds) or
//! given blocks' ([`RemoteTier::remove`]), all before the caller's deadline.

use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::Value;

use super::conn::{self, Conn, Deadline, Failure};
use super::{Node, RemoteTier, Space};
use crate::keys::Key;

/// Keys one `SCAN` step asks the server to look at (a hint).
const SCAN_COUNT: usize = 1000;
/// Bytes one `SCAN` reply may take (its keys are under 100 bytes each).
const SCAN_REPLY: usize = 4 << 20;
/// Keys one step of [`RemoteTier::remove`] unlinks (one round trip per master).
const STEP_KEYS: usize = 1024;

/// A purge that ended before the server's every key of the namespace was
/// deleted.
#[derive(Debug)]
pub struct PurgeStopped {
    /// Keys deleted before it stopped.
    pub deleted: u64,
    /// Why: the deadline, the connection, or the server's answer (scrubbed
    /// of secrets).
    pub why: String,
}

/// Why a purge of one server stopped.
enum Stop {
    /// The connection failed or the deadline passed (the tier's health
    /// hears of it).
    Net(Failure),
    /// The server answered with an error (a refused command: the server
    /// is up).
    Refused(String),
}

impl From<Failure> for Stop {
    fn from(e: Failure) -> Self {
        Stop::Net(e)
    }
}

impl RemoteTier {
    /// Delete every key of `space` the server holds (a cluster: every
    /// master's) before `d`; returns how many were deleted. The background
    /// queue's blocks of `space` are dropped first (counted as skipped) and
    /// a batch being sent is waited for, so that nothing this process
    /// queued earlier lands after the scan. Keys other processes write
    /// meanwhile may be left. Keys of other namespaces, prefixes, layouts
    /// or block sizes are never touched (the `MATCH` pattern is the key's
    /// whole shape).
    pub fn purge(&self, space: &Space, d: Deadline) -> Result<u64, PurgeStopped> {
        let mut deleted = 0;
        self.drop_queued(&d, |_, s| s == space)
            .map_err(|e| self.stopped(0, &e))?;
        let pattern = self.pattern(space);
        let masters: Vec<Node> = if self.net.cluster {
            if let Err(e) = self.refresh_slots(&d) {
                return Err(self.lost(0, e, &d));
            }
            let map = self.net.slots.lock().unwrap_or_else(|p| p.into_inner());
            map.masters()
        } else {
            vec![self.net.seeds[0].clone()]
        };
        for node in &masters {
            match self.purge_node(node, &pattern, &d, &mut deleted) {
                Ok(()) => {}
                Err(Stop::Net(e)) => return Err(self.lost(deleted, e, &d)),
                Err(Stop::Refused(e)) => return Err(self.stopped(deleted, &e)),
            }
        }
        Ok(self.finished(deleted))
    }

    /// A deletion that ended after `deleted` keys: counted.
    fn finished(&self, deleted: u64) -> u64 {
        self.came_up();
        self.stats.deleted.fetch_add(deleted, Ordering::Relaxed);
        deleted
    }

    /// A deletion that stopped after `deleted` keys: counted, its reason
    /// scrubbed of secrets.
    fn stopped(&self, deleted: u64, why: &dyn std::fmt::Display) -> PurgeStopped {
        self.stats.deleted.fetch_add(deleted, Ordering::Relaxed);
        PurgeStopped {
            deleted,
            why: self.scrub(why),
        }
    }

    /// A deletion whose round trip failed: the tier's health hears of it
    /// as of any call's; the caller's deadline is named as such.
    fn lost(&self, deleted: u64, e: Failure, d: &Deadline) -> PurgeStopped {
        self.failed(&e, d);
        match e {
            Failure::Io {
                timed_out: true, ..
            } => self.stopped(deleted, &"the timeout passed"),
            e => self.stopped(deleted, &e),
        }
    }

    /// Delete blocks `hashes` of `space` from the server (one pipelined
    /// `UNLINK` each, routed to the master that holds it) before `d`;
    /// returns how many the server held. The background queue's copies of
    /// them are dropped first and a batch being sent is waited for, as for
    /// [`Self::purge`].
    pub fn remove(&self, space: &Space, hashes: &[u64], d: Deadline) -> Result<u64, PurgeStopped> {
        let gone: std::collections::HashSet<u64> = hashes.iter().copied().collect();
        self.drop_queued(&d, |k, s| s == space && gone.contains(&k.hash))
            .map_err(|e| self.stopped(0, &e))?;
        let mut deleted = 0u64;
        let mut refused = None;
        let mut buf = Vec::new();
        for chunk in hashes.chunks(STEP_KEYS) {
            let keys: Vec<String> = chunk.iter().map(|&h| self.key(space, h)).collect();
            let r = self.round_trip(
                &keys,
                super::Replies::Parsed(1024),
                &d,
                &mut buf,
                &mut |i, b| {
                    redis::cmd("UNLINK").arg(&keys[i]).write_packed_command(b);
                    true
                },
                &mut |_, v| match v {
                    Value::Int(n) => deleted += n.max(0) as u64,
                    Value::ServerError(e) => refused = Some(conn::describe(&e)),
                    _ => {}
                },
            );
            if let Err(e) = r {
                return Err(self.lost(deleted, e, &d));
            }
            if let Some(e) = refused.take() {
                return Err(self.stopped(deleted, &format!("the server refused UNLINK: {e}")));
            }
        }
        Ok(self.finished(deleted))
    }

    /// The `MATCH` pattern of every key of `space` and no other: the
    /// prefix with glob characters escaped, then the key's exact shape.
    fn pattern(&self, space: &Space) -> String {
        let escaped: String = self
            .opts
            .prefix
            .chars()
            .flat_map(|c| {
                let esc = matches!(c, '*' | '?' | '[' | ']' | '\\');
                esc.then_some('\\').into_iter().chain(std::iter::once(c))
            })
            .collect();
        let (l, b) = (self.opts.layout, self.opts.block_size);
        let hash = "?".repeat(16);
        match space.tag() {
            None => format!("{escaped}:{l:016x}:{b}:{hash}"),
            Some(tag) => format!("{escaped}:{l:016x}:{b}:n{tag}:{hash}"),
        }
    }

    /// Drop the queued blocks `gone` says go and wait (until `d`) for a
    /// batch the writer is sending now.
    fn drop_queued(&self, d: &Deadline, gone: impl Fn(&Key, &Space) -> bool) -> Result<(), String> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let before = q.items.len();
        q.items.retain(|(k, s)| !gone(k, s));
        let dropped = (before - q.items.len()) as u64;
        self.stats.skipped.fetch_add(dropped, Ordering::Relaxed);
        if q.busy {
            let until = q.done + 1;
            while q.done < until && !q.stop {
                let Ok(left) = d.left() else {
                    return Err("the deadline passed while a background write batch was \
                                still being sent"
                        .into());
                };
                q = self
                    .queue_cv
                    .wait_timeout(q, left.min(Duration::from_millis(50)))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        Ok(())
    }

    /// Scan `node` for `pattern` and unlink what it finds, adding to
    /// `deleted` as the server confirms.
    fn purge_node(
        &self,
        node: &Node,
        pattern: &str,
        d: &Deadline,
        deleted: &mut u64,
    ) -> Result<(), Stop> {
        let mut c = self.take_conn(node, d)?;
        let mut cursor: Vec<u8> = b"0".to_vec();
        let mut buf = Vec::new();
        loop {
            buf.clear();
            redis::cmd("SCAN")
                .arg(&cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .write_packed_command(&mut buf);
            c.send(&buf, d)?;
            let (next, keys) = scan_reply(c.recv(SCAN_REPLY, d, 0)?)?;
            self.unlink(&mut c, &keys, d, deleted)?;
            if next == b"0" {
                break;
            }
            cursor = next;
        }
        self.give_conn(node.clone(), c);
        Ok(())
    }

    /// `UNLINK` each of `keys` (one command per key: a cluster refuses
    /// keys of several slots in one), pipelined.
    fn unlink(
        &self,
        c: &mut Conn,
        keys: &[Vec<u8>],
        d: &Deadline,
        deleted: &mut u64,
    ) -> Result<(), Stop> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for k in keys {
            redis::cmd("UNLINK").arg(k).write_packed_command(&mut buf);
        }
        c.send(&buf, d)?;
        let mut refused = None;
        for i in 0..keys.len() {
            match c.recv(1024, d, i)? {
                Value::Int(n) => *deleted += n.max(0) as u64,
                Value::ServerError(e) => refused = Some(conn::describe(&e)),
                _ => {}
            }
        }
        match refused {
            Some(e) => Err(Stop::Refused(format!("the server refused UNLINK: {e}"))),
            None => Ok(()),
        }
    }
}

/// A `SCAN` reply's next cursor and keys.
fn scan_reply(v: Value) -> Result<(Vec<u8>, Vec<Vec<u8>>), Stop> {
    let bad = || {
        Stop::Net(Failure::io(
            &"SCAN answered something that is not a cursor and keys",
            false,
        ))
    };
    let items = match v {
        Value::Array(items) => items,
        Value::ServerError(e) => {
            return Err(Stop::Refused(format!(
                "the server refused SCAN: {}",
                conn::describe(&e)
            )))
        }
        _ => return Err(bad()),
    };
    let mut it = items.into_iter();
    let (Some(Value::BulkString(cursor)), Some(Value::Array(found)), None) =
        (it.next(), it.next(), it.next())
    else {
        return Err(bad());
    };
    let keys = found
        .into_iter()
        .map(|k| match k {
            Value::BulkString(k) => Ok(k),
            _ => Err(bad()),
        })
        .collect::<Result<Vec<_>, Stop>>()?;
    Ok((cursor, keys))
}
