//! Prefix block hashing.
//!
//! A prompt is cut into blocks. Each block's hash is chained to the previous one, so equal hashes
//! at block `i` mean equal prompts up to and including block `i`:
//!
//! ```text
//! seed  = xxh3_64(target_model ‖ 0x00 ‖ cache_salt)
//! x_i   = xxh3_64(block_i)
//! h_i   = mix(h_{i-1}, x_i)          h_{-1} = seed
//! mix(h, x) = m · (rotl(h, 23) ⊕ x) ⊕ its high half, m odd
//! ```
//!
//! The block hashes `x_i` are independent of one another, so the CPU computes several at once;
//! only the cheap `mix` is serial (chaining through xxh3's seed made every block wait for the
//! previous one: twice the time). `mix` is a bijection of `rotl(h, 23) ⊕ x`, so two prompts
//! that differ anywhere up to block `i` collide at `h_i` only by a 64-bit accident. DESIGN §5
//! allows xxh3 since the index is process-local.
//!
//! **Dense head, coarse tail.** The first `max_blocks` blocks (default 256) are `block_size`
//! bytes (default 64: vLLM's 16-token KV block at ~4 characters per token), so the first 16 KiB
//! — system prompts, few-shot examples — match to the block. Past that, blocks are
//! [`COARSE_STRIDE`] × `block_size` bytes (1 KiB by default) up to `max_bytes` (default 512 KiB:
//! llm-d's 131,072-token default × 4), so multi-turn and agentic contexts well past 16 KiB still
//! tell apart the endpoints that hold more of them, for ~500 more hashes instead of ~8,000. A
//! coarse block's hash has its top bit set ([`is_coarse`]) so the index can weigh it as the
//! [`COARSE_STRIDE`] blocks of KV cache it stands for. The trailing partial block is hashed
//! too.
//!
//! **Digests ahead of the seed.** Since the `x_i` do not depend on the seed, [`BlockDigests`]
//! computes them while the body is still arriving (the seed needs the model and `cache_salt`,
//! which may come last); the decision then only chains them ([`BlockDigests::chain_into`]),
//! with the same result as [`BlockHasher::hash_into`].

use xxhash_rust::xxh3::xxh3_64;

/// Hash of one prefix block, chained over all blocks before it.
pub type BlockHash = u64;

/// Default block size in bytes: vLLM's 16-token block × ~4 characters per token.
pub const DEFAULT_BLOCK_SIZE: usize = 64;
/// Default number of dense (block-size) blocks hashed before the coarse tail (GIE's cap).
pub const DEFAULT_MAX_BLOCKS: usize = 256;
/// Characters per token used to turn token-denominated settings into bytes.
pub const CHARS_PER_TOKEN: usize = 4;
/// Default prompt coverage: llm-d's `maxPrefixTokensToMatch` default (128 Ki tokens) × 4.
pub const DEFAULT_MAX_BYTES: usize = 131_072 * CHARS_PER_TOKEN;
/// A coarse block is this many dense blocks long.
pub const COARSE_STRIDE: usize = 16;
const COARSE_BIT: u64 = 1 << 63;

/// Whether `h` is a coarse (tail) block's hash.
#[inline]
pub fn is_coarse(h: BlockHash) -> bool {
    h & COARSE_BIT != 0
}

/// KV blocks (of `block_size`) one indexed hash stands for.
#[inline]
pub fn weight(h: BlockHash) -> usize {
    if is_coarse(h) { COARSE_STRIDE } else { 1 }
}

/// How prompts are cut into blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHasher {
    /// Dense block size in bytes.
    pub block_size: usize,
    /// Dense blocks before the coarse tail.
    pub max_blocks: usize,
    /// Prompt bytes covered in all (the coarse tail ends here); at most the dense part when
    /// smaller.
    pub max_bytes: usize,
}

