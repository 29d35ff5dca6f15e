//! Namespaces: the store's table of names, each a small id that the keys
//! of its blocks carry (see [`crate::keys::Key`]). Id 0 is the shared
//! namespace (no name); the others are given out in order, at the first
//! put into a name. A persistent store keeps the table in a file beside its
//! index (`<index>.namespaces`), rewritten whole (written beside under a
//! random name, synced, renamed over, the directory synced) before any
//! index record names a new id, so that every id the index holds has its
//! name after a crash.
//!
//! The table also keeps each namespace's quota (in bytes, per tier), written
//! the same way when it is set.
//!
//! File format: text, one namespace per line, `<id> <name as hex of its
//! UTF-8 bytes>`, then, for a namespace with a quota, ` <host bytes>
//! <disk bytes>` (`-`: no quota in that tier), ids in order.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::files::{check_private_file, open_private, remove_temps_beside, sync_dir, temp_beside};

/// The longest name, in bytes of UTF-8.
pub const MAX_NAME: usize = 1024;
/// The id of a name the store does not know: no block has it, so a query
/// in it misses (a query never adds a name).
pub const UNKNOWN: u32 = u32::MAX;

/// A namespace's quota in bytes of the (host, disk) tiers (None: no quota).
pub type Quota = [Option<u64>; 2];

/// The table: names by id (index 0 unused: the shared namespace; an empty
/// name is an id held back, see [`Namespaces::reserve`]).
#[derive(Default)]
pub(super) struct Namespaces {
    names: Vec<String>,
    ids: HashMap<String, u32>,
    /// Quotas in bytes (host, disk; None: none in that tier).
    quotas: HashMap<u32, Quota>,
    /// Where a persistent store keeps it.
    file: Option<PathBuf>,
}

/// The file of the table of the store whose index is `index`.
pub fn file_of(index: &Path) -> PathBuf {
    let mut name = index.as_os_str().to_owned();
    name.push(".namespaces");
    PathBuf::from(name)
}

/// The names in the table of the store whose index is `index`, in id order
/// (the name of id `i` at `i - 1`, "" for an id held back; empty without a
/// table).
pub fn read_names(index: &Path) -> Result<Vec<String>> {
    Ok(Namespaces::read(index)?.names.split_off(1))
}

/// Check a namespace name: a non-empty string of at most [`MAX_NAME`] bytes.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(Error::InvalidArgument(format!(
            "namespace must be a non-empty str of at most {MAX_NAME} bytes (or None for the \
             shared namespace), got one of {} bytes",
            name.len()
        )));
    }
    Ok(())
}

impl Namespaces {
    /// The table of a store without persistence.
    pub(super) fn new() -> Self {
        Namespaces {
            names: vec![String::new()],
            ..Default::default()
        }
    }

    /// The table a persistent store's index at `index` keeps beside it
    /// (empty when there is none yet), for the store's exclusive opener:
    /// what a save that died left beside it is removed first.
    pub(super) fn open(index: &Path) -> Result<Self> {
        remove_temps_beside(&file_of(index), "new");
        Self::read(index)
    }

