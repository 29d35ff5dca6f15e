//! The Python edge: `dynblock._core`. Everything that touches Python lives
//! here; the engine modules never import PyO3.
#![allow(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{
    PyBufferError, PyException, PyIndexError, PyOSError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;

use crate::align::{Alignment, AlignmentSource};
use crate::disk::{DiskOptions, DiskStorage, ODirect, Prealloc};
use crate::error::Error;
use crate::host::{HostOptions, HostStorage, Pin, Region};
use crate::manager::{BlockManager, ManagerOptions};

create_exception!(
    _core,
    DynblockError,
    PyException,
    "Base class of dynblock's own errors."
);
create_exception!(
    _core,
    CapacityError,
    DynblockError,
    "Not enough disk space or memory for the requested tier."
);
create_exception!(
    _core,
    AlignmentError,
    DynblockError,
    "A direct-I/O alignment requirement cannot be met."
);
create_exception!(
    _core,
    ODirectError,
    DynblockError,
    "O_DIRECT was required but the filesystem refuses it."
);
create_exception!(
    _core,
    NumaError,
    DynblockError,
    "NUMA placement failed or the node does not exist."
);
create_exception!(
    _core,
    PinError,
    DynblockError,
    "Pinning (mlock) failed where it was required."
);
create_exception!(
    _core,
    StoreLockedError,
    DynblockError,
    "A persistent store is open in another process."
);

/// The one conversion from engine errors to Python exceptions.
pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Io { source, path, .. } => match source.raw_os_error() {
            Some(errno) => PyOSError::new_err((errno, msg, path.display().to_string())),
            None => PyOSError::new_err(msg),
        },
        Error::InvalidArgument(_) | Error::Buffer(_) | Error::Closed(_) => {
            PyValueError::new_err(msg)
        }
        Error::Index(_) => PyIndexError::new_err(msg),
        Error::Capacity(_) => CapacityError::new_err(msg),
        Error::ODirectUnavailable(_) => ODirectError::new_err(msg),
        Error::Alignment(_) => AlignmentError::new_err(msg),
        Error::Numa(_) => NumaError::new_err(msg),
        Error::Pin(_) => PinError::new_err(msg),
        Error::Locked(_) => StoreLockedError::new_err(msg),
    }
}

/// A caller's buffer held for the length of one call: exported through the
/// buffer protocol (numpy arrays, memoryview, bytearray, ...), or through
/// `numpy.asarray` for objects such as torch CPU tensors that only speak the
/// array interface. Holding it keeps the memory alive and un-resizable.
pub struct HeldBuffer {
    _buf: PyUntypedBuffer,
    pub ptr: usize,
    pub len: usize,
}

pub fn hold_buffer(obj: &Bound<'_, PyAny>, name: &str, writable: bool) -> PyResult<HeldBuffer> {
    let buf = match PyUntypedBuffer::get(obj) {
        Ok(b) => b,
        Err(first) => {
            let has_array = obj.hasattr("__array_interface__")? || obj.hasattr("__array__")?;
            if !has_array {
                return Err(PyTypeError::new_err(format!(
                    "{name} must support the buffer protocol (numpy array, memoryview, \
                     bytearray, torch CPU tensor), got {}: {first}",
                    obj.get_type().name()?
                )));
            }
            let np = obj.py().import("numpy")?;
            let arr = np.call_method1("asarray", (obj,))?;
            PyUntypedBuffer::get(&arr)?
        }
    };
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{name} must be C-contiguous; pass numpy.ascontiguousarray(...) or a contiguous copy"
        )));
    }
    if writable && buf.readonly() {
        return Err(PyBufferError::new_err(format!(
            "{name} is read-only; pass a writable buffer (e.g. numpy.empty(...) or bytearray)"
        )));
    }
    let ptr = buf.buf_ptr() as usize;
    let len = buf.len_bytes();
    Ok(HeldBuffer {
        _buf: buf,
        ptr,
        len,
    })
}

