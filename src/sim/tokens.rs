//! The simulator's tokenizer: deterministic, ~4 characters per token (the usual figure for
//! English text with Llama-family tokenizers). A prompt of `n` bytes is `ceil(n / 4)` tokens and
//! its KV block `i` (16 tokens) covers bytes `64i..64(i+1)`. Block hashes are chained xxh3 over
//! those bytes, seeded by the model name: the engine's own identity for cached blocks,
//! computed independently of epp's router-side hashing.
//!
//! Byte-aligned tokens make epp's 64-byte blocks coincide with the engine's blocks; real
//! tokenizers blur block boundaries, which this simulation does not model.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

pub const CHARS_PER_TOKEN: usize = 4;

pub fn count(prompt: &[u8]) -> usize {
    prompt.len().div_ceil(CHARS_PER_TOKEN)
}

/// Chained hashes of the prompt's full blocks of `block_tokens` tokens.
pub fn block_hashes(model: &str, prompt: &[u8], block_tokens: usize) -> Vec<u64> {
    let block_bytes = block_tokens * CHARS_PER_TOKEN;
    let mut prev = xxh3_64(model.as_bytes()) ^ 0x005e_ed0f_b10c;
    prompt
        .chunks_exact(block_bytes)
        .map(|b| {
            prev = xxh3_64_with_seed(b, prev);
            prev
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_chars_per_token_and_full_blocks_only() {
        assert_eq!(count(b"abcde"), 2);
        let p = vec![b'a'; 64 * 3 + 10];
        let h = block_hashes("m", &p, 16);
        assert_eq!(h.len(), 3);
        assert_ne!(h[0], h[1]);
        assert_ne!(block_hashes("n", &p, 16)[0], h[0]);
    }
}
