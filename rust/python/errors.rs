//! Engine errors to Python exceptions: the `DynblockError` tree for
//! dynblock's own failures, built-ins where users expect them. The one
//! conversion, [`to_py`], is used by every binding.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyIndexError, PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::error::Error;

create_exception!(
    dynblock._core,
    DynblockError,
    PyException,
    "Base class of dynblock's own errors."
);
create_exception!(
    dynblock._core,
    CapacityError,
    DynblockError,
    "Not enough disk space or memory for the requested tier."
);
create_exception!(
    dynblock._core,
    AlignmentError,
    DynblockError,
    "A direct-I/O alignment requirement cannot be met."
);
create_exception!(
    dynblock._core,
    ODirectError,
    DynblockError,
    "O_DIRECT was required but the filesystem refuses it."
);
create_exception!(
    dynblock._core,
    NumaError,
    DynblockError,
    "NUMA placement failed or the node does not exist."
);
create_exception!(
    dynblock._core,
    PinError,
    DynblockError,
    "Pinning (mlock) failed where it was required."
);
create_exception!(
    dynblock._core,
    StoreLockedError,
    DynblockError,
    "A persistent store is already open (in another process, or by another object here)."
);
create_exception!(
    dynblock._core,
    RemoteError,
    DynblockError,
    "The remote tier (Redis/Valkey) refused the connection or could not be reached at open."
);
create_exception!(
    dynblock._core,
    ForkError,
    DynblockError,
    "A storage opened before fork() was used in the child process."
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
        Error::Forked(_) => ForkError::new_err(msg),
        Error::Remote(_) => RemoteError::new_err(msg),
        Error::Unsupported(_) => PyOSError::new_err(msg),
    }
}

/// Add the exception classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("DynblockError", py.get_type::<DynblockError>())?;
    m.add("CapacityError", py.get_type::<CapacityError>())?;
    m.add("AlignmentError", py.get_type::<AlignmentError>())?;
    m.add("ODirectError", py.get_type::<ODirectError>())?;
    m.add("NumaError", py.get_type::<NumaError>())?;
    m.add("PinError", py.get_type::<PinError>())?;
    m.add("StoreLockedError", py.get_type::<StoreLockedError>())?;
    m.add("ForkError", py.get_type::<ForkError>())?;
    m.add("RemoteError", py.get_type::<RemoteError>())?;
    Ok(())
}