/// Sequence of unsigned 64-bit integers: a numpy integer array (fast path,
/// read through the buffer protocol) or any sequence of ints.
pub fn u64_list(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<u64>> {
    if let Ok(buf) = PyUntypedBuffer::get(obj) {
        let fmt = buf.format().to_bytes();
        let code = fmt.last().copied().unwrap_or(b'B');
        let native = fmt.len() == 1 || matches!(fmt.first(), Some(b'@' | b'=' | b'<'));
        if buf.is_c_contiguous() && buf.item_size() == 8 && native {
            let n = buf.item_count();
            let mut out = vec![0u64; n];
            // SAFETY: the buffer is C-contiguous, holds n 8-byte items and
            // stays exported while `buf` lives; we copy bytes, not values.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    buf.buf_ptr() as *const u8,
                    out.as_mut_ptr().cast::<u8>(),
                    n * 8,
                );
            }
            match code {
                b'Q' | b'L' => return Ok(out),
                b'q' | b'l' => {
                    if let Some(i) = out.iter().position(|&v| (v as i64) < 0) {
                        return Err(PyValueError::new_err(format!(
                            "{name}[{i}] is negative ({}); expected unsigned 64-bit integers",
                            out[i] as i64
                        )));
                    }
                    return Ok(out);
                }
                _ => {}
            }
        }
        if matches!(code, b'f' | b'd' | b'e') {
            return Err(PyTypeError::new_err(format!(
                "{name} must hold integers, got a float array"
            )));
        }
    }
    if obj.is_instance_of::<pyo3::types::PyString>() || obj.is_instance_of::<pyo3::types::PyBytes>()
    {
        return Err(PyTypeError::new_err(format!(
            "{name} must be a sequence of unsigned 64-bit integers, got {}",
            obj.get_type().name()?
        )));
    }
    let it =
        obj.try_iter().map_err(|_| {
            PyTypeError::new_err(format!(
            "{name} must be a sequence of unsigned 64-bit integers or a numpy uint64 array, got {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
        })?;
    let mut out = Vec::new();
    for (i, item) in it.enumerate() {
        let item = item?;
        if item.is_instance_of::<pyo3::types::PyBool>() {
            return Err(PyTypeError::new_err(format!(
                "{name}[{i}] is a bool; expected an integer"
            )));
        }
        let v: u64 = item.extract().map_err(|_| {
            let shown = item.repr().map(|r| r.to_string()).unwrap_or_default();
            PyValueError::new_err(format!(
                "{name}[{i}] must be an integer in 0..2**64, got {shown}"
            ))
        })?;
        out.push(v);
    }
    Ok(out)
}

/// One batch call from Python: parse the ids, hold the caller's buffer for
/// the call (checked for contiguity and, for destinations, writability), and
/// run `op(ids, address, length)` with the GIL released.
///
/// `op` receives the buffer's address; `HeldBuffer` keeps the exporter's
/// memory alive and fixed until after the GIL is re-taken.
pub fn batch_call<T: Send>(
    py: Python<'_>,
    ids: &Bound<'_, PyAny>,
    ids_name: &str,
    buf: &Bound<'_, PyAny>,
    buf_name: &str,
    writable: bool,
    op: impl FnOnce(&[u64], usize, usize) -> crate::error::Result<T> + Send,
) -> PyResult<T> {
    let list = u64_list(ids, ids_name)?;
    let held = hold_buffer(buf, buf_name, writable)?;
    let (ptr, len) = (held.ptr, held.len);
    let r = py.detach(move || op(&list, ptr, len));
    drop(held);
    r.map_err(to_py)
}

/// Log the engine's pending warnings through Python `logging`.
pub fn log_warnings(py: Python<'_>, logger: &str, warnings: Vec<String>) -> PyResult<()> {
    if warnings.is_empty() {
        return Ok(());
    }
    let log = py.import("logging")?.call_method1("getLogger", (logger,))?;
    for w in warnings {
        log.call_method1("warning", ("%s", w))?;
    }
    Ok(())
}

/// The disk tier (see `dynblock.DiskStorage` for the documented wrapper).
#[pyclass(name = "DiskStorage", module = "dynblock._core", frozen)]
pub struct PyDiskStorage {
    inner: Arc<DiskStorage>,
}

impl PyDiskStorage {
    pub fn inner(&self) -> &Arc<DiskStorage> {
        &self.inner
    }
}

fn parse_o_direct(v: &str) -> PyResult<ODirect> {
    match v {
        "auto" => Ok(ODirect::Auto),
        "off" => Ok(ODirect::Off),
        "require" => Ok(ODirect::Require),
        other => Err(PyValueError::new_err(format!(
            "o_direct must be True, False or \"require\", got {other:?}"
        ))),
    }
}

#[pymethods]
impl PyDiskStorage {
    #[new]
    #[pyo3(signature = (path, num_blocks, block_size, *, o_direct="auto", persist=false,
                        preallocate="auto", io_depth=16, max_io_bytes=4194304, alignment=None,
                        lock=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        num_blocks: u64,
        block_size: usize,
        o_direct: &str,
        persist: bool,
        preallocate: &str,
        io_depth: usize,
        max_io_bytes: usize,
        alignment: Option<(usize, usize)>,
        lock: bool,
    ) -> PyResult<Self> {
        let prealloc = match preallocate {
            "auto" => Prealloc::Auto,
            "sparse-fallback" => Prealloc::SparseFallback,
            "zero" => Prealloc::Zero,
            "sparse" => Prealloc::Sparse,
            other => {
                return Err(PyValueError::new_err(format!(
                    "preallocate must be \"auto\", \"zero\", \"sparse-fallback\" or \"sparse\", got {other:?}"
                )))
            }
        };
        let alignment = match alignment {
            Some((m, o)) => Some(Alignment::new(m, o, AlignmentSource::Override).map_err(to_py)?),
            None => None,
        };
        let opts = DiskOptions {
            o_direct: parse_o_direct(o_direct)?,
            persist,
            prealloc,
            io_depth,
            max_io_bytes,
            alignment,
            lock,
        };
        let s = py
            .detach(|| DiskStorage::open(&path, num_blocks, block_size, &opts))
            .map_err(to_py)?;
        log_warnings(py, "dynblock.disk", s.take_warnings())?;
        Ok(PyDiskStorage { inner: Arc::new(s) })
    }

    /// Write blocks from `src` (len(slot_ids) * block_size bytes) to the slots.
    fn write_blocks(
        &self,
        py: Python<'_>,
        slot_ids: &Bound<'_, PyAny>,
        src: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let s = self.inner.clone();
        // SAFETY: the buffer is held (alive, fixed) for the call; only read.
        let r = batch_call(
            py,
            slot_ids,
            "slot_ids",
            src,
            "src",
            false,
            move |ids, p, n| unsafe { s.write_blocks_raw(ids, p as *const u8, n) },
        );
        log_warnings(py, "dynblock.disk", self.inner.take_warnings())?;
        r
    }

    /// Read the slots into `dst` (writable, len(slot_ids) * block_size bytes).
    fn read_blocks(
        &self,
        py: Python<'_>,
        slot_ids: &Bound<'_, PyAny>,
        dst: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let s = self.inner.clone();
        // SAFETY: the buffer is held for the call and checked writable.
        let r = batch_call(
            py,
            slot_ids,
            "slot_ids",
            dst,
            "dst",
            true,
            move |ids, p, n| unsafe { s.read_blocks_raw(ids, p as *mut u8, n) },
        );
        log_warnings(py, "dynblock.disk", self.inner.take_warnings())?;
        r
    }

    fn sync(&self, py: Python<'_>) -> PyResult<()> {
        let s = self.inner.clone();
        py.detach(move || s.sync()).map_err(to_py)
    }

    fn drop_page_cache(&self, py: Python<'_>) -> PyResult<()> {
        let s = self.inner.clone();
        py.detach(move || s.drop_page_cache()).map_err(to_py)
    }

    fn close(&self, py: Python<'_>) {
        let s = self.inner.clone();
        py.detach(move || s.close())
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }
    #[getter]
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }
    #[getter]
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
    #[getter]
    fn slot_stride(&self) -> usize {
        self.inner.slot_stride()
    }
    /// (memory alignment, offset alignment, source)
    #[getter]
    fn alignment_info(&self) -> (usize, usize, &'static str) {
        let a = self.inner.alignment();
        (a.mem, a.offset, a.source.as_str())
    }
    #[getter]
    fn o_direct(&self) -> bool {
        self.inner.o_direct()
    }
    #[getter]
    fn fallback_reason(&self) -> Option<String> {
        self.inner.fallback_reason()
    }
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }
    #[getter]
    fn anonymous(&self) -> bool {
        self.inner.anonymous()
    }
    #[getter]
    fn fs_type(&self) -> String {
        self.inner.fs_type().to_string()
    }
    #[getter]
    fn io_depth(&self) -> usize {
        self.inner.io_depth()
    }
    #[getter]
    fn file_size(&self) -> u64 {
        self.inner.file_size()
    }
    #[getter]
    fn preallocation(&self) -> &'static str {
        self.inner.preallocation()
    }
}

