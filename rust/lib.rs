//! dynblock: a KV-cache block store for LLM serving engines.
//!
//! Tiers below the GPU:
//! - **disk** ([`disk::DiskStorage`]): one preallocated file of fixed-size
//!   slots, read and written with `O_DIRECT` through memory aligned to what
//!   the kernel reports for that file (`statx(STATX_DIOALIGN)`, else the
//!   device's logical block size, else 4096). Where the filesystem refuses
//!   `O_DIRECT` the file switches to buffered I/O and records why.
//!
//! Threading: each batch call is cut into I/O operations (adjacent slots
//! coalesced) and up to `io_depth` scoped threads keep them in flight.
//! Nothing here touches Python; the bindings live in `python/` behind the
//! `python` feature, so `cargo test` needs no interpreter.
#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod align;
pub mod disk;
pub mod error;
pub mod host;
pub mod index;
pub mod io;
pub mod manager;
pub mod numa;
pub mod process;
pub mod settings;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
