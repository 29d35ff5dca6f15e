//! Every setting of the tiers and the manager: declared, defaulted and
//! validated here, once. The Python layer (`dynblock.Config`, the tier
//! classes) takes its defaults from [`DEFAULTS`] and its checks from
//! [`check_int`] through the bindings, so a value gets the same message
//! wherever it is given.

use crate::error::{Error, Result};

/// Whether to use O_DIRECT. Python: `True`, `False` or `"require"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ODirect {
    /// Buffered I/O only.
    Off,
    /// O_DIRECT, falling back to buffered I/O where the filesystem refuses.
    Auto,
    /// O_DIRECT or an error.
    Require,
}

/// Whether to `mlock` the host tier. Python: `True`, `False` or `"require"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    Off,
    Auto,
    Require,
}

/// How to reserve the disk file's space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prealloc {
    /// `fallocate`, else zero-fill with aligned writes.
    Auto,
    /// `fallocate`, else a sparse file (a warning says ENOSPC may come later).
    SparseFallback,
    /// Always zero-fill (no `fallocate`).
    Zero,
    /// Reserve nothing: a sparse file (a warning says ENOSPC may come later).
    Sparse,
}

impl Prealloc {
    pub const NAMES: [&'static str; 4] = ["auto", "zero", "sparse-fallback", "sparse"];

    pub fn parse(v: &str) -> Result<Self> {
        Ok(match v {
            "auto" => Prealloc::Auto,
            "zero" => Prealloc::Zero,
            "sparse-fallback" => Prealloc::SparseFallback,
            "sparse" => Prealloc::Sparse,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "preallocate must be one of \"auto\", \"zero\", \"sparse-fallback\", \
                     \"sparse\", got {other:?}"
                )))
            }
        })
    }
}

/// When a persistent store's writes are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Survive the death of the process (the default).
    Process,
    /// Also survive power loss: fdatasync data, then index, every batch.
    Sync,
}

impl Durability {
    pub fn parse(v: &str) -> Result<Self> {
        match v {
            "process" => Ok(Durability::Process),
            "sync" => Ok(Durability::Sync),
            other => Err(Error::InvalidArgument(format!(
                "durability must be \"process\" or \"sync\", got {other:?}"
            ))),
        }
    }
}

/// How `put` reaches the remote tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteWrite {
    /// Queued and written by a background thread; the caller never waits.
    Async,
    /// Written before `put` returns.
    Sync,
    /// Never written (the remote is read only).
    Off,
}

impl RemoteWrite {
    pub fn parse(v: &str) -> Result<Self> {
        match v {
            "async" => Ok(RemoteWrite::Async),
            "sync" => Ok(RemoteWrite::Sync),
            "off" => Ok(RemoteWrite::Off),
            other => Err(Error::InvalidArgument(format!(
                "remote_write must be \"async\", \"sync\" or \"off\", got {other:?}"
            ))),
        }
    }
}

/// Which engine runs the disk tier's direct I/O batches (`disk_engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskEngine {
    /// io_uring where the kernel allows it, the worker pool otherwise.
    #[default]
    Auto,
    /// The worker pool: `io_depth` threads, one blocking call each.
    Threads,
    /// io_uring, or an error at open where the kernel refuses it.
    IoUring,
}

impl DiskEngine {
    pub const NAMES: [&'static str; 3] = ["auto", "threads", "io_uring"];

    pub fn parse(v: &str) -> Result<Self> {
        match v {
            "auto" => Ok(DiskEngine::Auto),
            "threads" => Ok(DiskEngine::Threads),
            "io_uring" => Ok(DiskEngine::IoUring),
            other => Err(Error::InvalidArgument(format!(
                "disk_engine must be \"auto\", \"threads\" or \"io_uring\", got {other:?}"
            ))),
        }
    }
}

/// Which blocks leaving the host tier get a disk copy
/// (`disk_admission`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DiskAdmission {
    /// Every host victim without a disk copy is written to disk.
    #[default]
    All,
    /// Only a victim asked for again while in the host tier (a hit, a
    /// `touch`, a `put` of it), or one turned away before and put again
    /// (its second sighting): the rest leave without a disk write, counted
    /// as `disk_not_admitted`.
    Reuse,
}

