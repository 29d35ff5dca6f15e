//! Unit tests of the block manager on real tiers (a host tier and a disk tier
//! in a temporary directory).
use super::*;
use crate::disk::DiskOptions;
use crate::host::{HostOptions, Pin};

/// Keys of `hashes` in the shared namespace.
fn k(hashes: &[u64]) -> Keys<'_> {
    Keys::shared(hashes)
}

/// `lru_order` as bare hashes.
fn lru(m: &BlockManager) -> (Vec<u64>, Vec<u64>) {
    let (h, d) = m.lru_order().unwrap();
    let bare = |v: Vec<Key>| -> Vec<u64> { v.into_iter().map(|k| k.hash).collect() };
    (bare(h), bare(d))
}

fn mgr(host: u64, disk: u64, bs: usize, dir: &std::path::Path) -> BlockManager {
    let h = (host > 0).then(|| {
        Arc::new(
            HostStorage::new(
                host,
                bs,
                &HostOptions {
                    pin: Pin::Off,
                    ..Default::default()
                },
            )
            .unwrap(),
        )
    });
    let d = (disk > 0)
        .then(|| Arc::new(DiskStorage::open(dir, disk, bs, &DiskOptions::default()).unwrap()));
    BlockManager::new(
        bs,
        h,
        d,
        ManagerOptions {
            checksums: true,
            ..Default::default()
        },
    )
    .unwrap()
}

fn block(h: u64, bs: usize) -> Vec<u8> {
    (0..bs).map(|i| (h as usize * 131 + i) as u8).collect()
}

#[test]
fn leased_blocks_are_never_evicted_and_a_full_pinned_tier_rejects() {
    let dir = tempfile::tempdir().unwrap();
    let bs = 4096;
    let m = mgr(2, 0, bs, dir.path()); // host only, 2 slots
    m.put(&[1, 2], &[block(1, bs), block(2, bs)].concat())
        .unwrap();
    let (lease, n) = m.lookup(k(&[1, 9]), None).unwrap();
    assert_eq!(n, 1);
    // 1 is pinned: new blocks evict 2, then each other, never 1.
    for h in 10..20u64 {
        assert_eq!(m.put(&[h], &block(h, bs)).unwrap(), 1);
    }
    let (lease2, n2) = m.lookup(k(&[19]), None).unwrap();
    assert_eq!(n2, 1);
    // Both slots pinned: a new block is rejected, counted, not an error.
    assert_eq!(m.put(&[30], &block(30, bs)).unwrap(), 0);
    let (s, _) = m.stats().unwrap();
    assert_eq!((s.rejected_full, s.leases), (1, 2));
    let mut out = vec![0u8; bs];
    assert_eq!(m.get_lease_into(lease, &mut out).unwrap(), 1);
    assert_eq!(out, block(1, bs));
    assert!(m.release_lease(lease2));
    assert!(!m.release_lease(lease2)); // once
    assert!(m.get_lease_into(lease, &mut out).is_err()); // used
    assert_eq!(m.put(&[30], &block(30, bs)).unwrap(), 1); // room again
}

#[test]
fn a_block_removed_while_leased_frees_its_slot_at_release() {
    let dir = tempfile::tempdir().unwrap();
    let bs = 4096;
    let m = mgr(2, 0, bs, dir.path());
    m.put(&[1, 2], &[block(1, bs), block(2, bs)].concat())
        .unwrap();
    let (lease, _) = m.lookup(k(&[1, 2]), None).unwrap();
    assert_eq!(m.remove(k(&[1])).unwrap(), 1);
    m.clear().unwrap();
    // Both slots still leased: nothing fits.
    assert_eq!(m.put(&[5], &block(5, bs)).unwrap(), 0);
    let mut out = vec![0u8; 2 * bs];
    assert_eq!(m.get_lease_into(lease, &mut out).unwrap(), 0);
    assert_eq!(
        m.put(&[5, 6], &[block(5, bs), block(6, bs)].concat())
            .unwrap(),
        2
    );
}

