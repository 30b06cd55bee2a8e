//! Peer routers' policies for the fleet simulator, written from their public documentation
//! (not their code), so that epp is judged against them on the same requests in one run.
//!
//! * [`SglangCacheAware`] — sglang-router's `cache_aware` policy: an approximate prefix tree of
//!   the request *text* per worker, filled with every request routed there and never told what
//!   the worker evicted; per-worker load = the router's own count of requests in flight. If the
//!   load is imbalanced (`max − min > balance_abs_threshold` (64) and `max > min ×
//!   balance_rel_threshold` (1.5)) the least-loaded worker gets the request; otherwise the
//!   worker with the longest text match gets it if the match covers more than
//!   `cache_threshold` (0.3) of the text, else the least-loaded one. The tree here holds
//!   8-byte-granular chained hashes instead of a character radix tree (its match lengths are
//!   rounded down to 8 characters).
//! * [`DynamoKv`] — Dynamo's KV router: the workers' *true* cached blocks (Dynamo receives KV
//!   events from the engines) and its own accounting of each worker's active work, in KV
//!   blocks: `cost = overlap_score_weight × (active prefill blocks + the request's uncached
//!   blocks) + (active decode blocks + the request's blocks)`, `overlap_score_weight` 1,
//!   temperature 0 (the lowest cost wins; ties at random). Prefill blocks leave the account at
//!   the first token; decode blocks grow with every generated token and leave at the end.

use std::collections::HashSet;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Characters per tree node in [`SglangCacheAware`]'s approximation of a radix tree.
const TEXT_GRANULE: usize = 8;

/// sglang-router `cache_aware` (see the module docs).
#[derive(Debug)]
pub struct SglangCacheAware {
    trees: Vec<HashSet<u64>>,
    loads: Vec<usize>,
    pub cache_threshold: f64,
    pub balance_abs_threshold: usize,
    pub balance_rel_threshold: f64,
}

fn text_hashes(text: &[u8]) -> Vec<u64> {
    let mut prev = 0x0591_7a4e;
    text.chunks(TEXT_GRANULE)
        .map(|c| {
            prev = xxh3_64_with_seed(c, prev);
            prev
        })
        .collect()
}