impl Default for BlockHasher {
    fn default() -> Self {
        Self {
            block_size: DEFAULT_BLOCK_SIZE,
            max_blocks: DEFAULT_MAX_BLOCKS,
            max_bytes: DEFAULT_MAX_BYTES,
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

    fn dense_bytes(&self) -> usize {
        self.block_size.max(1).saturating_mul(self.max_blocks)
    }

    /// Most prompt bytes ever hashed (parsers need render no more than this).
    pub fn hashed_limit(&self) -> usize {
        self.dense_bytes().max(self.max_bytes)
    }

    /// Prompt bytes the first `n` hashes of a `prompt_len`-byte prompt cover.
    pub fn covered_bytes(&self, n: usize, prompt_len: usize) -> usize {
        let bs = self.block_size.max(1);
        let bytes = if n <= self.max_blocks {
            n * bs
        } else {
            self.dense_bytes() + (n - self.max_blocks) * bs * COARSE_STRIDE
        };
        bytes.min(prompt_len).min(self.hashed_limit())
    }

    /// Chains block hash `x` onto the previous chain hash `h` (see the module docs).
    #[inline]
    fn mix(h: u64, x: u64) -> u64 {
        let v = (h.rotate_left(23) ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        v ^ (v >> 32)
    }

    /// Hashes `prompt` into `out` (cleared first): dense blocks first, then coarse ones, the
    /// trailing partial block included.
    pub fn hash_into(&self, seed: u64, prompt: &[u8], out: &mut Vec<BlockHash>) {
        out.clear();
        let bs = self.block_size.max(1);
        let dense_end = prompt.len().min(self.dense_bytes());
        let coarse_end = prompt.len().min(self.hashed_limit()).max(dense_end);
        let coarse = bs * COARSE_STRIDE;
        out.reserve(dense_end.div_ceil(bs) + (coarse_end - dense_end).div_ceil(coarse));
        let mut prev = seed;
        for block in prompt[..dense_end].chunks(bs) {
            prev = Self::mix(prev, xxh3_64(block));
            out.push(Self::tag(prev, true));
        }
        for block in prompt[dense_end..coarse_end].chunks(coarse) {
            prev = Self::mix(prev, xxh3_64(block));
            out.push(Self::tag(prev, false));
        }
    }

    /// A chained hash marked as a dense or a coarse block's.
    #[inline]
    fn tag(h: u64, dense: bool) -> BlockHash {
        if dense {
            h & !COARSE_BIT
        } else {
            h | COARSE_BIT
        }
    }

    fn block_at(&self, pos: usize) -> usize {
        let bs = self.block_size.max(1);
        if pos < self.dense_bytes() {
            bs
        } else {
            bs * COARSE_STRIDE
        }
    }

    /// Convenience wrapper around [`BlockHasher::hash_into`].
    pub fn hash(&self, seed: u64, prompt: &[u8]) -> Vec<BlockHash> {
        let mut out = Vec::new();
        self.hash_into(seed, prompt, &mut out);
        out
    }
}

/// The block digests `x_i` of a prompt being rendered, computed as its bytes arrive (see the
/// module docs): [`BlockDigests::advance`] takes each complete block of the prompt so far,
/// [`BlockDigests::finish`] the trailing partial one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDigests {
    hasher: BlockHasher,
    xs: Vec<u64>,
    /// How many of `xs` are dense blocks (the first ones).
    dense: usize,
    /// Prompt bytes digested.
    done: usize,
}

impl BlockDigests {
    pub fn new(hasher: BlockHasher) -> Self {
        Self {
            hasher,
            xs: Vec::new(),
            dense: 0,
            done: 0,
        }
    }

    /// The hasher whose blocks these are.
    pub fn hasher(&self) -> &BlockHasher {
        &self.hasher
    }

    /// Digests the complete blocks of `prompt` (the prompt rendered so far, which only ever
    /// grows) not digested yet.
    pub fn advance(&mut self, prompt: &[u8]) {
        let limit = prompt.len().min(self.hasher.hashed_limit());
        loop {
            let end = self.done + self.hasher.block_at(self.done);
            if end > limit {
                break;
            }
            self.digest(&prompt[self.done..end]);
        }
    }

    /// Digests the rest of the whole `prompt`, its trailing partial block included.
    pub fn finish(&mut self, prompt: &[u8]) {
        self.advance(prompt);
        let limit = prompt.len().min(self.hasher.hashed_limit());
        if self.done < limit {
            self.digest(&prompt[self.done..limit]);
        }
    }

    fn digest(&mut self, block: &[u8]) {
        if self.done < self.hasher.dense_bytes() {
            self.dense += 1;
        }
        self.xs.push(xxh3_64(block));
        self.done += block.len();
    }

    /// The chained hashes for `seed` into `out` (cleared first): what
    /// [`BlockHasher::hash_into`] gives for the finished prompt.
    pub fn chain_into(&self, seed: u64, out: &mut Vec<BlockHash>) {
        out.clear();
        out.reserve(self.xs.len());
        let mut prev = seed;
        for (i, &x) in self.xs.iter().enumerate() {
            prev = BlockHasher::mix(prev, x);
            out.push(BlockHasher::tag(prev, i < self.dense));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Digests `prompt` fed in pieces of `piece` bytes, as a body arrives.
    fn digested(h: BlockHasher, prompt: &[u8], piece: usize) -> BlockDigests {
        let mut d = BlockDigests::new(h);
        let mut end = 0;
        while end < prompt.len() {
            end = (end + piece).min(prompt.len());
            d.advance(&prompt[..end]);
        }
        d.finish(prompt);
        d
    }

    #[test]
    fn digests_chain_to_the_same_hashes_however_the_prompt_arrives() {
        let configs = [
            BlockHasher::default(),
            BlockHasher {
                block_size: 4,
                max_blocks: 3,
                max_bytes: 0,
            },
            BlockHasher {
                block_size: 5,
                max_blocks: 2,
                max_bytes: 10 + 5 * COARSE_STRIDE * 2 + 7,
            },
            BlockHasher {
                block_size: 0,
                max_blocks: 1,
                max_bytes: 40,
            },
        ];
        let mut rng = fastrand::Rng::with_seed(11);
        let mut prompt = vec![0u8; 40_000];
        rng.fill(&mut prompt);
        for h in configs {
            for len in [
                0, 1, 3, 4, 5, 11, 64, 65, 200, 1_000, 16_384, 16_385, 40_000,
            ] {
                let p = &prompt[..len];
                let expected = h.hash(9, p);
                for piece in [1, 7, 64, 1_000, 16_384, 40_000] {
                    let mut got = Vec::new();
                    digested(h, p, piece).chain_into(9, &mut got);
                    assert_eq!(got, expected, "{h:?}, {len} bytes in pieces of {piece}");
                }
            }
        }
    }

    #[test]
    fn digests_stop_at_the_hashed_limit() {
        let h = BlockHasher {
            block_size: 4,
            max_blocks: 3,
            max_bytes: 0,
        };
        let d = digested(h, &[1; 100], 9);
        assert_eq!(d.xs.len(), 3);
        assert_eq!(d.done, 12);
    }

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
    fn respects_caps_and_empty_prompt() {
        let h = BlockHasher {
            block_size: 4,
            max_blocks: 3,
            max_bytes: 0,
        };
        assert_eq!(h.hash(1, &[0; 100]).len(), 3);
        assert!(h.hash(1, b"").is_empty());
        assert_eq!(h.hash(1, b"abcde").len(), 2);
        assert_eq!(h.hashed_limit(), 12);
    }

    #[test]
    fn coarse_tail_covers_long_prompts_with_few_hashes() {
        let h = BlockHasher::default();
        let prompt = vec![b'q'; 200_000];
        let v = h.hash(7, &prompt);
        // 256 dense blocks (16 KiB), then ceil((200,000 − 16,384) / 1,024) = 180 coarse ones.
        assert_eq!(v.len(), 256 + 180);
        assert!(v[..256].iter().all(|x| !is_coarse(*x)));
        assert!(
            v[256..]
                .iter()
                .all(|x| is_coarse(*x) && weight(*x) == COARSE_STRIDE)
        );
        assert_eq!(h.covered_bytes(256, prompt.len()), 16_384);
        assert_eq!(h.covered_bytes(258, prompt.len()), 16_384 + 2_048);
        assert_eq!(h.covered_bytes(v.len(), prompt.len()), 200_000);
        // Coverage stops at max_bytes.
        let huge = vec![b'q'; DEFAULT_MAX_BYTES + 10_000];
        let v = h.hash(7, &huge);
        assert_eq!(h.covered_bytes(v.len(), huge.len()), DEFAULT_MAX_BYTES);
        assert_eq!(v.len(), 256 + (DEFAULT_MAX_BYTES - 16_384) / 1_024);
    }

    #[test]
    fn identical_blocks_at_different_positions_hash_differently() {
        let h = BlockHasher {
            block_size: 4,
            max_blocks: 10,
            max_bytes: 0,
        };
        let v = h.hash(7, b"abcdabcd");
        assert_ne!(v[0], v[1]);
    }
}