impl DiskAdmission {
    pub const NAMES: [&'static str; 2] = ["all", "reuse"];

    pub fn parse(v: &str) -> Result<Self> {
        match v {
            "all" => Ok(DiskAdmission::All),
            "reuse" => Ok(DiskAdmission::Reuse),
            other => Err(Error::InvalidArgument(format!(
                "disk_admission must be \"all\" or \"reuse\", got {other:?}"
            ))),
        }
    }
}

/// How a tier chooses the block it gives up when it needs a slot
/// (`host_eviction`, `disk_eviction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Eviction {
    /// The least recently used block (a hit, a `touch` or a `put` of a
    /// stored block makes it the most recent).
    #[default]
    Lru,
    /// S3-FIFO: new blocks enter a small FIFO queue and leave it unless
    /// asked for again while in it (then they move to the main FIFO queue);
    /// the main queue gives a block asked for since its last pass another
    /// pass; a block put again soon after leaving the small queue (a ghost
    /// of those is kept) goes straight to the main queue. One-off blocks
    /// (scans, documents read once) leave early without pushing out blocks
    /// that are asked for again.
    S3Fifo,
}

impl Eviction {
    pub const NAMES: [&'static str; 2] = ["lru", "s3fifo"];

    /// `what`: the setting's name, for the error.
    pub fn parse(v: &str, what: &str) -> Result<Self> {
        match v {
            "lru" => Ok(Eviction::Lru),
            "s3fifo" => Ok(Eviction::S3Fifo),
            other => Err(Error::InvalidArgument(format!(
                "{what} must be \"lru\" or \"s3fifo\", got {other:?}"
            ))),
        }
    }
}

/// Bounds of the integer settings: (name, minimum, maximum, default).
/// `None` as default: no default (must be given) or "unset".
pub struct IntSetting {
    pub name: &'static str,
    pub min: u64,
    pub max: u64,
    pub default: Option<u64>,
    pub what: &'static str,
}

/// Largest block: 4 GiB (a 512-token block of a 70B model in fp16 is
/// ~160 MiB; anything near this is a unit mistake).
pub const MAX_BLOCK_SIZE: u64 = 1 << 32;
/// Largest tier in blocks (slot ids are 32-bit in the registry and index).
pub const MAX_TIER_BLOCKS: u64 = u32::MAX as u64 - 2;
/// Largest tier in bytes: 1 PiB.
pub const MAX_TIER_BYTES: u64 = 1 << 50;

pub const INTS: &[IntSetting] = &[
    IntSetting {
        name: "block_size",
        min: 1,
        max: MAX_BLOCK_SIZE,
        default: None,
        what: "bytes per block",
    },
    IntSetting {
        name: "host_blocks",
        min: 0,
        max: MAX_TIER_BLOCKS,
        default: None,
        what: "blocks in the host tier (0: no host tier)",
    },
    IntSetting {
        name: "disk_blocks",
        min: 0,
        max: MAX_TIER_BLOCKS,
        default: None,
        what: "blocks in the disk tier (0: no disk tier)",
    },
    IntSetting {
        name: "host_bytes",
        min: 0,
        max: MAX_TIER_BYTES,
        default: None,
        what: "bytes of host tier",
    },
    IntSetting {
        name: "disk_bytes",
        min: 0,
        max: MAX_TIER_BYTES,
        default: None,
        what: "bytes of disk tier",
    },
    IntSetting {
        name: "num_blocks",
        min: 1,
        max: MAX_TIER_BLOCKS,
        default: None,
        what: "slots in the tier",
    },
    IntSetting {
        name: "io_depth",
        min: 1,
        max: 1024,
        default: None,
        what: "disk I/Os in flight per batch (None: from the block size and the device)",
    },
    IntSetting {
        name: "max_io_bytes",
        min: 1,
        max: 1 << 30,
        default: Some(4 << 20),
        what:
            "largest single disk I/O after coalescing (one slot is always one I/O, however large)",
    },
    IntSetting {
        name: "numa_node",
        min: 0,
        max: 1023,
        default: None,
        what: "NUMA node of the host tier",
    },
    IntSetting {
        name: "gpu",
        min: 0,
        max: 1023,
        default: None,
        what: "CUDA device ordinal",
    },
    IntSetting {
        name: "populate_threads",
        min: 0,
        max: 4096,
        default: Some(0),
        what: "threads that populate the host tier (0: one per CPU of the node)",
    },
    IntSetting {
        name: "copy_threads",
        min: 0,
        max: 4096,
        default: Some(0),
        what: "threads for host copies (0: one per allowed CPU)",
    },
    IntSetting {
        name: "worker_nice",
        min: 0,
        max: 19,
        default: Some(5),
        what: "nice value of dynblock's worker threads",
    },
    IntSetting {
        name: "remote_timeout_ms",
        min: 1,
        max: 600_000,
        default: Some(200),
        what: "milliseconds the remote work of one call may take",
    },
    IntSetting {
        name: "remote_ttl_s",
        min: 1,
        max: 10 * 365 * 24 * 3600,
        default: None,
        what: "seconds a remote value lives; None: no expiry",
    },
    IntSetting {
        name: "remote_queue_bytes",
        min: 1 << 20,
        max: 1 << 40,
        default: Some(256 << 20),
        what: "bytes of blocks queued for the remote tier's background writer",
    },
    IntSetting {
        name: "remote_check_threads",
        min: 0,
        max: 64,
        default: None,
        what: "threads that compute or check remote values' checksums or MACs beside a \
               transfer; None: automatic",
    },
    IntSetting {
        name: "alignment",
        min: 64,
        max: 1 << 30,
        default: Some(4096),
        what: "host slot alignment, a power of two",
    },
];

/// Defaults of the settings that are not integers (Python names and values).
pub const DEFAULT_O_DIRECT: bool = true;
pub const DEFAULT_PIN: bool = true;
pub const DEFAULT_PREALLOCATE: &str = "auto";
pub const DEFAULT_DURABILITY: &str = "process";
pub const DEFAULT_CHECKSUMS: bool = true;
pub const DEFAULT_WRITE_THROUGH: bool = false;
pub const DEFAULT_WRITE_BEHIND: bool = true;
pub const DEFAULT_DISK_ADMISSION: &str = "all";
pub const DEFAULT_DISK_ENGINE: &str = "auto";
pub const DEFAULT_EVICTION: &str = "lru";
pub const DEFAULT_PERSIST: bool = false;
pub const DEFAULT_HUGE_PAGES: bool = true;
pub const DEFAULT_REMOTE_PREFIX: &str = "dynblock";
pub const DEFAULT_REMOTE_WRITE: &str = "async";

/// How an environment variable's text becomes a value of its field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvForm {
    /// A whole number in plain ASCII decimal digits.
    Int,
    /// An integer, or `auto`.
    IntOrAuto,
    /// `1/true/yes/on` or `0/false/no/off`.
    Bool,
    /// Text (surrounding spaces removed; empty is refused).
    Str,
    /// One of the listed words (case-insensitive).
    Choice(&'static [&'static str]),
    /// Decimal gigabytes (Dynamo's unit): the field gets `GB * 10**9` bytes.
    DecimalGb,
    /// A switch that turns the field off (`o_direct=False`,
    /// `numa_node=None`) when true and leaves it alone when false.
    Disables,
    /// Dynamo's zero-fill switch: true is `preallocate="auto"`, false
    /// `"sparse-fallback"`.
    ZeroFill,
    /// Seconds, 0 meaning "none" (`remote_ttl_s=None`).
    SecondsOrNone,
}

