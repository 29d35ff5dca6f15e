//! Reopening a persistent store: the index replayed into the registry (its
//! live blocks registered in the disk tier, oldest first), and what recovery
//! has to report (torn tail, damaged records, a reset index) as warnings.
#![forbid(unsafe_code)]

use std::path::Path;

use super::policy::Registry;
use super::ManagerOptions;
use crate::disk::DiskStorage;
use crate::error::{Error, Result};
use crate::index::{Geometry, IndexLog};

/// What reopening found.
pub(super) struct Recovered {
    pub(super) index: IndexLog,
    pub(super) geometry: Geometry,
    pub(super) recovered: u64,
    pub(super) torn_bytes: u64,
    pub(super) bad_records: u64,
    pub(super) warnings: Vec<String>,
}

/// Open (or create) the index at `path` for the persistent disk tier `disk`
/// and register its live blocks in `reg`.
pub(super) fn recover(
    path: &Path,
    disk: Option<&DiskStorage>,
    block_size: usize,
    opts: &ManagerOptions,
    reg: &mut Registry,
) -> Result<Recovered> {
    let d = disk.ok_or_else(|| {
        Error::InvalidArgument("a persistent store needs a disk tier (disk_blocks > 0)".into())
    })?;
    let store_id = d.store_id().ok_or_else(|| {
        Error::InvalidArgument(
            "a persistent store needs a persistent disk tier (persist=True)".into(),
        )
    })?;
    let geometry = Geometry {
        block_size: block_size as u64,
        num_blocks: d.num_blocks(),
        layout: opts.layout,
        checksums: opts.checksums,
        store_id,
    };
    let (mut index, rec) = IndexLog::open(path, &geometry, opts.sync, d.created())?;
    reg.recover(&rec.live, &rec.order_ghost);
    reg.recover_ghost(&rec.ghost);
    let mut warnings = Vec::new();
    // Best effort: a failed append marks the log for a rewrite before the
    // next data write, as any failed append does.
    if let Err(e) = index.mark(false) {
        warnings.push(format!("could not record the open in the index: {e}"));
    }
    if let Some(why) = rec.reset {
        warnings.push(why);
    }
    if rec.bad_records > 0 {
        warnings.push(format!(
            "the index {} held {} damaged records (failed checksums) among intact ones; \
             they were skipped, the {} blocks of the intact records recovered, and the \
             index rewritten without them",
            path.display(),
            rec.bad_records,
            rec.live.len()
        ));
    }
    if rec.torn_bytes > 0 {
        warnings.push(format!(
            "the index {} ended in {} bytes of an interrupted record; they were cut \
             off and the {} complete blocks before them recovered",
            path.display(),
            rec.torn_bytes,
            rec.live.len()
        ));
    }
    Ok(Recovered {
        index,
        geometry,
        recovered: rec.live.len() as u64,
        torn_bytes: rec.torn_bytes,
        bad_records: rec.bad_records,
        warnings,
    })
}
