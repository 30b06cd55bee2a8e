//! A vLLM-like engine model: paged KV cache with prefix reuse, continuous batching with chunked
//! prefill, and a step-time model. Time is a plain `f64` of seconds so the same engine runs in
//! real time (`epp-sim`) and in virtual time (the fleet simulator).
//!
//! # Tokens and KV cache
//! Requests arrive as token ids of the simulator's own tokenizer and chat template
//! ([`super::tokenizer`]), not as bytes. The cache holds `num_blocks` blocks of `block_tokens`
//! (16) tokens. A *full* block is identified by the chained hash of its token ids (block `i`'s
//! hash covers tokens `0..16(i+1)` and the model name), so a cached block implies its whole
//! prefix is cached. Full prompt blocks are registered when the step that computes them is
//! scheduled, as vLLM (v1) caches a block when it allocates it for a step: a request admitted
//! in the same step, or while that step runs, reuses a prefix another request is computing
//! instead of computing it again (both get their first token when the step ends). Blocks
//! filled by generated tokens are registered during decode, as in vLLM, so a follow-up turn
//! that sends the answer back hits on them. Admission reuses the longest run of
//! cached leading blocks (at least one prompt token is always recomputed). Blocks whose last
//! user finished stay cached and become evictable; eviction takes the least recently freed
//! first, and a finished request frees its blocks tail first, so shared heads outlive unique
//! tails. With `prefix_caching` off (vLLM's `--no-enable-prefix-caching`) nothing is reused:
//! every prompt is computed whole.
//!
//! # Output
//! Generation is deterministic for a given prompt (greedy decoding): words of the simulator's
//! lexicon drawn from a generator seeded by the prompt's tokens, one token per step.
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
//!
//! # What the metrics say
//! `reported_blocks` (when set) is what the engine *claims* in its cache-config metric; it may
//! differ from the blocks it really has, as it can on real servers (memory reserved elsewhere,
//! a misconfigured exporter).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::text::WordSampler;
use super::tokenizer::{TokenId, tokenizer};

/// Step-time model constants (seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCost {
    pub base: f64,
    pub per_prefill_token: f64,
    pub per_decode_seq: f64,
    pub per_kv_token: f64,
}

impl StepCost {
    /// The same costs on hardware `speed` times as fast (0.25: four times slower).
    pub fn at_speed(self, speed: f64) -> Self {
        let f = 1.0 / speed.max(1e-6);
        Self {
            base: self.base * f,
            per_prefill_token: self.per_prefill_token * f,
            per_decode_seq: self.per_decode_seq * f,
            per_kv_token: self.per_kv_token * f,
        }
    }

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
    /// Blocks the engine claims in its metrics (`None`: the truth).
    pub reported_blocks: Option<usize>,
    /// Tokens per KV block (vLLM's default 16).
    pub block_tokens: usize,
    /// Most sequences running at once (vLLM's `max_num_seqs`, default 256).
    pub max_num_seqs: usize,
    /// Token budget per step (vLLM's `max_num_batched_tokens`, 8192 with chunked prefill).
    pub max_batched_tokens: usize,
    /// Reuse cached prefixes (vLLM's `--enable-prefix-caching`, on by default). Off, every
    /// prompt is computed whole, whatever the engine computed before.
    pub prefix_caching: bool,
    pub step: StepCost,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            num_blocks: 6_500,
            reported_blocks: None,
            block_tokens: 16,
            max_num_seqs: 256,
            max_batched_tokens: 8_192,
            prefix_caching: true,
            step: StepCost::h100_llama2_7b(),
        }
    }
}

/// A request as the engine sees it.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub id: u64,
    /// The prompt's token ids (after the chat template).
    pub prompt: Arc<[TokenId]>,
    pub max_tokens: usize,
}

/// Something that happened to a request during a step (at the step's end time).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EngineEvent {
    /// The first output token (TTFT is measured here).
    FirstToken { id: u64, token: TokenId },
    /// A further output token.
    Token { id: u64, token: TokenId },
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
    /// Blocks claimed (see [`EngineConfig::reported_blocks`]).
    pub num_blocks: usize,
    pub block_tokens: usize,
    /// [`EngineConfig::prefix_caching`], as vLLM's cache config reports it.
    pub prefix_caching: bool,
}

#[derive(Debug, Clone)]
struct Block {
    hash: Option<u64>,
    refs: u32,
    freed_at: u64,
}

/// Deterministic output: lexicon words from a generator seeded by the prompt.
#[derive(Debug)]
struct Generator {
    rng: fastrand::Rng,
    pending: VecDeque<TokenId>,
    started: bool,
}

