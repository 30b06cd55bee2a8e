//! `prefix-cache-scorer`: routes a request to where its prompt prefix is (probably) cached.
//!
//! Algorithm (GIE proposal 0602, DESIGN §5):
//! 1. *pre-schedule*: hash the prompt into chained blocks (see [`crate::index::hash`]: 64-byte
//!    blocks for the first `maxPrefixBlocksToMatch` (256), then 1 KiB blocks up to
//!    `maxPrefixTokensToMatch` (131,072) × 4 bytes), seeded by the target model and
//!    `cache_salt`; look the hashes up in the [`PrefixIndex`] to get, per endpoint, the number
//!    of leading blocks it holds, and publish the match in bytes as the context's
//!    [`PrefixMatchInfo`] (read by the affinity filter and the load accounting).
//! 2. *score*: `matched_bytes / hashed_bytes` (0 for an empty prompt).
//! 3. *post-schedule*: record all the request's blocks as held by the chosen endpoint, at once,
//!    not when the response arrives (so a burst sharing a prefix follows the first request).
//!
//! Each endpoint holds at most `lruCapacityPerServer` KV blocks (default 31,250; a coarse block
//! counts 16), least recently used evicted first. With `autoTune` (default true) an endpoint
//! that reports its cache size (`vllm:cache_config_info`) gets a capacity of exactly that many
//! tokens, in epp blocks: tokens × the endpoint's bytes per token, learned from its responses'
//! `usage.prompt_tokens` ([`crate::datastore::tokenization`]; 4 until it has seen enough).
//! With `learnCapacity` (default true) that capacity is scaled by the share of it the engine
//! really keeps, learned from the `cached_tokens` its responses report where the index had
//! predicted a hit ([`crate::datastore::cache_fit`]; post-schedule notes the prediction on the
//! load reservation, the response checks it): an engine whose metrics claim more cache than it
//! has, or name none, is not credited with prefixes it has evicted.
//! Endpoints leaving the datastore are purged from the index.
//!
//! Pre-schedule also publishes, per endpoint whose cache is full, the cached bytes recording
//! the request there would evict, weighted by the share of evicted blocks the pool has lately
//! asked for again ([`PrefixIndex::displacement`]; 0 where prompts are unique, so evicting
//! them costs nothing). `prefill-cost-scorer` prices it.
//!
//! With `respectEnablePrefixCaching` (default true) an endpoint whose engine reports prefix
//! caching off (`enable_prefix_caching="False"` in `vllm:cache_config_info`, vLLM's
//! `--no-enable-prefix-caching`) matches nothing and is not recorded: it computes every prompt
//! whole, so a prefix it was sent before buys nothing there. Turn it off for engines that reuse
//! prefixes outside their own cache (a KV connector such as LMCache behind a vLLM whose own
//! prefix cache is off).
//!
//! `approx-prefix-cache-producer` is the same plugin without the scorer role.

use std::sync::{Arc, OnceLock};

use crate::datastore::cache_fit::{self, CacheCheck};
use crate::datastore::load::Reservation;
use crate::datastore::{Candidate, Endpoint, EndpointId, EndpointObserver};
use crate::index::hash::CHARS_PER_TOKEN;
use crate::index::recorder::Recorder;
use crate::index::{BlockHash, BlockHasher, PrefixIndex, PrefixMatch};
use crate::scheduling::framework::{
    PluginId, PostSchedule, PreSchedule, PrefixMatchInfo, ScheduleResult, SchedulingContext,
    Scorer, next_plugin_id,
};

pub const TYPE: &str = "prefix-cache-scorer";

/// Parameters of the prefix plugin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixConfig {
    pub hasher: BlockHasher,
    pub lru_capacity_per_server: usize,
    pub auto_tune: bool,
    /// Endpoints reporting prefix caching off match nothing (see the module docs).
    pub respect_enable_prefix_caching: bool,
    /// Scale each endpoint's capacity by the share its engine keeps (see the module docs).
    pub learn_capacity: bool,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        Self {
            hasher: BlockHasher::default(),
            lru_capacity_per_server: crate::index::DEFAULT_LRU_CAPACITY_PER_SERVER,
            auto_tune: true,
            respect_enable_prefix_caching: true,
            learn_capacity: true,
        }
    }
}