/// A zero-copy window on host-tier memory. Holds the mapping alive: memory
/// a live view points to is never unmapped, even after `close()`.
#[pyclass(name = "HostView", module = "dynblock._core", frozen)]
pub struct PyHostView {
    region: Arc<Region>,
    offset: usize,
    len: usize,
}

#[pymethods]
impl PyHostView {
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        let (ptr, len) = {
            let me = slf.get();
            // SAFETY: offset + len lies inside the mapping (checked when built).
            (unsafe { me.region.ptr().add(me.offset) }, me.len)
        };
        // SAFETY: view is the interpreter's Py_buffer to fill; FillInfo takes
        // a new reference to `slf`, which keeps the Arc<Region> alive.
        let rc = unsafe {
            pyo3::ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr.cast(), len as isize, 0, flags)
        };
        if rc != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.len
    }
}

fn parse_pin(v: &str) -> PyResult<Pin> {
    match v {
        "auto" => Ok(Pin::Auto),
        "off" => Ok(Pin::Off),
        "require" => Ok(Pin::Require),
        other => Err(PyValueError::new_err(format!(
            "pin must be True, False or \"require\", got {other:?}"
        ))),
    }
}

/// The host tier (see `dynblock.HostStorage` for the documented wrapper).
#[pyclass(name = "HostStorage", module = "dynblock._core", frozen)]
pub struct PyHostStorage {
    inner: Arc<HostStorage>,
}

