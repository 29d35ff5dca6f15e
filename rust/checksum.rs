//! The block checksum every tier uses: on disk (the persistent store's
//! index records it), and in the remote tier's values without a secret.

/// Checksum of a block: CRC32C over its hash (little endian) and its bytes.
pub fn block_crc(hash: u64, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(block_crc_start(hash), bytes)
}

/// [`block_crc`] before any of the block's bytes: `crc32c::crc32c_append`
/// each piece of the block to it, in order, to get the block's checksum.
pub fn block_crc_start(hash: u64) -> u32 {
    crc32c::crc32c(&hash.to_le_bytes())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_hash_is_part_of_the_checksum() {
        let b = [7u8; 64];
        assert_ne!(super::block_crc(1, &b), super::block_crc(2, &b));
        assert_eq!(super::block_crc(1, &b), super::block_crc(1, &b));
    }
}
