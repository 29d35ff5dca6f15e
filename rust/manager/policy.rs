//! The block manager's policy: which block lives in which slot of which
//! tier, LRU order per tier, pins (leases and in-flight transfers), and the
//! planning of a batch (inserts, evictions, offloads) on metadata alone. No
//! I/O and no `unsafe` here: the execution side (`super`) runs the plans.
//! The policy itself is documented at the top of `super`; the invariants are
//! property-tested below.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::error::{Error, Result};
use crate::index::{IndexLog, Live};

/// Hasher for u64 keys: the splitmix64 finaliser (sequence hashes may be
/// small consecutive integers; this spreads them).
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = v as u64;
    }
}

pub(super) type Map<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

pub(super) const NIL: u32 = u32::MAX;
/// Marks a block whose host slot is being chosen: an eviction cascade
/// started by its own insertion must not drop it.
pub(super) const PENDING: u32 = u32::MAX - 1;

/// Doubly linked LRU list over slot ids (front = least recently used).
pub(super) struct Lru {
    pub(super) prev: Vec<u32>,
    pub(super) next: Vec<u32>,
    pub(super) head: u32,
    pub(super) tail: u32,
}

impl Lru {
    pub(super) fn new(n: usize) -> Self {
        Lru {
            prev: vec![NIL; n],
            next: vec![NIL; n],
            head: NIL,
            tail: NIL,
        }
    }
    pub(super) fn push_back(&mut self, s: u32) {
        let i = s as usize;
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        if self.tail != NIL {
            self.next[self.tail as usize] = s;
        } else {
            self.head = s;
        }
        self.tail = s;
    }
    pub(super) fn remove(&mut self, s: u32) {
        let i = s as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        if p != NIL {
            self.next[p as usize] = n;
        } else {
            self.head = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        } else {
            self.tail = p;
        }
        self.prev[i] = NIL;
        self.next[i] = NIL;
    }
    pub(super) fn touch(&mut self, s: u32) {
        if self.tail != s {
            self.remove(s);
            self.push_back(s);
        }
    }
    pub(super) fn order(&self) -> Vec<u32> {
        let mut out = Vec::new();
        let mut c = self.head;
        while c != NIL {
            out.push(c);
            c = self.next[c as usize];
        }
        out
    }
}

/// One tier's slots: which hash each holds, LRU order, free list, and pins.
/// A pinned slot (held by a lease) is never evicted nor reused: a block
/// removed while pinned leaves its slot "doomed" until the last unpin.
pub(super) struct Tier {
    pub(super) lru: Lru,
    pub(super) hash_of: Vec<u64>,
    /// Checksum of each slot's block (disk tier; unused for host).
    pub(super) crc: Vec<u32>,
    pub(super) free: Vec<u32>,
    pub(super) pins: Vec<u32>,
    pub(super) doomed: Vec<bool>,
    /// Bytes still arriving (a plan running without the lock): invisible
    /// to lookups, and always pinned.
    pub(super) filling: Vec<bool>,
}

impl Tier {
    pub(super) fn new(cap: u32) -> Self {
        Tier {
            lru: Lru::new(cap as usize),
            hash_of: vec![0; cap as usize],
            crc: vec![0; cap as usize],
            free: (0..cap).rev().collect(),
            pins: vec![0; cap as usize],
            doomed: vec![false; cap as usize],
            filling: vec![false; cap as usize],
        }
    }
    /// The least recently used slot that no lease pins.
    pub(super) fn evictable(&self) -> Option<u32> {
        let mut c = self.lru.head;
        while c != NIL {
            if self.pins[c as usize] == 0 {
                return Some(c);
            }
            c = self.lru.next[c as usize];
        }
        None
    }
    pub(super) fn pin(&mut self, s: u32) {
        self.pins[s as usize] += 1;
    }
    pub(super) fn unpin(&mut self, s: u32) {
        let p = &mut self.pins[s as usize];
        *p = p.saturating_sub(1);
        if *p == 0 && self.doomed[s as usize] {
            self.doomed[s as usize] = false;
            self.free.push(s);
        }
    }
    /// Fill from recovered entries (oldest first), marking their slots used.
    pub(super) fn load(&mut self, live: &[Live]) {
        let mut used = vec![false; self.hash_of.len()];
        for l in live {
            self.occupy(l.slot, l.hash);
            self.crc[l.slot as usize] = l.crc;
            used[l.slot as usize] = true;
        }
        self.free = (0..self.hash_of.len() as u32)
            .rev()
            .filter(|&s| !used[s as usize])
            .collect();
    }
    pub(super) fn occupy(&mut self, s: u32, h: u64) {
        self.hash_of[s as usize] = h;
        self.lru.push_back(s);
    }
    pub(super) fn release(&mut self, s: u32) {
        self.lru.remove(s);
        if self.pins[s as usize] > 0 {
            self.doomed[s as usize] = true;
        } else {
            self.free.push(s);
        }
    }
    pub(super) fn used(&self) -> usize {
        self.hash_of.len() - self.free.len()
    }
    /// Forget every block; slots a lease still pins stay out of use until
    /// their last unpin.
    pub(super) fn reset(&mut self) {
        let cap = self.hash_of.len() as u32;
        let pins = std::mem::take(&mut self.pins);
        *self = Tier::new(cap);
        for (s, &p) in pins.iter().enumerate() {
            if p > 0 {
                self.doomed[s] = true;
            }
        }
        self.free.retain(|&s| pins[s as usize] == 0);
        self.pins = pins;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) host: u32,
    pub(super) disk: u32,
}