/// Observes prefix-match quality (epp's metrics implement it).
pub trait PrefixObserver: Send + Sync {
    /// `matched_bytes` of the `hashed_bytes` hashed were already on the chosen endpoint.
    fn observe_match(&self, matched_bytes: usize, hashed_bytes: usize);
    /// Index size changed.
    fn observe_index_size(&self, entries: usize);
}

/// The prefix-cache plugin: pre-schedule, scorer and post-schedule in one.
pub struct PrefixCachePlugin {
    id: PluginId,
    config: PrefixConfig,
    index: Arc<PrefixIndex>,
    observer: Option<Arc<dyn PrefixObserver>>,
    /// Set by [`PrefixCachePlugin::record_in_background`] or
    /// [`PrefixCachePlugin::record_after_reply`]; otherwise decisions record inline.
    recorder: OnceLock<Recorder>,
}

impl std::fmt::Debug for PrefixCachePlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixCachePlugin")
            .field("config", &self.config)
            .field("entries", &self.index.len())
            .finish()
    }
}

/// What pre-schedule learned about this request (private to this plugin instance).
struct PrefixState {
    hashes: Vec<BlockHash>,
    /// Leading blocks each endpoint holds, as the index matched them.
    matched: PrefixMatch,
    info: PrefixMatchInfo,
}

impl PrefixCachePlugin {
    pub fn new(config: PrefixConfig) -> Self {
        Self {
            id: next_plugin_id(),
            index: Arc::new(PrefixIndex::new(config.lru_capacity_per_server)),
            config,
            observer: None,
            recorder: OnceLock::new(),
        }
    }

    /// Moves recording off the request path (see [`Recorder`]); the fleet simulator and the
    /// tests keep the inline, deterministic recording.
    pub fn record_in_background(&self) -> std::io::Result<()> {
        if self.recorder.get().is_none() {
            let _ = self.recorder.set(Recorder::spawn(self.index.clone())?);
        }
        Ok(())
    }

    /// Queues each decision's record until [`PrefixCachePlugin::apply_pending_records`] (the
    /// ext_proc stream calls it once its reply is sent) or the next decision's match.
    pub fn record_after_reply(&self) {
        let _ = self.recorder.set(Recorder::after_reply(self.index.clone()));
    }

    /// Whether decisions queue their records (see [`PrefixCachePlugin::record_after_reply`]).
    pub fn defers_records(&self) -> bool {
        self.recorder.get().is_some()
    }

    /// Applies the records decisions have queued (nothing when recording is inline), and
    /// reports the index's new size.
    pub fn apply_pending_records(&self) {
        let Some(r) = self.recorder.get() else {
            return;
        };
        r.sync();
        if let Some(o) = &self.observer {
            o.observe_index_size(self.index.len());
        }
    }

