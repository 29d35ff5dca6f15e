//! The block checksum every tier uses: on disk (the persistent store's
//! index records it), and in the remote tier's values without a secret.
//! CRC32C (Castagnoli), computed by `crc-fast` (VPCLMULQDQ folding where the
//! CPU has it: about twice the `crc32` instruction's speed on AVX-512 x86;
//! the same values as any CRC32C, so stores written before stay valid).

use crc_fast::{CrcAlgorithm, Digest};

/// The algorithm of every checksum here.
const ALGO: CrcAlgorithm = CrcAlgorithm::Crc32Iscsi;

/// CRC32C of `bytes` (the index's records, the data file's header).
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc_fast::checksum(ALGO, bytes) as u32
}

/// The CRC32C of `a` followed by `b`, from `crc32c(a)` (or a block's
/// [`block_crc`] of its first bytes), `crc32c(b)` and `b`'s length: how a
/// block checksummed in pieces on several threads gets its checksum.
/// `crc(a) * x^(8 len(b)) + crc(b)` modulo the polynomial (the initial and
/// final inversions cancel out); a few microseconds (`crc_fast`'s combine
/// measured tens, a sixth of a fused copy's time at 1 MiB pieces).
pub fn crc32c_combine(a: u32, b: u32, b_len: usize) -> u32 {
    mul_mod(a, x_pow_8n(b_len as u64)) ^ b
}

/// The CRC32C polynomial, bit-reflected (the lowest power in the top bit).
const POLY: u32 = 0x82F6_3B78;

/// `a * b` modulo the polynomial, both in reflected bit order.
fn mul_mod(a: u32, mut b: u32) -> u32 {
    let mut p = 0;
    for bit in (0..32).rev() {
        if a & (1 << bit) != 0 {
            p ^= b;
        }
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    p
}

/// `x^(8 n)` modulo the polynomial, by squaring (`x^(2^k)` for each bit of
/// `8 n`).
fn x_pow_8n(n: u64) -> u32 {
    let mut p = 1u32 << 31; // x^0
    let mut sq = 1u32 << 30; // x^1
    let mut e = n.checked_mul(8).expect("a length in bytes");
    while e != 0 {
        if e & 1 != 0 {
            p = mul_mod(p, sq);
        }
        sq = mul_mod(sq, sq);
        e >>= 1;
    }
    p
}

/// Checksum of a block: CRC32C over its hash (little endian) and its bytes.
pub fn block_crc(hash: u64, bytes: &[u8]) -> u32 {
    let mut d = block_crc_start(hash);
    d.update(bytes);
    d.finalize() as u32
}

/// [`block_crc`] from the CRC32C of the block's bytes alone (`bytes_crc`
/// of `len` bytes, e.g. from [`copy_crc32c`]): the hash's CRC joined in
/// front.
pub fn block_crc_of(hash: u64, bytes_crc: u32, len: usize) -> u32 {
    crc32c_combine(crc32c(&hash.to_le_bytes()), bytes_crc, len)
}

/// Copy `src` into `dst` (of the same length) and return the CRC32C of the
/// bytes: each 64 KiB run is summed right after its copy read it, while it
/// is in the core's cache (one pass over memory that may be cold, not two).
pub fn copy_crc32c(src: &[u8], dst: &mut [u8]) -> u32 {
    const RUN: usize = 64 << 10;
    assert_eq!(src.len(), dst.len(), "copy_crc32c: lengths differ");
    let mut d = crc_start();
    for (s, t) in src.chunks(RUN).zip(dst.chunks_mut(RUN)) {
        t.copy_from_slice(s);
        d.update(s);
    }
    d.finalize() as u32
}

/// [`block_crc`] before any of the block's bytes: `update` it with each
/// piece of the block, in order, and `finalize` it to get the block's
/// checksum.
pub fn block_crc_start(hash: u64) -> Digest {
    let mut d = Digest::new(ALGO);
    d.update(&hash.to_le_bytes());
    d
}

/// A CRC32C before any bytes: `update` it, then `finalize`.
pub fn crc_start() -> Digest {
    Digest::new(ALGO)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    #[test]
    fn the_hash_is_part_of_the_checksum() {
        let b = [7u8; 64];
        assert_ne!(super::block_crc(1, &b), super::block_crc(2, &b));
        assert_eq!(super::block_crc(1, &b), super::block_crc(1, &b));
    }

    #[test]
    fn known_crc32c_values() {
        // The CRC-32C check value, and an iSCSI test vector (32 zero bytes).
        assert_eq!(super::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(super::crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    proptest! {
        /// A block's checksum is the CRC32C of its hash and bytes, however
        /// the bytes arrive (the remote tier feeds it in pieces).
        #[test]
        fn pieces_give_the_whole_blocks_checksum(
            hash in any::<u64>(),
            bytes in proptest::collection::vec(any::<u8>(), 0..5000),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut whole = hash.to_le_bytes().to_vec();
            whole.extend_from_slice(&bytes);
            let at = cut.index(bytes.len() + 1);
            let mut d = super::block_crc_start(hash);
            d.update(&bytes[..at]);
            d.update(&bytes[at..]);
            prop_assert_eq!(d.finalize() as u32, super::crc32c(&whole));
            prop_assert_eq!(super::block_crc(hash, &bytes), super::crc32c(&whole));
            let (a, b) = bytes.split_at(at);
            let joined = super::crc32c_combine(super::block_crc(hash, a), super::crc32c(b), b.len());
            prop_assert_eq!(joined, super::crc32c(&whole));
            prop_assert_eq!(super::crc32c_combine(super::crc32c(b), 0, 0), super::crc32c(b));
            prop_assert_eq!(
                super::block_crc_of(hash, super::crc32c(&bytes), bytes.len()),
                super::block_crc(hash, &bytes)
            );
        }

        /// A copy that sums returns the CRC32C of what it copied, and copies
        /// it whole (lengths across the 64 KiB runs).
        #[test]
        fn a_summed_copy_copies_and_sums(len in 0usize..200_000, seed in any::<u8>()) {
            let src: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed | 1)).collect();
            let mut dst = vec![0u8; len];
            let crc = super::copy_crc32c(&src, &mut dst);
            prop_assert_eq!(crc, super::crc32c(&src));
            prop_assert!(src == dst);
        }
    }
}