/// Counters reported by `stats()`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub put_blocks: u64,
    pub put_new: u64,
    pub get_calls: u64,
    pub host_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    pub offloaded_blocks: u64,
    pub onboarded_blocks: u64,
    pub host_evictions: u64,
    pub disk_evictions: u64,
    pub dropped_blocks: u64,
    /// New blocks not stored because every slot they could take was pinned.
    pub rejected_full: u64,
    /// Leases taken by `lookup`.
    pub leases: u64,
    /// Host-only blocks written to disk ahead of eviction (write-behind).
    pub written_behind: u64,
    /// Write-behind batches that failed (their blocks stay in the host tier).
    pub failed_write_behind: u64,
    pub failed_writes: u64,
    pub corrupt_blocks: u64,
    pub io_errors: u64,
    pub recovered_blocks: u64,
    pub index_torn_bytes: u64,
    pub index_bad_records: u64,
    pub index_compactions: u64,
}

#[derive(Clone, Copy)]
pub(super) enum Src {
    HostSlot(u32),
    Addr(usize),
}

pub(super) struct Write {
    pub(super) disk_slot: u32,
    pub(super) src: Src,
    pub(super) hash: u64,
    pub(super) victim: bool,
    pub(super) live: bool,
}

pub(super) struct Copy {
    pub(super) host_slot: u32,
    pub(super) addr: usize,
    pub(super) live: bool,
}

#[derive(Default)]
pub(super) struct Plan {
    /// Disk slots taken from their owners in this batch (hash, slot): their
    /// DEL records go to the index before any slot is overwritten.
    pub(super) disk_evicted: Vec<(u64, u32)>,
    pub(super) writes: Vec<Write>,
    pub(super) write_by_disk: Map<u32, usize>,
    pub(super) copies: Vec<Copy>,
    pub(super) copy_by_host: Map<u32, usize>,
}

pub(super) struct State {
    pub(super) map: Map<u64, Entry>,
    pub(super) host: Option<Tier>,
    pub(super) disk: Option<Tier>,
    pub(super) stats: Stats,
    pub(super) warnings: Vec<String>,
    pub(super) index: Option<IndexLog>,
    pub(super) closed: bool,
    pub(super) io_error_logged: bool,
    /// Leases by id: the (tier, slot) each pins.
    pub(super) leases: Map<u64, Vec<Pinned>>,
    pub(super) next_lease: u64,
}

/// One block a lease holds: its host slot or, when it had none, its disk slot.
#[derive(Clone, Copy, Debug)]
pub(super) struct Pinned {
    pub(super) hash: u64,
    pub(super) host: bool,
    pub(super) slot: u32,
}

impl State {
    pub(super) fn touch(&mut self, e: Entry) {
        if e.host != NIL {
            if let Some(t) = self.host.as_mut() {
                t.lru.touch(e.host);
            }
        }
        if e.disk != NIL {
            if let Some(t) = self.disk.as_mut() {
                t.lru.touch(e.disk);
            }
        }
    }

