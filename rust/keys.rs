//! Keys from an engine's own page names: 64-bit dynblock hashes for every
//! piece of every page (`dynblock.sglang`). A page name is mixed with a
//! context (the model, the shard, the layout: what gives the bytes their
//! meaning) by BLAKE3 keyed with a digest of that context, so two contexts
//! never share keys; each piece of the page then gets its own key from the
//! page's by a splitmix64 finalisation of `page + (piece + 1) * golden`.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

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
