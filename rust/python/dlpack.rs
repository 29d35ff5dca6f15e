//! A DLPack consumer: zero-copy access to any object with `__dlpack__` (torch
//! CPU tensors of every dtype, including `bfloat16` and the `float8_*` types;
//! numpy; JAX; CuPy pinned host arrays), without converting through numpy.
//!
//! The protocol (<https://dmlc.github.io/dlpack/latest/python_spec.html>):
//! `obj.__dlpack__(max_version=(1, 0))` returns a capsule named
//! `"dltensor_versioned"` (or, from producers that predate versioning,
//! `__dlpack__()` returns `"dltensor"`) holding a managed tensor. The consumer
//! renames the capsule to `"used_..."` so its destructor leaves the tensor
//! alone, and calls the tensor's deleter itself when done.
#![allow(unsafe_code)]

use std::ffi::{c_void, CStr};

use pyo3::exceptions::{PyBufferError, PyTypeError, PyValueError};
use pyo3::prelude::*;

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

const FLAG_READ_ONLY: u64 = 1;
/// Device types whose memory the CPU can address: CPU, CUDA pinned host
/// memory, ROCm pinned host memory.
const CPU_DEVICES: [i32; 3] = [1, 3, 11];

/// A tensor taken from a DLPack capsule; calls the producer's deleter when
/// dropped (with the GIL, which producers' deleters may need).
pub struct DlpackHold {
    managed: *mut c_void,
    versioned: bool,
}

// SAFETY: the managed tensor is only touched in Drop, under the GIL.
unsafe impl Send for DlpackHold {}

impl Drop for DlpackHold {
    fn drop(&mut self) {
        Python::attach(|_| {
            // SAFETY: `managed` came from a capsule this consumer renamed to
            // "used_*", so nobody else calls the deleter; it is called once.
            unsafe {
                if self.versioned {
                    let m = self.managed as *mut DLManagedTensorVersioned;
                    if let Some(d) = (*m).deleter {
                        d(m);
                    }
                } else {
                    let m = self.managed as *mut DLManagedTensor;
                    if let Some(d) = (*m).deleter {
                        d(m);
                    }
                }
            }
        });
    }
}

/// (hold, data address, bytes) of `obj`'s tensor; C-contiguous and in
/// CPU-addressable memory, writable when `writable`.
pub fn take(
    obj: &Bound<'_, PyAny>,
    name: &str,
    writable: bool,
) -> PyResult<(DlpackHold, usize, usize)> {
    let py = obj.py();
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("max_version", (1u32, 0u32))?;
    let capsule = match obj.call_method("__dlpack__", (), Some(&kwargs)) {
        Ok(c) => c,
        // A producer that predates versioned capsules.
        Err(e) if e.is_instance_of::<PyTypeError>(py) => obj.call_method0("__dlpack__")?,
        Err(e) => return Err(e),
    };
    // SAFETY: a capsule's name is a C string owned by the capsule (or null).
    let cname = unsafe { pyo3::ffi::PyCapsule_GetName(capsule.as_ptr()) };
    if cname.is_null() {
        return Err(PyTypeError::new_err(format!(
            "{name}.__dlpack__() did not return a DLPack capsule"
        )));
    }
    // SAFETY: non-null, NUL-terminated, alive while `capsule` is.
    let cname = unsafe { CStr::from_ptr(cname) };
    let versioned = match cname.to_bytes() {
        b"dltensor_versioned" => true,
        b"dltensor" => false,
        other => {
            return Err(PyTypeError::new_err(format!(
                "{name}.__dlpack__() returned a capsule named {:?}, not a DLPack tensor \
                 (was it consumed already?)",
                String::from_utf8_lossy(other)
            )))
        }
    };
    // SAFETY: the capsule has this name; the pointer is the managed tensor.
    let managed = unsafe { pyo3::ffi::PyCapsule_GetPointer(capsule.as_ptr(), cname.as_ptr()) };
    if managed.is_null() {
        return Err(PyErr::fetch(py));
    }
    let used: &CStr = if versioned {
        c"used_dltensor_versioned"
    } else {
        c"used_dltensor"
    };
    // SAFETY: renaming our capsule to a static name: from now on its
    // destructor leaves the tensor to us (the protocol's "consumed" mark).
    if unsafe { pyo3::ffi::PyCapsule_SetName(capsule.as_ptr(), used.as_ptr()) } != 0 {
        return Err(PyErr::fetch(py));
    }
    let hold = DlpackHold { managed, versioned };
    // SAFETY: the producer keeps the tensor valid until its deleter runs.
    let (t, flags) = unsafe {
        if versioned {
            let m = &*(managed as *const DLManagedTensorVersioned);
            if m.version.major != 1 {
                return Err(PyValueError::new_err(format!(
                    "{name}: DLPack version {}.{} is not supported (1.x is)",
                    m.version.major, m.version.minor
                )));
            }
            (&m.dl_tensor, m.flags)
        } else {
            (&(*(managed as *const DLManagedTensor)).dl_tensor, 0)
        }
    };
    if !CPU_DEVICES.contains(&t.device.device_type) {
        return Err(PyValueError::new_err(format!(
            "{name} lives on DLPack device type {} (id {}); dynblock copies to and from memory \
             the CPU can address (CPU or pinned host tensors): move it with .cpu() first",
            t.device.device_type, t.device.device_id
        )));
    }
    let item_bits = t.dtype.bits as u64 * t.dtype.lanes as u64;
    if item_bits == 0 || item_bits % 8 != 0 {
        return Err(PyTypeError::new_err(format!(
            "{name} has elements of {item_bits} bits; dynblock moves whole bytes"
        )));
    }
    let item = item_bits / 8;
    let ndim = usize::try_from(t.ndim).unwrap_or(0);
    let shape: &[i64] = if ndim == 0 {
        &[]
    } else {
        // SAFETY: a DLTensor's shape holds ndim entries (strides too, when
        // not null), valid until the deleter runs.
        unsafe { std::slice::from_raw_parts(t.shape, ndim) }
    };
    let strides: Option<&[i64]> = if t.strides.is_null() || ndim == 0 {
        None
    } else {
        // SAFETY: as above.
        Some(unsafe { std::slice::from_raw_parts(t.strides, ndim) })
    };
    let mut count: u64 = 1;
    for &d in shape {
        count = count.saturating_mul(u64::try_from(d).unwrap_or(0));
    }
    if let Some(st) = strides {
        // Row-major: each stride (in elements) is the product of the later
        // extents; dimensions of extent 1 may have any stride.
        let mut want: i64 = 1;
        for k in (0..ndim).rev() {
            if shape[k] != 1 && st[k] != want {
                return Err(PyValueError::new_err(format!(
                    "{name} must be contiguous (row-major); call .contiguous() on it first"
                )));
            }
            want = want.saturating_mul(shape[k]);
        }
    }
    if writable && flags & FLAG_READ_ONLY != 0 {
        return Err(PyBufferError::new_err(format!(
            "{name} is read-only; pass a writable tensor or array"
        )));
    }
    let len = count.saturating_mul(item) as usize;
    let ptr = (t.data as usize).wrapping_add(t.byte_offset as usize);
    Ok((hold, ptr, len))
}
