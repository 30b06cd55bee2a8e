//! The prefix index: which pods (probably) hold which prompt blocks in their KV cache.
//!
//! Layout, chosen for a small per-entry footprint and no global lock:
//!
//! * **Reverse map**, sharded: `SHARDS` hash tables ([`table`]: linear probing, no tombstones)
//!   behind their own `RwLock`, storing 12-byte entries `(block hash, pod slot, generation)`. A
//!   block held by several pods has one entry per pod (a multimap), so "who holds block h" is
//!   one probe run. The block hash is already uniform: its low bits pick the slot, bits 32..40
//!   the shard.
//! * **Per-pod recency**: generation buckets ([`buckets`]) behind the pod's own mutex: the
//!   hashes recorded in each generation; an entry's generation says which bucket it lives in.
//!   A block recorded again in the same generation costs one lookup and nothing else; eviction
//!   removes whole buckets, oldest first. There are no duplicate slots to compact and no
//!   per-record work proportional to anything but the record itself.
//!
//! **Prefix closure.** A record stamps all of a prompt's blocks with the current generation,
//! and block `i`'s chained hash only ever arrives together with blocks `0..i`, so a block's
//! generation is never older than any later block's of the same prompt; whole-bucket eviction
//! then keeps every pod's set of blocks closed under prefixes, and a pod's match length is
//! found by *binary search* over the request's blocks instead of a walk over all of them: a
//! decision probes O(log n) blocks per distinct match length rather than n. (vLLM also frees a
//! request's blocks tail first.)
//!
//! **Departed pods.** Removing a pod purges its entries and frees its slot; a record that
//! races the removal is dropped (the pod id is remembered as removed until the next
//! [`PrefixIndex::reconcile`], which also drops any pod the datastore no longer has).
//!
//! Lock order: pods map, then pod mutex, then one shard lock at a time. Matching takes shard
//! read locks only. Recording groups a request's blocks by shard and takes each shard's lock
//! once. [`recorder::Recorder`] moves recording off the request path.

mod buckets;
mod ghosts;
pub mod hash;
pub mod recorder;
mod table;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};

use buckets::PodBuckets;
use ghosts::{Ghosts, Share};
pub use hash::{BlockDigests, BlockHash, BlockHasher};
use table::{EMPTY_SLOT, Table};

/// Identity of a pod as the datastore knows it (the endpoint id).
pub type PodId = u32;
/// Dense per-index pod number (reused after a pod is removed), kept small for compact entries.
type Slot = u16;

/// Default per-pod capacity in blocks (GIE's default, sized for an H100 80 GB serving an 8B
/// model: ~73 GB of HBM for KV at 128 KiB per token is ~500k tokens = 31,250 blocks of 16).
pub const DEFAULT_LRU_CAPACITY_PER_SERVER: usize = 31_250;

const SHARDS: usize = 64;

/// 12 bytes: the hash is split so the struct needs only 4-byte alignment.
#[derive(Debug, Clone, Copy)]
struct Entry {
    hash_lo: u32,
    hash_hi: u32,
    slot: Slot,
    /// The pod generation this block was last recorded in.
    generation: u16,
}

impl Entry {
    #[inline]
    fn hash(&self) -> BlockHash {
        (u64::from(self.hash_hi) << 32) | u64::from(self.hash_lo)
    }
}

#[derive(Debug)]
struct PodCache {
    slot: Slot,
    buckets: PodBuckets,
    /// Distinct blocks held.
    live: usize,
    /// KV blocks they stand for (a coarse block counts [`hash::COARSE_STRIDE`]); bounded by
    /// `capacity`.
    weight: usize,
    capacity: usize,
    removed: bool,
}

/// A pod's cache behind its mutex, and the room it has left, published for decisions.
#[derive(Debug)]
struct PodEntry {
    cache: Mutex<PodCache>,
    /// KV blocks the pod can take without evicting (`capacity - weight`) as of its last change.
    room: AtomicUsize,
}

impl PodEntry {
    fn lock(&self) -> parking_lot::MutexGuard<'_, PodCache> {
        self.cache.lock()
    }

    fn publish_room(&self, pc: &PodCache) {
        let room = pc.capacity.saturating_sub(pc.weight);
        self.room.store(room, Ordering::Relaxed);
    }
}