#[test]
fn a_batch_never_evicts_its_own_stored_blocks() {
    // Disk-only, 2 slots holding [1, 2]: put([3, 1]) refreshes 1, and 3
    // evicts the LRU block 2. One new block.
    let dir = tempfile::tempdir().unwrap();
    let bs = 4096;
    let m = mgr(0, 2, bs, dir.path());
    m.put(&[1, 2], &[block(1, bs), block(2, bs)].concat())
        .unwrap();
    let n = m
        .put(&[3, 1], &[block(3, bs), block(1, bs)].concat())
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(lru(&m).1, vec![3, 1]); // the batch order is the recency order
    let mut one = vec![0u8; bs];
    assert_eq!(m.get(k(&[1]), &mut one).unwrap(), 1);
    assert_eq!(one, block(1, bs));
}

#[test]
fn offload_and_onboard_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let bs = 4096;
    let m = mgr(2, 4, bs, dir.path());
    for h in 0..5u64 {
        assert_eq!(m.put(&[h], &block(h, bs)).unwrap(), 1);
    }
    // host holds 3,4; disk holds 0,1,2 (offloaded in order)
    assert_eq!(lru(&m), (vec![3, 4], vec![0, 1, 2]));
    let mut out = vec![0u8; 3 * bs];
    assert_eq!(m.get(k(&[0, 1, 9]), &mut out).unwrap(), 2);
    assert_eq!(&out[..bs], &block(0, bs)[..]);
    assert_eq!(&out[bs..2 * bs], &block(1, bs)[..]);
    // 0 and 1 promoted; 3 and 4 offloaded; the disk was full, so its LRU block 2 was dropped
    let (host, disk) = lru(&m);
    assert_eq!(host, vec![0, 1]);
    assert_eq!(disk, vec![0, 1, 3, 4]);
    assert!(!m.contains(2.into()).unwrap());
    let s = m.stats().unwrap().0;
    assert_eq!((s.disk_hits, s.onboarded_blocks, s.misses), (2, 2, 1));
    let mut one = vec![0u8; bs];
    for h in [0u64, 1, 3, 4] {
        assert_eq!(m.get(k(&[h]), &mut one).unwrap(), 1, "block {h}");
        assert_eq!(one, block(h, bs));
    }
}

#[test]
fn promotions_hold_no_slot_once_done() {
    // Host 4, disk 16: a get of disk hits promotes each (read straight into
    // its host slot); afterwards no host slot stays held, so later puts and
    // promotions find the whole tier.
    let dir = tempfile::tempdir().unwrap();
    let bs = 4096;
    let m = mgr(4, 16, bs, dir.path());
    let all: Vec<u64> = (0..16).collect();
    let data: Vec<u8> = all.iter().flat_map(|&h| block(h, bs)).collect();
    m.put(&all, &data).unwrap();
    let mut out = vec![0u8; 2 * bs];
    let mut disk_hits = 0;
    for round in 0..3u64 {
        for pair in all.chunks(2) {
            assert_eq!(m.get(k(pair), &mut out).unwrap(), 2, "round {round}");
            assert_eq!(&out[..bs], &block(pair[0], bs)[..]);
            assert_eq!(&out[bs..], &block(pair[1], bs)[..]);
        }
        disk_hits += 16;
    }
    let s = m.stats().unwrap().0;
    // Every get was a disk hit: each pair's promotion evicted the two least
    // recent host blocks, the ones the next pairs would have hit.
    assert_eq!(s.disk_hits, disk_hits);
    assert_eq!(s.onboarded_blocks, s.disk_hits);
    assert_eq!(lru(&m).0, vec![12, 13, 14, 15]);
    assert_eq!(m.put(&[100, 101, 102, 103], &vec![7u8; 4 * bs]).unwrap(), 4);
    assert_eq!(s.rejected_full, 0);
}

