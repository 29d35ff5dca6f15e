//! NUMA topology from sysfs, memory-policy syscalls and CPU affinity.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};

pub const MPOL_PREFERRED: i32 = 1;
pub const MPOL_BIND: i32 = 2;

/// The largest CPU or node id a list may name: far above any kernel's
/// limit (CONFIG_NR_CPUS is at most 8192), so a malformed list with a huge
/// range is an error instead of an allocation of billions of ids.
pub const MAX_LIST_ID: usize = 1 << 16;

/// Parse a kernel CPU/node list such as `0-3,8,10-11`. Empty text is empty.
pub fn parse_list(text: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in text
        .trim()
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let bad = || Error::InvalidArgument(format!("not a CPU/node list: {text:?}"));
        let too_big = |v: usize| {
            Error::InvalidArgument(format!(
                "CPU/node list {:?} names id {v}, above the largest possible ({MAX_LIST_ID}): \
                 the list is malformed",
                text.chars().take(80).collect::<String>()
            ))
        };
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (usize, usize) =
                (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if b < a {
                return Err(bad());
            }
            if b > MAX_LIST_ID {
                return Err(too_big(b));
            }
            out.extend(a..=b);
        } else {
            let v: usize = part.parse().map_err(|_| bad())?;
            if v > MAX_LIST_ID {
                return Err(too_big(v));
            }
            out.push(v);
        }
    }
    Ok(out)
}

/// Nodes that are online and have memory (`/sys/devices/system/node`). A
/// list that cannot be parsed is an error naming the file.
pub fn memory_nodes(sysfs: &Path) -> Result<Vec<usize>> {
    let base = sysfs.join("devices/system/node");
    for f in ["has_memory", "online"] {
        if let Ok(t) = std::fs::read_to_string(base.join(f)) {
            return parse_list(&t)
                .map_err(|e| Error::Numa(format!("{}: {e}", base.join(f).display())));
        }
    }
    // No NUMA support in the kernel: one node, 0.
    Ok(vec![0])
}

/// CPUs of a node, from sysfs.
pub fn node_cpus(sysfs: &Path, node: usize) -> Vec<usize> {
    let p = sysfs.join(format!("devices/system/node/node{node}/cpulist"));
    std::fs::read_to_string(p)
        .ok()
        .and_then(|t| parse_list(&t).ok())
        .unwrap_or_default()
}

/// CPUs this thread may run on (`sched_getaffinity`).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` is a writable cpu_set_t of `size` bytes on our stack.
    let rc = unsafe { libc::sched_getaffinity(0, size, &mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: i < CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// Pin the calling thread to one CPU.
pub fn pin_thread_to(cpu: usize) -> bool {
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu < CPU_SETSIZE (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t; 0 means the calling thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
}

fn nodemask(node: usize) -> (Vec<libc::c_ulong>, libc::c_ulong) {
    let bits = libc::c_ulong::BITS as usize;
    let words = node / bits + 1;
    let mut mask = vec![0 as libc::c_ulong; words];
    mask[node / bits] |= 1 << (node % bits);
    // maxnode: the kernel reads maxnode-1 bits; pass one word more than needed.
    (mask, (words * bits + 1) as libc::c_ulong)
}

/// `mbind(addr, len, mode, {node})`. Returns the errno on failure.
///
/// # Safety
/// `addr..addr+len` must be a mapping owned by the caller.
pub unsafe fn mbind(
    addr: *mut u8,
    len: usize,
    mode: i32,
    node: usize,
) -> std::result::Result<(), i32> {
    let (mask, maxnode) = nodemask(node);
    // SAFETY: the mapping is the caller's; mask lives across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as libc::c_ulong,
            len as libc::c_ulong,
            mode as libc::c_ulong,
            mask.as_ptr(),
            maxnode,
            0 as libc::c_ulong,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// Ask the kernel where each page of `addr..addr+len` lives
/// (`move_pages` with no target nodes). Returns pages per node; pages that
/// are not resident are counted under -1 (and other per-page errors under
/// their negative errno).
///
/// # Safety
/// `addr..addr+len` must be a mapping owned by the caller.
pub unsafe fn placement(addr: *const u8, len: usize, page: usize) -> Result<BTreeMap<i64, u64>> {
    let mut out = BTreeMap::new();
    let npages = len.div_ceil(page);
    const CHUNK: usize = 1 << 16;
    let mut ptrs: Vec<*const libc::c_void> = Vec::with_capacity(CHUNK.min(npages));
    let mut status: Vec<libc::c_int> = vec![0; CHUNK.min(npages)];
    let mut start = 0usize;
    while start < npages {
        let n = CHUNK.min(npages - start);
        ptrs.clear();
        for i in 0..n {
            // SAFETY: the page lies inside the caller's mapping.
            ptrs.push(unsafe { addr.add((start + i) * page) }.cast());
        }
        // SAFETY: ptrs and status hold n entries; nodes = NULL only queries.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_move_pages,
                0 as libc::c_long,
                n as libc::c_ulong,
                ptrs.as_ptr(),
                std::ptr::null::<libc::c_int>(),
                status.as_mut_ptr(),
                0 as libc::c_int,
            )
        };
        if rc < 0 {
            return Err(Error::Numa(format!(
                "move_pages (query) failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        for &s in &status[..n] {
            let key = if s == -libc::ENOENT || s == -libc::EFAULT {
                -1
            } else {
                s as i64
            };
            *out.entry(key).or_insert(0) += 1;
        }
        start += n;
    }
    Ok(out)
}

/// Does the effective capability set hold `cap` (from /proc/self/status)?
pub fn has_capability(cap: u32) -> bool {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .map(|bits| bits & (1u64 << cap) != 0)
        .unwrap_or(false)
}

pub const CAP_IPC_LOCK: u32 = 14;

/// `RLIMIT_MEMLOCK` (soft, hard); `u64::MAX` means unlimited.
pub fn memlock_limit() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills r.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return (0, 0);
    }
    let conv = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            u64::MAX
        } else {
            v
        }
    };
    (conv(r.rlim_cur), conv(r.rlim_max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists() {
        assert_eq!(
            parse_list("0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_list("").unwrap(), Vec::<usize>::new());
        assert!(parse_list("3-1").is_err());
        assert!(parse_list("a").is_err());
        assert!(parse_list("0-4000000000").is_err());
        assert!(parse_list("99999999999").is_err());
        assert_eq!(parse_list("65536").unwrap(), vec![65536]);
    }

    #[test]
    fn this_machine_has_node_0_and_cpus() {
        let nodes = memory_nodes(Path::new("/sys")).unwrap();
        assert!(nodes.contains(&0));
        assert!(!allowed_cpus().is_empty());
    }
}
