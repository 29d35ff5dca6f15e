//! `dynblock._core.BlockManager` (documented by the `dynblock.BlockManager` wrapper).
#![allow(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;

use super::buffers::{batch_call, hold_buffer, log_warnings, u64_list};
use super::disk::PyDiskStorage;
use super::errors::to_py;
use super::host::PyHostStorage;
use super::remote::PyRemoteTier;
use crate::manager::{BlockManager, Key, Keys, ManagerOptions};
use crate::remote::RemoteWrite;

/// The block manager over a host tier, a disk tier or both.
#[pyclass(name = "BlockManager", module = "dynblock._core", frozen)]
pub struct PyBlockManager {
    inner: Arc<BlockManager>,
}

#[pymethods]
impl PyBlockManager {
    #[new]
    #[pyo3(signature = (block_size, *, host=None, disk=None, checksums=true, write_through=false,
                        index_path=None, sync=false, layout=0, write_behind=true,
                        disk_admission="all", host_eviction="lru", disk_eviction="lru"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        block_size: usize,
        host: Option<PyRef<'_, PyHostStorage>>,
        disk: Option<PyRef<'_, PyDiskStorage>>,
        checksums: bool,
        write_through: bool,
        index_path: Option<PathBuf>,
        sync: bool,
        layout: u64,
        write_behind: bool,
        disk_admission: &str,
        host_eviction: &str,
        disk_eviction: &str,
    ) -> PyResult<Self> {
        use crate::settings::{DiskAdmission, Eviction};
        let disk_admission = DiskAdmission::parse(disk_admission).map_err(to_py)?;
        let host_eviction = Eviction::parse(host_eviction, "host_eviction").map_err(to_py)?;
        let disk_eviction = Eviction::parse(disk_eviction, "disk_eviction").map_err(to_py)?;
        let opts = ManagerOptions {
            checksums,
            write_through,
            index_path,
            sync,
            layout,
            write_behind,
            disk_admission,
            host_eviction,
            disk_eviction,
        };
        let (h, d) = (
            host.map(|h| h.inner().clone()),
            disk.map(|d| d.inner().clone()),
        );
        let m = py
            .detach(move || BlockManager::new(block_size, h, d, opts))
            .map_err(to_py)?;
        let inner = Arc::new(m);
        inner.start_write_behind();
        let me = PyBlockManager { inner };
        me.flush_warnings(py)?;
        Ok(me)
    }

    /// Wait for write-behind: host-only blocks near eviction are written now.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let m = self.inner.clone();
        let r = py.detach(move || m.flush()).map_err(to_py);
        self.flush_warnings(py)?;
        r
    }

    fn sync(&self, py: Python<'_>) -> PyResult<()> {
        let m = self.inner.clone();
        py.detach(move || m.sync()).map_err(to_py)
    }

    fn compact_index(&self, py: Python<'_>) -> PyResult<()> {
        let m = self.inner.clone();
        py.detach(move || m.compact_index()).map_err(to_py)
    }

    #[getter]
    fn persistent(&self) -> bool {
        self.inner.persistent()
    }

    #[pyo3(signature = (hashes, src, rows=None, namespace=None))]
    fn put(
        &self,
        py: Python<'_>,
        hashes: &Bound<'_, PyAny>,
        src: &Bound<'_, PyAny>,
        rows: Option<&Bound<'_, PyAny>>,
        namespace: Option<String>,
    ) -> PyResult<usize> {
        self.transfer(py, hashes, src, rows, true, namespace)
    }

    #[pyo3(signature = (hashes, dst, rows=None, namespace=None))]
    fn get(
        &self,
        py: Python<'_>,
        hashes: &Bound<'_, PyAny>,
        dst: &Bound<'_, PyAny>,
        rows: Option<&Bound<'_, PyAny>>,
        namespace: Option<String>,
    ) -> PyResult<usize> {
        self.transfer(py, hashes, dst, rows, false, namespace)
    }

    /// Put a remote tier below the local ones; `write`: "async", "sync" or "off".
    fn attach_remote(&self, remote: PyRef<'_, PyRemoteTier>, write: &str) -> PyResult<()> {
        let w = RemoteWrite::parse(write).map_err(to_py)?;
        self.inner
            .attach_remote(remote.inner().clone(), w)
            .map_err(to_py)
    }

    /// Pin the longest stored prefix: (lease id, count). `timeout_s`: the
    /// most the remote tier's part may take (None: `remote_timeout_ms`).
    #[pyo3(signature = (hashes, timeout_s=None, namespace=None))]
    fn lookup(
        &self,
        py: Python<'_>,
        hashes: &Bound<'_, PyAny>,
        timeout_s: Option<f64>,
        namespace: Option<String>,
    ) -> PyResult<(u64, usize)> {
        let budget = match timeout_s {
            None => None,
            Some(t) if t.is_finite() && t >= 0.0 => Some(std::time::Duration::from_secs_f64(t)),
            Some(t) => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "timeout must be a finite number of seconds >= 0 or None, got {t}"
                )))
            }
        };
        let r = self.keyed(py, hashes, namespace, true, move |m, k| m.lookup(k, budget));
        if self.inner.remote().is_some() {
            self.flush_warnings(py)?;
        }
        r
    }

    /// Release a lease unread; False when it was already used or released.
    fn release_lease(&self, py: Python<'_>, lease: u64) -> bool {
        let m = self.inner.clone();
        py.detach(move || m.release_lease(lease))
    }

    /// Read a lease's blocks into `dst` (or at `rows`) and release it.
    #[pyo3(signature = (lease, dst, rows=None))]
    fn get_lease(
        &self,
        py: Python<'_>,
        lease: u64,
        dst: &Bound<'_, PyAny>,
        rows: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        let rows = rows_arg(rows)?;
        let held = hold_buffer(dst, "dst", true)?;
        let (p, n) = (held.ptr, held.len);
        let m = self.inner.clone();
        // SAFETY: the buffer is held for the call and checked writable.
        let r = py.detach(move || unsafe { m.get_lease(lease, p as *mut u8, n, rows.as_deref()) });
        drop(held);
        self.flush_warnings(py)?;
        r.map_err(to_py)
    }

    #[pyo3(name = "match", signature = (hashes, namespace=None))]
    fn match_prefix(
        &self,
        py: Python<'_>,
        hashes: &Bound<'_, PyAny>,
        namespace: Option<String>,
    ) -> PyResult<usize> {
        let r = self.keyed(py, hashes, namespace, true, |m, k| m.match_prefix(k));
        if self.inner.remote().is_some() {
            self.flush_warnings(py)?;
        }
        r
    }

    /// Mark stored blocks as the most recently used; returns how many were stored.
    #[pyo3(signature = (hashes, namespace=None))]
    fn touch(
        &self,
        py: Python<'_>,
        hashes: &Bound<'_, PyAny>,
        namespace: Option<String>,
    ) -> PyResult<usize> {
        self.keyed(py, hashes, namespace, false, |m, k| m.touch(k))
    }

    #[pyo3(signature = (hash, namespace=None))]
    fn contains(&self, py: Python<'_>, hash: u64, namespace: Option<String>) -> PyResult<bool> {
        let ns = self.ns(py, namespace)?;
        let m = self.inner.clone();
        py.detach(move || m.contains(Key::new(hash, ns)))
            .map_err(to_py)
    }

    /// Forget every block of `namespace`: how many there were.
    fn purge(&self, py: Python<'_>, namespace: String) -> PyResult<usize> {
        let ns = self.ns(py, Some(namespace))?;
        let m = self.inner.clone();
        py.detach(move || m.purge(ns)).map_err(to_py)
    }

    /// The namespaces the store has names for, in the order they came.
    fn namespaces(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let m = self.inner.clone();
        py.detach(move || m.namespaces()).map_err(to_py)
    }

    /// Give `namespace` a quota in bytes of each tier (None: none there).
    #[pyo3(signature = (namespace, host_bytes=None, disk_bytes=None))]
    fn set_quota(
        &self,
        py: Python<'_>,
        namespace: String,
        host_bytes: Option<u64>,
        disk_bytes: Option<u64>,
    ) -> PyResult<()> {
        let m = self.inner.clone();
        let r = py
            .detach(move || m.set_quota(&namespace, [host_bytes, disk_bytes]))
            .map_err(to_py);
        self.flush_warnings(py)?;
        r
    }

    /// `namespace`'s counters (since this manager opened), the slots its
    /// blocks hold, and its quota in bytes (None where it has none).
    fn namespace_counters(
        &self,
        py: Python<'_>,
        namespace: Option<String>,
    ) -> PyResult<std::collections::BTreeMap<&'static str, Option<u64>>> {
        let ns = self.ns(py, namespace)?;
        let m = self.inner.clone();
        let s = py.detach(move || m.namespace_stats(ns)).map_err(to_py)?;
        let bs = self.inner.block_size() as u64;
        Ok([
            ("put_blocks", s.put_blocks),
            ("put_new", s.put_new),
            ("host_hits", s.host_hits),
            ("disk_hits", s.disk_hits),
            ("remote_hits", s.remote_hits),
            ("misses", s.misses),
            ("host_blocks_used", s.host_blocks),
            ("disk_blocks_used", s.disk_blocks),
            ("host_bytes_used", s.host_blocks * bs),
            ("disk_bytes_used", s.disk_blocks * bs),
        ]
        .into_iter()
        .map(|(k, v)| (k, Some(v)))
        .chain([
            ("host_quota_bytes", s.quota[0]),
            ("disk_quota_bytes", s.quota[1]),
        ])
        .collect())
    }

    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        let m = self.inner.clone();
        py.detach(move || m.len()).map_err(to_py)
    }

    /// Close (see `dynblock.BlockManager.close`): returns how many host-only
    /// blocks were written to disk first.
    #[pyo3(signature = (flush=true))]
    fn close(&self, py: Python<'_>, flush: bool) -> PyResult<usize> {
        let m = self.inner.clone();
        let r = py.detach(move || m.close(flush)).map_err(to_py);
        self.flush_warnings(py)?;
        r
    }

    #[pyo3(signature = (hashes, namespace=None))]
    fn remove(
        &self,
        py: Python<'_>,
        hashes: &Bound<'_, PyAny>,
        namespace: Option<String>,
    ) -> PyResult<usize> {
        self.keyed(py, hashes, namespace, false, |m, k| m.remove(k))
    }

    fn clear(&self, py: Python<'_>) -> PyResult<()> {
        let m = self.inner.clone();
        py.detach(move || m.clear()).map_err(to_py)
    }

    fn counters(&self, py: Python<'_>) -> PyResult<std::collections::BTreeMap<&'static str, u64>> {
        let m = self.inner.clone();
        let (s, (host_used, disk_used)) = py.detach(move || m.stats()).map_err(to_py)?;
        let bs = self.inner.block_size() as u64;
        Ok([
            ("put_blocks", s.put_blocks),
            ("put_new", s.put_new),
            ("get_calls", s.get_calls),
            ("host_hits", s.host_hits),
            ("disk_hits", s.disk_hits),
            ("misses", s.misses),
            ("offloaded_blocks", s.offloaded_blocks),
            ("offloaded_bytes", s.offloaded_blocks * bs),
            ("onboarded_blocks", s.onboarded_blocks),
            ("onboarded_bytes", s.onboarded_blocks * bs),
            ("host_evictions", s.host_evictions),
            ("disk_evictions", s.disk_evictions),
            ("dropped_blocks", s.dropped_blocks),
            ("disk_not_admitted", s.disk_not_admitted),
            ("rejected_full", s.rejected_full),
            ("leases", s.leases),
            ("leases_held", s.leases_held),
            ("written_behind", s.written_behind),
            ("failed_write_behind", s.failed_write_behind),
            ("failed_writes", s.failed_writes),
            ("corrupt_blocks", s.corrupt_blocks),
            ("io_errors", s.io_errors),
            ("recovered_blocks", s.recovered_blocks),
            ("index_torn_bytes", s.index_torn_bytes),
            ("index_bad_records", s.index_bad_records),
            ("index_compactions", s.index_compactions),
            ("host_blocks_used", host_used as u64),
            ("disk_blocks_used", disk_used as u64),
        ]
        .into_iter()
        .collect())
    }

    /// Latency histograms: `[(name, bucket upper bounds in seconds, count per
    /// bucket (one more than bounds: the last is past them), sum in seconds)]`
    /// for `lookup` (lookup and match), `load` (get, a lease's load) and
    /// `store` (put).
    fn latencies(&self) -> Vec<(&'static str, Vec<f64>, Vec<u64>, f64)> {
        let bounds: Vec<f64> = crate::latency::BOUNDS_US
            .iter()
            .map(|&us| us as f64 / 1e6)
            .collect();
        self.inner
            .latency
            .all()
            .into_iter()
            .map(|(name, h)| {
                let (counts, sum) = h.snapshot();
                (name, bounds.clone(), counts, sum)
            })
            .collect()
    }

    /// Start (cap > 0) or stop (0) recording tier changes.
    fn watch_events(&self, py: Python<'_>, cap: usize) -> PyResult<()> {
        let m = self.inner.clone();
        py.detach(move || m.watch_events(cap)).map_err(to_py)
    }

    /// ([(kind, tier, hash, namespace)], lost): kind "stored", "removed" or
    /// "cleared" (tier "host" or "disk"; None for "cleared"; namespace None
    /// for the shared one), oldest first.
    #[allow(clippy::type_complexity)]
    fn take_events(
        &self,
        py: Python<'_>,
    ) -> PyResult<(
        Vec<(&'static str, Option<&'static str>, u64, Option<String>)>,
        u64,
    )> {
        use crate::manager::TierEvent;
        let m = self.inner.clone();
        // The names of the events' namespaces, each looked up once, the GIL released.
        let (events, lost, names) = py
            .detach(move || {
                let (events, lost) = m.take_events()?;
                let mut names = std::collections::HashMap::new();
                for e in &events {
                    if let TierEvent::Stored { hash, .. } | TierEvent::Removed { hash, .. } = e {
                        if hash.ns != 0 {
                            names
                                .entry(hash.ns)
                                .or_insert_with(|| m.namespace_name(hash.ns));
                        }
                    }
                }
                Ok::<_, crate::error::Error>((events, lost, names))
            })
            .map_err(to_py)?;
        let tier = |host: bool| Some(if host { "host" } else { "disk" });
        let name = |k: Key| names.get(&k.ns).cloned().flatten();
        let out = events
            .into_iter()
            .map(|e| match e {
                TierEvent::Stored { host, hash } => ("stored", tier(host), hash.hash, name(hash)),
                TierEvent::Removed { host, hash } => ("removed", tier(host), hash.hash, name(hash)),
                TierEvent::Cleared => ("cleared", None, 0, None),
            })
            .collect();
        Ok((out, lost))
    }

    /// (host hashes, disk hashes), least recently used first (hashes of
    /// every namespace).
    fn lru_order(&self, py: Python<'_>) -> PyResult<(Vec<u64>, Vec<u64>)> {
        let m = self.inner.clone();
        let (h, d) = py.detach(move || m.lru_order()).map_err(to_py)?;
        let hashes = |v: Vec<Key>| v.into_iter().map(|k| k.hash).collect();
        Ok((hashes(h), hashes(d)))
    }

    #[getter]
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
}