    /// Put `h` into the host tier with its bytes at `addr` (copied later).
    /// False when every host slot is pinned: nothing was registered.
    pub(super) fn host_insert(&mut self, h: u64, addr: usize, plan: &mut Plan) -> bool {
        let had = self.map.contains_key(&h);
        self.map
            .entry(h)
            .and_modify(|e| e.host = PENDING)
            .or_insert(Entry {
                host: PENDING,
                disk: NIL,
            });
        let s = loop {
            let host = self.host.as_mut().expect("host tier");
            if let Some(s) = host.free.pop() {
                break Some(s);
            }
            match host.evictable() {
                Some(v) => self.evict_host(v, plan),
                None => break None,
            }
        };
        let Some(s) = s else {
            let e = self.map.get_mut(&h).expect("inserted above");
            if e.disk != NIL {
                e.host = NIL;
            } else {
                self.map.remove(&h);
                if had {
                    self.stats.dropped_blocks += 1; // its disk copy made room first
                }
            }
            return false;
        };
        self.host.as_mut().expect("host tier").occupy(s, h);
        self.map.get_mut(&h).expect("inserted above").host = s;
        plan.copy_by_host.insert(s, plan.copies.len());
        plan.copies.push(Copy {
            host_slot: s,
            addr,
            live: true,
        });
        true
    }

    pub(super) fn evict_host(&mut self, s: u32, plan: &mut Plan) {
        let host = self.host.as_mut().expect("host tier");
        let vh = host.hash_of[s as usize];
        host.release(s);
        self.stats.host_evictions += 1;
        // Its bytes are in the slot, or still in the caller's buffer if the
        // block arrived in this batch.
        let src = match plan.copy_by_host.remove(&s) {
            Some(ci) => {
                plan.copies[ci].live = false;
                Src::Addr(plan.copies[ci].addr)
            }
            None => Src::HostSlot(s),
        };
        let e = self.map.get_mut(&vh).expect("registered");
        e.host = NIL;
        if e.disk != NIL {
            return; // already on disk: nothing to write
        }
        if self.disk.is_none() || !self.disk_insert(vh, src, true, plan) {
            self.map.remove(&vh);
            self.stats.dropped_blocks += 1;
        }
    }

    /// Put `h` into the disk tier from `src`. False when every disk slot is
    /// pinned: nothing was registered.
    pub(super) fn disk_insert(&mut self, h: u64, src: Src, victim: bool, plan: &mut Plan) -> bool {
        let t = loop {
            let disk = self.disk.as_mut().expect("disk tier");
            if let Some(t) = disk.free.pop() {
                break Some(t);
            }
            match disk.evictable() {
                Some(w) => self.evict_disk(w, plan),
                None => break None,
            }
        };
        let Some(t) = t else {
            return false;
        };
        self.disk.as_mut().expect("disk tier").occupy(t, h);
        self.map
            .entry(h)
            .and_modify(|e| e.disk = t)
            .or_insert(Entry { host: NIL, disk: t });
        plan.write_by_disk.insert(t, plan.writes.len());
        plan.writes.push(Write {
            disk_slot: t,
            src,
            hash: h,
            victim,
            live: true,
        });
        true
    }

    pub(super) fn evict_disk(&mut self, t: u32, plan: &mut Plan) {
        let disk = self.disk.as_mut().expect("disk tier");
        let wh = disk.hash_of[t as usize];
        disk.release(t);
        self.stats.disk_evictions += 1;
        plan.disk_evicted.push((wh, t));
        if let Some(wi) = plan.write_by_disk.remove(&t) {
            plan.writes[wi].live = false;
        }
        let e = self.map.get_mut(&wh).expect("registered");
        e.disk = NIL;
        if e.host == NIL {
            self.map.remove(&wh);
            self.stats.dropped_blocks += 1;
        }
    }

    /// Undo what a failed plan registered. Called with the plan whose disk
    /// write failed, before any host copy ran.
    pub(super) fn roll_back(&mut self, plan: &Plan) {
        let mut touched = Vec::new();
        for w in plan.writes.iter().filter(|w| w.live) {
            if let Some(e) = self.map.get_mut(&w.hash) {
                if e.disk == w.disk_slot {
                    e.disk = NIL;
                    self.disk.as_mut().expect("disk tier").release(w.disk_slot);
                }
            }
            touched.push(w.hash);
        }
        for c in plan.copies.iter().filter(|c| c.live) {
            let host = self.host.as_mut().expect("host tier");
            let h = host.hash_of[c.host_slot as usize];
            if let Some(e) = self.map.get_mut(&h) {
                if e.host == c.host_slot {
                    e.host = NIL;
                    host.release(c.host_slot);
                }
            }
            touched.push(h);
        }
        for h in touched {
            if let Some(e) = self.map.get(&h) {
                if e.host == NIL && e.disk == NIL {
                    self.map.remove(&h);
                    self.stats.dropped_blocks += 1;
                }
            }
        }
    }

