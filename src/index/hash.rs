//! Prefix block hashing.
//!
//! A prompt is cut into blocks of `block_size` bytes (default 64: vLLM's 16-token KV block at
//! ~4 characters per token). Each block's hash is chained to the previous one, so equal hashes at
//! block `i` mean equal prompts up to and including block `i`:
//!
//! ```text
//! seed  = xxh3_64(target_model ‖ 0x00 ‖ cache_salt)
//! h_0   = xxh3_64_with_seed(block_0, seed)
//! h_i   = xxh3_64_with_seed(block_i, h_{i-1})
//! ```
//!
//! Using the previous hash as the xxh3 seed chains the blocks without copying them into a
//! scratch buffer (DESIGN §5 allows xxh3 since the index is process-local). The trailing partial
//! block is hashed too, and at most `max_blocks` hashes are produced (default 256, i.e. the first
//! 16 KiB of the prompt with 64-byte blocks).

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Hash of one prefix block, chained over all blocks before it.
pub type BlockHash = u64;

/// Default block size in bytes: vLLM's 16-token block × ~4 characters per token.
pub const DEFAULT_BLOCK_SIZE: usize = 64;
/// Default cap on the number of blocks hashed and matched per request (GIE's default).
pub const DEFAULT_MAX_BLOCKS: usize = 256;
/// Characters per token used to turn token-denominated settings into bytes.
pub const CHARS_PER_TOKEN: usize = 4;

/// How prompts are cut into blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHasher {
    pub block_size: usize,
    pub max_blocks: usize,
}

impl Default for BlockHasher {
    fn default() -> Self {
        Self {
            block_size: DEFAULT_BLOCK_SIZE,
            max_blocks: DEFAULT_MAX_BLOCKS,
        }
    }
}

impl BlockHasher {
    /// The chain seed: the model the request is served by and its optional `cache_salt`, so that
    /// equal prompts for different models (or salts) never share cache entries.
    pub fn seed(model: &str, cache_salt: Option<&str>) -> u64 {
        match cache_salt {
            None | Some("") => xxh3_64(model.as_bytes()),
            Some(salt) => {
                let mut buf = Vec::with_capacity(model.len() + 1 + salt.len());
                buf.extend_from_slice(model.as_bytes());
                buf.push(0);
                buf.extend_from_slice(salt.as_bytes());
                xxh3_64(&buf)
            }
        }
    }

    /// Hashes `prompt` into `out` (cleared first): one chained hash per block, the trailing
    /// partial block included, at most `max_blocks`.
    pub fn hash_into(&self, seed: u64, prompt: &[u8], out: &mut Vec<BlockHash>) {
        out.clear();
        let block_size = self.block_size.max(1);
        let n = prompt.len().div_ceil(block_size).min(self.max_blocks);
        out.reserve(n);
        let mut prev = seed;
        for block in prompt.chunks(block_size).take(n) {
            prev = xxh3_64_with_seed(block, prev);
            out.push(prev);
        }
    }

    /// Convenience wrapper around [`BlockHasher::hash_into`].
    pub fn hash(&self, seed: u64, prompt: &[u8]) -> Vec<BlockHash> {
        let mut out = Vec::new();
        self.hash_into(seed, prompt, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_shares_leading_hashes() {
        let h = BlockHasher::default();
        let seed = BlockHasher::seed("m", None);
        let a = h.hash(seed, &[b'a'; 200]);
        let mut other = vec![b'a'; 130];
        other.extend_from_slice(&[b'b'; 70]);
        let b = h.hash(seed, &other);
        assert_eq!(a.len(), 4, "3 full blocks and a partial one");
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        assert_ne!(a[3], b[3], "a difference propagates down the chain");
    }

    #[test]
    fn model_and_salt_change_every_hash() {
        let h = BlockHasher::default();
        let p = [b'x'; 128];
        let base = h.hash(BlockHasher::seed("m", None), &p);
        let other_model = h.hash(BlockHasher::seed("n", None), &p);
        let salted = h.hash(BlockHasher::seed("m", Some("s")), &p);
        assert_eq!(base, h.hash(BlockHasher::seed("m", Some("")), &p));
        for (x, (y, z)) in base.iter().zip(other_model.iter().zip(&salted)) {
            assert_ne!(x, y);
            assert_ne!(x, z);
        }
    }

    #[test]
    fn respects_block_cap_and_empty_prompt() {
        let h = BlockHasher {
            block_size: 4,
            max_blocks: 3,
        };
        assert_eq!(h.hash(1, &[0; 100]).len(), 3);
        assert!(h.hash(1, b"").is_empty());
        assert_eq!(h.hash(1, b"abcde").len(), 2);
    }

    #[test]
    fn identical_blocks_at_different_positions_hash_differently() {
        let h = BlockHasher {
            block_size: 4,
            max_blocks: 10,
        };
        let v = h.hash(7, b"abcdabcd");
        assert_ne!(v[0], v[1]);
    }
}