/// Leading entries of `hashes` present in `set` (the set is prefix-closed: binary search).
fn matched(set: &HashSet<u64>, hashes: &[u64]) -> usize {
    let (mut lo, mut hi) = (0, hashes.len());
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if set.contains(&hashes[mid - 1]) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Index of a minimum of `key` over `0..n`, ties broken at random.
fn argmin_random<K: PartialOrd + Copy>(
    n: usize,
    rng: &mut fastrand::Rng,
    key: impl Fn(usize) -> K,
) -> usize {
    let mut best = 0;
    let mut ties = 0u32;
    for i in 0..n {
        if i == 0 || key(i) < key(best) {
            best = i;
            ties = 1;
        } else if key(i) == key(best) {
            ties += 1;
            if rng.u32(..ties) == 0 {
                best = i;
            }
        }
    }
    best
}

impl SglangCacheAware {
    pub fn new(workers: usize) -> Self {
        Self {
            trees: vec![HashSet::new(); workers],
            loads: vec![0; workers],
            cache_threshold: 0.3,
            balance_abs_threshold: 64,
            balance_rel_threshold: 1.5,
        }
    }

    /// Picks the worker for `text` and counts the request against it.
    pub fn route(&mut self, text: &[u8], rng: &mut fastrand::Rng) -> usize {
        let n = self.loads.len();
        let hashes = text_hashes(text);
        let max = self.loads.iter().copied().max().unwrap_or(0);
        let min = self.loads.iter().copied().min().unwrap_or(0);
        let imbalanced = max - min > self.balance_abs_threshold
            && max as f64 > min as f64 * self.balance_rel_threshold;
        let least_loaded = |rng: &mut fastrand::Rng| argmin_random(n, rng, |i| self.loads[i]);
        let w = if imbalanced {
            least_loaded(rng)
        } else {
            let matches: Vec<usize> = self.trees.iter().map(|t| matched(t, &hashes)).collect();
            let best = argmin_random(n, rng, |i| (usize::MAX - matches[i], self.loads[i]));
            let rate =
                (matches[best] * TEXT_GRANULE).min(text.len()) as f64 / text.len().max(1) as f64;
            if rate > self.cache_threshold {
                best
            } else {
                least_loaded(rng)
            }
        };
        self.trees[w].extend(hashes);
        self.loads[w] += 1;
        w
    }

    /// A request on `worker` completed.
    pub fn finished(&mut self, worker: usize) {
        self.loads[worker] = self.loads[worker].saturating_sub(1);
    }
}

/// One request in [`DynamoKv`]'s accounting.
#[derive(Debug, Clone, Copy, Default)]
pub struct DynamoRequest {
    pub worker: usize,
    prefill_blocks: usize,
    decode_blocks: usize,
    tokens: usize,
}

/// Dynamo's KV router (see the module docs).
#[derive(Debug)]
pub struct DynamoKv {
    block_tokens: usize,
    prefill_blocks: Vec<usize>,
    decode_blocks: Vec<usize>,
    pub overlap_score_weight: f64,
}

impl DynamoKv {
    pub fn new(workers: usize, block_tokens: usize) -> Self {
        Self {
            block_tokens: block_tokens.max(1),
            prefill_blocks: vec![0; workers],
            decode_blocks: vec![0; workers],
            overlap_score_weight: 1.0,
        }
    }

    /// Picks the worker for a `prompt_tokens`-token request of which `cached_blocks[w]` leading
    /// blocks are cached on worker `w`, and accounts for it there.
    pub fn route(
        &mut self,
        prompt_tokens: usize,
        cached_blocks: &[usize],
        rng: &mut fastrand::Rng,
    ) -> DynamoRequest {
        let bt = self.block_tokens;
        let blocks = prompt_tokens.div_ceil(bt);
        let new_blocks = |w: usize| blocks.saturating_sub(cached_blocks[w]);
        let cost = |w: usize| {
            self.overlap_score_weight * (self.prefill_blocks[w] + new_blocks(w)) as f64
                + (self.decode_blocks[w] + blocks) as f64
        };
        let w = argmin_random(cached_blocks.len(), rng, cost);
        let r = DynamoRequest {
            worker: w,
            prefill_blocks: new_blocks(w),
            decode_blocks: blocks,
            tokens: prompt_tokens,
        };
        self.prefill_blocks[w] += r.prefill_blocks;
        self.decode_blocks[w] += r.decode_blocks;
        r
    }

    /// The first token arrived: the request's prefill leaves the account.
    pub fn first_token(&mut self, r: &mut DynamoRequest) {
        self.prefill_blocks[r.worker] -= std::mem::take(&mut r.prefill_blocks);
    }

    /// A token was generated: the request's KV may need another block.
    pub fn token(&mut self, r: &mut DynamoRequest) {
        r.tokens += 1;
        let blocks = r.tokens.div_ceil(self.block_tokens);
        if blocks > r.decode_blocks {
            self.decode_blocks[r.worker] += blocks - r.decode_blocks;
            r.decode_blocks = blocks;
        }
    }

    /// The request finished: everything it held leaves the account.
    pub fn finished(&mut self, r: &mut DynamoRequest) {
        self.first_token(r);
        self.decode_blocks[r.worker] -= std::mem::take(&mut r.decode_blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sglang_sticks_above_the_threshold_and_balances_below() {
        let mut s = SglangCacheAware::new(3);
        let mut rng = fastrand::Rng::with_seed(1);
        let long = "shared system prompt ".repeat(50);
        let a = s.route(format!("{long} question one").as_bytes(), &mut rng);
        for i in 0..10 {
            assert_eq!(
                s.route(format!("{long} question {i}").as_bytes(), &mut rng),
                a,
                "a long shared prefix sticks"
            );
        }
        // An unrelated prompt goes to the least-loaded worker.
        let b = s.route(b"completely different text here", &mut rng);
        assert_ne!(b, a);
        for _ in 0..11 {
            s.finished(a);
        }
        assert_eq!(s.loads[a], 0);
    }

    #[test]
    fn sglang_balances_when_loads_diverge() {
        let mut s = SglangCacheAware::new(2);
        let mut rng = fastrand::Rng::with_seed(2);
        let p = "p".repeat(400);
        let first = s.route(p.as_bytes(), &mut rng);
        s.loads[first] = 200;
        assert_ne!(s.route(p.as_bytes(), &mut rng), first);
    }

    #[test]
    fn dynamo_weighs_prefill_against_decode_load() {
        let mut d = DynamoKv::new(2, 16);
        let mut rng = fastrand::Rng::with_seed(3);
        // 160 tokens (10 blocks), 8 cached on worker 1: cost 0: 10+10 = 20, 1: 2+10 = 12.
        let mut r = d.route(160, &[0, 8], &mut rng);
        assert_eq!(r.worker, 1);
        d.first_token(&mut r);
        for _ in 0..16 {
            d.token(&mut r);
        }
        assert_eq!(d.decode_blocks[1], 11);
        d.finished(&mut r);
        assert_eq!((d.prefill_blocks[1], d.decode_blocks[1]), (0, 0));
    }
}