impl PyHostStorage {
    pub fn inner(&self) -> &Arc<HostStorage> {
        &self.inner
    }
    fn view_of(&self, offset: usize, len: usize) -> PyResult<PyHostView> {
        let region = self.inner.region().map_err(to_py)?;
        Ok(PyHostView {
            region,
            offset,
            len,
        })
    }
}

#[pymethods]
impl PyHostStorage {
    #[new]
    #[pyo3(signature = (num_blocks, block_size, *, numa_node=None, pin="auto", populate_threads=0,
                        copy_threads=0, huge_pages=true, alignment=4096, sysfs_root=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        num_blocks: u64,
        block_size: usize,
        numa_node: Option<usize>,
        pin: &str,
        populate_threads: usize,
        copy_threads: usize,
        huge_pages: bool,
        alignment: usize,
        sysfs_root: Option<PathBuf>,
    ) -> PyResult<Self> {
        let opts = HostOptions {
            numa_node,
            pin: parse_pin(pin)?,
            populate_threads,
            copy_threads,
            huge_pages,
            alignment,
            sysfs_root: sysfs_root.unwrap_or_else(|| PathBuf::from("/sys")),
        };
        let h = py
            .detach(|| HostStorage::new(num_blocks, block_size, &opts))
            .map_err(to_py)?;
        log_warnings(py, "dynblock.host", h.take_warnings())?;
        Ok(PyHostStorage { inner: Arc::new(h) })
    }

    fn write_blocks(
        &self,
        py: Python<'_>,
        slot_ids: &Bound<'_, PyAny>,
        src: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let h = self.inner.clone();
        // SAFETY: the buffer is held (alive, fixed) for the call; only read.
        batch_call(
            py,
            slot_ids,
            "slot_ids",
            src,
            "src",
            false,
            move |ids, p, n| unsafe { h.copy_raw(ids, p as *mut u8, n, true) },
        )
    }

    fn read_blocks(
        &self,
        py: Python<'_>,
        slot_ids: &Bound<'_, PyAny>,
        dst: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let h = self.inner.clone();
        // SAFETY: the buffer is held for the call and checked writable.
        batch_call(
            py,
            slot_ids,
            "slot_ids",
            dst,
            "dst",
            true,
            move |ids, p, n| unsafe { h.copy_raw(ids, p as *mut u8, n, false) },
        )
    }

    /// A writable zero-copy view of one slot's block_size bytes.
    fn block(&self, slot_id: i64) -> PyResult<PyHostView> {
        if slot_id < 0 || slot_id as u64 >= self.inner.num_blocks() {
            return Err(PyIndexError::new_err(format!(
                "slot id {slot_id} is out of range: this storage has slots 0..{}",
                self.inner.num_blocks()
            )));
        }
        self.view_of(
            self.inner.slot_offset(slot_id as u64),
            self.inner.block_size(),
        )
    }

    /// A writable zero-copy view of the whole tier (num_blocks * slot_stride bytes).
    fn view(&self) -> PyResult<PyHostView> {
        self.view_of(0, self.inner.nbytes())
    }

    fn placement(&self, py: Python<'_>) -> PyResult<std::collections::BTreeMap<i64, u64>> {
        let h = self.inner.clone();
        py.detach(move || h.placement()).map_err(to_py)
    }

    /// Address of the first slot (for DMA registration).
    #[getter]
    fn data_ptr(&self) -> PyResult<usize> {
        Ok(self.inner.region().map_err(to_py)?.ptr() as usize)
    }

    fn close(&self) {
        self.inner.close()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }
    #[getter]
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }
    #[getter]
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
    #[getter]
    fn slot_stride(&self) -> usize {
        self.inner.slot_stride()
    }
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }
    #[getter]
    fn numa_node(&self) -> Option<usize> {
        self.inner.numa_node()
    }
    #[getter]
    fn policy(&self) -> &'static str {
        self.inner.policy().as_str()
    }
    #[getter]
    fn pinned(&self) -> bool {
        self.inner.pinned()
    }
    #[getter]
    fn huge_pages(&self) -> bool {
        self.inner.huge_pages()
    }
    #[getter]
    fn populate_threads(&self) -> usize {
        self.inner.populate_threads()
    }
    #[getter]
    fn populate_seconds(&self) -> f64 {
        self.inner.populate_seconds
    }
}