static WORDS: std::sync::LazyLock<WordSampler> = std::sync::LazyLock::new(WordSampler::default);

impl Generator {
    fn new(prompt: &[TokenId]) -> Self {
        let bytes: Vec<u8> = prompt.iter().flat_map(|t| t.to_le_bytes()).collect();
        Self {
            rng: fastrand::Rng::with_seed(xxh3_64(&bytes)),
            pending: VecDeque::new(),
            started: false,
        }
    }

    fn next_token(&mut self) -> TokenId {
        if self.pending.is_empty() {
            let w = WORDS.word(&mut self.rng);
            let chunk = if self.started {
                format!(" {w}")
            } else {
                w.to_owned()
            };
            self.started = true;
            self.pending.extend(tokenizer().encode(&chunk));
        }
        self.pending.pop_front().unwrap_or(0)
    }
}

#[derive(Debug)]
struct Seq {
    req: EngineRequest,
    /// Prompt then generated tokens.
    tokens: Vec<TokenId>,
    /// Chained hashes of the full blocks of `tokens` computed so far.
    hashes: Vec<u64>,
    blocks: Vec<u32>,
    /// Tokens to prefill: the prompt, or after a preemption everything generated so far too.
    target: usize,
    /// Of those, computed (or found cached).
    computed: usize,
    generated: usize,
    cached_tokens: usize,
    /// Whether the first-token event was already emitted (a preempted sequence keeps it).
    first_emitted: bool,
    generator: Generator,
}

/// The engine. See the module docs.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    seed: u64,
    blocks: Vec<Block>,
    /// Hash → block, for cached full blocks.
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

/// Chained hashes of the full `block_tokens`-token blocks of `tokens`, seeded by `seed`.
pub fn block_hashes(seed: u64, tokens: &[TokenId], block_tokens: usize) -> Vec<u64> {
    let mut prev = seed;
    tokens
        .chunks_exact(block_tokens.max(1))
        .map(|b| {
            let bytes: Vec<u8> = b.iter().flat_map(|t| t.to_le_bytes()).collect();
            prev = xxh3_64_with_seed(&bytes, prev);
            prev
        })
        .collect()
}

/// The hash seed of a served model's blocks.
pub fn model_seed(model: &str) -> u64 {
    xxh3_64(model.as_bytes()) ^ 0x005e_ed0f_b10c
}

