//! The block checksum every tier uses: on disk (the persistent store's
//! index records it), and in the remote tier's values without a secret.
//! CRC32C (Castagnoli), computed by `crc-fast` (VPCLMULQDQ folding where the
//! CPU has it: about twice the `crc32` instruction's speed on AVX-512 x86;
//! the same values as any CRC32C, so stores written before stay valid).

use crc_fast::{CrcAlgorithm, Digest};

/// CRC32C of `bytes` (the index's records, the data file's header).
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc_fast::checksum(CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

/// Checksum of a block: CRC32C over its hash (little endian) and its bytes.
pub fn block_crc(hash: u64, bytes: &[u8]) -> u32 {
    let mut d = block_crc_start(hash);
    d.update(bytes);
    d.finalize() as u32
}

/// [`block_crc`] before any of the block's bytes: `update` it with each
/// piece of the block, in order, and `finalize` it to get the block's
/// checksum.
pub fn block_crc_start(hash: u64) -> Digest {
    let mut d = Digest::new(CrcAlgorithm::Crc32Iscsi);
    d.update(&hash.to_le_bytes());
    d
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
        }
    }
}