/// Identity hasher for small integer ids (pod ids are dense and already distinct).
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n);
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A `HashMap` keyed by pod id.
pub type PodMap<V> = HashMap<PodId, V, BuildHasherDefault<IdHasher>>;

#[derive(Debug, Default)]
struct Pods {
    by_id: PodMap<Arc<PodEntry>>,
    /// `owner[slot]`: the pod using a slot, if any.
    owner: Vec<Option<PodId>>,
    /// Pods removed since the last reconcile (a late record for them is dropped).
    removed: HashSet<PodId, BuildHasherDefault<IdHasher>>,
    /// Pods removed before the last reconcile.
    removed_before: HashSet<PodId, BuildHasherDefault<IdHasher>>,
}

/// One shard, alone on its cache lines: neighbouring shards' lock words would otherwise share a
/// line, and two threads recording into different shards would still contend for it.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(RwLock<Table>);

impl std::ops::Deref for Shard {
    type Target = RwLock<Table>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// Sharded reverse map plus per-pod generation buckets. See the module docs.
#[derive(Debug)]
pub struct PrefixIndex {
    shards: Box<[Shard]>,
    pods: RwLock<Pods>,
    default_capacity: usize,
    entries: AtomicUsize,
    /// Evicted blocks and how many came back (taken after any other lock, alone).
    ghosts: Mutex<Ghosts>,
    /// `ghosts`' share, published for decisions.
    returning: Share,
}

/// How long a prefix each pod holds, in blocks.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrefixMatch {
    /// `(pod, leading blocks held)`, sorted by pod, for pods holding at least the first block.
    pub pods: Vec<(PodId, usize)>,
    /// Length of the longest match.
    pub longest: usize,
}

impl PrefixMatch {
    pub fn blocks_for(&self, pod: PodId) -> usize {
        self.pods
            .binary_search_by_key(&pod, |(p, _)| *p)
            .map_or(0, |i| self.pods[i].1)
    }
}

#[inline]
fn shard_of(hash: BlockHash) -> usize {
    ((hash >> 32) as usize) & (SHARDS - 1)
}

impl Default for PrefixIndex {
    fn default() -> Self {
        Self::new(DEFAULT_LRU_CAPACITY_PER_SERVER)
    }
}