    pub fn with_observer(mut self, observer: Arc<dyn PrefixObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn index(&self) -> &Arc<PrefixIndex> {
        &self.index
    }

    pub fn config(&self) -> &PrefixConfig {
        &self.config
    }

    /// Capacity in epp blocks for an endpoint reporting `num_gpu_blocks` of `block_size_tokens`,
    /// whose tokens stand for `bytes_per_token` bytes of prompt.
    fn tuned_capacity(
        &self,
        num_gpu_blocks: u64,
        block_size_tokens: u32,
        bytes_per_token: f64,
    ) -> usize {
        let tokens = num_gpu_blocks.saturating_mul(u64::from(block_size_tokens));
        // Eighths of a byte: the capacity does not follow every response's rounding.
        let eighths = (bytes_per_token * 8.0).round() as u64;
        let bytes = tokens.saturating_mul(eighths) / 8;
        (bytes / self.config.hasher.block_size.max(1) as u64).max(1) as usize
    }

    /// Sets the index's capacity for `target`: its cache size (with `autoTune`, where its
    /// metrics report one) or `lruCapacityPerServer`, times the share its engine was found to
    /// keep (with `learnCapacity`). Returns the unscaled capacity.
    fn tune_capacity(&self, target: &Candidate) -> usize {
        let base = match (
            self.config.auto_tune,
            target.metrics.num_gpu_blocks,
            target.metrics.block_size_tokens,
        ) {
            (true, Some(blocks), Some(size)) => {
                let bytes_per_token = self.bytes_per_token(&target.endpoint);
                self.tuned_capacity(blocks, size, bytes_per_token)
            }
            _ => self.config.lru_capacity_per_server,
        };
        let want = if self.config.learn_capacity {
            ((base as f64 * target.endpoint.cache_fit.scale()).round() as usize).max(1)
        } else {
            base
        };
        let pod = target.endpoint.id;
        if self.index.capacity(pod) != want {
            self.index.set_capacity(pod, want);
        }
        base
    }

    /// Notes on the reservation what the index predicts the chosen endpoint holds, for its
    /// response's cached tokens to check ([`crate::datastore::cache_fit`]): the predicted share
    /// of the prompt and the depth of its last block over `base`. A block recorded since by no
    /// more than the prompts still waiting for their prefill there is too fresh to check: the
    /// engine may not have computed it yet.
    fn note_cache_check(
        &self,
        state: &PrefixState,
        target: &Candidate,
        reservation: &Reservation,
        base: usize,
        prompt_len: usize,
    ) {
        let pod = target.endpoint.id;
        let blocks = state.matched.blocks_for(pod).min(state.hashes.len());
        if !self.config.learn_capacity || blocks == 0 || prompt_len == 0 {
            return;
        }
        let predicted = state.info.matched_bytes(pod) as f64 / prompt_len as f64;
        if predicted < cache_fit::MIN_PREDICTED {
            return;
        }
        let Some(depth) = self.index.depth(pod, state.hashes[blocks - 1]) else {
            return;
        };
        let endpoint = &target.endpoint;
        let waiting_bytes = endpoint.load.pending_prefill() as f64 * self.bytes_per_token(endpoint);
        if depth as f64 * self.config.hasher.block_size as f64 <= waiting_bytes {
            return;
        }
        reservation.note_cache_check(CacheCheck {
            predicted: predicted.min(1.0),
            depth: depth as f64 / base.max(1) as f64,
        });
    }

    fn bytes_per_token(&self, endpoint: &Endpoint) -> f64 {
        endpoint
            .tokenization
            .bytes_per_token()
            .unwrap_or(CHARS_PER_TOKEN as f64)
    }

    fn state<'c>(&self, ctx: &'c SchedulingContext<'_>) -> Option<&'c PrefixState> {
        ctx.state.get::<PrefixState>(self.id)
    }

    /// `(endpoint, bytes)` of cached prompt that recording `hashes` would displace on each
    /// candidate that reuses prefixes ([`PrefixIndex::displacement`], in bytes).
    fn displaced(
        &self,
        hashes: &[BlockHash],
        matched: &PrefixMatch,
        candidates: &[Candidate],
        no_reuse: &[EndpointId],
    ) -> Vec<(EndpointId, usize)> {
        let pods = candidates
            .iter()
            .map(|c| c.endpoint.id)
            .filter(|pod| no_reuse.binary_search(pod).is_err());
        let block_bytes = self.config.hasher.block_size as f64;
        self.index
            .displacement(hashes, matched, pods)
            .into_iter()
            .map(|(pod, blocks)| (pod, (blocks * block_bytes) as usize))
            .collect()
    }

    /// Whether `metrics` say the endpoint computes every prompt whole (and this plugin
    /// believes it).
    fn reuses_nothing(&self, metrics: &crate::datastore::EndpointMetrics) -> bool {
        self.config.respect_enable_prefix_caching && metrics.prefix_caching == Some(false)
    }
}

impl PreSchedule for PrefixCachePlugin {
    fn name(&self) -> &str {
        TYPE
    }