    /// The table, read only. Like the index, it must be a private regular
    /// file of this user (not a link): whoever could write it could map a
    /// name to another tenant's blocks.
    fn read(index: &Path) -> Result<Self> {
        let file = file_of(index);
        let mut t = Namespaces::new();
        t.file = Some(file.clone());
        let mut f = match open_private(&file, false) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(t),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(Error::InvalidArgument(format!(
                    "{} is a symbolic link; dynblock does not follow links for its store files",
                    file.display()
                )))
            }
            Err(e) => return Err(Error::io("open", &file, 0, 0, e)),
        };
        check_private_file(f.as_raw_fd(), &file, "namespace table")?;
        let mut text = String::new();
        f.read_to_string(&mut text)
            .map_err(|e| Error::io("read", &file, 0, 0, e))?;
        let bad = |line: usize, why: &str| {
            Error::InvalidArgument(format!(
                "{} line {line} is not a namespace ({why}); restore the file or delete it \
                 together with the store",
                file.display()
            ))
        };
        for (i, line) in text.lines().enumerate() {
            let mut fields = line.split(' ');
            let id: u32 = fields
                .next()
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| bad(i + 1, "no id"))?;
            if (id as usize) < t.names.len() {
                return Err(bad(i + 1, "ids out of order"));
            }
            t.reserve(id - 1);
            let hex = fields.next().ok_or_else(|| bad(i + 1, "no name"))?;
            let quota: Vec<&str> = fields.collect();
            match quota.as_slice() {
                [] => {}
                [h, d] => {
                    let q = |f: &str| match f {
                        "-" => Ok(None),
                        n => n
                            .parse()
                            .map(Some)
                            .map_err(|_| bad(i + 1, "a quota is not a number")),
                    };
                    t.quotas.insert(id, [q(h)?, q(d)?]);
                }
                _ => return Err(bad(i + 1, "a quota needs a host and a disk part")),
            }
            let name = unhex(hex)
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| bad(i + 1, "the name is not hex of UTF-8"))?;
            t.ids.insert(name.clone(), id);
            t.names.push(name);
        }
        Ok(t)
    }

    /// The id of `name` (None: the shared namespace, 0); [`UNKNOWN`] for a
    /// name never put into.
    pub(super) fn find(&self, name: Option<&str>) -> u32 {
        match name {
            None => 0,
            Some(n) => self.ids.get(n).copied().unwrap_or(UNKNOWN),
        }
    }

    /// The id of `name`, given out (and, for a persistent store, written
    /// down) if it is new.
    pub(super) fn id(&mut self, name: Option<&str>) -> Result<u32> {
        let Some(n) = name else {
            return Ok(0);
        };
        if let Some(&id) = self.ids.get(n) {
            return Ok(id);
        }
        check_name(n)?;
        let id = self.names.len() as u32;
        if id == UNKNOWN {
            return Err(Error::InvalidArgument(format!(
                "this store holds {} namespaces, the most it can",
                id - 1
            )));
        }
        self.names.push(n.to_owned());
        if let Err(e) = self.save() {
            self.names.pop();
            return Err(e);
        }
        self.ids.insert(n.to_owned(), id);
        Ok(id)
    }

    /// The name of `id` (None: the shared namespace or an id unknown here).
    pub(super) fn name(&self, id: u32) -> Option<&str> {
        (id != 0)
            .then(|| self.names.get(id as usize))
            .flatten()
            .map(String::as_str)
            .filter(|n| !n.is_empty())
    }

    /// Never give out ids up to `top`: blocks of a store whose table lost
    /// their names (a table deleted or restored from an older copy) keep
    /// ids nobody can name, and a new name must not take one of them (it
    /// would see another tenant's blocks).
    pub(super) fn reserve(&mut self, top: u32) {
        while self.names.len() <= top as usize {
            self.names.push(String::new());
        }
    }

    /// Namespace `id`'s quota (none: `[None, None]`).
    pub(super) fn quota(&self, id: u32) -> Quota {
        self.quotas.get(&id).copied().unwrap_or([None; 2])
    }

    /// Every namespace with a quota, and its quota.
    pub(super) fn quotas(&self) -> impl Iterator<Item = (u32, Quota)> + '_ {
        self.quotas.iter().map(|(&id, &q)| (id, q))
    }

    /// Set namespace `id`'s quota (written down first, for a persistent
    /// store: on an error nothing changed).
    pub(super) fn set_quota(&mut self, id: u32, quota: Quota) -> Result<()> {
        let old = self.quota(id);
        let put = |t: &mut Self, q: Quota| {
            if q == [None; 2] {
                t.quotas.remove(&id);
            } else {
                t.quotas.insert(id, q);
            }
        };
        put(self, quota);
        if let Err(e) = self.save() {
            put(self, old);
            return Err(e);
        }
        Ok(())
    }

    /// Every named namespace: (id, name), in id order.
    pub(super) fn all(&self) -> impl Iterator<Item = (u32, &str)> {
        self.names
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, n)| !n.is_empty())
            .map(|(i, n)| (i as u32, n.as_str()))
    }

    /// Write the table to its file (nothing without one).
    fn save(&self) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let mut text = String::new();
        for (id, name) in self.all() {
            text.push_str(&format!("{id} {}", hex(name.as_bytes())));
            if let Some(q) = self.quotas.get(&id) {
                let f = |b: Option<u64>| b.map_or("-".to_string(), |b| b.to_string());
                text.push_str(&format!(" {} {}", f(q[0]), f(q[1])));
            }
            text.push('\n');
        }
        let tmp = temp_beside(file, "new");
        let res = open_private(&tmp, true)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .map_err(|e| Error::io("write", &tmp, 0, text.len() as u64, e))
            .and_then(|_| {
                std::fs::rename(&tmp, file).map_err(|e| Error::io("rename", &tmp, 0, 0, e))
            });
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        sync_dir(file);
        Ok(())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_get_ids_in_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ix = dir.path().join("store.index");
        let mut t = Namespaces::open(&ix).unwrap();
        assert_eq!(t.find(Some("a")), UNKNOWN);
        assert_eq!(t.id(None).unwrap(), 0);
        assert_eq!(t.id(Some("a")).unwrap(), 1);
        assert_eq!(t.id(Some("b c\n")).unwrap(), 2);
        assert_eq!(t.id(Some("a")).unwrap(), 1);
        assert!(t.id(Some("")).is_err());
        assert!(t.id(Some(&"x".repeat(MAX_NAME + 1))).is_err());
        let t = Namespaces::open(&ix).unwrap();
        assert_eq!((t.find(Some("a")), t.find(Some("b c\n"))), (1, 2));
        assert_eq!(t.name(2), Some("b c\n"));
        assert_eq!(t.name(0), None);
        let mut t = t;
        t.set_quota(2, [Some(4096), None]).unwrap();
        let t = Namespaces::open(&ix).unwrap();
        assert_eq!((t.quota(2), t.quota(1)), ([Some(4096), None], [None, None]));
        // A save that died before its rename leaves a file the next open removes.
        let dead = temp_beside(&file_of(&ix), "new");
        std::fs::write(&dead, "1 61\n").unwrap();
        assert!(
            Namespaces::read(&ix).is_ok() && dead.exists(),
            "a reader leaves it"
        );
        Namespaces::open(&ix).unwrap();
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "only the table itself is left");
    }
}
