//! `dynblock._core.DiskStorage` (documented by the `dynblock.DiskStorage` wrapper).
#![allow(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;

use super::buffers::{batch_call, hold_buffer, log_warnings, HeldBuffer};
use super::errors::to_py;
use super::settings::{int_or_default, int_setting, EngineArg, ODirectArg, PreallocArg};
use crate::align::{Alignment, AlignmentSource};
use crate::disk::{DiskEngine, DiskOptions, DiskStorage, ODirect, Prealloc};

/// The disk tier (see `dynblock.DiskStorage` for the documented wrapper).
#[pyclass(name = "DiskStorage", module = "dynblock._core", frozen)]
pub struct PyDiskStorage {
    inner: Arc<DiskStorage>,
    /// Buffers registered with the io_uring engine, held (alive, fixed)
    /// until they are unregistered.
    registered: std::sync::Mutex<std::collections::HashMap<u64, HeldBuffer>>,
}

impl Drop for PyDiskStorage {
    fn drop(&mut self) {
        // The storage may outlive this object (a manager holds it too): no
        // ring may keep a buffer whose hold goes now.
        self.unregister_all();
    }
}

impl PyDiskStorage {
    pub fn inner(&self) -> &Arc<DiskStorage> {
        &self.inner
    }

    /// Forget every registration (then drop the holds).
    fn unregister_all(&self) -> Vec<HeldBuffer> {
        let mut held = self.registered.lock().unwrap_or_else(|p| p.into_inner());
        let ids: Vec<u64> = held.keys().copied().collect();
        self.inner.unregister_memory(&ids);
        held.drain().map(|(_, b)| b).collect()
    }

    /// One batch between the slots and a caller buffer (`write`: from it,
    /// read only; else into it, checked writable), GIL released; then the
    /// tier's warnings are logged.
    fn io(
        &self,
        py: Python<'_>,
        slot_ids: &Bound<'_, PyAny>,
        buf: &Bound<'_, PyAny>,
        write: bool,
    ) -> PyResult<()> {
        let s = self.inner.clone();
        let name = if write { "src" } else { "dst" };
        // SAFETY: the buffer is held (alive, fixed) for the call; written only
        // when it is the destination, which batch_call checked writable.
        let r = batch_call(
            py,
            slot_ids,
            "slot_ids",
            buf,
            name,
            !write,
            Some(self.inner.block_size()),
            move |ids, p, n| unsafe {
                if write {
                    s.write_blocks_raw(ids, p as *const u8, n)
                } else {
                    s.read_blocks_raw(ids, p as *mut u8, n)
                }
            },
        );
        let s = self.inner.clone();
        log_warnings(py, "dynblock.disk", py.detach(move || s.take_warnings()))?;
        r
    }
}

