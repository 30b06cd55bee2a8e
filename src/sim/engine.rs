//! A vLLM-like engine model: paged KV cache with prefix reuse, continuous batching with chunked
//! prefill, and a step-time model. Time is a plain `f64` of seconds so the same engine runs in
//! real time (`epp-sim`) and in virtual time (the fleet simulator).
//!
//! # KV cache
//! `num_blocks` blocks of `block_tokens` (16) tokens. A prompt's *full* blocks are identified by
//! chained hashes (block `i`'s hash covers tokens `0..16(i+1)`), so a cached block implies its
//! whole prefix is cached. Admission reuses the longest run of cached leading blocks (at least
//! one prompt token is always recomputed, as vLLM does). Blocks whose last user finished stay
//! cached and become evictable; eviction takes the least recently freed first, and a finished
//! request frees its blocks tail first, so shared heads outlive unique tails. Only prompt blocks
//! are cached (generated tokens are not).
//!
//! # Scheduling (one step)
//! Token budget `max_batched_tokens` per step: first every decoding sequence takes one token
//! (allocating a block when it crosses a block boundary; if none is free the most recently
//! admitted sequence is preempted back to the queue front, recomputing later), then running
//! prefills continue in chunks, then waiting requests are admitted FCFS while the budget,
//! `max_num_seqs` and free blocks allow (all of a prompt's blocks are allocated at admission).
//!
//! # Step time
//! `t = base + per_prefill_token·prefill_tokens + per_decode_seq·decode_seqs +
//!  per_kv_token·Σ decode context lengths`, see [`StepCost::h100_llama2_7b`] for the constants.

use std::collections::{BTreeSet, HashMap, VecDeque};

/// Step-time model constants (seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCost {
    pub base: f64,
    pub per_prefill_token: f64,
    pub per_decode_seq: f64,
    pub per_kv_token: f64,
}

impl StepCost {
    /// An H100 SXM 80 GB serving Llama-2-7B in bf16 (the seed's setup), from first principles:
    /// * `base` 5 ms: every step streams the 13.5 GB of weights from HBM at 3.35 TB/s (≈ 4.0 ms)
    ///   plus ~1 ms of scheduling, sampling and kernel-launch overhead.
    /// * `per_prefill_token` 25 µs: 2 × 6.7 G parameters = 13.4 GFLOP per token at ~55 % of the
    ///   989 dense bf16 TFLOPS (≈ 540 TFLOPS), i.e. ~40k prefill tokens/s, in line with
    ///   published vLLM prefill throughput for 7B models on H100.
    /// * `per_decode_seq` 20 µs: the same 13.4 GFLOP per generated token at decode's lower
    ///   efficiency (~670 TFLOPS-equivalent once batched), plus per-sequence sampling.
    /// * `per_kv_token` 0.16 µs: decoding reads each context token's KV: 2 × 32 layers × 4096 ×
    ///   2 bytes = 512 KiB per token (no GQA in Llama-2-7B) at 3.35 TB/s.
    pub fn h100_llama2_7b() -> Self {
        Self {
            base: 5e-3,
            per_prefill_token: 25e-6,
            per_decode_seq: 20e-6,
            per_kv_token: 0.16e-6,
        }
    }
}

/// Engine sizing and limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    /// KV blocks on the device. 6,500 for the H100 above: 80 GB × 0.9 utilisation − 13.5 GB
    /// weights − ~3 GB activations ≈ 55 GB, at 16 tokens × 512 KiB = 8 MiB per block
    /// (≈ 104k tokens).
    pub num_blocks: usize,
    /// Tokens per KV block (vLLM's default 16).
    pub block_tokens: usize,
    /// Most sequences running at once (vLLM's `max_num_seqs`, default 256).
    pub max_num_seqs: usize,
    /// Token budget per step (vLLM's `max_num_batched_tokens`, 8192 with chunked prefill).
    pub max_batched_tokens: usize,
    pub step: StepCost,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            num_blocks: 6_500,
            block_tokens: 16,
            max_num_seqs: 256,
            max_batched_tokens: 8_192,
            step: StepCost::h100_llama2_7b(),
        }
    }
}