    /// The copy of a block whose bytes are in place (host preferred):
    /// (in the host tier?, slot). None while every copy is still filling.
    pub(super) fn readable(&self, h: u64) -> Option<(bool, u32)> {
        let e = self.map.get(&h)?;
        if e.host != NIL && e.host != PENDING {
            let t = self.host.as_ref().expect("host tier");
            if !t.filling[e.host as usize] {
                return Some((true, e.host));
            }
        }
        if e.disk != NIL {
            let t = self.disk.as_ref().expect("disk tier");
            if !t.filling[e.disk as usize] {
                return Some((false, e.disk));
            }
        }
        None
    }

    /// Length of the longest registered prefix (bytes of some blocks may
    /// still be arriving: see [`Self::in_flight`]).
    pub(super) fn prefix(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .position(|h| !self.map.contains_key(h))
            .unwrap_or(hashes.len())
    }

    /// Whether any block of `hashes` is registered but has no copy whose
    /// bytes are in place yet (a put or an offload in flight): a read waits.
    pub(super) fn in_flight(&self, hashes: &[u64]) -> bool {
        hashes.iter().any(|&h| self.readable(h).is_none())
    }

    /// The copy a lease pins: the readable one, else the host copy being
    /// filled, else the disk copy being filled (read once it is in place).
    pub(super) fn lease_copy(&self, h: u64) -> (bool, u32) {
        if let Some(c) = self.readable(h) {
            return c;
        }
        let e = self.map[&h];
        if e.host != NIL && e.host != PENDING {
            (true, e.host)
        } else {
            (false, e.disk)
        }
    }
}