/// One environment variable and the field it sets.
pub struct EnvVar {
    pub var: &'static str,
    pub field: &'static str,
    pub form: EnvForm,
    /// What it means, for the docs table.
    pub meaning: &'static str,
}

/// One setting's environment variables, highest precedence first: the
/// first one set decides (every one set is still parsed, so a bad value is
/// refused even where another one wins). Groups apply in the order of
/// [`ENV`]; a later group overrides an earlier one of the same field (a
/// switch that disables NUMA binding wins over a node number).
pub struct EnvGroup {
    pub vars: &'static [EnvVar],
    /// The standalone tier classes (`DiskStorage`, `HostStorage`) honour it
    /// too, not only `Config.from_env`.
    pub tiers: bool,
}

const fn var(
    var: &'static str,
    field: &'static str,
    form: EnvForm,
    meaning: &'static str,
) -> EnvVar {
    EnvVar {
        var,
        field,
        form,
        meaning,
    }
}

const fn group(vars: &'static [EnvVar]) -> EnvGroup {
    EnvGroup { vars, tiers: false }
}

/// Every environment variable dynblock reads, and only here: `Config.from_env`
/// and its docs table follow from this list. Dynamo's names (`DYN_*`) are
/// read so a deployment can switch without rewriting its environment; ours
/// win over theirs, whatever unit they use.
pub const ENV: &[EnvGroup] = &[
    group(&[var(
        "DYNBLOCK_BLOCK_SIZE",
        "block_size",
        EnvForm::Int,
        "block_size in bytes",
    )]),
    group(&[
        var(
            "DYNBLOCK_HOST_BLOCKS",
            "host_blocks",
            EnvForm::Int,
            "host_blocks",
        ),
        var(
            "DYNBLOCK_HOST_BYTES",
            "host_bytes",
            EnvForm::Int,
            "host_bytes",
        ),
        var(
            "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS",
            "host_blocks",
            EnvForm::Int,
            "host_blocks",
        ),
        var(
            "DYN_KVBM_CPU_CACHE_GB",
            "host_bytes",
            EnvForm::DecimalGb,
            "host_bytes = GB * 10**9",
        ),
    ]),
    group(&[
        var(
            "DYNBLOCK_DISK_BLOCKS",
            "disk_blocks",
            EnvForm::Int,
            "disk_blocks",
        ),
        var(
            "DYNBLOCK_DISK_BYTES",
            "disk_bytes",
            EnvForm::Int,
            "disk_bytes",
        ),
        var(
            "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS",
            "disk_blocks",
            EnvForm::Int,
            "disk_blocks",
        ),
        var(
            "DYN_KVBM_DISK_CACHE_GB",
            "disk_bytes",
            EnvForm::DecimalGb,
            "disk_bytes = GB * 10**9",
        ),
    ]),
    group(&[
        var("DYNBLOCK_DISK_DIR", "disk_dir", EnvForm::Str, "disk_dir"),
        var(
            "DYN_KVBM_DISK_CACHE_DIR",
            "disk_dir",
            EnvForm::Str,
            "disk_dir",
        ),
    ]),
    EnvGroup {
        vars: &[
            var(
                "DYNBLOCK_DISABLE_O_DIRECT",
                "o_direct",
                EnvForm::Disables,
                "true: o_direct=False",
            ),
            var(
                "DYN_KVBM_DISK_DISABLE_O_DIRECT",
                "o_direct",
                EnvForm::Disables,
                "true: o_direct=False",
            ),
        ],
        tiers: true,
    },
    group(&[var(
        "DYN_KVBM_DISK_ZEROFILL_FALLBACK",
        "preallocate",
        EnvForm::ZeroFill,
        "true: preallocate=\"auto\"; false: \"sparse-fallback\"",
    )]),
    group(&[var(
        "DYNBLOCK_NUMA_NODE",
        "numa_node",
        EnvForm::IntOrAuto,
        "numa_node (an integer or auto)",
    )]),
    EnvGroup {
        vars: &[
            var(
                "DYNBLOCK_DISABLE_NUMA",
                "numa_node",
                EnvForm::Disables,
                "true: numa_node=None",
            ),
            var(
                "DYN_MEMORY_DISABLE_NUMA",
                "numa_node",
                EnvForm::Disables,
                "true: numa_node=None",
            ),
        ],
        tiers: true,
    },
    group(&[var(
        "DYNBLOCK_GPU",
        "gpu",
        EnvForm::Int,
        "gpu (CUDA ordinal)",
    )]),
    group(&[var("DYNBLOCK_PIN", "pin", EnvForm::Bool, "pin")]),
    group(&[var(
        "DYNBLOCK_IO_DEPTH",
        "io_depth",
        EnvForm::Int,
        "io_depth",
    )]),
    group(&[var(
        "DYNBLOCK_WORKER_NICE",
        "worker_nice",
        EnvForm::Int,
        "worker_nice (0-19)",
    )]),
    group(&[var(
        "DYNBLOCK_DISK_PATH",
        "disk_path",
        EnvForm::Str,
        "disk_path (a persistent store's file)",
    )]),
    group(&[var("DYNBLOCK_PERSIST", "persist", EnvForm::Bool, "persist")]),
    group(&[var(
        "DYNBLOCK_DURABILITY",
        "durability",
        EnvForm::Choice(&["process", "sync"]),
        "durability",
    )]),
    group(&[var(
        "DYNBLOCK_WRITE_THROUGH",
        "write_through",
        EnvForm::Bool,
        "write_through",
    )]),
    group(&[var(
        "DYNBLOCK_WRITE_BEHIND",
        "write_behind",
        EnvForm::Bool,
        "write_behind",
    )]),
    group(&[var(
        "DYNBLOCK_DISK_ENGINE",
        "disk_engine",
        EnvForm::Choice(&DiskEngine::NAMES),
        "disk_engine",
    )]),
    group(&[var(
        "DYNBLOCK_DISK_ADMISSION",
        "disk_admission",
        EnvForm::Choice(&DiskAdmission::NAMES),
        "disk_admission",
    )]),
    group(&[var(
        "DYNBLOCK_HOST_EVICTION",
        "host_eviction",
        EnvForm::Choice(&Eviction::NAMES),
        "host_eviction",
    )]),
    group(&[var(
        "DYNBLOCK_DISK_EVICTION",
        "disk_eviction",
        EnvForm::Choice(&Eviction::NAMES),
        "disk_eviction",
    )]),
    group(&[var(
        "DYNBLOCK_CHECKSUMS",
        "checksums",
        EnvForm::Bool,
        "checksums",
    )]),
    group(&[var(
        "DYNBLOCK_REMOTE_URL",
        "remote",
        EnvForm::Str,
        "remote (redis://, rediss://, redis+cluster:// URL)",
    )]),
    group(&[var(
        "DYNBLOCK_REMOTE_PREFIX",
        "remote_prefix",
        EnvForm::Str,
        "remote_prefix",
    )]),
    group(&[var(
        "DYNBLOCK_REMOTE_TTL_S",
        "remote_ttl_s",
        EnvForm::SecondsOrNone,
        "remote_ttl_s (seconds; 0: no expiry)",
    )]),
    group(&[var(
        "DYNBLOCK_REMOTE_TIMEOUT_MS",
        "remote_timeout_ms",
        EnvForm::Int,
        "remote_timeout_ms",
    )]),
    group(&[var(
        "DYNBLOCK_REMOTE_WRITE",
        "remote_write",
        EnvForm::Choice(&["async", "sync", "off"]),
        "remote_write",
    )]),
    group(&[var(
        "DYNBLOCK_REMOTE_CA_FILE",
        "remote_ca_file",
        EnvForm::Str,
        "remote_ca_file",
    )]),
    group(&[var(
        "DYNBLOCK_REMOTE_SECRET",
        "remote_secret",
        EnvForm::Str,
        "remote_secret (values carry a keyed MAC)",
    )]),
    group(&[var(
        "DYNBLOCK_REMOTE_QUEUE_BYTES",
        "remote_queue_bytes",
        EnvForm::Int,
        "remote_queue_bytes (the background writer's queue)",
    )]),
    group(&[var(
        "DYNBLOCK_REMOTE_CHECK_THREADS",
        "remote_check_threads",
        EnvForm::Int,
        "remote_check_threads (unset: automatic)",
    )]),
];