impl PrefixIndex {
    /// An empty index whose pods hold at most `default_capacity` blocks each unless
    /// [`PrefixIndex::set_capacity`] says otherwise.
    pub fn new(default_capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            pods: RwLock::new(Pods::default()),
            default_capacity: default_capacity.max(1),
            entries: AtomicUsize::new(0),
            ghosts: Mutex::default(),
            returning: Share::default(),
        }
    }

    /// Number of live `(block, pod)` entries.
    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the index's tables and buckets (allocation sizes, not just live entries).
    pub fn memory_bytes(&self) -> usize {
        let tables: usize = self.shards.iter().map(|s| s.read().allocation_size()).sum();
        let buckets: usize = self
            .pods
            .read()
            .by_id
            .values()
            .map(|p| p.lock().buckets.bytes())
            .sum();
        tables + buckets
    }

    /// Hashes stored in one pod's buckets (live and stale), for tests and benches.
    pub fn pod_stored(&self, pod: PodId) -> usize {
        self.pods
            .read()
            .by_id
            .get(&pod)
            .map_or(0, |p| p.lock().buckets.stored())
    }

    /// Slots of the pods holding `hash`.
    fn holders(&self, hash: BlockHash, out: &mut Vec<Slot>) {
        out.clear();
        let shard = self.shards[shard_of(hash)].read();
        out.extend(shard.iter_hash(hash).map(|e| e.slot));
    }

    /// For each pod, how many of the leading `hashes` it holds (binary search per group of
    /// pods, relying on prefix closure; see the module docs).
    pub fn match_prefix(&self, hashes: &[BlockHash]) -> PrefixMatch {
        let Some(&first) = hashes.first() else {
            return PrefixMatch::default();
        };
        let mut probe = Vec::new();
        self.holders(first, &mut probe);
        if probe.is_empty() {
            return PrefixMatch::default();
        }
        let mut found: Vec<(Slot, usize)> = Vec::new();
        // (lo, hi, pods): every pod holds block lo-1 and (if hi < n) not block hi.
        let mut work: Vec<(usize, usize, Vec<Slot>)> = vec![(1, hashes.len(), probe.clone())];
        while let Some((lo, hi, pods)) = work.pop() {
            if lo == hi {
                found.extend(pods.into_iter().map(|s| (s, lo)));
                continue;
            }
            let mid = lo + (hi - lo) / 2;
            self.holders(hashes[mid], &mut probe);
            let (held, not): (Vec<Slot>, Vec<Slot>) =
                pods.into_iter().partition(|s| probe.contains(s));
            if !held.is_empty() {
                work.push((mid + 1, hi, held));
            }
            if !not.is_empty() {
                work.push((lo, mid, not));
            }
        }
        let pods = self.pods.read();
        let mut out: Vec<(PodId, usize)> = found
            .into_iter()
            .filter_map(|(s, n)| Some((pods.owner.get(usize::from(s)).copied().flatten()?, n)))
            .collect();
        drop(pods);
        out.sort_unstable();
        let longest = out.iter().map(|(_, n)| *n).max().unwrap_or(0);
        PrefixMatch { pods: out, longest }
    }

    /// Records that `pod` now holds all of `hashes` (they become its most recent blocks),
    /// evicting its oldest generations past its capacity.
    pub fn record(&self, pod: PodId, hashes: &[BlockHash]) {
        if hashes.is_empty() {
            return;
        }
        let Some(cache) = self.pod_cache(pod) else {
            return;
        };
        let mut pc = cache.lock();
        if pc.removed {
            return;
        }
        let (slot, cur) = (pc.slot, pc.buckets.current());
        let mut left: Vec<u16> = Vec::new();
        let mut fresh: Vec<BlockHash> = Vec::with_capacity(hashes.len());
        let mut new: Vec<BlockHash> = Vec::new();
        let (mut added, mut weight) = (0, 0);
        self.for_each_by_shard(hashes, |table, h| {
            if let Some(e) = table.find_mut(h, |e| e.slot == slot) {
                if e.generation != cur {
                    left.push(e.generation);
                    e.generation = cur;
                    fresh.push(h);
                }
            } else {
                table.insert(Entry {
                    hash_lo: h as u32,
                    hash_hi: (h >> 32) as u32,
                    slot,
                    generation: cur,
                });
                added += 1;
                weight += hash::weight(h);
                fresh.push(h);
                if ghosts::sampled(h) {
                    new.push(h);
                }
            }
        });
        if !new.is_empty() {
            self.update_ghosts(|g| g.recorded(new));
        }
        for g in left {
            pc.buckets.leave(g);
        }
        for h in fresh {
            pc.buckets.push_current(h);
        }
        pc.live += added;
        pc.weight += weight;
        self.entries.fetch_add(added, Ordering::Relaxed);
        if pc.buckets.current_len() >= PodBuckets::target(pc.capacity) {
            if pc.buckets.full(pc.capacity) {
                self.evict_oldest(&mut pc);
            }
            pc.buckets.advance();
        }
        self.evict_to_capacity(&mut pc);
        cache.publish_room(&pc);
    }

    /// Runs `f` on every hash with its shard's table locked, each shard locked once. Hashes
    /// are grouped by shard with a counting sort (O(n); a comparison sort cost more than the
    /// table work it saves).
    fn for_each_by_shard(&self, hashes: &[BlockHash], mut f: impl FnMut(&mut Table, BlockHash)) {
        self.for_each_by_shard_indexed(hashes, |t, _, h| f(t, h));
    }

    /// Like [`Self::for_each_by_shard`], also passing each hash's index in `hashes`. Within a
    /// shard, hashes keep their order (the counting sort is stable).
    fn for_each_by_shard_indexed(
        &self,
        hashes: &[BlockHash],
        mut f: impl FnMut(&mut Table, usize, BlockHash),
    ) {
        let mut starts = [0u32; SHARDS + 1];
        for &h in hashes {
            starts[shard_of(h) + 1] += 1;
        }
        for i in 1..=SHARDS {
            starts[i] += starts[i - 1];
        }
        let mut next = starts;
        let mut grouped = vec![0u32; hashes.len()];
        for (i, &h) in hashes.iter().enumerate() {
            let s = shard_of(h);
            grouped[next[s] as usize] = i as u32;
            next[s] += 1;
        }
        // Start at a random shard so that concurrent writers do not walk the shards in lockstep.
        let offset = fastrand::usize(..SHARDS);
        for i in 0..SHARDS {
            let s = (i + offset) % SHARDS;
            let group = &grouped[starts[s] as usize..starts[s + 1] as usize];
            if group.is_empty() {
                continue;
            }
            let mut table = self.shards[s].write();
            for &i in group {
                f(&mut table, i as usize, hashes[i as usize]);
            }
        }
    }

    /// Evicts the pod's oldest generation: every block whose entry is still in it.
    fn evict_oldest(&self, pc: &mut PodCache) {
        let Some((generation, hashes)) = pc.buckets.pop_oldest() else {
            return;
        };
        let slot = pc.slot;
        let (mut removed, mut weight) = (0, 0);
        let mut gone: Vec<BlockHash> = Vec::new();
        self.for_each_by_shard(&hashes, |table, h| {
            if let Some(i) = table.find(h, |e| e.slot == slot && e.generation == generation) {
                table.remove_at(i);
                removed += 1;
                weight += hash::weight(h);
                if ghosts::sampled(h) {
                    gone.push(h);
                }
            }
        });
        if !gone.is_empty() {
            self.update_ghosts(|g| g.evicted(gone));
        }
        pc.live -= removed;
        pc.weight -= weight;
        self.entries.fetch_sub(removed, Ordering::Relaxed);
    }

    fn evict_to_capacity(&self, pc: &mut PodCache) {
        pc.buckets.drop_dead_front();
        while pc.weight > pc.capacity && !pc.buckets.is_empty() {
            self.evict_oldest(pc);
            pc.buckets.drop_dead_front();
        }
    }

    fn update_ghosts(&self, f: impl FnOnce(&mut Ghosts)) {
        let mut g = self.ghosts.lock();
        f(&mut g);
        self.returning.set(g.share());
    }

    /// Share of the blocks evicted lately that the pool asked for again ([`ghosts`]).
    pub fn returning_share(&self) -> f64 {
        self.returning.get()
    }

    /// For each of `pods` whose cache cannot take the blocks of `hashes` it does not hold
    /// (`held`) without evicting, those blocks' weight (as many cached blocks go) times
    /// [`Self::returning_share`]: the cached blocks a record there is expected to cost the
    /// pool. Pods with room for them, and every pod while evicted blocks do not come back,
    /// are left out (then without an allocation).
    pub fn displacement(
        &self,
        hashes: &[BlockHash],
        held: &PrefixMatch,
        pods: impl IntoIterator<Item = PodId>,
    ) -> Vec<(PodId, f64)> {
        let share = self.returning_share();
        if share <= 0.0 || hashes.is_empty() {
            return Vec::new();
        }
        let total: usize = hashes.iter().map(|&h| hash::weight(h)).sum();
        // before[k]: the weight of hashes[..k], built only if some pod holds a prefix.
        let before: Vec<usize> = if held.pods.is_empty() {
            Vec::new()
        } else {
            std::iter::once(0)
                .chain(hashes.iter().scan(0, |w, &h| {
                    *w += hash::weight(h);
                    Some(*w)
                }))
                .collect()
        };
        let map = self.pods.read();
        let mut out = Vec::new();
        for pod in pods {
            let k = held.blocks_for(pod).min(hashes.len());
            let need = total - if k == 0 { 0 } else { before[k] };
            // A full cache stays about full, so it evicts as much as it takes; room left
            // within a generation's granularity is not room.
            let room = map
                .by_id
                .get(&pod)
                .map_or(self.default_capacity, |p| p.room.load(Ordering::Relaxed));
            if need > room {
                out.push((pod, need as f64 * share));
            }
        }
        out.sort_unstable_by_key(|(pod, _)| *pod);
        out
    }

    /// How deep `hash` lies in `pod`'s recency order, at least: the weight of the blocks
    /// recorded there in the generations after its own (its place within its own is not kept),
    /// at the pod's mean weight per block. `None` if the pod does not hold it.
    pub fn depth(&self, pod: PodId, hash: BlockHash) -> Option<usize> {
        let cache = self.pods.read().by_id.get(&pod)?.clone();
        let pc = cache.lock();
        let slot = pc.slot;
        let generation = self.shards[shard_of(hash)]
            .read()
            .iter_hash(hash)
            .find(|e| e.slot == slot)?
            .generation;
        let after = pc.buckets.live_after(generation);
        Some(after * pc.weight / pc.live.max(1))
    }

    /// Sets one pod's capacity in blocks (e.g. its `num_gpu_blocks` when autoTune is on),
    /// evicting at once if it shrank.
    pub fn set_capacity(&self, pod: PodId, capacity: usize) {
        let Some(cache) = self.pod_cache(pod) else {
            return;
        };
        let mut pc = cache.lock();
        pc.capacity = capacity.max(1);
        self.evict_to_capacity(&mut pc);
        cache.publish_room(&pc);
    }

    /// Capacity of one pod in blocks.
    pub fn capacity(&self, pod: PodId) -> usize {
        self.pods
            .read()
            .by_id
            .get(&pod)
            .map_or(self.default_capacity, |p| p.lock().capacity)
    }

    /// Number of distinct blocks held by one pod.
    pub fn pod_len(&self, pod: PodId) -> usize {
        self.pods
            .read()
            .by_id
            .get(&pod)
            .map_or(0, |p| p.lock().live)
    }

    /// KV blocks one pod is thought to hold (coarse blocks weighted).
    pub fn pod_weight(&self, pod: PodId) -> usize {
        self.pods
            .read()
            .by_id
            .get(&pod)
            .map_or(0, |p| p.lock().weight)
    }

    /// Pods with entries.
    pub fn pods(&self) -> Vec<PodId> {
        self.pods.read().by_id.keys().copied().collect()
    }

    /// Forgets a pod and every entry it held (called when it leaves the datastore). A record
    /// for it that arrives later is dropped.
    pub fn remove_pod(&self, pod: PodId) {
        let mut pods = self.pods.write();
        pods.removed.insert(pod);
        let Some(cache) = pods.by_id.remove(&pod) else {
            return;
        };
        let mut pc = cache.lock();
        pc.removed = true;
        let slot = pc.slot;
        let unique: Vec<BlockHash> = pc
            .buckets
            .all_hashes()
            .collect::<HashSet<_, BuildHasherDefault<IdHasher>>>()
            .into_iter()
            .collect();
        let mut removed = 0;
        self.for_each_by_shard(&unique, |table, h| {
            if let Some(i) = table.find(h, |e| e.slot == slot) {
                table.remove_at(i);
                removed += 1;
            }
        });
        pc.buckets = PodBuckets::default();
        pc.live = 0;
        pc.weight = 0;
        self.entries.fetch_sub(removed, Ordering::Relaxed);
        // Only now, with its entries gone, may the slot be reused.
        pods.owner[usize::from(slot)] = None;
    }

    /// Drops every pod not in `live` (a safety net behind the datastore's removal
    /// notifications) and forgets removals older than the previous reconcile.
    pub fn reconcile(&self, live: &[PodId]) {
        let live: HashSet<PodId> = live.iter().copied().collect();
        let stale: Vec<PodId> = self
            .pods()
            .into_iter()
            .filter(|p| !live.contains(p))
            .collect();
        for p in stale {
            tracing::info!(
                pod = p,
                "prefix index: dropping a pod the datastore no longer has"
            );
            self.remove_pod(p);
        }
        let mut pods = self.pods.write();
        pods.removed_before = std::mem::take(&mut pods.removed);
    }

    /// The pod's cache, created on first use; `None` for a removed pod or when all 65,535
    /// slots are taken.
    fn pod_cache(&self, pod: PodId) -> Option<Arc<PodEntry>> {
        if let Some(p) = self.pods.read().by_id.get(&pod) {
            return Some(p.clone());
        }
        let mut pods = self.pods.write();
        if let Some(p) = pods.by_id.get(&pod) {
            return Some(p.clone());
        }
        if pods.removed.contains(&pod) || pods.removed_before.contains(&pod) {
            return None;
        }
        let slot = match pods.owner.iter().position(Option::is_none) {
            Some(s) => s,
            None if pods.owner.len() < usize::from(EMPTY_SLOT) => {
                pods.owner.push(None);
                pods.owner.len() - 1
            }
            None => {
                tracing::warn!(pod, "prefix index full: more than 65,535 pods");
                return None;
            }
        };
        pods.owner[slot] = Some(pod);
        let cache = Arc::new(PodEntry {
            cache: Mutex::new(PodCache {
                slot: slot as Slot,
                buckets: PodBuckets::default(),
                live: 0,
                weight: 0,
                capacity: self.default_capacity,
                removed: false,
            }),
            room: AtomicUsize::new(self.default_capacity),
        });
        pods.by_id.insert(pod, cache.clone());
        Some(cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(range: std::ops::Range<u64>) -> Vec<u64> {
        // Dense-block hashes (top bit clear: weight 1), spread over shards as real ones are.
        range
            .map(|i| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()) >> 1)
            .collect()
    }

    #[test]
    fn match_counts_leading_blocks_per_pod() {
        let idx = PrefixIndex::new(100);
        let h = hashes(0..10);
        idx.record(1, &h[..10]);
        idx.record(2, &h[..4]);
        let m = idx.match_prefix(&h);
        assert_eq!(m.pods, vec![(1, 10), (2, 4)]);
        assert_eq!(m.longest, 10);
        assert_eq!(idx.len(), 14);
    }

    #[test]
    fn match_finds_each_pods_own_length() {
        let idx = PrefixIndex::new(1000);
        let h = hashes(0..200);
        for (pod, n) in [(1, 200), (2, 1), (3, 77), (4, 128), (5, 77), (6, 199)] {
            idx.record(pod, &h[..n]);
        }
        let m = idx.match_prefix(&h);
        assert_eq!(
            m.pods,
            vec![(1, 200), (2, 1), (3, 77), (4, 128), (5, 77), (6, 199)]
        );
        assert_eq!(m.longest, 200);
        assert_eq!(idx.match_prefix(&h[..50]).blocks_for(4), 50);
        assert!(idx.match_prefix(&hashes(1000..1003)).pods.is_empty());
        assert_eq!(idx.match_prefix(&[]), PrefixMatch::default());
    }

    /// Whether `pod` holds each of `chain`'s blocks (one lookup each).
    fn held(idx: &PrefixIndex, pod: PodId, chain: &[u64]) -> Vec<bool> {
        chain
            .iter()
            .map(|h| idx.match_prefix(&[*h]).blocks_for(pod) == 1)
            .collect()
    }

    #[test]
    fn eviction_keeps_every_pods_blocks_prefix_closed() {
        // Requests share heads of various lengths; small capacities force constant eviction.
        for capacity in [40, 300, 2_000] {
            let idx = PrefixIndex::new(capacity);
            let mut rng = fastrand::Rng::with_seed(5);
            let chains: Vec<Vec<u64>> = (0..12).map(|c| hashes(c * 1000..c * 1000 + 60)).collect();
            for _ in 0..3_000 {
                let c = &chains[rng.usize(..chains.len())];
                let n = rng.usize(1..=c.len());
                idx.record(1, &c[..n]);
            }
            for c in &chains {
                let h = held(&idx, 1, c);
                let walked = h.iter().take_while(|x| **x).count();
                assert!(
                    !h[walked..].contains(&true),
                    "a hole in the prefix ({capacity})"
                );
                assert_eq!(idx.match_prefix(c).blocks_for(1), walked);
            }
            assert!(idx.pod_weight(1) <= capacity);
        }
    }

    #[test]
    fn refreshing_a_hot_prefix_keeps_storage_bounded() {
        // Regression (issue 8): with a per-refresh ring, a pod whose working set fits needed
        // compaction rounds; past 65,535 ring slots every record compacted the whole ring.
        let idx = PrefixIndex::new(200_000);
        let hot = hashes(0..256);
        for i in 0..20_000u64 {
            idx.record(1, &hot);
            if i % 7 == 0 {
                idx.record(1, &hashes(1_000_000 + i * 300..1_000_000 + i * 300 + 8));
            }
        }
        assert_eq!(idx.match_prefix(&hot).blocks_for(1), 256);
        assert!(
            idx.pod_stored(1) <= 2 * 200_000 + 256,
            "stored {}",
            idx.pod_stored(1)
        );
    }

    #[test]
    fn removed_slot_is_reused_without_stale_entries() {
        let idx = PrefixIndex::new(100);
        let h = hashes(0..5);
        idx.record(1, &h);
        idx.remove_pod(1);
        idx.record(2, &h[..2]);
        assert_eq!(idx.match_prefix(&h).pods, vec![(2, 2)]);
    }

    #[test]
    fn a_record_racing_removal_does_not_resurrect_the_pod() {
        // Regression (issue 8): a record arriving after remove_pod re-created the pod for good.
        let idx = PrefixIndex::new(100);
        idx.record(1, &hashes(0..5));
        idx.remove_pod(1);
        idx.record(1, &hashes(0..5));
        assert!(idx.pods().is_empty() && idx.is_empty());
        idx.reconcile(&[]);
        idx.record(1, &hashes(0..5));
        assert!(
            idx.is_empty(),
            "still remembered for one more reconcile period"
        );
        idx.reconcile(&[]);
        idx.record(1, &hashes(0..5));
        assert_eq!(idx.pods(), vec![1], "an id may come back after two periods");
    }

    #[test]
    fn reconcile_drops_pods_the_datastore_lost() {
        let idx = PrefixIndex::new(100);
        for p in 1..=3 {
            idx.record(p, &hashes(p as u64 * 100..p as u64 * 100 + 5));
        }
        idx.reconcile(&[2]);
        assert_eq!(idx.pods(), vec![2]);
        assert_eq!(idx.len(), 5);
    }

    #[test]
    fn oldest_generation_goes_first() {
        // Capacity 4 (one block per generation): six blocks in, the two oldest records out.
        let idx = PrefixIndex::new(4);
        let a = hashes(0..3);
        let b = hashes(10..13);
        idx.record(1, &a);
        idx.record(1, &b);
        assert_eq!(idx.pod_len(1), 3, "a whole generation goes at once");
        assert_eq!(idx.match_prefix(&a).blocks_for(1), 0);
        assert_eq!(idx.match_prefix(&b).blocks_for(1), 3);
    }

    #[test]
    fn refresh_protects_blocks_from_eviction() {
        let idx = PrefixIndex::new(3);
        let h = hashes(0..5);
        idx.record(1, &h[0..1]);
        idx.record(1, &h[1..2]);
        idx.record(1, &h[2..3]);
        idx.record(1, &h[0..1]); // refresh block 0
        idx.record(1, &h[3..4]); // evicts block 1, the least recently used
        assert_eq!(held(&idx, 1, &h[..4]), vec![true, false, true, true]);
        assert_eq!(idx.len(), 3);
    }

    #[test]
    fn coarse_blocks_weigh_their_stride() {
        let idx = PrefixIndex::new(40);
        let coarse = |r| -> Vec<u64> { hashes(r).iter().map(|h| h | 1 << 63).collect() };
        idx.record(1, &coarse(0..2));
        assert_eq!((idx.pod_len(1), idx.pod_weight(1)), (2, 32));
        // Three entries are far below 40, but 48 KV blocks are not: the oldest record goes.
        idx.record(1, &coarse(10..11));
        assert_eq!((idx.pod_len(1), idx.pod_weight(1)), (1, 16));
    }

    #[test]
    fn remove_pod_purges_its_entries_only() {
        let idx = PrefixIndex::new(100);
        let h = hashes(0..5);
        idx.record(1, &h);
        idx.record(2, &h);
        idx.remove_pod(1);
        assert_eq!(idx.match_prefix(&h).pods, vec![(2, 5)]);
        assert_eq!(idx.len(), 5);
        idx.remove_pod(2);
        assert!(idx.is_empty());
        assert!(idx.shards.iter().all(|s| s.read().is_empty()));
    }

    #[test]
    fn depth_is_the_weight_recorded_since_a_block_was() {
        let idx = PrefixIndex::new(10_000);
        // Four prompts of 300 blocks: each fills a generation of its own.
        for p in 0..4u64 {
            idx.record(1, &hashes(p * 1000..p * 1000 + 300));
        }
        // The first prompt: three generations after it.
        assert_eq!(idx.depth(1, hashes(299..300)[0]), Some(900));
        assert_eq!(idx.depth(1, hashes(3299..3300)[0]), Some(0));
        // Recorded again, it is the newest.
        idx.record(1, &hashes(0..300));
        assert_eq!(idx.depth(1, hashes(299..300)[0]), Some(0));
        // The second: prompts 2, 3 and 0 since.
        assert_eq!(idx.depth(1, hashes(1299..1300)[0]), Some(900));
        assert_eq!(idx.depth(1, hashes(5000..5001)[0]), None);
        assert_eq!(idx.depth(2, hashes(0..1)[0]), None);
    }

    #[test]
    fn shrinking_capacity_evicts() {
        let idx = PrefixIndex::new(100);
        for i in 0..50 {
            idx.record(1, &hashes(i * 10..i * 10 + 1));
        }
        idx.set_capacity(1, 10);
        assert!(
            idx.pod_len(1) <= 10 && idx.pod_len(1) >= 8,
            "{}",
            idx.pod_len(1)
        );
        assert_eq!(idx.len(), idx.pod_len(1));
        assert_eq!(idx.capacity(1), 10);
    }

    /// `docs` documents of 16 blocks, recorded on pod 1 in turn, `rounds` times.
    fn cycle_documents(idx: &PrefixIndex, docs: u64, rounds: usize) {
        for _ in 0..rounds {
            for d in 0..docs {
                idx.record(1, &hashes(d * 100..d * 100 + 16));
            }
        }
    }

    #[test]
    fn evictions_that_come_back_are_priced_where_a_cache_is_full() {
        let idx = PrefixIndex::new(64);
        let new_doc = hashes(9_000..9_016);
        let pods = || [1, 2];
        cycle_documents(&idx, 4, 1);
        assert_eq!(idx.returning_share(), 0.0);
        assert!(
            idx.displacement(&new_doc, &idx.match_prefix(&new_doc), pods())
                .is_empty()
        );
        // 20 documents through a cache of 4: every one is evicted before it comes back.
        cycle_documents(&idx, 20, 4);
        let share = idx.returning_share();
        assert!(share > 0.4, "{share}");
        let d = idx.displacement(&new_doc, &idx.match_prefix(&new_doc), pods());
        assert_eq!(d.len(), 1, "pod 2 has room: {d:?}");
        assert_eq!(d[0].0, 1);
        assert!((d[0].1 - 16.0 * share).abs() < 1e-9, "{d:?}");
        // What pod 1 holds costs nothing: only the 4 blocks past it are priced.
        let held = hashes(1_900..1_916);
        let mut longer = held[..12].to_vec();
        longer.extend(hashes(7_000..7_004));
        let d = idx.displacement(&longer, &idx.match_prefix(&longer), pods());
        assert!((d[0].1 - 4.0 * share).abs() < 1e-9, "{d:?}");
        assert!(
            idx.displacement(&held, &idx.match_prefix(&held), pods())
                .is_empty()
        );
    }

    #[test]
    fn evicting_blocks_that_never_come_back_costs_nothing() {
        let idx = PrefixIndex::new(64);
        for d in 0..200 {
            idx.record(1, &hashes(d * 100..d * 100 + 16));
        }
        assert!(idx.pod_weight(1) > 48, "the cache is full");
        assert_eq!(idx.returning_share(), 0.0);
        let new_doc = hashes(90_000..90_016);
        assert!(
            idx.displacement(&new_doc, &PrefixMatch::default(), [1])
                .is_empty()
        );
    }

    #[test]
    fn concurrent_record_and_match_stay_consistent() {
        let idx = Arc::new(PrefixIndex::new(500));
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let idx = idx.clone();
                std::thread::spawn(move || {
                    for r in 0..200u64 {
                        let h = hashes(r * 10..r * 10 + 20);
                        idx.record(t % 2, &h);
                        let m = idx.match_prefix(&h);
                        assert!(m.blocks_for(t % 2) <= 20);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(idx.pod_len(0) + idx.pod_len(1), idx.len());
        assert!(idx.pod_weight(0) <= 500);
    }
}