/// The optional `rows` argument: None, or one row index per hash.
fn rows_arg(rows: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<u64>>> {
    match rows {
        Some(r) if !r.is_none() => Ok(Some(u64_list(r, "rows")?)),
        _ => Ok(None),
    }
}

impl PyBlockManager {
    /// `put` (from `buf`, read only) or `get` (into `buf`, checked
    /// writable), back to back or at `rows`, GIL released; then the
    /// manager's warnings are logged.
    fn transfer(
        &self,
        py: Python<'_>,
        hashes: &Bound<'_, PyAny>,
        buf: &Bound<'_, PyAny>,
        rows: Option<&Bound<'_, PyAny>>,
        put: bool,
        namespace: Option<String>,
    ) -> PyResult<usize> {
        let m = self.inner.clone();
        let rows = rows_arg(rows)?;
        let unit = rows.is_none().then(|| self.inner.block_size());
        let name = if put { "src" } else { "dst" };
        // SAFETY: the buffer is held (alive, fixed) for the call; written only
        // by a get, whose destination batch_call checked writable.
        let r = batch_call(
            py,
            hashes,
            "hashes",
            buf,
            name,
            !put,
            unit,
            move |hs, p, n| unsafe {
                if put {
                    m.put_in(namespace.as_deref(), hs, p as *const u8, n, rows.as_deref())
                } else {
                    let ns = m.query_namespace_id(namespace.as_deref())?;
                    m.get_rows(Keys::new(hs, ns), p as *mut u8, n, rows.as_deref())
                }
            },
        );
        self.flush_warnings(py)?;
        r
    }

    /// The id of `namespace` (checked; a name the store does not know is
    /// the unknown id, in which every query misses).
    fn ns(&self, py: Python<'_>, namespace: Option<String>) -> PyResult<u32> {
        if namespace.is_none() {
            return Ok(0); // the shared namespace: no lock to take
        }
        let m = self.inner.clone();
        py.detach(move || m.namespace_id(namespace.as_deref(), false))
            .map_err(to_py)
    }

    /// `f(manager, keys)` with the GIL released, the keys being `hashes` (a
    /// sequence of ints) in `namespace` (`remote`: a query that goes on to
    /// the remote tier, see `BlockManager::query_namespace_id`).
    fn keyed<T: Send>(
        &self,
        py: Python<'_>,
        hashes: &Bound<'_, PyAny>,
        namespace: Option<String>,
        remote: bool,
        f: impl FnOnce(&BlockManager, Keys<'_>) -> crate::error::Result<T> + Send,
    ) -> PyResult<T> {
        let hs = u64_list(hashes, "hashes")?;
        let m = self.inner.clone();
        py.detach(move || {
            let name = namespace.as_deref();
            let ns = if remote {
                m.query_namespace_id(name)?
            } else {
                m.namespace_id(name, false)?
            };
            f(&m, Keys::new(&hs, ns))
        })
        .map_err(to_py)
    }

    /// Log the engine's pending warnings. They are taken with the GIL
    /// released: the manager's lock may be held by another thread's batch,
    /// and waiting for it must not stop every Python thread.
    fn flush_warnings(&self, py: Python<'_>) -> PyResult<()> {
        let m = self.inner.clone();
        let (w, rw, (hw, dw)) = py.detach(move || {
            let rw = m.remote().map(|r| r.take_warnings()).unwrap_or_default();
            (m.take_warnings(), rw, m.take_tier_warnings())
        });
        log_warnings(py, "dynblock.host", hw)?;
        log_warnings(py, "dynblock.disk", dw)?;
        log_warnings(py, "dynblock.remote", rw)?;
        log_warnings(py, "dynblock.manager", w)
    }
}