/// A request as the engine sees it.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub id: u64,
    pub prompt_tokens: usize,
    /// Chained hashes of the prompt's full blocks.
    pub block_hashes: Vec<u64>,
    pub max_tokens: usize,
}

/// Something that happened to a request during a step (at the step's end time).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EngineEvent {
    /// The first output token (TTFT is measured here).
    FirstToken { id: u64 },
    /// A further output token.
    Token { id: u64 },
    /// Done; counts for usage reporting.
    Finished {
        id: u64,
        prompt_tokens: usize,
        cached_tokens: usize,
        output_tokens: usize,
    },
}

/// Result of one step.
#[derive(Debug, Clone, Default)]
pub struct Step {
    pub duration: f64,
    pub events: Vec<EngineEvent>,
    pub prefill_tokens: usize,
    pub decode_seqs: usize,
}

/// What the engine exports as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineMetrics {
    pub waiting: usize,
    pub running: usize,
    /// Referenced blocks / all blocks (cached-but-idle blocks count as free, as in vLLM).
    pub kv_usage: f64,
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub num_blocks: usize,
    pub block_tokens: usize,
}

#[derive(Debug, Clone)]
struct Block {
    hash: Option<u64>,
    refs: u32,
    freed_at: u64,
}

#[derive(Debug)]
struct Seq {
    req: EngineRequest,
    blocks: Vec<u32>,
    /// Prompt tokens computed (or found cached).
    computed: usize,
    generated: usize,
    cached_tokens: usize,
    /// Whether the first-token event was already emitted (a preempted sequence keeps it).
    first_emitted: bool,
}

