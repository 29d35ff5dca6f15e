//! Keys from an engine's own page names: 64-bit dynblock hashes for every
//! piece of every page (`dynblock.sglang`). A page name is mixed with a
//! context (the model, the shard, the layout: what gives the bytes their
//! meaning) by BLAKE3 keyed with a digest of that context, so two contexts
//! never share keys; each piece of the page then gets its own key from the
//! page's by a splitmix64 finalisation of `page + (piece + 1) * golden`.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A block's name in a store: the engine's 64-bit hash within a namespace.
/// Namespace 0 is the shared one (what a call without `namespace=` uses);
/// another namespace's id stands for its name in the store's table of
/// namespaces. Two keys are the same block only when both parts are equal:
/// blocks of different namespaces with the same hash never alias.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Key {
    pub hash: u64,
    pub ns: u32,
}

impl Key {
    #[inline]
    pub const fn new(hash: u64, ns: u32) -> Self {
        Key { hash, ns }
    }
    /// The key of `hash` in the shared namespace.
    pub const fn shared(hash: u64) -> Self {
        Key { hash, ns: 0 }
    }
    /// Both parts folded into 64 bits (for hash tables and fingerprints:
    /// equal keys fold equal; the shared namespace folds to the hash itself).
    #[inline]
    pub fn fold(self) -> u64 {
        self.hash ^ (self.ns as u64).wrapping_mul(GOLDEN)
    }
}

/// A batch's keys: its hashes, all in one namespace (what every call that
/// names blocks passes), read as [`Key`]s without a copy.
#[derive(Clone, Copy, Debug)]
pub struct Keys<'a> {
    hashes: &'a [u64],
    ns: u32,
}

impl<'a> Keys<'a> {
    #[inline]
    pub const fn new(hashes: &'a [u64], ns: u32) -> Self {
        Keys { hashes, ns }
    }
    /// `hashes` in the shared namespace.
    #[cfg(test)]
    pub const fn shared(hashes: &'a [u64]) -> Self {
        Keys { hashes, ns: 0 }
    }
    #[inline]
    pub fn len(&self) -> usize {
        self.hashes.len()
    }
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
    #[inline]
    pub fn ns(&self) -> u32 {
        self.ns
    }
    #[inline]
    pub fn hashes(&self) -> &'a [u64] {
        self.hashes
    }
    /// The key at `i` (panics past the end, as indexing does).
    #[inline]
    pub fn at(&self, i: usize) -> Key {
        Key::new(self.hashes[i], self.ns)
    }
    #[inline]
    pub fn iter(&self) -> impl Iterator<Item = Key> + 'a {
        let ns = self.ns;
        self.hashes.iter().map(move |&hash| Key { hash, ns })
    }
    /// The keys in `range`.
    #[inline]
    pub fn sub(&self, range: impl std::slice::SliceIndex<[u64], Output = [u64]>) -> Keys<'a> {
        Keys::new(&self.hashes[range], self.ns)
    }
}

/// `{:x}` / `{:#018x}`: the hash in hex, then the namespace's id when it is
/// not the shared one.
impl std::fmt::LowerHex for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.hash, f)?;
        if self.ns != 0 {
            write!(f, " (namespace #{})", self.ns)?;
        }
        Ok(())
    }
}

impl From<u64> for Key {
    fn from(hash: u64) -> Self {
        Key::shared(hash)
    }
}

impl std::hash::Hash for Key {
    // One `write_u64` (the store's maps use a hasher made for one u64).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.fold());
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The key of every piece in `pieces` (piece indices, in the order wanted)
/// of every page in `names`, page after page.
pub fn piece_keys<S: AsRef<[u8]>>(names: &[S], context: &[u8], pieces: &[u64]) -> Vec<u64> {
    let key = blake3::hash(context);
    let base = blake3::Hasher::new_keyed(key.as_bytes());
    let mut out = Vec::with_capacity(names.len() * pieces.len());
    for name in names {
        let mut h = base.clone();
        h.update(name.as_ref());
        let d = h.finalize();
        let page = u64::from_le_bytes(d.as_bytes()[..8].try_into().expect("8 bytes"));
        for &p in pieces {
            out.push(splitmix(
                page.wrapping_add(p.wrapping_add(1).wrapping_mul(GOLDEN)),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_name_context_and_piece() {
        let a = piece_keys(&["p1", "p2"], b"model-a/tp0of1", &[0, 1]);
        assert_eq!(a.len(), 4);
        let mut uniq = a.clone();
        uniq.sort_unstable();
        uniq.dedup();
        assert_eq!(uniq.len(), 4, "pieces and pages have distinct keys");
        assert_eq!(a, piece_keys(&["p1", "p2"], b"model-a/tp0of1", &[0, 1]));
        let b = piece_keys(&["p1", "p2"], b"model-b/tp0of1", &[0, 1]);
        assert!(
            a.iter().all(|k| !b.contains(k)),
            "another context shares no key"
        );
        // Pieces asked in another order come in that order.
        assert_eq!(
            piece_keys(&["p1"], b"model-a/tp0of1", &[1, 0]),
            vec![a[1], a[0]]
        );
    }
}