    fn pre_schedule(&self, ctx: &mut SchedulingContext<'_>, candidates: &[Candidate]) {
        let req = ctx.request;
        let hasher = &self.config.hasher;
        let seed = BlockHasher::seed(&req.target_model, req.cache_salt.as_deref());
        let mut hashes = Vec::new();
        match &req.digests {
            Some(d) if d.hasher() == hasher => d.chain_into(seed, &mut hashes),
            _ => hasher.hash_into(seed, &req.prompt, &mut hashes),
        }
        if let Some(r) = self.recorder.get() {
            r.sync();
        }
        let matched = self.index.match_prefix(&hashes);
        let len = req.prompt_len();
        // Usually empty, and then without an allocation.
        let mut no_reuse: Vec<_> = candidates
            .iter()
            .filter(|c| self.reuses_nothing(&c.metrics))
            .map(|c| c.endpoint.id)
            .collect();
        no_reuse.sort_unstable();
        let displaced = self.displaced(&hashes, &matched, candidates, &no_reuse);
        let info = PrefixMatchInfo {
            hashed_bytes: hasher.covered_bytes(hashes.len(), len),
            matched: matched
                .pods
                .iter()
                .filter(|(pod, _)| no_reuse.binary_search(pod).is_err())
                .map(|&(pod, blocks)| (pod, hasher.covered_bytes(blocks, len)))
                .collect(),
            displaced,
        };
        if ctx.prefix.is_none() {
            ctx.prefix = Some(info.clone());
        }
        ctx.state.insert(
            self.id,
            PrefixState {
                hashes,
                matched,
                info,
            },
        );
    }
}

impl Scorer for PrefixCachePlugin {
    fn name(&self) -> &str {
        TYPE
    }

    fn score(&self, ctx: &SchedulingContext<'_>, candidates: &[&Candidate], scores: &mut [f64]) {
        let Some(state) = self.state(ctx) else {
            return;
        };
        for (c, s) in candidates.iter().zip(scores.iter_mut()) {
            *s = state.info.ratio(c.endpoint.id);
        }
    }
}

impl PostSchedule for PrefixCachePlugin {
    fn name(&self) -> &str {
        TYPE
    }