fn int_setting(name: &str) -> &'static IntSetting {
    INTS.iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no integer setting named {name}"))
}

/// The default of an integer setting.
pub fn default_int(name: &str) -> u64 {
    int_setting(name)
        .default
        .unwrap_or_else(|| panic!("{name} has no default"))
}

/// Disk I/Os in flight per batch when `io_depth` is not given: enough to
/// keep a few MiB moving, since small blocks need more of them to reach the
/// device's speed, and no more than the device queues (`queue/nr_requests`,
/// when known). On an io_uring ring (`ring`) an operation in flight costs
/// no thread: 4 MiB, 16 to 64. On the worker pool each is a thread: 2 MiB,
/// 16 to 32. (The bench's disk workload, 64 KiB random writes: 16 in flight
/// reached 0.8x of fio's best depth, 32-64 parity.)
pub fn auto_io_depth(block_size: usize, ring: bool, device_queue: Option<usize>) -> usize {
    let bs = block_size.max(1);
    let want = if ring {
        ((4usize << 20) / bs).clamp(16, 64)
    } else {
        ((2usize << 20) / bs).clamp(16, 32)
    };
    match device_queue {
        Some(q) if q > 0 => want.min(q),
        _ => want,
    }
}

/// The one message for an integer setting out of its bounds (`shown`: the
/// value as the caller gave it, which may not fit a `u64`).
pub fn out_of_range(name: &str, shown: &str) -> Error {
    let s = int_setting(name);
    Error::InvalidArgument(format!(
        "{name} ({}) must be between {} and {}, got {shown}",
        s.what, s.min, s.max
    ))
}