#[test]
fn a_write_through_put_writes_each_block_once_without_a_bounce_copy() {
    // With write_through a new block from an unaligned buffer is copied into
    // the host tier first (its checksum taken during the copy) and its disk
    // copy written from the host slot with that checksum (no bounce copy for
    // direct I/O); from an aligned buffer it is written in place first, and
    // its copy takes the write's checksum. Each block's host and disk
    // checksums and its bytes on disk must be its own, also when the disk
    // tier holds fewer blocks than the batch brings.
    let dir = tempfile::tempdir().unwrap();
    let bs = 64 << 10;
    for (disk, unaligned) in [(8, true), (2, true), (8, false), (2, false)] {
        let d = tempfile::tempdir_in(dir.path()).unwrap();
        let m = BlockManager::new(
            bs,
            Some(Arc::new(
                HostStorage::new(
                    8,
                    bs,
                    &HostOptions {
                        pin: Pin::Off,
                        ..Default::default()
                    },
                )
                .unwrap(),
            )),
            Some(Arc::new(
                DiskStorage::open(d.path(), disk, bs, &DiskOptions::default()).unwrap(),
            )),
            ManagerOptions {
                checksums: true,
                write_through: true,
                ..Default::default()
            },
        )
        .unwrap();
        let hs = [7u64, 3, 9, 1];
        let src: Vec<u8> = hs.iter().flat_map(|&h| block(h, bs)).collect();
        let mut aligned = crate::align::AlignedBuf::new(src.len() + 4096, 4096).unwrap();
        // Page-aligned (written from in place), then one byte past a page.
        let skip = if unaligned { 1 } else { 0 };
        aligned.as_mut_slice()[skip..skip + src.len()].copy_from_slice(&src);
        m.put(&hs, &aligned.as_slice()[skip..skip + src.len()])
            .unwrap();
        let d = m.disk.as_ref().unwrap();
        if d.o_direct() {
            assert_eq!(
                d.bounce_buffers(),
                0,
                "a write went through a bounce buffer"
            );
        } else {
            eprintln!("bounce check skipped: buffered I/O on {}", d.fs_type());
        }
        let st = m.lock();
        for &h in &hs {
            let want = crate::checksum::block_crc(h, &block(h, bs));
            let at = st.reg.readable(Key::shared(h)).unwrap();
            assert_eq!(at.kind, policy::TierKind::Host);
            assert_eq!(
                st.reg.host_crc(at.slot),
                Some(want),
                "block {h}, disk tier of {disk}"
            );
        }
        let on_disk = st.reg.disk_copies_of(crate::keys::Keys::shared(&hs));
        assert_eq!(on_disk.len(), disk.min(4) as usize, "disk tier of {disk}");
        for (k, t) in on_disk {
            let h = k.hash;
            assert_eq!(
                st.reg.disk_crc(t),
                crate::checksum::block_crc(h, &block(h, bs))
            );
            let mut got = vec![0u8; bs];
            m.disk
                .as_ref()
                .unwrap()
                .read_blocks(&[t as u64], &mut got)
                .unwrap();
            assert!(
                got == block(h, bs),
                "block {h}'s bytes on disk, disk tier of {disk}"
            );
        }
    }
}

#[test]
fn a_blocks_checksum_is_taken_as_it_enters_the_host_tier() {
    // The checksum a host block's disk copy is written with is the one
    // computed while its bytes were copied in: bytes that change in host
    // memory afterwards fail it when read back from disk (a miss, never
    // wrong bytes), and blocks left alone come back whole.
    let dir = tempfile::tempdir().unwrap();
    let bs = 64 << 10;
    let m = mgr(2, 8, bs, dir.path());
    m.put(&[1, 2], &[block(1, bs), block(2, bs)].concat())
        .unwrap();
    let host = m.host.as_ref().unwrap();
    let region = host.region().unwrap();
    for s in 0..2 {
        // SAFETY: inside slot s of the tier's mapping; no copy is running.
        unsafe { *region.ptr().add(s * host.slot_stride() + 100) ^= 0xff };
    }
    m.put(&[3, 4], &[block(3, bs), block(4, bs)].concat())
        .unwrap(); // 1 and 2 go to disk
    m.put(&[5, 6], &[block(5, bs), block(6, bs)].concat())
        .unwrap(); // 3 and 4 go to disk, unchanged
    let mut out = vec![0u8; 2 * bs];
    assert_eq!(m.get(k(&[1]), &mut out[..bs]).unwrap(), 0);
    assert_eq!(m.get(k(&[2]), &mut out[..bs]).unwrap(), 0);
    assert_eq!(m.get(k(&[3, 4]), &mut out).unwrap(), 2);
    assert_eq!(out, [block(3, bs), block(4, bs)].concat());
    let (s, _) = m.stats().unwrap();
    assert_eq!(s.corrupt_blocks, 2);
}
