//! The Python edge: `dynblock._core`. Everything that touches Python lives
//! here; the engine modules never import PyO3. One file per concern:
//! [`errors`] (the exception tree and the one conversion), [`buffers`]
//! (caller buffers and id lists), [`dlpack`] (zero-copy tensors of any
//! dtype), [`settings`] (typed arguments, defaults,
//! checks), and one per class: [`disk`], [`host`], [`manager`].

use std::path::PathBuf;

use pyo3::prelude::*;

mod buffers;
mod disk;
mod dlpack;
mod errors;
mod host;
mod manager;
mod remote;
mod settings;

use disk::PyDiskStorage;
use errors::to_py;
use host::{PyHostStorage, PyHostView};
use manager::PyBlockManager;
use remote::PyRemoteTier;

/// Seconds a single thread takes to first-touch a fresh `nbytes` mapping
/// (the bench's population baseline).
#[pyfunction]
#[pyo3(signature = (nbytes, huge_pages=true))]
fn single_thread_touch_seconds(py: Python<'_>, nbytes: usize, huge_pages: bool) -> PyResult<f64> {
    py.detach(move || crate::host::single_thread_touch_seconds(nbytes, huge_pages))
        .map_err(to_py)
}

/// (soft, hard) RLIMIT_MEMLOCK; None means unlimited.
#[pyfunction]
fn memlock_limit() -> (Option<u64>, Option<u64>) {
    let (s, h) = crate::numa::memlock_limit();
    let f = |v: u64| if v == u64::MAX { None } else { Some(v) };
    (f(s), f(h))
}

/// Whether the process's effective capability set holds capability `cap`.
#[pyfunction]
fn has_capability(cap: u32) -> bool {
    crate::numa::has_capability(cap)
}

/// Filesystem type name of a path ("ext4", "tmpfs", ...).
#[pyfunction]
fn fs_type(path: PathBuf) -> String {
    crate::disk::fs_type_of_path(&path)
}

/// A remote URL with its password replaced by `***` (for messages and reprs).
#[pyfunction]
fn redact_url(url: &str) -> String {
    crate::remote::redact(url)
}

#[pyfunction]
fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDiskStorage>()?;
    m.add_class::<PyHostStorage>()?;
    m.add_class::<PyHostView>()?;
    m.add_class::<PyBlockManager>()?;
    m.add_class::<PyRemoteTier>()?;
    m.add_function(wrap_pyfunction!(single_thread_touch_seconds, m)?)?;
    m.add_function(wrap_pyfunction!(memlock_limit, m)?)?;
    m.add_function(wrap_pyfunction!(has_capability, m)?)?;
    m.add_function(wrap_pyfunction!(fs_type, m)?)?;
    m.add_function(wrap_pyfunction!(build_profile, m)?)?;
    m.add_function(wrap_pyfunction!(redact_url, m)?)?;
    m.add_function(wrap_pyfunction!(settings::settings_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(settings::check_setting, m)?)?;
    m.add_function(wrap_pyfunction!(settings::settings_env, m)?)?;
    errors::register(m)
}
