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

/// What a persistent store's files say, read without changing them and
/// without its lock (see `dynblock.store`): a dict of the data file's
/// header, the index's geometry and records, its live blocks as
/// `(hash, slot, crc, namespace id)`, oldest first, and the names of its
/// namespaces (`namespaces`: id `i`'s at `i - 1`; id 0 is the shared one).
#[pyfunction]
fn inspect_store<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
    use crate::files::id_hex;
    let index_path = PathBuf::from(format!("{}.index", path.display()));
    let (data, ins, names) = py
        .detach(|| {
            let data = crate::disk::inspect_data_file(&path)?;
            let ins = crate::index::inspect(&index_path)?;
            let names = crate::manager::namespaces::read_names(&index_path)?;
            Ok::<_, crate::error::Error>((data, ins, names))
        })
        .map_err(to_py)?;
    let d = pyo3::types::PyDict::new(py);
    match data {
        Some(h) => {
            d.set_item("store_id", id_hex(&h.store_id))?;
            d.set_item("block_size", h.block_size)?;
            d.set_item("num_blocks", h.num_blocks)?;
            d.set_item("slot_stride", h.stride)?;
            d.set_item("data_offset", h.data_offset)?;
        }
        None => d.set_item("store_id", py.None())?,
    }
    let g = &ins.geometry;
    d.set_item("index_store_id", id_hex(&g.store_id))?;
    d.set_item("index_block_size", g.block_size)?;
    d.set_item("index_num_blocks", g.num_blocks)?;
    d.set_item("layout", g.layout)?;
    d.set_item("checksums", g.checksums)?;
    d.set_item("index_bytes", ins.bytes)?;
    d.set_item("index_records", ins.recovered.records)?;
    d.set_item("index_bad_records", ins.recovered.bad_records)?;
    d.set_item("index_torn_bytes", ins.recovered.torn_bytes)?;
    let ghost: std::collections::HashSet<crate::keys::Key> =
        ins.recovered.ghost.iter().copied().collect();
    d.set_item("turned_away_remembered", ghost.len())?;
    d.set_item("last_opened", ins.recovered.last_open)?;
    d.set_item("last_closed_cleanly", ins.recovered.last_close)?;
    d.set_item("closed_cleanly", ins.recovered.closed_cleanly)?;
    let live: Vec<(u64, u32, u32, u32)> = ins
        .recovered
        .live
        .iter()
        .map(|l| (l.key.hash, l.slot, l.crc, l.key.ns))
        .collect();
    d.set_item("live", live)?;
    d.set_item("namespaces", names)?;
    Ok(d)
}

/// The checksums dynblock records for blocks `hashes[i]` whose bytes lie
/// back to back in `data` (`len(hashes) * block_size` bytes, any buffer):
/// CRC32C over each hash (little endian) and its block.
#[pyfunction]
#[allow(unsafe_code)]
fn block_crcs(
    py: Python<'_>,
    hashes: &Bound<'_, PyAny>,
    data: &Bound<'_, PyAny>,
    block_size: usize,
) -> PyResult<Vec<u32>> {
    let hs = buffers::u64_list(hashes, "hashes")?;
    let held = buffers::hold_buffer(data, "data", false)?;
    if block_size == 0 || held.len != hs.len() * block_size {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "data must be len(hashes) * block_size = {} bytes, got {}",
            hs.len() * block_size,
            held.len
        )));
    }
    let (ptr, len) = (held.ptr, held.len);
    let out = py.detach(|| {
        // SAFETY: the held buffer keeps `len` readable bytes at `ptr` alive
        // and un-resizable until `held` drops, after this call.
        let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        hs.iter()
            .zip(bytes.chunks(block_size))
            .map(|(&h, b)| crate::checksum::block_crc(h, b))
            .collect()
    });
    drop(held);
    Ok(out)
}

/// 64-bit keys for the pieces `pieces` (indices, in the order wanted) of
/// every page named in `names` (str), page after page, as little-endian
/// uint64 bytes: BLAKE3 keyed by a digest of `context` over each name, then
/// one splitmix64 step per piece (`rust/keys.rs`).
#[pyfunction]
fn piece_keys<'py>(
    py: Python<'py>,
    names: Vec<String>,
    context: &[u8],
    pieces: Vec<u64>,
) -> Bound<'py, pyo3::types::PyBytes> {
    let keys = crate::keys::piece_keys(&names, context, &pieces);
    let bytes: Vec<u8> = keys.iter().flat_map(|k| k.to_le_bytes()).collect();
    pyo3::types::PyBytes::new(py, &bytes)
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
    m.add_function(wrap_pyfunction!(inspect_store, m)?)?;
    m.add_function(wrap_pyfunction!(block_crcs, m)?)?;
    m.add_function(wrap_pyfunction!(piece_keys, m)?)?;
    m.add_function(wrap_pyfunction!(redact_url, m)?)?;
    m.add_function(wrap_pyfunction!(settings::settings_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(settings::check_setting, m)?)?;
    m.add_function(wrap_pyfunction!(settings::settings_env, m)?)?;
    errors::register(m)
}