/// Check an integer setting against its bounds.
pub fn check_int(name: &str, v: u64) -> Result<u64> {
    let s = int_setting(name);
    if v < s.min || v > s.max {
        return Err(out_of_range(name, &v.to_string()));
    }
    if name == "alignment" && !v.is_power_of_two() {
        return Err(Error::Alignment(format!(
            "alignment ({}) must be a power of two, got {v}",
            s.what
        )));
    }
    Ok(v)
}

/// `check_int` for a value already in a `usize`.
pub fn check_usize(name: &str, v: usize) -> Result<usize> {
    check_int(name, v as u64).map(|v| v as usize)
}

/// A tier's size: `num_blocks` slots of `block_size` bytes, each checked,
/// and their product (with `stride` per slot) representable.
pub fn check_tier(num_blocks: u64, block_size: usize, stride: usize) -> Result<u64> {
    check_int("num_blocks", num_blocks)?;
    check_int("block_size", block_size as u64)?;
    (stride as u64)
        .checked_mul(num_blocks)
        .filter(|&b| b <= isize::MAX as u64)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "num_blocks * slot size is too large: {num_blocks} * {stride} bytes"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_message_per_setting() {
        let e = check_int("io_depth", 0).unwrap_err().to_string();
        assert!(
            e.starts_with("io_depth") && e.contains("between 1 and 1024"),
            "{e}"
        );
        assert_eq!(check_int("io_depth", 1024).unwrap(), 1024);
        assert!(check_int("io_depth", 5000).is_err());
        assert!(check_int("block_size", u64::MAX).is_err());
        assert!(check_int("alignment", 96).is_err());
        assert_eq!(auto_io_depth(64 << 10, true, None), 64);
        assert_eq!(auto_io_depth(64 << 10, false, None), 32);
        assert_eq!(auto_io_depth(256 << 10, true, None), 16);
        assert_eq!(auto_io_depth(2 << 20, true, None), 16);
        assert_eq!(auto_io_depth(2 << 20, false, None), 16);
        assert_eq!(auto_io_depth(4096, true, Some(8)), 8);
        assert_eq!(auto_io_depth(4096, false, Some(0)), 32);
        assert!(check_tier(3, 4096, 4096).is_ok());
        assert!(check_tier(MAX_TIER_BLOCKS, 1 << 32, 1 << 32).is_err());
    }

    #[test]
    fn every_variable_is_listed_once_and_sets_a_known_field() {
        let mut seen = std::collections::HashSet::new();
        for g in ENV {
            assert!(!g.vars.is_empty());
            for v in g.vars {
                assert!(seen.insert(v.var), "{} listed twice", v.var);
                assert!(v.var.starts_with("DYNBLOCK_") || v.var.starts_with("DYN_"));
                // Integer fields are bounded by their row of INTS.
                if v.form == EnvForm::Int {
                    assert!(INTS.iter().any(|s| s.name == v.field), "{}", v.field);
                }
            }
        }
    }

    #[test]
    fn names_parse() {
        assert_eq!(Prealloc::parse("sparse").unwrap(), Prealloc::Sparse);
        assert!(Prealloc::parse("lots").is_err());
        assert_eq!(Durability::parse("sync").unwrap(), Durability::Sync);
        assert_eq!(DiskAdmission::parse("reuse").unwrap(), DiskAdmission::Reuse);
        assert!(DiskAdmission::parse("second-hit").is_err());
        assert_eq!(DiskEngine::parse("io_uring").unwrap(), DiskEngine::IoUring);
        let e = DiskEngine::parse("aio").unwrap_err().to_string();
        assert!(
            e.starts_with("disk_engine must be") && e.contains("\"aio\""),
            "{e}"
        );
        assert_eq!(
            Eviction::parse("s3fifo", "host_eviction").unwrap(),
            Eviction::S3Fifo
        );
        let e = Eviction::parse("arc", "disk_eviction")
            .unwrap_err()
            .to_string();
        assert!(e.contains("disk_eviction") && e.contains("\"arc\""), "{e}");
        assert!(Durability::parse("SYNC").is_err());
    }
}