/// The block manager over a host tier, a disk tier or both.
#[pyclass(name = "BlockManager", module = "dynblock._core", frozen)]
pub struct PyBlockManager {
    inner: Arc<BlockManager>,
}

#[pymethods]
impl PyBlockManager {
    #[new]
    #[pyo3(signature = (block_size, *, host=None, disk=None, checksums=true, write_through=false,
                        index_path=None, sync=false, layout=0))]
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
    ) -> PyResult<Self> {
        let opts = ManagerOptions {
            checksums,
            write_through,
            index_path,
            sync,
            layout,
        };
        let (h, d) = (
            host.map(|h| h.inner().clone()),
            disk.map(|d| d.inner().clone()),
        );
        let m = py
            .detach(move || BlockManager::new(block_size, h, d, opts))
            .map_err(to_py)?;
        let me = PyBlockManager { inner: Arc::new(m) };
        me.flush_warnings(py)?;
        Ok(me)
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

    fn put(
        &self,
        py: Python<'_>,
        hashes: &Bound<'_, PyAny>,
        src: &Bound<'_, PyAny>,
    ) -> PyResult<usize> {
        let m = self.inner.clone();
        // SAFETY: the buffer is held (alive, fixed) for the call; only read.
        let r = batch_call(
            py,
            hashes,
            "hashes",
            src,
            "src",
            false,
            move |hs, p, n| unsafe { m.put_raw(hs, p as *const u8, n) },
        );
        self.flush_warnings(py)?;
        r
    }

    fn get(
        &self,
        py: Python<'_>,
        hashes: &Bound<'_, PyAny>,
        dst: &Bound<'_, PyAny>,
    ) -> PyResult<usize> {
        let m = self.inner.clone();
        // SAFETY: the buffer is held for the call and checked writable.
        let r = batch_call(
            py,
            hashes,
            "hashes",
            dst,
            "dst",
            true,
            move |hs, p, n| unsafe { m.get_raw(hs, p as *mut u8, n) },
        );
        self.flush_warnings(py)?;
        r
    }

    #[pyo3(name = "match")]
    fn match_prefix(&self, py: Python<'_>, hashes: &Bound<'_, PyAny>) -> PyResult<usize> {
        let hs = u64_list(hashes, "hashes")?;
        let m = self.inner.clone();
        Ok(py.detach(move || m.match_prefix(&hs)))
    }

    fn contains(&self, py: Python<'_>, hash: u64) -> bool {
        let m = self.inner.clone();
        py.detach(move || m.contains(hash))
    }

    fn __len__(&self, py: Python<'_>) -> usize {
        let m = self.inner.clone();
        py.detach(move || m.len())
    }

    fn remove(&self, py: Python<'_>, hashes: &Bound<'_, PyAny>) -> PyResult<usize> {
        let hs = u64_list(hashes, "hashes")?;
        let m = self.inner.clone();
        py.detach(move || m.remove(&hs)).map_err(to_py)
    }

    fn clear(&self, py: Python<'_>) -> PyResult<()> {
        let m = self.inner.clone();
        py.detach(move || m.clear()).map_err(to_py)
    }

    fn counters(&self, py: Python<'_>) -> std::collections::BTreeMap<&'static str, u64> {
        let m = self.inner.clone();
        let (s, (host_used, disk_used)) = py.detach(move || (m.stats(), m.usage()));
        let bs = self.inner.block_size() as u64;
        [
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
            ("failed_writes", s.failed_writes),
            ("corrupt_blocks", s.corrupt_blocks),
            ("recovered_blocks", s.recovered_blocks),
            ("index_torn_bytes", s.index_torn_bytes),
            ("index_compactions", s.index_compactions),
            ("host_blocks_used", host_used as u64),
            ("disk_blocks_used", disk_used as u64),
        ]
        .into_iter()
        .collect()
    }

    /// (host hashes, disk hashes), least recently used first.
    fn lru_order(&self, py: Python<'_>) -> (Vec<u64>, Vec<u64>) {
        let m = self.inner.clone();
        py.detach(move || m.lru_order())
    }

    #[getter]
    fn block_size(&self) -> usize {
        self.inner.block_size()
    }
}

impl PyBlockManager {
    fn flush_warnings(&self, py: Python<'_>) -> PyResult<()> {
        log_warnings(py, "dynblock.manager", self.inner.take_warnings())
    }
}

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
    let py = m.py();
    m.add_class::<PyDiskStorage>()?;
    m.add_class::<PyHostStorage>()?;
    m.add_class::<PyHostView>()?;
    m.add_class::<PyBlockManager>()?;
    m.add_function(wrap_pyfunction!(single_thread_touch_seconds, m)?)?;
    m.add_function(wrap_pyfunction!(memlock_limit, m)?)?;
    m.add_function(wrap_pyfunction!(has_capability, m)?)?;
    m.add_function(wrap_pyfunction!(fs_type, m)?)?;
    m.add_function(wrap_pyfunction!(build_profile, m)?)?;
    m.add("DynblockError", py.get_type::<DynblockError>())?;
    m.add("CapacityError", py.get_type::<CapacityError>())?;
    m.add("AlignmentError", py.get_type::<AlignmentError>())?;
    m.add("ODirectError", py.get_type::<ODirectError>())?;
    m.add("NumaError", py.get_type::<NumaError>())?;
    m.add("PinError", py.get_type::<PinError>())?;
    m.add("StoreLockedError", py.get_type::<StoreLockedError>())?;
    Ok(())
}