    fn post_schedule(&self, ctx: &SchedulingContext<'_>, result: &ScheduleResult) {
        let Some(state) = self.state(ctx) else {
            return;
        };
        let target = result.primary();
        let pod = target.endpoint.id;
        let base = self.tune_capacity(target);
        if let Some(r) = &result.reservation {
            self.note_cache_check(state, target, r, base, ctx.request.prompt_len());
        }
        if !self.reuses_nothing(&target.metrics) {
            match self.recorder.get() {
                Some(r) => r.record(pod, state.hashes.clone()),
                None => self.index.record(pod, &state.hashes),
            }
        }
        if let Some(o) = &self.observer {
            o.observe_match(state.info.matched_bytes(pod), state.info.hashed_bytes);
            o.observe_index_size(self.index.len());
        }
    }
}

impl EndpointObserver for PrefixCachePlugin {
    fn endpoint_removed(&self, endpoint: &Endpoint) {
        self.index.remove_pod(endpoint.id);
        if let Some(o) = &self.observer {
            o.observe_index_size(self.index.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::EndpointMetrics;
    use crate::request::LlmRequest;
    use crate::scheduling::plugins::test_support::candidates;

    fn req(prompt: &str) -> LlmRequest {
        LlmRequest {
            model: "m".into(),
            target_model: "m".into(),
            prompt: prompt.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    /// Runs the plugin's three steps for `r` with `cs[pick]` chosen (with a load reservation
    /// there if `reserve`, as the profile takes one); returns the scores and the result.
    fn decide(
        p: &PrefixCachePlugin,
        r: &LlmRequest,
        cs: &[Candidate],
        pick: usize,
        reserve: bool,
    ) -> (Vec<f64>, ScheduleResult) {
        let mut ctx = SchedulingContext::new(r, fastrand::Rng::with_seed(1));
        p.pre_schedule(&mut ctx, cs);
        let refs: Vec<_> = cs.iter().collect();
        let mut s = vec![0.0; cs.len()];
        p.score(&ctx, &refs, &mut s);
        let result = ScheduleResult {
            targets: vec![cs[pick].clone()],
            scores: vec![0.0],
            profile: "t".into(),
            reservation: reserve
                .then(|| Reservation::new(cs[pick].endpoint.clone(), Default::default())),
        };
        p.post_schedule(&ctx, &result);
        (s, result)
    }

    fn run(p: &PrefixCachePlugin, r: &LlmRequest, cs: &[Candidate], pick: usize) -> Vec<f64> {
        decide(p, r, cs, pick, false).0
    }

    #[test]
    fn scores_fraction_of_prompt_cached() {
        let p = PrefixCachePlugin::new(PrefixConfig::default());
        let cs = candidates(&[EndpointMetrics::default(), EndpointMetrics::default()]);
        let long = "x".repeat(64 * 4);
        assert_eq!(run(&p, &req(&long), &cs, 1), vec![0.0, 0.0]);
        assert_eq!(run(&p, &req(&long), &cs, 1), vec![0.0, 1.0]);
        let mut half = "x".repeat(64 * 2);
        half.push_str(&"y".repeat(64 * 2));
        assert_eq!(run(&p, &req(&half), &cs, 0), vec![0.0, 0.5]);
        assert_eq!(run(&p, &req(""), &cs, 0), vec![0.0, 0.0]);
    }

    #[test]
    fn different_models_do_not_share_blocks() {
        let p = PrefixCachePlugin::new(PrefixConfig::default());
        let cs = candidates(&[EndpointMetrics::default()]);
        let prompt = "z".repeat(200);
        run(&p, &req(&prompt), &cs, 0);
        let mut other = req(&prompt);
        other.target_model = "n".into();
        assert_eq!(run(&p, &other, &cs, 0), vec![0.0]);
    }

    /// One endpoint reporting a KV cache of 100 blocks of 16 tokens.
    fn one_pod_of_100_blocks() -> Vec<Candidate> {
        candidates(&[EndpointMetrics {
            num_gpu_blocks: Some(100),
            block_size_tokens: Some(16),
            ..Default::default()
        }])
    }

    #[test]
    fn auto_tune_sizes_capacity_from_cache_config() {
        let p = PrefixCachePlugin::new(PrefixConfig::default());
        let cs = one_pod_of_100_blocks();
        for c in ["q", "r", "s"] {
            run(&p, &req(&c.repeat(64 * 50)), &cs, 0);
        }
        // 100 blocks × 16 tokens × 4 chars / 64 chars per epp block = 100: of three 50-block
        // prompts, the oldest was evicted.
        assert_eq!(p.index().capacity(cs[0].endpoint.id), 100);
        assert_eq!(p.index().pod_len(cs[0].endpoint.id), 100);
    }

    #[test]
    fn auto_tune_uses_the_endpoints_learned_bytes_per_token() {
        let p = PrefixCachePlugin::new(PrefixConfig::default());
        let cs = one_pod_of_100_blocks();
        // Its responses said 5 bytes per token (25,000 bytes in 5,000 prompt tokens).
        cs[0].endpoint.tokenization.observe(25_000, 5_000);
        for c in ["q", "r"] {
            run(&p, &req(&c.repeat(64 * 60)), &cs, 0);
        }
        // 100 × 16 tokens × 5 bytes / 64 = 125 blocks: both 60-block prompts fit (at 4 bytes
        // per token, 100 blocks, the first would have been evicted).
        assert_eq!(p.index().capacity(cs[0].endpoint.id), 125);
        assert_eq!(p.index().pod_len(cs[0].endpoint.id), 120);
        assert_eq!(run(&p, &req(&"q".repeat(64 * 60)), &cs, 0), vec![1.0]);
    }

    /// Schedules `r` on `cs[0]` with a load reservation, as the profile does.
    fn reserve(p: &PrefixCachePlugin, r: &LlmRequest, cs: &[Candidate]) -> ScheduleResult {
        decide(p, r, cs, 0, true).1
    }

    #[test]
    fn an_engine_missing_a_predicted_prefix_shrinks_its_capacity() {
        for learn in [true, false] {
            let p = PrefixCachePlugin::new(PrefixConfig {
                learn_capacity: learn,
                ..Default::default()
            });
            let cs = one_pod_of_100_blocks();
            let (a, b) = (req(&"a".repeat(64 * 40)), req(&"b".repeat(64 * 40)));
            run(&p, &a, &cs, 0);
            run(&p, &b, &cs, 0);
            // The index holds `a` behind `b`'s 40 blocks; the engine answers that it had
            // nothing of it cached.
            let mut result = reserve(&p, &a, &cs);
            result.reservation.as_mut().unwrap().observe_cached(0, 640);
            run(&p, &b, &cs, 0);
            let capacity = p.index().capacity(cs[0].endpoint.id);
            if learn {
                // Half way from 100 down to `a`'s depth: the 40 blocks recorded since.
                assert_eq!(capacity, 70);
            } else {
                assert_eq!(capacity, 100);
            }
        }
    }

    #[test]
    fn a_confirmed_hit_or_a_fresh_prompt_does_not_shrink_it() {
        let p = PrefixCachePlugin::new(PrefixConfig::default());
        let cs = one_pod_of_100_blocks();
        let (a, b) = (req(&"a".repeat(64 * 40)), req(&"b".repeat(64 * 40)));
        run(&p, &a, &cs, 0);
        run(&p, &b, &cs, 0);
        reserve(&p, &a, &cs)
            .reservation
            .unwrap()
            .observe_cached(600, 640);
        // Never sent before: nothing predicted, nothing checked.
        reserve(&p, &req(&"c".repeat(64 * 10)), &cs)
            .reservation
            .unwrap()
            .observe_cached(0, 160);
        assert_eq!(cs[0].endpoint.cache_fit.scale(), 1.0);
    }

    #[test]
    fn removed_endpoint_is_purged() {
        let p = PrefixCachePlugin::new(PrefixConfig::default());
        let cs = candidates(&[EndpointMetrics::default()]);
        run(&p, &req(&"a".repeat(300)), &cs, 0);
        assert!(!p.index().is_empty());
        p.endpoint_removed(&cs[0].endpoint);
        assert!(p.index().is_empty());
    }

    #[test]
    fn an_engine_reporting_prefix_caching_off_matches_nothing_and_is_not_recorded() {
        let off = EndpointMetrics {
            prefix_caching: Some(false),
            ..Default::default()
        };
        let on = EndpointMetrics {
            prefix_caching: Some(true),
            ..Default::default()
        };
        let prompt = req(&"p".repeat(64 * 4));
        let p = PrefixCachePlugin::new(PrefixConfig::default());
        let cs = candidates(&[off.clone(), on]);
        run(&p, &prompt, &cs, 0);
        assert_eq!(p.index().pod_len(cs[0].endpoint.id), 0, "not recorded");
        run(&p, &prompt, &cs, 1);
        assert_eq!(run(&p, &prompt, &cs, 1), vec![0.0, 1.0]);

        // The same endpoint, before it reported the flag: its entries stop counting once it does.
        let p = PrefixCachePlugin::new(PrefixConfig::default());
        let unknown = candidates(&[EndpointMetrics::default()]);
        run(&p, &prompt, &unknown, 0);
        assert_eq!(run(&p, &prompt, &unknown, 0), vec![1.0]);
        let reported = vec![Candidate {
            metrics: std::sync::Arc::new(off.clone()),
            ..unknown[0].clone()
        }];
        assert_eq!(run(&p, &prompt, &reported, 0), vec![0.0]);
        let mut ctx = SchedulingContext::new(&prompt, fastrand::Rng::with_seed(1));
        p.pre_schedule(&mut ctx, &reported);
        assert_eq!(ctx.prefix.unwrap().longest(), 0, "the published match, too");

        // respectEnablePrefixCaching: false (reuse outside the engine's own cache).
        let p = PrefixCachePlugin::new(PrefixConfig {
            respect_enable_prefix_caching: false,
            ..PrefixConfig::default()
        });
        let cs = candidates(&[off]);
        run(&p, &prompt, &cs, 0);
        assert_eq!(run(&p, &prompt, &cs, 0), vec![1.0]);
    }
}