/// The engine. See the module docs.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    blocks: Vec<Block>,
    /// Hash → block, for cached full prompt blocks.
    cache: HashMap<u64, u32>,
    never_used: Vec<u32>,
    /// Cached blocks nobody references, oldest first: `(freed_at, block)`.
    evictable: BTreeSet<(u64, u32)>,
    tick: u64,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    prefix_query_tokens: u64,
    prefix_hit_tokens: u64,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            blocks: vec![
                Block {
                    hash: None,
                    refs: 0,
                    freed_at: 0
                };
                cfg.num_blocks
            ],
            cache: HashMap::new(),
            never_used: (0..cfg.num_blocks as u32).rev().collect(),
            evictable: BTreeSet::new(),
            tick: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            prefix_query_tokens: 0,
            prefix_hit_tokens: 0,
            cfg,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Whether a request of this size can ever run (its prompt and output fit in the cache).
    pub fn fits(&self, prompt_tokens: usize, max_tokens: usize) -> bool {
        self.blocks_for(prompt_tokens + max_tokens) <= self.cfg.num_blocks
    }

    /// Queues a request.
    pub fn add_request(&mut self, req: EngineRequest) {
        let req = EngineRequest {
            max_tokens: req.max_tokens.max(1),
            prompt_tokens: req.prompt_tokens.max(1),
            ..req
        };
        self.waiting.push_back(Seq {
            req,
            blocks: Vec::new(),
            computed: 0,
            generated: 0,
            cached_tokens: 0,
            first_emitted: false,
        });
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn metrics(&self) -> EngineMetrics {
        let free = self.never_used.len() + self.evictable.len();
        EngineMetrics {
            waiting: self.waiting.len(),
            running: self.running.len(),
            kv_usage: 1.0 - free as f64 / self.cfg.num_blocks as f64,
            prefix_query_tokens: self.prefix_query_tokens,
            prefix_hit_tokens: self.prefix_hit_tokens,
            num_blocks: self.cfg.num_blocks,
            block_tokens: self.cfg.block_tokens,
        }
    }

    /// How many leading blocks of `hashes` are cached right now (for the oracle policy).
    pub fn cached_prefix_blocks(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.cache.contains_key(h))
            .count()
    }

    /// Prompt tokens still to be computed by queued and running requests (for the oracle).
    pub fn pending_prefill_tokens(&self) -> usize {
        let running: usize = self
            .running
            .iter()
            .map(|s| s.req.prompt_tokens - s.computed)
            .sum();
        let waiting: usize = self.waiting.iter().map(|s| s.req.prompt_tokens).sum();
        running + waiting
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.cfg.block_tokens)
    }

    fn free_blocks(&self) -> usize {
        self.never_used.len() + self.evictable.len()
    }

    /// Takes a free block, evicting the least recently freed cached block if needed.
    fn allocate(&mut self) -> Option<u32> {
        let id = match self.never_used.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self.evictable.pop_first()?;
                if let Some(h) = self.blocks[id as usize].hash.take() {
                    self.cache.remove(&h);
                }
                id
            }
        };
        self.blocks[id as usize].refs = 1;
        Some(id)
    }

    fn retain(&mut self, id: u32) {
        let b = &mut self.blocks[id as usize];
        if b.refs == 0 {
            self.evictable.remove(&(b.freed_at, id));
        }
        b.refs += 1;
    }

    /// Drops a sequence's block references, tail first (so tails are evicted first).
    fn release(&mut self, blocks: &[u32]) {
        for &id in blocks.iter().rev() {
            self.tick += 1;
            let b = &mut self.blocks[id as usize];
            b.refs -= 1;
            if b.refs == 0 {
                if b.hash.is_some() {
                    b.freed_at = self.tick;
                    self.evictable.insert((self.tick, id));
                } else {
                    self.never_used.push(id);
                }
            }
        }
    }

    /// Tries to admit the front waiting sequence; false if it does not fit now.
    fn admit_front(&mut self) -> bool {
        let Some(seq) = self.waiting.front() else {
            return false;
        };
        let bt = self.cfg.block_tokens;
        let total = self.blocks_for(seq.req.prompt_tokens);
        let mut hits = self.cached_prefix_blocks(&seq.req.block_hashes);
        // Always compute at least one prompt token.
        if hits * bt >= seq.req.prompt_tokens {
            hits = hits.saturating_sub(1);
        }
        let hit_ids: Vec<u32> = seq.req.block_hashes[..hits]
            .iter()
            .map(|h| self.cache[h])
            .collect();
        let hits_idle = hit_ids
            .iter()
            .filter(|id| self.blocks[**id as usize].refs == 0)
            .count();
        let needed = total - hits;
        if needed > self.free_blocks() - hits_idle {
            return false;
        }
        let mut seq = self.waiting.pop_front().expect("front exists");
        for &id in &hit_ids {
            self.retain(id);
        }
        seq.blocks = hit_ids;
        for _ in 0..needed {
            let id = self.allocate().expect("checked free blocks");
            seq.blocks.push(id);
        }
        seq.computed = hits * bt;
        seq.cached_tokens = seq.cached_tokens.max(hits * bt);
        self.prefix_query_tokens += seq.req.prompt_tokens as u64;
        self.prefix_hit_tokens += (hits * bt) as u64;
        self.running.push(seq);
        true
    }

    /// Registers the sequence's prompt blocks that are now fully computed.
    fn register_computed(&mut self, i: usize) {
        let bt = self.cfg.block_tokens;
        let seq = &self.running[i];
        let full = (seq.computed / bt).min(seq.req.block_hashes.len());
        for b in 0..full {
            let h = seq.req.block_hashes[b];
            let id = seq.blocks[b];
            if self.blocks[id as usize].hash.is_none() && !self.cache.contains_key(&h) {
                self.blocks[id as usize].hash = Some(h);
                self.cache.insert(h, id);
            }
        }
    }

    /// Preempts the most recently admitted running sequence (recompute later).
    fn preempt_last(&mut self) -> bool {
        let Some(mut seq) = self.running.pop() else {
            return false;
        };
        let blocks = std::mem::take(&mut seq.blocks);
        self.release(&blocks);
        seq.computed = 0;
        self.waiting.push_front(seq);
        true
    }

    /// Plans and "executes" one step starting now; returns its duration and what happened at
    /// its end. A step with nothing to do has zero duration and no events.
    pub fn step(&mut self) -> Step {
        let bt = self.cfg.block_tokens;
        let mut budget = self.cfg.max_batched_tokens;
        let mut out = Step::default();
        let mut kv_read = 0usize;

        // 1. Decodes: one token each, growing blocks as needed.
        let mut i = 0;
        let mut decoding: Vec<usize> = Vec::new();
        while i < self.running.len() {
            let s = &self.running[i];
            if s.computed < s.req.prompt_tokens {
                i += 1;
                continue;
            }
            let context = s.req.prompt_tokens + s.generated;
            // The next token goes at position `context`: it needs context + 1 slots.
            if (context + 1).div_ceil(bt) > s.blocks.len() {
                match self.allocate() {
                    Some(id) => self.running[i].blocks.push(id),
                    None => {
                        // Free the newest sequence (possibly this one) and try again.
                        self.preempt_last();
                        continue;
                    }
                }
            }
            if budget == 0 {
                break;
            }
            budget -= 1;
            kv_read += context;
            decoding.push(i);
            i += 1;
        }

        // 2. Running prefills continue; 3. waiting requests are admitted.
        let mut prefilled: Vec<(usize, usize)> = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if s.computed < s.req.prompt_tokens && !decoding.contains(&i) {
                let chunk = (s.req.prompt_tokens - s.computed).min(budget);
                budget -= chunk;
                prefilled.push((i, chunk));
            }
        }
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs && self.admit_front() {
            let i = self.running.len() - 1;
            let s = &self.running[i];
            let chunk = (s.req.prompt_tokens - s.computed).min(budget);
            budget -= chunk;
            prefilled.push((i, chunk));
        }

        let prefill_tokens: usize = prefilled.iter().map(|(_, c)| c).sum();
        if prefill_tokens == 0 && decoding.is_empty() {
            return out;
        }
        let c = self.cfg.step;
        out.duration = c.base
            + c.per_prefill_token * prefill_tokens as f64
            + c.per_decode_seq * decoding.len() as f64
            + c.per_kv_token * kv_read as f64;
        out.prefill_tokens = prefill_tokens;
        out.decode_seqs = decoding.len();

        // Apply the step's effects.
        for &(i, chunk) in &prefilled {
            self.running[i].computed += chunk;
            self.register_computed(i);
            let s = &mut self.running[i];
            if s.computed == s.req.prompt_tokens {
                if s.first_emitted {
                    // Recomputed after preemption: the next token continues the output.
                    s.generated += 1;
                    out.events.push(EngineEvent::Token { id: s.req.id });
                } else {
                    s.first_emitted = true;
                    s.generated = 1;
                    out.events.push(EngineEvent::FirstToken { id: s.req.id });
                }
            }
        }
        for &i in &decoding {
            let s = &mut self.running[i];
            s.generated += 1;
            out.events.push(EngineEvent::Token { id: s.req.id });
        }
        // Finish.
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            if s.computed == s.req.prompt_tokens && s.generated >= s.req.max_tokens {
                let s = self.running.remove(i);
                self.release(&s.blocks);
                out.events.push(EngineEvent::Finished {
                    id: s.req.id,
                    prompt_tokens: s.req.prompt_tokens,
                    cached_tokens: s.cached_tokens,
                    output_tokens: s.generated,
                });
            } else {
                i += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(blocks: usize) -> EngineConfig {
        EngineConfig {
            num_blocks: blocks,
            block_tokens: 16,
            max_num_seqs: 8,
            max_batched_tokens: 4096,
            step: StepCost::h100_llama2_7b(),
        }
    }

    /// A request whose full blocks are `hashes` (16 tokens each) plus `extra` tokens.
    fn req(id: u64, hashes: &[u64], extra: usize, out: usize) -> EngineRequest {
        EngineRequest {
            id,
            prompt_tokens: hashes.len() * 16 + extra,
            block_hashes: hashes.to_vec(),
            max_tokens: out,
        }
    }

    fn run(e: &mut Engine) -> Vec<EngineEvent> {
        let mut all = Vec::new();
        for _ in 0..10_000 {
            if !e.has_work() {
                break;
            }
            all.extend(e.step().events);
        }
        all
    }

    fn cached(events: &[EngineEvent], want: u64) -> usize {
        events
            .iter()
            .find_map(|e| match e {
                EngineEvent::Finished {
                    id, cached_tokens, ..
                } if *id == want => Some(*cached_tokens),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn full_hit_partial_hit_and_miss() {
        let mut e = Engine::new(cfg(100));
        e.add_request(req(1, &[1, 2, 3, 4], 5, 2));
        let ev = run(&mut e);
        assert_eq!(cached(&ev, 1), 0);
        e.add_request(req(2, &[1, 2, 3, 4], 5, 2));
        e.add_request(req(3, &[1, 2, 9, 9], 0, 2));
        e.add_request(req(4, &[7, 8], 0, 2));
        let ev = run(&mut e);
        assert_eq!(cached(&ev, 2), 64, "all four blocks hit");
        assert_eq!(cached(&ev, 3), 32, "shared head only");
        assert_eq!(cached(&ev, 4), 0);
        let m = e.metrics();
        assert_eq!(m.prefix_hit_tokens, 96);
        assert_eq!(m.kv_usage, 0.0, "idle cached blocks count as free");
    }

    #[test]
    fn fully_cached_prompt_recomputes_last_block() {
        let mut e = Engine::new(cfg(100));
        e.add_request(req(1, &[1, 2], 0, 1));
        run(&mut e);
        e.add_request(req(2, &[1, 2], 0, 1));
        let ev = run(&mut e);
        assert_eq!(cached(&ev, 2), 16);
    }

    #[test]
    fn eviction_takes_least_recently_freed_tail_first() {
        // 6 blocks: request A (3 blocks + 1 decode block), then B needs 4 → evicts A's tail.
        let mut e = Engine::new(cfg(6));
        e.add_request(req(1, &[1, 2, 3], 0, 1));
        run(&mut e);
        e.add_request(req(2, &[7, 8, 9, 10], 0, 1));
        run(&mut e);
        assert_eq!(
            e.cached_prefix_blocks(&[1, 2, 3]),
            2,
            "A's tail block 3 went first"
        );
        assert_eq!(e.cached_prefix_blocks(&[7, 8, 9, 10]), 4);
    }

    #[test]
    fn capacity_bounds_admission_and_cache() {
        let mut e = Engine::new(cfg(5));
        e.add_request(req(1, &[1, 2, 3, 4], 0, 3));
        e.add_request(req(2, &[5, 6, 7, 8], 0, 3));
        e.step();
        assert_eq!(e.metrics().running, 1, "second prompt does not fit");
        assert_eq!(e.metrics().waiting, 1);
        let ev = run(&mut e);
        assert_eq!(
            ev.iter()
                .filter(|x| matches!(x, EngineEvent::Finished { .. }))
                .count(),
            2
        );
        assert!(e.cache.len() <= 5);
    }

    #[test]
    fn outputs_exact_token_counts_and_timing_grows_with_prefill() {
        let mut e = Engine::new(cfg(1000));
        e.add_request(req(1, &[1; 0], 100, 5));
        let first = e.step();
        assert!(matches!(first.events[0], EngineEvent::FirstToken { id: 1 }));
        let c = StepCost::h100_llama2_7b();
        assert!((first.duration - (c.base + 100.0 * c.per_prefill_token)).abs() < 1e-12);
        let ev = run(&mut e);
        let tokens = ev
            .iter()
            .filter(|x| matches!(x, EngineEvent::Token { .. }))
            .count();
        assert_eq!(tokens, 4);
        assert!(matches!(
            ev.last(),
            Some(EngineEvent::Finished {
                output_tokens: 5,
                ..
            })
        ));
    }

    #[test]
    fn chunked_prefill_respects_token_budget() {
        let mut e = Engine::new(EngineConfig {
            max_batched_tokens: 64,
            ..cfg(1000)
        });
        e.add_request(req(1, &[], 200, 1));
        let s = e.step();
        assert_eq!(s.prefill_tokens, 64);
        assert!(s.events.is_empty());
        let mut steps = 1;
        while e.has_work() {
            e.step();
            steps += 1;
        }
        assert_eq!(steps, 4, "200 tokens in chunks of 64");
    }
}