pub(super) fn capacity(n: u64, what: &str) -> Result<u32> {
    if n >= NIL as u64 {
        return Err(Error::InvalidArgument(format!(
            "the {what} tier has {n} blocks; at most {} are supported",
            PENDING - 1
        )));
    }
    Ok(n as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn state(host: u32, disk: u32) -> State {
        State {
            map: Map::default(),
            host: (host > 0).then(|| Tier::new(host)),
            disk: (disk > 0).then(|| Tier::new(disk)),
            stats: Stats::default(),
            warnings: Vec::new(),
            index: None,
            closed: false,
            io_error_logged: false,
            leases: Map::default(),
            next_lease: 1,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u64, bool),
        Pin(u64),
        Unpin(usize),
        Remove(u64),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..8, prop::bool::weighted(0.2)).prop_map(|(h, rb)| Op::Put(h, rb)),
            3 => (0u64..8).prop_map(Op::Pin),
            2 => (0usize..8).prop_map(Op::Unpin),
            2 => (0u64..8).prop_map(Op::Remove),
            1 => Just(Op::Clear),
        ]
    }

    /// Every slot is in exactly one place (an entry's copy in the LRU list,
    /// the free list, or doomed), pins are never free, every entry has a copy.
    fn check(st: &State) {
        for (name, tier) in [("host", &st.host), ("disk", &st.disk)] {
            let Some(t) = tier else { continue };
            let cap = t.hash_of.len();
            let order = t.lru.order();
            let mut seen = vec![0u8; cap];
            for &s in &order {
                seen[s as usize] += 1;
            }
            for &s in &t.free {
                seen[s as usize] += 1;
                assert_eq!(t.pins[s as usize], 0, "{name}: a pinned slot {s} is free");
            }
            for (s, &d) in t.doomed.iter().enumerate() {
                if d {
                    seen[s] += 1;
                    assert!(t.pins[s] > 0, "{name}: slot {s} doomed without a pin");
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{name}: slots {seen:?}");
            let in_tier = st
                .map
                .values()
                .filter(|e| {
                    if name == "host" {
                        e.host != NIL
                    } else {
                        e.disk != NIL
                    }
                })
                .count();
            assert_eq!(in_tier, order.len(), "{name}: entries vs LRU");
        }
        for (&h, e) in &st.map {
            assert!(e.host != NIL || e.disk != NIL, "block {h} has no copy");
            assert_ne!(e.host, PENDING);
            if e.host != NIL {
                assert_eq!(st.host.as_ref().unwrap().hash_of[e.host as usize], h);
            }
            if e.disk != NIL {
                assert_eq!(st.disk.as_ref().unwrap().hash_of[e.disk as usize], h);
            }
        }
    }

    #[test]
    fn a_removed_pinned_block_keeps_its_slot_until_unpinned() {
        let mut st = state(2, 0);
        let mut plan = Plan::default();
        st.host_insert(7, 0, &mut plan);
        let (_, slot) = st.readable(7).unwrap();
        st.host.as_mut().unwrap().pin(slot);
        let e = st.map.remove(&7).unwrap();
        st.host.as_mut().unwrap().release(e.host);
        check(&st);
        assert!(!st.host.as_ref().unwrap().free.contains(&slot));
        st.host.as_mut().unwrap().unpin(slot);
        check(&st);
        assert!(st.host.as_ref().unwrap().free.contains(&slot));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn slots_stay_consistent(caps in (0u32..5, 0u32..6).prop_filter("a tier", |c| c.0 + c.1 > 0),
                                 ops in proptest::collection::vec(op(), 1..60)) {
            let mut st = state(caps.0, caps.1);
            // (in the host tier?, slot, hash, still expected in place)
            let mut pins: Vec<(bool, u32, u64, bool)> = Vec::new();
            for o in ops {
                match o {
                    Op::Put(h, roll_back) => {
                        if let Some(&e) = st.map.get(&h) {
                            st.touch(e);
                            continue;
                        }
                        let mut plan = Plan::default();
                        if st.host.is_some() {
                            st.host_insert(h, 0, &mut plan);
                        } else {
                            st.disk_insert(h, Src::Addr(0), false, &mut plan);
                        }
                        if roll_back {
                            st.roll_back(&plan);
                        }
                    }
                    Op::Pin(h) => {
                        if let Some((host, slot)) = st.readable(h) {
                            let t = if host { st.host.as_mut() } else { st.disk.as_mut() };
                            t.unwrap().pin(slot);
                            pins.push((host, slot, h, true));
                        }
                    }
                    Op::Unpin(i) => {
                        if i < pins.len() {
                            let (host, slot, _, _) = pins.remove(i);
                            let t = if host { st.host.as_mut() } else { st.disk.as_mut() };
                            t.unwrap().unpin(slot);
                        }
                    }
                    Op::Remove(h) => {
                        for p in pins.iter_mut().filter(|p| p.2 == h) {
                            p.3 = false;
                        }
                        if let Some(e) = st.map.remove(&h) {
                            if e.host != NIL {
                                st.host.as_mut().unwrap().release(e.host);
                            }
                            if e.disk != NIL {
                                st.disk.as_mut().unwrap().release(e.disk);
                            }
                        }
                    }
                    Op::Clear => {
                        for p in pins.iter_mut() {
                            p.3 = false;
                        }
                        st.map.clear();
                        for t in [st.host.as_mut(), st.disk.as_mut()].into_iter().flatten() {
                            t.reset();
                        }
                    }
                }
                check(&st);
                // A pinned block keeps its copy in its slot: never evicted.
                for &(host, slot, h, expected) in &pins {
                    if expected {
                        let e = st.map.get(&h).copied();
                        let held = e.is_some_and(|e| if host { e.host == slot } else { e.disk == slot });
                        prop_assert!(held, "pinned block {} lost its slot {}", h, slot);
                    }
                }
            }
            for (host, slot, _, _) in pins.drain(..) {
                let t = if host { st.host.as_mut() } else { st.disk.as_mut() };
                t.unwrap().unpin(slot);
            }
            check(&st);
            for t in [st.host.as_ref(), st.disk.as_ref()].into_iter().flatten() {
                assert!(t.pins.iter().all(|&p| p == 0) && !t.doomed.iter().any(|&d| d));
            }
        }
    }

    #[test]
    fn lru_list() {
        let mut l = Lru::new(4);
        for s in 0..4 {
            l.push_back(s);
        }
        l.touch(1);
        l.remove(2);
        assert_eq!(l.order(), vec![0, 3, 1]);
        assert_eq!(l.head, 0);
    }
}
