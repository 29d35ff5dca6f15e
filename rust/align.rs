//! Alignment as types: [`Alignment`] is what direct I/O on one file needs,
//! discovered from the kernel, and [`AlignedBuf`] is memory that can only be
//! built aligned.
#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::os::fd::RawFd;
use std::ptr::NonNull;

use crate::error::{Error, Result};

/// Where the alignment numbers came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlignmentSource {
    /// `statx(STATX_DIOALIGN)`: the kernel's own answer for this file.
    Statx,
    /// The block device's logical block size from sysfs.
    LogicalBlockSize,
    /// Neither was available: the safe default, 4096.
    Default,
    /// Set by the caller.
    Override,
}

impl AlignmentSource {
    pub fn as_str(self) -> &'static str {
        match self {
            AlignmentSource::Statx => "statx",
            AlignmentSource::LogicalBlockSize => "logical_block_size",
            AlignmentSource::Default => "default",
            AlignmentSource::Override => "override",
        }
    }
}

/// Direct-I/O alignment of one file: buffer addresses must be multiples of
/// `mem`, file offsets and lengths multiples of `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    pub mem: usize,
    pub offset: usize,
    pub source: AlignmentSource,
}

/// The fallback when the kernel tells us nothing.
pub const DEFAULT_ALIGNMENT: usize = 4096;

impl Alignment {
    pub fn new(mem: usize, offset: usize, source: AlignmentSource) -> Result<Self> {
        for (name, v) in [("memory", mem), ("offset", offset)] {
            if v == 0 || !v.is_power_of_two() {
                return Err(Error::Alignment(format!(
                    "{name} alignment must be a power of two, got {v}"
                )));
            }
        }
        Ok(Alignment {
            mem,
            offset,
            source,
        })
    }

    /// Ask the kernel about the open file `fd` (on the device `dev`).
    /// Order: statx STATX_DIOALIGN, then the device's logical block size,
    /// then 4096.
    pub fn discover(fd: RawFd) -> Alignment {
        if let Some((mem, off)) = statx_dioalign(fd) {
            return Alignment {
                mem,
                offset: off,
                source: AlignmentSource::Statx,
            };
        }
        if let Some(lbs) = logical_block_size(fd) {
            return Alignment {
                mem: lbs,
                offset: lbs,
                source: AlignmentSource::LogicalBlockSize,
            };
        }
        Alignment {
            mem: DEFAULT_ALIGNMENT,
            offset: DEFAULT_ALIGNMENT,
            source: AlignmentSource::Default,
        }
    }

    /// Round `n` up to the offset alignment.
    pub fn round_up(&self, n: usize) -> usize {
        round_up(n, self.offset)
    }

    /// Round `n` up to the offset alignment; an error where that overflows.
    pub fn round_up_checked(&self, n: usize) -> Result<usize> {
        round_up_checked(n, self.offset)
    }
}

/// Round `n` up to a multiple of `align` (a power of two). The caller
/// guarantees no overflow (see [`round_up_checked`]).
pub const fn round_up(n: usize, align: usize) -> usize {
    (n + align - 1) & !(align - 1)
}

/// Round `n` up to a multiple of `align` (a power of two), refusing sizes
/// where that overflows.
pub fn round_up_checked(n: usize, align: usize) -> Result<usize> {
    n.checked_add(align - 1)
        .map(|v| v & !(align - 1))
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{n} bytes cannot be rounded up to a multiple of {align}: too large"
            ))
        })
}

/// `statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN)`. `None` when the kernel does
/// not answer (older than 6.1, or a filesystem that does not report it) or
/// answers 0 (direct I/O unsupported there).
pub fn statx_dioalign(fd: RawFd) -> Option<(usize, usize)> {
    // SAFETY: statx writes at most size_of::<statx>() bytes into `buf`, which
    // is zeroed and lives on our stack; the path is a valid NUL-terminated "".
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, NUL-terminated empty path, writable buffer.
    let rc = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut buf,
        )
    };
    if rc != 0 || buf.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let (mem, off) = (
        buf.stx_dio_mem_align as usize,
        buf.stx_dio_offset_align as usize,
    );
    if mem == 0 || off == 0 || !mem.is_power_of_two() || !off.is_power_of_two() {
        return None;
    }
    Some((mem, off))
}

/// The logical block size of the device holding `fd`, from
/// `/sys/dev/block/MAJ:MIN/queue/logical_block_size` (or the parent disk's
/// queue for a partition).
pub fn logical_block_size(fd: RawFd) -> Option<usize> {
    // SAFETY: fstat writes into the zeroed stat buffer on our stack.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a writable stat buffer on our stack.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    let (maj, min) = (libc::major(st.st_dev), libc::minor(st.st_dev));
    if maj == 0 {
        return None; // anonymous device: tmpfs, overlayfs, network fs ...
    }
    let base = format!("/sys/dev/block/{maj}:{min}");
    for p in [
        format!("{base}/queue/logical_block_size"),
        format!("{base}/../queue/logical_block_size"),
    ] {
        if let Ok(s) = std::fs::read_to_string(&p) {
            if let Ok(v) = s.trim().parse::<usize>() {
                if v.is_power_of_two() {
                    return Some(v);
                }
            }
        }
    }
    None
}

/// Heap memory whose address is a multiple of `align`, zero-initialised.
/// The only way to build one is through [`AlignedBuf::new`], so holding one
/// proves the alignment.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> Result<Self> {
        let layout = Layout::from_size_align(len.max(1), align.max(1)).map_err(|_| {
            Error::Alignment(format!("cannot allocate {len} bytes aligned to {align}"))
        })?;
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            Error::Capacity(format!("out of memory allocating {len} aligned bytes"))
        })?;
        Ok(AlignedBuf { ptr, len, layout })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    #[cfg(test)]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Is `ptr` a multiple of `align`?
pub fn is_aligned(ptr: *const u8, align: usize) -> bool {
    (ptr as usize) & (align - 1) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_up_is_smallest_multiple(n in 0usize..1 << 40, shift in 0u32..22) {
            let a = 1usize << shift;
            let r = round_up(n, a);
            prop_assert!(r >= n);
            prop_assert_eq!(r % a, 0);
            prop_assert!(r - n < a);
        }

        #[test]
        fn aligned_buf_is_aligned(len in 0usize..100_000, shift in 0u32..22) {
            let a = 1usize << shift;
            let b = AlignedBuf::new(len, a).unwrap();
            prop_assert!(is_aligned(b.as_ptr(), a));
            prop_assert_eq!(b.len(), len);
            prop_assert!(b.as_slice().iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn alignment_rejects_non_powers_of_two() {
        assert!(Alignment::new(3, 512, AlignmentSource::Override).is_err());
        assert!(Alignment::new(512, 0, AlignmentSource::Override).is_err());
        assert!(Alignment::new(512, 4096, AlignmentSource::Override).is_ok());
    }

    #[test]
    fn discover_on_a_real_file() {
        let f = tempfile::tempfile().unwrap();
        use std::os::fd::AsRawFd;
        let a = Alignment::discover(f.as_raw_fd());
        assert!(a.mem.is_power_of_two() && a.offset.is_power_of_two());
        assert!(a.offset <= 65536);
    }
}

/// A tier's slots, as both tiers (and their bindings) report them: how many,
/// the block each holds, and the distance between slot starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotLayout {
    pub num_blocks: u64,
    pub block_size: usize,
    pub stride: usize,
}