impl Engine {
    pub fn new(cfg: EngineConfig, model: &str) -> Self {
        Self {
            blocks: vec![
                Block {
                    hash: None,
                    refs: 0,
                    freed_at: 0
                };
                cfg.num_blocks
            ],
            seed: model_seed(model),
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

    /// Chained hashes of the full blocks of `tokens` as this engine names them.
    pub fn hashes_of(&self, tokens: &[TokenId]) -> Vec<u64> {
        block_hashes(self.seed, tokens, self.cfg.block_tokens)
    }

    /// Queues a request.
    pub fn add_request(&mut self, req: EngineRequest) {
        let req = EngineRequest {
            max_tokens: req.max_tokens.max(1),
            prompt: if req.prompt.is_empty() {
                Arc::from(vec![super::tokenizer::BEGIN_OF_TEXT])
            } else {
                req.prompt
            },
            ..req
        };
        let hashes = self.hashes_of(&req.prompt);
        self.waiting.push_back(Seq {
            tokens: req.prompt.to_vec(),
            generator: Generator::new(&req.prompt),
            req,
            hashes,
            blocks: Vec::new(),
            target: 0,
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
            num_blocks: self.cfg.reported_blocks.unwrap_or(self.cfg.num_blocks),
            block_tokens: self.cfg.block_tokens,
            prefix_caching: self.cfg.prefix_caching,
        }
    }

    /// How many leading blocks of `hashes` are cached right now (for oracles and peers that
    /// see the true cache); none without prefix caching.
    pub fn cached_prefix_blocks(&self, hashes: &[u64]) -> usize {
        if !self.cfg.prefix_caching {
            return 0;
        }
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
            .map(|s| s.target.saturating_sub(s.computed))
            .sum();
        let waiting: usize = self.waiting.iter().map(|s| s.tokens.len()).sum();
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

    /// Tries to admit the front waiting sequence; false if it does not fit now. A sequence
    /// preempted earlier recomputes its generated tokens too.
    fn admit_front(&mut self) -> bool {
        let Some(seq) = self.waiting.front() else {
            return false;
        };
        let bt = self.cfg.block_tokens;
        let target = seq.tokens.len();
        let total = self.blocks_for(target);
        let mut hits = self.cached_prefix_blocks(&seq.hashes);
        // Always compute at least one token.
        if hits * bt >= target {
            hits = hits.saturating_sub(1);
        }
        let hit_ids: Vec<u32> = seq.hashes[..hits].iter().map(|h| self.cache[h]).collect();
        let hits_idle = hit_ids
            .iter()
            .filter(|id| self.blocks[**id as usize].refs == 0)
            .count();
        let needed = total - hits;
        if needed > self.free_blocks() - hits_idle {
            return false;
        }
        let Some(mut seq) = self.waiting.pop_front() else {
            return false;
        };
        for &id in &hit_ids {
            self.retain(id);
        }
        seq.blocks = hit_ids;
        for _ in 0..needed {
            match self.allocate() {
                Some(id) => seq.blocks.push(id),
                None => unreachable!("free blocks were counted above"),
            }
        }
        seq.target = target;
        seq.computed = hits * bt;
        if !seq.first_emitted {
            seq.cached_tokens = hits * bt;
            // As in vLLM, an engine without prefix caching does not look its cache up at all.
            if self.cfg.prefix_caching {
                self.prefix_query_tokens += seq.req.prompt.len() as u64;
                self.prefix_hit_tokens += (hits * bt) as u64;
            }
        }
        self.running.push(seq);
        true
    }

    /// Registers block `b` of sequence `i` under its hash, unless the hash is cached already.
    fn register_block(&mut self, i: usize, b: usize) {
        let seq = &self.running[i];
        let (Some(&h), Some(&id)) = (seq.hashes.get(b), seq.blocks.get(b)) else {
            return;
        };
        if self.blocks[id as usize].hash.is_none() && !self.cache.contains_key(&h) {
            self.blocks[id as usize].hash = Some(h);
            self.cache.insert(h, id);
        }
    }

    /// Registers the sequence's full blocks that its `chunk` planned for this step computes.
    fn register_planned(&mut self, i: usize, chunk: usize) {
        let bt = self.cfg.block_tokens;
        let s = &self.running[i];
        debug_assert!(s.computed + chunk <= s.target);
        let full = ((s.computed + chunk) / bt).min(s.hashes.len());
        for b in s.computed / bt..full {
            self.register_block(i, b);
        }
    }

    /// Appends a generated token; a block it fills is hashed and registered (decode blocks
    /// are cached too).
    fn push_generated(&mut self, i: usize) -> TokenId {
        let bt = self.cfg.block_tokens;
        let seed = self.seed;
        let s = &mut self.running[i];
        let token = s.generator.next_token();
        s.tokens.push(token);
        s.generated += 1;
        if s.tokens.len().is_multiple_of(bt) {
            let prev = s.hashes.last().copied().unwrap_or(seed);
            let block = &s.tokens[s.tokens.len() - bt..];
            let bytes: Vec<u8> = block.iter().flat_map(|t| t.to_le_bytes()).collect();
            s.hashes.push(xxh3_64_with_seed(&bytes, prev));
            let b = s.hashes.len() - 1;
            self.register_block(i, b);
        }
        token
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

    /// Decoding sequences take one token each (growing blocks as needed); returns their
    /// indices and the KV tokens they read.
    fn plan_decodes(&mut self, budget: &mut usize) -> (Vec<usize>, usize) {
        let bt = self.cfg.block_tokens;
        let mut kv_read = 0usize;
        let mut decoding: Vec<usize> = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            if s.computed < s.target {
                i += 1;
                continue;
            }
            let context = s.tokens.len();
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
            if *budget == 0 {
                break;
            }
            *budget -= 1;
            kv_read += context;
            decoding.push(i);
            i += 1;
        }
        (decoding, kv_read)
    }

    /// Running prefills continue, then waiting requests are admitted, within `budget`.
    fn plan_prefills(&mut self, budget: &mut usize, decoding: &[usize]) -> Vec<(usize, usize)> {
        let mut prefilled: Vec<(usize, usize)> = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            if *budget == 0 {
                break;
            }
            if s.computed < s.target && !decoding.contains(&i) {
                let chunk = (s.target - s.computed).min(*budget);
                *budget -= chunk;
                prefilled.push((i, chunk));
            }
        }
        for &(i, chunk) in &prefilled {
            self.register_planned(i, chunk);
        }
        while *budget > 0 && self.running.len() < self.cfg.max_num_seqs && self.admit_front() {
            let i = self.running.len() - 1;
            let s = &self.running[i];
            let chunk = (s.target - s.computed).min(*budget);
            *budget -= chunk;
            prefilled.push((i, chunk));
            self.register_planned(i, chunk);
        }
        prefilled
    }

    /// Plans and "executes" one step starting now; returns its duration and what happened at
    /// its end. A step with nothing to do has zero duration and no events.
    pub fn step(&mut self) -> Step {
        let mut budget = self.cfg.max_batched_tokens;
        let mut out = Step::default();
        let (decoding, kv_read) = self.plan_decodes(&mut budget);
        let prefilled = self.plan_prefills(&mut budget, &decoding);
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
        self.apply_prefills(&prefilled, &mut out.events);
        for &i in &decoding {
            let token = self.push_generated(i);
            out.events.push(EngineEvent::Token {
                id: self.running[i].req.id,
                token,
            });
        }
        self.finish_done(&mut out.events);
        out
    }

    /// Applies the prefill chunks; a sequence whose prefill completes produces a token.
    fn apply_prefills(&mut self, prefilled: &[(usize, usize)], events: &mut Vec<EngineEvent>) {
        for &(i, chunk) in prefilled {
            self.running[i].computed += chunk;
            let s = &self.running[i];
            if s.computed < s.target {
                continue;
            }
            let id = s.req.id;
            let first = !s.first_emitted;
            self.running[i].first_emitted = true;
            let token = self.push_generated(i);
            events.push(if first {
                EngineEvent::FirstToken { id, token }
            } else {
                // Recomputed after preemption: the next token continues the output.
                EngineEvent::Token { id, token }
            });
        }
    }

    /// Retires the sequences that produced all their tokens.
    fn finish_done(&mut self, events: &mut Vec<EngineEvent>) {
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            if s.target > 0 && s.computed >= s.target && s.generated >= s.req.max_tokens {
                let s = self.running.remove(i);
                self.release(&s.blocks);
                events.push(EngineEvent::Finished {
                    id: s.req.id,
                    prompt_tokens: s.req.prompt.len(),
                    cached_tokens: s.cached_tokens,
                    output_tokens: s.generated,
                });
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(blocks: usize) -> EngineConfig {
        EngineConfig {
            num_blocks: blocks,
            max_num_seqs: 8,
            max_batched_tokens: 4096,
            ..Default::default()
        }
    }

    /// 16 tokens per label in `blocks`, then `extra` more.
    fn tokens(blocks: &[u32], extra: usize) -> Vec<TokenId> {
        let mut t: Vec<TokenId> = blocks
            .iter()
            .flat_map(|b| (0..16).map(move |i| 1000 + b * 16 + i))
            .collect();
        t.extend((0..extra as u32).map(|i| 90_000 + i));
        t
    }

    fn req(id: u64, prompt: Vec<TokenId>, out: usize) -> EngineRequest {
        EngineRequest {
            id,
            prompt: Arc::from(prompt),
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

    fn output(events: &[EngineEvent], want: u64) -> Vec<TokenId> {
        events
            .iter()
            .filter_map(|e| match e {
                EngineEvent::FirstToken { id, token } | EngineEvent::Token { id, token }
                    if *id == want =>
                {
                    Some(*token)
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn full_hit_partial_hit_and_miss() {
        let mut e = Engine::new(cfg(100), "m");
        e.add_request(req(1, tokens(&[1, 2, 3, 4], 5), 2));
        let ev = run(&mut e);
        assert_eq!(cached(&ev, 1), 0);
        e.add_request(req(2, tokens(&[1, 2, 3, 4], 5), 2));
        e.add_request(req(3, tokens(&[1, 2, 9, 9], 0), 2));
        e.add_request(req(4, tokens(&[7, 8], 0), 2));
        let ev = run(&mut e);
        assert_eq!(cached(&ev, 2), 64, "all four blocks hit");
        assert_eq!(cached(&ev, 3), 32, "shared head only");
        assert_eq!(cached(&ev, 4), 0);
        let m = e.metrics();
        assert_eq!(m.prefix_hit_tokens, 96);
        assert_eq!(m.kv_usage, 0.0, "idle cached blocks count as free");
    }

    #[test]
    fn without_prefix_caching_every_prompt_is_computed_whole() {
        let mut e = Engine::new(
            EngineConfig {
                prefix_caching: false,
                ..cfg(100)
            },
            "m",
        );
        e.add_request(req(1, tokens(&[1, 2, 3, 4], 5), 2));
        run(&mut e);
        e.add_request(req(2, tokens(&[1, 2, 3, 4], 5), 2));
        let first = e.step();
        assert_eq!(
            first.prefill_tokens, 69,
            "the same prompt again, computed whole"
        );
        let ev = run(&mut e);
        assert_eq!(cached(&ev, 2), 0);
        assert_eq!(e.cached_prefix_blocks(&e.hashes_of(&tokens(&[1, 2], 0))), 0);
        let m = e.metrics();
        assert_eq!((m.prefix_hit_tokens, m.prefix_query_tokens), (0, 0));
        assert!(!m.prefix_caching, "reported as vLLM's cache config does");
    }

    #[test]
    fn a_prefix_being_computed_is_shared_by_requests_admitted_in_the_same_step() {
        let mut e = Engine::new(cfg(100), "m");
        e.add_request(req(1, tokens(&[1, 2, 3, 4], 5), 2));
        e.add_request(req(2, tokens(&[1, 2, 3, 4], 7), 2));
        let first = e.step();
        // 69 tokens for the first, only the 7 past the shared 64 for the second.
        assert_eq!(first.prefill_tokens, 69 + 7);
        let firsts = first
            .events
            .iter()
            .filter(|ev| matches!(ev, EngineEvent::FirstToken { .. }))
            .count();
        assert_eq!(firsts, 2, "both first tokens come at the end of that step");
        let ev = run(&mut e);
        assert_eq!(cached(&ev, 1), 0);
        assert_eq!(cached(&ev, 2), 64);
    }

    #[test]
    fn generated_blocks_are_cached_for_the_next_turn() {
        let mut e = Engine::new(cfg(100), "m");
        let prompt = tokens(&[1, 2], 0);
        e.add_request(req(1, prompt.clone(), 40));
        let ev = run(&mut e);
        let answer = output(&ev, 1);
        assert_eq!(answer.len(), 40);
        // Same prompt, same answer: greedy decoding is deterministic.
        e.add_request(req(2, prompt.clone(), 40));
        assert_eq!(output(&run(&mut e), 2), answer);
        let mut next = prompt;
        next.extend_from_slice(&answer);
        next.extend(tokens(&[5], 3));
        e.add_request(req(3, next, 2));
        let ev = run(&mut e);
        // 32 prompt + 40 generated = 72 tokens: 4 full blocks, 2 of them generated.
        assert_eq!(cached(&ev, 3), 64);
    }

    #[test]
    fn fully_cached_prompt_recomputes_last_block() {
        let mut e = Engine::new(cfg(100), "m");
        e.add_request(req(1, tokens(&[1, 2], 0), 1));
        run(&mut e);
        e.add_request(req(2, tokens(&[1, 2], 0), 1));
        let ev = run(&mut e);
        assert_eq!(cached(&ev, 2), 16);
    }

    #[test]
    fn eviction_takes_least_recently_freed_tail_first() {
        // 6 blocks: request A (3 blocks + 1 decode block), then B needs 4 → evicts A's tail.
        let mut e = Engine::new(cfg(6), "m");
        e.add_request(req(1, tokens(&[1, 2, 3], 0), 1));
        run(&mut e);
        e.add_request(req(2, tokens(&[7, 8, 9, 10], 0), 1));
        run(&mut e);
        let a = e.hashes_of(&tokens(&[1, 2, 3], 0));
        assert_eq!(e.cached_prefix_blocks(&a), 2, "A's tail block 3 went first");
        let b = e.hashes_of(&tokens(&[7, 8, 9, 10], 0));
        assert_eq!(e.cached_prefix_blocks(&b), 4);
    }

    #[test]
    fn capacity_bounds_admission_and_cache() {
        let mut e = Engine::new(cfg(5), "m");
        e.add_request(req(1, tokens(&[1, 2, 3, 4], 0), 3));
        e.add_request(req(2, tokens(&[5, 6, 7, 8], 0), 3));
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
    fn reported_capacity_may_differ_from_the_real_one() {
        let e = Engine::new(
            EngineConfig {
                reported_blocks: Some(9_000),
                ..cfg(100)
            },
            "m",
        );
        assert_eq!(e.metrics().num_blocks, 9_000);
        assert!(!e.fits(2_000, 16), "admission follows the real 100 blocks");
    }

    #[test]
    fn outputs_exact_token_counts_and_timing_grows_with_prefill() {
        let mut e = Engine::new(cfg(1000), "m");
        e.add_request(req(1, tokens(&[], 100), 5));
        let first = e.step();
        assert!(matches!(
            first.events[0],
            EngineEvent::FirstToken { id: 1, .. }
        ));
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
        let mut e = Engine::new(
            EngineConfig {
                max_batched_tokens: 64,
                ..cfg(1000)
            },
            "m",
        );
        e.add_request(req(1, tokens(&[], 200), 1));
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
