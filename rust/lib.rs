//! dynblock: a KV-cache block store for LLM serving engines.
//!
//! Tiers below the GPU, and the manager over them:
//! - **host** ([`host::HostStorage`]): one anonymous mapping of fixed-size
//!   slots, bound to the GPU's NUMA node with `mbind`, populated in
//!   parallel, pinned with `mlock` where the limits allow ([`numa`] holds
//!   the sysfs and syscall helpers).
//! - **disk** ([`disk::DiskStorage`]): one preallocated file of fixed-size
//!   slots, read and written with `O_DIRECT` through memory aligned to what
//!   the kernel reports for that file, falling back to buffered I/O (and
//!   saying why) where the filesystem refuses. A persistent file starts with
//!   a header naming its geometry and a random store id.
//! - **manager** ([`manager::BlockManager`]): sequence hash -> slot in each
//!   tier, LRU per tier, pins and leases, offload and promotion, write-behind,
//!   checksums, and the persistent store's append-only [`index`] (bound to
//!   its data file by the store id). Its policy (no I/O, no `unsafe`) lives
//!   in `manager/policy.rs` as verbs over private fields; the rest of
//!   `manager/` executes what it decides, one file per concern.
//!
//! - **remote** ([`remote::RemoteTier`]): Redis or Valkey (one server, or a
//!   cluster) below the local tiers, shared by every process that names the
//!   same server, prefix and layout; every call bounded by a deadline, every
//!   reply by a size (`remote/conn.rs`), values checked by CRC32C or
//!   authenticated by a MAC, writes in the background through a bounded
//!   queue. It reads the local tiers only through [`remote::LocalSource`],
//!   which the manager implements; it never imports the manager.
//!
//! [`checksum`] is the block checksum every tier uses; [`files`] the
//! store-file safety both the disk tier and the index use (neither imports
//! the other). Every setting is
//! declared, defaulted and checked once, in [`settings`].
//! [`process`] detects `fork()` (a storage refuses to work in a child) and
//! keeps one open per store per process.
//!
//! Threading: each batch call is cut into operations (adjacent disk slots
//! coalesced, host copies cut into pieces), run on the storage's own
//! long-lived worker pool ([`io`]) with `io_depth` operations in flight;
//! `close()` stops the pool at once. The manager's lock is held to plan and
//! commit a batch, never while bytes move.
//!
//! Nothing here touches Python; the bindings live in `python/` behind the
//! `python` feature, so `cargo test` needs no interpreter. See
//! `docs/ARCHITECTURE.md` for the whole picture.
#![deny(unsafe_code)]
// The crate map links its internal modules (the docs are for this crate's developers).
#![allow(rustdoc::private_intra_doc_links)]
// Without the bindings (`cargo test`), what only they call looks unused.
#![cfg_attr(not(feature = "python"), allow(dead_code))]
#![warn(clippy::undocumented_unsafe_blocks)]

pub(crate) mod align;
pub(crate) mod checksum;
pub(crate) mod disk;
pub(crate) mod error;
pub(crate) mod files;
pub(crate) mod host;
pub(crate) mod index;
pub(crate) mod io;
pub(crate) mod keys;
pub(crate) mod latency;
pub(crate) mod manager;
pub(crate) mod numa;
pub(crate) mod process;
pub(crate) mod remote;
pub(crate) mod settings;

#[cfg(feature = "python")]
mod python;
