//! Caller buffers and id lists crossing into Rust: held (alive, fixed,
//! checked) for one call, with the GIL released while bytes move.
#![allow(unsafe_code)]

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyBufferError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use super::errors::to_py;

/// A caller's buffer held for the length of one call: exported through the
/// buffer protocol (numpy arrays, memoryview, bytearray, ...), through
/// DLPack (torch tensors of any dtype: zero-copy, no numpy conversion), or
/// through `numpy.asarray` for objects that only speak the array interface.
/// Holding it keeps the memory alive and un-resizable. Drop it with the GIL.
pub struct HeldBuffer {
    _keep: Keep,
    pub ptr: usize,
    pub len: usize,
}

enum Keep {
    Buffer(#[allow(dead_code)] PyUntypedBuffer),
    Dlpack(#[allow(dead_code)] super::dlpack::DlpackHold),
}

/// Whether `obj` says its data starts at `ptr`: through
/// `__array_interface__["data"]` or a torch-style `data_ptr()`.
fn same_memory(obj: &Bound<'_, PyAny>, ptr: usize) -> PyResult<bool> {
    if let Ok(ai) = obj.getattr("__array_interface__") {
        if let Ok(data) = ai.get_item("data") {
            if let Ok((p, _ro)) = data.extract::<(usize, bool)>() {
                return Ok(p == ptr);
            }
        }
    }
    if let Ok(f) = obj.getattr("data_ptr") {
        if let Ok(p) = f.call0().and_then(|p| p.extract::<usize>()) {
            return Ok(p == ptr);
        }
    }
    Ok(false)
}

pub fn hold_buffer(obj: &Bound<'_, PyAny>, name: &str, writable: bool) -> PyResult<HeldBuffer> {
    // Exporters that give no strides (ctypes arrays) are read through a
    // memoryview, which supplies them and keeps the exporter alive.
    let direct = PyUntypedBuffer::get(obj).or_else(|e| {
        let mv = pyo3::types::PyMemoryView::from(obj).map_err(|_| e)?;
        PyUntypedBuffer::get(mv.as_any())
    });
    let buf = match direct {
        Ok(b) => b,
        Err(_) if obj.hasattr("__dlpack__")? => {
            let (hold, ptr, len) = super::dlpack::take(obj, name, writable)?;
            return Ok(HeldBuffer {
                _keep: Keep::Dlpack(hold),
                ptr,
                len,
            });
        }
        Err(first) => {
            let has_array = obj.hasattr("__array_interface__")? || obj.hasattr("__array__")?;
            if !has_array {
                return Err(PyTypeError::new_err(format!(
                    "{name} must support the buffer protocol or DLPack (numpy array, \
                     memoryview, bytearray, torch CPU tensor), got {}: {first}",
                    obj.get_type().name()?
                )));
            }
            let np = obj.py().import("numpy")?;
            let arr = np.call_method1("asarray", (obj,))?;
            let b = PyUntypedBuffer::get(&arr)?;
            if writable && !same_memory(obj, b.buf_ptr() as usize)? {
                return Err(PyTypeError::new_err(format!(
                    "{name} ({}) does not expose its memory: it has only __array__, which may \
                     return a copy, so data written there would never reach it. Pass a numpy \
                     array, memoryview, bytearray or torch CPU tensor",
                    obj.get_type().name()?
                )));
            }
            b
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
        _keep: Keep::Buffer(buf),
        ptr,
        len,
    })
}

/// Sets and dicts have no order: never a list of block hashes.
fn refuse_unordered(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<()> {
    use pyo3::types::{PyByteArray, PyDict, PyFrozenSet, PySet};
    let unordered = obj.is_instance_of::<PySet>()
        || obj.is_instance_of::<PyFrozenSet>()
        || obj.is_instance_of::<PyDict>();
    if unordered {
        return Err(PyTypeError::new_err(format!(
            "{name} must be an ordered sequence of unsigned 64-bit integers (a list, tuple or \
             numpy array), got an unordered {}",
            obj.get_type().name()?
        )));
    }
    if obj.is_instance_of::<PyByteArray>() || obj.is_instance_of::<pyo3::types::PyBytes>() {
        return Err(PyTypeError::new_err(format!(
            "{name} must be a sequence of unsigned 64-bit integers, got {} (a byte buffer)",
            obj.get_type().name()?
        )));
    }
    Ok(())
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
        if buf.item_size() != 8 && !obj.hasattr("dtype")? {
            // bytes, bytearray, memoryview of bytes: not a list of hashes.
            return Err(PyTypeError::new_err(format!(
                "{name} must be a sequence of unsigned 64-bit integers, got {} (a byte buffer)",
                obj.get_type().name()?
            )));
        }
    }
    refuse_unordered(obj, name)?;
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

/// One batch call from Python: hold the caller's buffer for the call
/// (checked for contiguity and, for destinations, writability), parse the
/// ids, and run `op(ids, address, length)` with the GIL released. `unit` is
/// the bytes each id moves when they lie back to back: a sized id list that
/// cannot fit the buffer is refused before it is materialised.
///
/// `op` receives the buffer's address; `HeldBuffer` keeps the exporter's
/// memory alive and fixed until after the GIL is re-taken.
#[allow(clippy::too_many_arguments)]
pub fn batch_call<T: Send>(
    py: Python<'_>,
    ids: &Bound<'_, PyAny>,
    ids_name: &str,
    buf: &Bound<'_, PyAny>,
    buf_name: &str,
    writable: bool,
    unit: Option<usize>,
    op: impl FnOnce(&[u64], usize, usize) -> crate::error::Result<T> + Send,
) -> PyResult<T> {
    refuse_unordered(ids, ids_name)?;
    let held = hold_buffer(buf, buf_name, writable)?;
    if let (Some(unit), Ok(n)) = (unit, ids.len()) {
        // The engine checks this too; here it runs before the ids are listed.
        crate::error::check_batch_len(buf_name, held.len, n, "blocks", unit).map_err(to_py)?;
    }
    let list = u64_list(ids, ids_name)?;
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
