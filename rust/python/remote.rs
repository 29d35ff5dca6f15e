//! `dynblock._core.RemoteTier` (used through `dynblock.Config(remote=...)`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;

use super::buffers::log_warnings;
use super::errors::to_py;
use crate::error::Error;
use crate::remote::{Deadline, RemoteOptions, RemoteTier};

/// A connection to a Redis/Valkey remote tier (see `rust/remote/`).
#[pyclass(name = "RemoteTier", module = "dynblock._core", frozen)]
pub struct PyRemoteTier {
    inner: Arc<RemoteTier>,
}

impl PyRemoteTier {
    pub fn inner(&self) -> &Arc<RemoteTier> {
        &self.inner
    }
}

#[pymethods]
impl PyRemoteTier {
    #[new]
    #[pyo3(signature = (url, block_size, *, prefix=crate::settings::DEFAULT_REMOTE_PREFIX.to_string(), ttl_s=None,
                        timeout_ms=None, ca_file=None, layout=0, queue_bytes=None,
                        secret=None, check_threads=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        url: String,
        block_size: usize,
        prefix: String,
        ttl_s: Option<u64>,
        timeout_ms: Option<u64>,
        ca_file: Option<PathBuf>,
        layout: u64,
        queue_bytes: Option<usize>,
        secret: Option<String>,
        check_threads: Option<usize>,
    ) -> PyResult<Self> {
        use crate::settings::default_int;
        // Defaults from the one settings table (`RemoteTier::open` checks the values there).
        let timeout_ms = timeout_ms.unwrap_or_else(|| default_int("remote_timeout_ms"));
        let queue_bytes = queue_bytes.unwrap_or_else(|| default_int("remote_queue_bytes") as usize);
        let opts = RemoteOptions {
            url,
            prefix,
            ttl_s,
            timeout_ms,
            ca_file,
            block_size,
            layout,
            queue_bytes,
            secret,
            check_threads,
        };
        let inner = py.detach(move || RemoteTier::open(opts)).map_err(to_py)?;
        Ok(PyRemoteTier { inner })
    }

    /// The URL without its password.
    #[getter]
    fn url(&self) -> String {
        self.inner.display_url().to_string()
    }

    #[getter]
    fn cluster(&self) -> bool {
        self.inner.is_cluster()
    }

    /// Whether the tier is marked down (skipped until its backoff ends).
    #[getter]
    fn down(&self) -> bool {
        self.inner.is_down()
    }

    /// Whether the server refuses writes (e.g. OOM at `maxmemory`): writes
    /// are skipped for a backoff, reads go on.
    #[getter]
    fn refusing_writes(&self) -> bool {
        self.inner.is_refusing_writes()
    }

    /// Blocks waiting in the background write queue.
    #[getter]
    fn queued(&self) -> usize {
        self.inner.queued()
    }

    /// (name, value) counters: remote_hits, remote_misses, remote_errors,
    /// remote_skipped, remote_corrupt, remote_stored, remote_unauthenticated,
    /// remote_oversized, remote_deadline_missed, remote_deleted.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.inner.stats;
        vec![
            ("remote_hits", s.hits.load(Relaxed)),
            ("remote_misses", s.misses.load(Relaxed)),
            ("remote_errors", s.errors.load(Relaxed)),
            ("remote_skipped", s.skipped.load(Relaxed)),
            ("remote_corrupt", s.corrupt.load(Relaxed)),
            ("remote_stored", s.stored.load(Relaxed)),
            ("remote_unauthenticated", s.unauthenticated.load(Relaxed)),
            ("remote_oversized", s.oversized.load(Relaxed)),
            ("remote_deadline_missed", s.deadline_missed.load(Relaxed)),
            ("remote_deleted", s.deleted.load(Relaxed)),
        ]
    }

    /// Delete every key of namespace `namespace` (None: the shared one) the
    /// server holds, within `timeout_s`; how many were deleted. A purge cut
    /// short raises `RemoteError` saying how many it deleted.
    fn purge(&self, py: Python<'_>, namespace: Option<String>, timeout_s: f64) -> PyResult<u64> {
        let d = deadline(timeout_s)?;
        let r = self.inner.clone();
        let shown = shown_namespace(namespace.as_deref());
        let got = py.detach(move || r.purge(&r.space(namespace.as_deref()), d));
        self.log_warnings(py)?;
        got.map_err(|s| self.stopped("purge", &shown, s.deleted, &s.why))
    }

    /// Delete blocks `hashes` of namespace `namespace` (None: the shared
    /// one) from the server, within `timeout_s`; how many it held. Cut
    /// short: `RemoteError` saying how many it deleted.
    fn remove(
        &self,
        py: Python<'_>,
        namespace: Option<String>,
        hashes: &Bound<'_, PyAny>,
        timeout_s: f64,
    ) -> PyResult<u64> {
        let d = deadline(timeout_s)?;
        let hs = super::buffers::u64_list(hashes, "hashes")?;
        let r = self.inner.clone();
        let shown = shown_namespace(namespace.as_deref());
        let got = py.detach(move || r.remove(&r.space(namespace.as_deref()), &hs, d));
        self.log_warnings(py)?;
        got.map_err(|s| self.stopped("remove", &shown, s.deleted, &s.why))
    }

    /// Wait for the background writes; False after `timeout_s`.
    #[pyo3(signature = (timeout_s=60.0))]
    fn flush(&self, py: Python<'_>, timeout_s: f64) -> bool {
        let r = self.inner.clone();
        py.detach(move || r.flush(Duration::from_secs_f64(timeout_s.max(0.0))))
    }

    /// Log the tier's pending warnings (state changes, corrupt values).
    fn log_warnings(&self, py: Python<'_>) -> PyResult<()> {
        let r = self.inner.clone();
        let w = py.detach(move || r.take_warnings());
        log_warnings(py, "dynblock.remote", w)
    }

    #[pyo3(signature = (timeout_s=10.0))]
    fn close(&self, py: Python<'_>, timeout_s: f64) {
        let r = self.inner.clone();
        py.detach(move || r.close(Duration::from_secs_f64(timeout_s.max(0.0))))
    }

    fn __repr__(&self) -> String {
        format!("RemoteTier({:?})", self.inner.display_url())
    }
}

impl PyRemoteTier {
    /// The error of a deletion (`what`: purge or remove) cut short.
    fn stopped(&self, what: &str, shown: &str, deleted: u64, why: &str) -> PyErr {
        to_py(Error::Remote(format!(
            "{what} of {shown} on {}: stopped after deleting {deleted} key(s): {why}; the keys \
             left are still served: call {what} again to go on",
            self.inner.display_url(),
        )))
    }
}

/// A caller's deadline `timeout_s` from now (a number of seconds > 0).
fn deadline(timeout_s: f64) -> PyResult<Deadline> {
    if !(timeout_s.is_finite() && timeout_s > 0.0) {
        return Err(to_py(Error::InvalidArgument(format!(
            "timeout must be a number of seconds > 0, got {timeout_s}"
        ))));
    }
    Ok(Deadline::after(Duration::from_secs_f64(timeout_s)))
}

fn shown_namespace(name: Option<&str>) -> String {
    name.map_or("the shared namespace".to_string(), |n| {
        format!("namespace {n:?}")
    })
}
