//! `dynblock._core.HostStorage` and `HostView` (documented by the
//! `dynblock.HostStorage` wrapper).
#![allow(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::PyIndexError;
use pyo3::prelude::*;

use super::buffers::{batch_call, log_warnings};
use super::errors::to_py;
use super::settings::{int_or_default, int_setting, PinArg};
use crate::host::{HostOptions, HostStorage, Pin, Region};

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

/// The host tier (see `dynblock.HostStorage` for the documented wrapper).
#[pyclass(name = "HostStorage", module = "dynblock._core", frozen)]
pub struct PyHostStorage {
    inner: Arc<HostStorage>,
}

impl PyHostStorage {
    pub fn inner(&self) -> &Arc<HostStorage> {
        &self.inner
    }
    /// Copy between the slots and a caller buffer (`into_slots`: from it,
    /// read only; else into it, checked writable), GIL released.
    fn copy(
        &self,
        py: Python<'_>,
        slot_ids: &Bound<'_, PyAny>,
        buf: &Bound<'_, PyAny>,
        into_slots: bool,
    ) -> PyResult<()> {
        let h = self.inner.clone();
        let name = if into_slots { "src" } else { "dst" };
        // SAFETY: the buffer is held (alive, fixed) for the call; written only
        // when it is the destination, which batch_call checked writable.
        batch_call(
            py,
            slot_ids,
            "slot_ids",
            buf,
            name,
            !into_slots,
            Some(self.inner.block_size()),
            move |ids, p, n| unsafe { h.copy_raw(ids, p as *mut u8, n, into_slots) },
        )
    }

    /// Rust locks are never taken with the GIL held: the region is fetched
    /// with it released.
    fn view_of(&self, py: Python<'_>, offset: usize, len: usize) -> PyResult<PyHostView> {
        let h = self.inner.clone();
        let region = py.detach(move || h.region()).map_err(to_py)?;
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
    #[pyo3(signature = (num_blocks, block_size, *, numa_node=None, pin=PinArg(Pin::Auto),
                        populate_threads=None, copy_threads=None, huge_pages=true,
                        alignment=None, sysfs_root=None, worker_nice=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        num_blocks: &Bound<'_, PyAny>,
        block_size: &Bound<'_, PyAny>,
        numa_node: Option<&Bound<'_, PyAny>>,
        pin: PinArg,
        populate_threads: Option<&Bound<'_, PyAny>>,
        copy_threads: Option<&Bound<'_, PyAny>>,
        huge_pages: bool,
        alignment: Option<&Bound<'_, PyAny>>,
        sysfs_root: Option<PathBuf>,
        worker_nice: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let num_blocks = int_setting(num_blocks, "num_blocks")?;
        let block_size = int_setting(block_size, "block_size")? as usize;
        let numa_node = match numa_node {
            Some(n) if !n.is_none() => Some(int_setting(n, "numa_node")? as usize),
            _ => None,
        };
        let opts = HostOptions {
            numa_node,
            pin: pin.0,
            populate_threads: int_or_default(populate_threads, "populate_threads")? as usize,
            copy_threads: int_or_default(copy_threads, "copy_threads")? as usize,
            worker_nice: int_or_default(worker_nice, "worker_nice")? as u32,
            huge_pages,
            alignment: int_or_default(alignment, "alignment")? as usize,
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
        self.copy(py, slot_ids, src, true)
    }

    fn read_blocks(
        &self,
        py: Python<'_>,
        slot_ids: &Bound<'_, PyAny>,
        dst: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.copy(py, slot_ids, dst, false)
    }

    /// A writable zero-copy view of one slot's block_size bytes.
    fn block(&self, py: Python<'_>, slot_id: i64) -> PyResult<PyHostView> {
        if slot_id < 0 || slot_id as u64 >= self.inner.num_blocks() {
            return Err(PyIndexError::new_err(format!(
                "slot id {slot_id} is out of range: this storage has slots 0..{}",
                self.inner.num_blocks()
            )));
        }
        self.view_of(
            py,
            self.inner.slot_offset(slot_id as u64),
            self.inner.block_size(),
        )
    }

    /// A writable zero-copy view of the whole tier (num_blocks * slot_stride bytes).
    fn view(&self, py: Python<'_>) -> PyResult<PyHostView> {
        self.view_of(py, 0, self.inner.nbytes())
    }

    fn placement(&self, py: Python<'_>) -> PyResult<std::collections::BTreeMap<i64, u64>> {
        let h = self.inner.clone();
        py.detach(move || h.placement()).map_err(to_py)
    }

    /// Address of the first slot (for DMA registration).
    #[getter]
    fn data_ptr(&self, py: Python<'_>) -> PyResult<usize> {
        let h = self.inner.clone();
        Ok(py.detach(move || h.region()).map_err(to_py)?.ptr() as usize)
    }

    /// Waits for copies in flight: the GIL is released meanwhile.
    fn close(&self, py: Python<'_>) {
        let h = self.inner.clone();
        py.detach(move || h.close())
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