#[pymethods]
impl PyDiskStorage {
    #[new]
    #[pyo3(signature = (path, num_blocks, block_size, *, o_direct=ODirectArg(ODirect::Auto),
                        persist=false, preallocate=PreallocArg(Prealloc::Auto), io_depth=None,
                        max_io_bytes=None, alignment=None, lock=true, worker_nice=None,
                        engine=EngineArg(DiskEngine::Auto)))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        num_blocks: &Bound<'_, PyAny>,
        block_size: &Bound<'_, PyAny>,
        o_direct: ODirectArg,
        persist: bool,
        preallocate: PreallocArg,
        io_depth: Option<&Bound<'_, PyAny>>,
        max_io_bytes: Option<&Bound<'_, PyAny>>,
        alignment: Option<(usize, usize)>,
        lock: bool,
        worker_nice: Option<&Bound<'_, PyAny>>,
        engine: EngineArg,
    ) -> PyResult<Self> {
        let num_blocks = int_setting(num_blocks, "num_blocks")?;
        let block_size = int_setting(block_size, "block_size")? as usize;
        let alignment = match alignment {
            Some((m, o)) => Some(Alignment::new(m, o, AlignmentSource::Override).map_err(to_py)?),
            None => None,
        };
        let opts = DiskOptions {
            o_direct: o_direct.0,
            persist,
            prealloc: preallocate.0,
            io_depth: match io_depth {
                Some(d) if !d.is_none() => Some(int_setting(d, "io_depth")? as usize),
                _ => None,
            },
            max_io_bytes: int_or_default(max_io_bytes, "max_io_bytes")? as usize,
            alignment,
            lock,
            worker_nice: int_or_default(worker_nice, "worker_nice")? as u32,
            engine: engine.0,
        };
        let s = py
            .detach(|| DiskStorage::open(&path, num_blocks, block_size, &opts))
            .map_err(to_py)?;
        log_warnings(py, "dynblock.disk", s.take_warnings())?;
        Ok(PyDiskStorage {
            inner: Arc::new(s),
            registered: Default::default(),
        })
    }

    /// Write blocks from `src` (len(slot_ids) * block_size bytes) to the slots.
    fn write_blocks(
        &self,
        py: Python<'_>,
        slot_ids: &Bound<'_, PyAny>,
        src: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.io(py, slot_ids, src, true)
    }

    /// Read the slots into `dst` (writable, len(slot_ids) * block_size bytes).
    fn read_blocks(
        &self,
        py: Python<'_>,
        slot_ids: &Bound<'_, PyAny>,
        dst: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.io(py, slot_ids, dst, false)
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
        let held = py.detach(|| self.unregister_all());
        drop(held); // with the GIL: releasing a Python buffer needs it
        let s = self.inner.clone();
        py.detach(move || s.close())
    }

    /// Register `buf` with the io_uring engine (its direct I/O then skips
    /// pinning the buffer's pages for every operation); the buffer is held
    /// until `unregister_buffer(id)` or `close()`. None: no io_uring engine.
    fn register_buffer(&self, py: Python<'_>, buf: &Bound<'_, PyAny>) -> PyResult<Option<u64>> {
        if self.inner.is_closed() {
            return Err(to_py(crate::error::Error::Closed("DiskStorage")));
        }
        let held = hold_buffer(buf, "buf", false)?;
        if held.len == 0 {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "buf is empty: nothing to register",
            ));
        }
        let (ptr, len) = (held.ptr, held.len);
        let s = self.inner.clone();
        // SAFETY: `held` keeps the buffer alive and un-resizable; it is kept
        // in `registered` until the registration is gone (unregister_buffer,
        // close, or drop unregister it first).
        let id = py.detach(move || unsafe { s.register_memory(ptr, len) });
        if let Some(id) = id {
            self.registered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, held);
        }
        Ok(id)
    }

    /// Forget a registration; False when `id` is not one.
    fn unregister_buffer(&self, py: Python<'_>, id: u64) -> bool {
        let s = self.inner.clone();
        let found = py.detach(move || s.unregister_memory(&[id]) == 1);
        let held = self
            .registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        drop(held);
        found
    }

    /// (bytes registered, direct I/Os through registered memory, why the
    /// last buffer was left unregistered (huge pages, or the kernel refused
    /// to pin it) or None).
    #[getter]
    fn registration(&self) -> (u64, u64, Option<String>) {
        self.inner.registration()
    }

    /// Close, and remove the file if this open created it (for an owner
    /// whose own open failed after the storage was made).
    fn abandon(&self, py: Python<'_>) {
        let s = self.inner.clone();
        py.detach(move || s.abandon())
    }

    #[getter]
    fn closed(&self, py: Python<'_>) -> bool {
        let s = self.inner.clone();
        py.detach(move || s.is_closed())
    }
    /// (num_blocks, block_size, slot_stride): the geometry every tier shares.
    #[getter]
    fn layout(&self) -> (u64, usize, usize) {
        let l = self.inner.layout();
        (l.num_blocks, l.block_size, l.stride)
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
    fn fallback_reason(&self, py: Python<'_>) -> Option<String> {
        let s = self.inner.clone();
        py.detach(move || s.fallback_reason())
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
    /// The engine running direct I/O batches: "io_uring" or "threads".
    #[getter]
    fn engine(&self) -> &'static str {
        self.inner.engine()
    }
    #[getter]
    fn file_size(&self) -> u64 {
        self.inner.file_size()
    }
    #[getter]
    fn data_offset(&self) -> u64 {
        self.inner.data_offset()
    }
    #[getter]
    fn created(&self) -> bool {
        self.inner.created()
    }
    #[getter]
    fn preallocation(&self, py: Python<'_>) -> &'static str {
        let s = self.inner.clone();
        py.detach(move || s.preallocation())
    }
}
