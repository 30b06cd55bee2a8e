//! The prefix index: which pods (probably) hold which prompt blocks in their KV cache.
//!
//! Layout, chosen for a small per-entry footprint and no global lock:
//!
//! * **Reverse map**, sharded: `SHARDS` hash tables ([`table`]: linear probing, no tombstones)
//!   behind their own `RwLock`, storing 12-byte entries `(block hash, pod slot, count)`. A block
//!   held by several pods has one entry per pod (a multimap), so "who holds block h" is one
//!   probe run. The block hash is already uniform: its low bits pick the slot, bits 32..40 the
//!   shard.
//! * **Per-pod LRU**: a ring of block hashes in recency order behind the pod's own mutex. A
//!   block refreshed again is pushed again; the entry's `count` says how many ring slots refer
//!   to it, so popping the front evicts the block only when its count drops to zero (no newer
//!   slot exists). Duplicate slots are dropped by incremental compaction, a bounded batch per
//!   record (see `compact_step`), so no decision pays for a whole ring.
//!
//! **Prefix closure.** A request's blocks are pushed last block first, and block `i`'s chained
//! hash only ever arrives together with blocks `0..i`, so block `j < i` is always more recent
//! than block `i` in a pod's LRU and is evicted after it. Every pod's set of blocks is therefore
//! closed under prefixes, and a pod's match length is found by *binary search* over the
//! request's blocks instead of a walk over all of them: a decision probes O(log n) blocks per
//! distinct match length rather than n. (This is also the order vLLM frees blocks in.)
//!
//! Lock order: pod mutex, then one shard lock at a time. Matching takes shard read locks only.
//! Recording groups a request's blocks by shard and takes each shard's lock once.

pub mod hash;
mod ring;
mod table;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};

pub use hash::{BlockHash, BlockHasher};
use ring::LruOrder;
use table::Table;

/// Identity of a pod as the datastore knows it (the endpoint id).
pub type PodId = u32;
/// Dense per-index pod number (reused after a pod is removed), kept small for compact entries.
type Slot = u16;

/// Default per-pod capacity in blocks (GIE's default, sized for an H100 80 GB serving an 8B
/// model: ~73 GB of HBM for KV at 128 KiB per token is ~500k tokens = 31,250 blocks of 16).
pub const DEFAULT_LRU_CAPACITY_PER_SERVER: usize = 31_250;

const SHARDS: usize = 64;
/// Duplicate ring slots tolerated (beyond as many as there are live blocks) before a
/// compaction round starts.
const RING_SLACK: usize = 256;
/// Dirty slots checked per slot pushed while a compaction round runs: a round over `d` slots
/// finishes after `d / 4` pushes, so the ring stays within ~2.25× its live blocks.
const COMPACT_PER_PUSH: usize = 4;

/// 12 bytes: the hash is split so the struct needs only 4-byte alignment.
#[derive(Debug, Clone, Copy)]
struct Entry {
    hash_lo: u32,
    hash_hi: u32,
    slot: Slot,
    /// Ring slots of this pod that refer to this block.
    count: u16,
}

impl Entry {
    #[inline]
    fn hash(&self) -> BlockHash {
        (u64::from(self.hash_hi) << 32) | u64::from(self.hash_lo)
    }
}

#[derive(Debug)]
struct PodLru {
    slot: Slot,
    /// Block hashes, oldest first; a block may appear more than once (see `Entry::count`).
    ring: LruOrder,
    /// Distinct blocks held.
    live: usize,
    /// KV blocks they stand for (a coarse block counts [`hash::COARSE_STRIDE`]); bounded by
    /// `capacity`.
    weight: usize,
    capacity: usize,
    removed: bool,
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
    by_id: PodMap<Arc<Mutex<PodLru>>>,
    /// `owner[slot]`: the pod using a slot, if any.
    owner: Vec<Option<PodId>>,
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

/// Sharded reverse map plus per-pod LRUs. See the module docs.
#[derive(Debug)]
pub struct PrefixIndex {
    shards: Box<[Shard]>,
    pods: RwLock<Pods>,
    default_capacity: usize,
    entries: AtomicUsize,
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
        }
    }

    /// Number of live `(block, pod)` entries.
    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the index's tables and rings (allocation sizes, not just live entries).
    pub fn memory_bytes(&self) -> usize {
        let tables: usize = self.shards.iter().map(|s| s.read().allocation_size()).sum();
        let rings: usize = self
            .pods
            .read()
            .by_id
            .values()
            .map(|p| p.lock().ring.bytes())
            .sum();
        tables + rings
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

    /// Records that `pod` now holds all of `hashes` (refreshing their recency), evicting the
    /// pod's least recently used blocks past its capacity.
    pub fn record(&self, pod: PodId, hashes: &[BlockHash]) {
        if hashes.is_empty() {
            return;
        }
        let Some(lru) = self.pod_lru(pod) else {
            return;
        };
        let mut lru = lru.lock();
        if lru.removed {
            return;
        }
        let slot = lru.slot;
        // A block's count is bounded by the ring length; compact fully before it could
        // overflow (only rings longer than 65,535 slots, i.e. very large capacities).
        if lru.ring.len() + hashes.len() >= usize::from(u16::MAX) {
            self.compact(&mut lru);
        }
        for &h in hashes.iter().rev() {
            lru.ring.push_back(h);
        }
        let mut added = 0;
        let mut weight = 0;
        self.for_each_by_shard(hashes, |table, h| {
            if let Some(e) = table.find_mut(h, |e| e.slot == slot) {
                e.count += 1;
            } else {
                table.insert(Entry {
                    hash_lo: h as u32,
                    hash_hi: (h >> 32) as u32,
                    slot,
                    count: 1,
                });
                added += 1;
                weight += hash::weight(h);
            }
        });
        lru.live += added;
        lru.weight += weight;
        self.entries.fetch_add(added, Ordering::Relaxed);
        self.evict_to_capacity(&mut lru);
        self.compact_step(&mut lru, COMPACT_PER_PUSH * hashes.len());
    }

    /// One bounded step of incremental compaction: starts a round once duplicates outnumber
    /// live blocks, then checks `budget` of the oldest dirty slots. Processing oldest first
    /// makes the test local: a slot whose block has other slots (`count > 1`) has a newer one
    /// and is dropped; the only slot of its block is live and kept, in order.
    fn compact_step(&self, lru: &mut PodLru, budget: usize) {
        if !lru.ring.compacting() {
            if lru.ring.len() <= 2 * lru.live + RING_SLACK {
                return;
            }
            lru.ring.start_round();
        }
        let slot = lru.slot;
        let batch = lru.ring.take_dirty(budget);
        let mut keep = vec![false; batch.len()];
        self.for_each_by_shard_indexed(&batch, |table, i, h| {
            if let Some(e) = table.find_mut(h, |e| e.slot == slot) {
                if e.count > 1 {
                    e.count -= 1;
                } else {
                    keep[i] = true;
                }
            }
        });
        for (h, k) in batch.into_iter().zip(keep) {
            if k {
                lru.ring.push_clean(h);
            }
        }
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

    /// Pops `n` slots from the front of the ring, dropping blocks no newer slot refers to.
    fn pop_front(&self, lru: &mut PodLru, n: usize) {
        let slot = lru.slot;
        let popped = lru.ring.drain_front(n);
        let mut removed = 0;
        let mut weight = 0;
        self.for_each_by_shard(&popped, |table, h| {
            if let Some(i) = table.find(h, |e| e.slot == slot) {
                let e = table.get_mut(i);
                e.count -= 1;
                if e.count == 0 {
                    table.remove_at(i);
                    removed += 1;
                    weight += hash::weight(h);
                }
            }
        });
        lru.live -= removed;
        lru.weight -= weight;
        self.entries.fetch_sub(removed, Ordering::Relaxed);
    }

    fn evict_to_capacity(&self, lru: &mut PodLru) {
        while lru.weight > lru.capacity && !lru.ring.is_empty() {
            // Popping n slots frees at most n × COARSE_STRIDE and at least 0 blocks (a slot
            // may be a duplicate); this converges without overshooting by more than one block.
            let excess = (lru.weight - lru.capacity).div_ceil(hash::COARSE_STRIDE);
            self.pop_front(lru, excess);
        }
    }

    /// Keeps only each block's newest ring slot (order preserved), resetting counts to 1.
    fn compact(&self, lru: &mut PodLru) {
        let slot = lru.slot;
        let mut seen: HashSet<BlockHash, BuildHasherDefault<IdHasher>> =
            HashSet::with_capacity_and_hasher(lru.live, Default::default());
        let mut kept: Vec<BlockHash> = Vec::with_capacity(lru.live);
        let all: Vec<BlockHash> = lru.ring.iter().collect();
        for &h in all.iter().rev() {
            if seen.insert(h) {
                kept.push(h);
            }
        }
        kept.reverse();
        self.for_each_by_shard(&kept, |table, h| {
            if let Some(e) = table.find_mut(h, |e| e.slot == slot) {
                e.count = 1;
            }
        });
        lru.ring.replace(kept);
    }

    /// Sets one pod's capacity in blocks (e.g. its `num_gpu_blocks` when autoTune is on),
    /// evicting at once if it shrank.
    pub fn set_capacity(&self, pod: PodId, capacity: usize) {
        let Some(lru) = self.pod_lru(pod) else {
            return;
        };
        let mut lru = lru.lock();
        lru.capacity = capacity.max(1);
        self.evict_to_capacity(&mut lru);
    }

    /// Capacity of one pod in blocks.
    pub fn capacity(&self, pod: PodId) -> usize {
        self.pods
            .read()
            .by_id
            .get(&pod)
            .map_or(self.default_capacity, |l| l.lock().capacity)
    }

    /// Number of distinct blocks held by one pod.
    pub fn pod_len(&self, pod: PodId) -> usize {
        self.pods
            .read()
            .by_id
            .get(&pod)
            .map_or(0, |l| l.lock().live)
    }

    /// KV blocks one pod is thought to hold (coarse blocks weighted).
    pub fn pod_weight(&self, pod: PodId) -> usize {
        self.pods
            .read()
            .by_id
            .get(&pod)
            .map_or(0, |l| l.lock().weight)
    }

    /// Forgets a pod and every entry it held (called when it leaves the datastore).
    pub fn remove_pod(&self, pod: PodId) {
        let mut pods = self.pods.write();
        let Some(lru) = pods.by_id.remove(&pod) else {
            return;
        };
        let mut lru = lru.lock();
        lru.removed = true;
        let slot = lru.slot;
        let ring = std::mem::take(&mut lru.ring);
        let unique: Vec<BlockHash> = ring
            .iter()
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
        lru.live = 0;
        lru.weight = 0;
        self.entries.fetch_sub(removed, Ordering::Relaxed);
        // Only now, with its entries gone, may the slot be reused.
        pods.owner[usize::from(slot)] = None;
    }

    /// The pod's LRU, created on first use; `None` if all 65,536 slots are taken.
    fn pod_lru(&self, pod: PodId) -> Option<Arc<Mutex<PodLru>>> {
        if let Some(l) = self.pods.read().by_id.get(&pod) {
            return Some(l.clone());
        }
        let mut pods = self.pods.write();
        if let Some(l) = pods.by_id.get(&pod) {
            return Some(l.clone());
        }
        let slot = match pods.owner.iter().position(Option::is_none) {
            Some(s) => s,
            None if pods.owner.len() <= usize::from(Slot::MAX) => {
                pods.owner.push(None);
                pods.owner.len() - 1
            }
            None => {
                tracing::warn!(pod, "prefix index full: more than 65,536 pods");
                return None;
            }
        };
        pods.owner[slot] = Some(pod);
        let lru = Arc::new(Mutex::new(PodLru {
            slot: slot as Slot,
            ring: LruOrder::default(),
            live: 0,
            weight: 0,
            capacity: self.default_capacity,
            removed: false,
        }));
        pods.by_id.insert(pod, lru.clone());
        Some(lru)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(range: std::ops::Range<u64>) -> Vec<u64> {
        // Spread ids over shards and tags the way real hashes are spread.
        // Dense-block hashes (top bit clear: weight 1).
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

    #[test]
    fn eviction_keeps_every_pods_blocks_prefix_closed() {
        // Requests share heads of various lengths; tiny capacity forces constant eviction.
        let idx = PrefixIndex::new(40);
        let mut rng = fastrand::Rng::with_seed(5);
        let chains: Vec<Vec<u64>> = (0..6).map(|c| hashes(c * 1000..c * 1000 + 30)).collect();
        for _ in 0..500 {
            let c = &chains[rng.usize(..chains.len())];
            let n = rng.usize(1..=c.len());
            idx.record(1, &c[..n]);
        }
        for c in &chains {
            // Walk: the number of leading blocks held must equal what binary search says.
            let walked = c
                .iter()
                .take_while(|h| idx.match_prefix(&[**h]).blocks_for(1) == 1)
                .count();
            let held_later = c[walked..]
                .iter()
                .any(|h| idx.match_prefix(&[*h]).blocks_for(1) == 1);
            assert!(!held_later, "a hole in the prefix");
            assert_eq!(idx.match_prefix(c).blocks_for(1), walked);
        }
        assert!(idx.pod_len(1) <= 40);
    }

    #[test]
    fn incremental_compaction_keeps_counts_order_and_bounds() {
        // Under capacity (no eviction): only compaction removes duplicate slots.
        let idx = PrefixIndex::new(1_000_000);
        let mut rng = fastrand::Rng::with_seed(9);
        let chains: Vec<Vec<u64>> = (0..20).map(|c| hashes(c * 1000..c * 1000 + 64)).collect();
        for round in 0..3000 {
            let c = &chains[rng.usize(..chains.len())];
            let n = rng.usize(1..=c.len());
            idx.record(7, &c[..n]);
            if round % 250 != 0 {
                continue;
            }
            let lru = idx.pod_lru(7).unwrap();
            let lru = lru.lock();
            let slots: Vec<u64> = lru.ring.iter().collect();
            assert!(slots.len() <= 3 * lru.live + RING_SLACK + 4 * 64);
            // Every live block's count equals its number of ring slots.
            let mut per_block: HashMap<u64, u16> = HashMap::new();
            for h in &slots {
                *per_block.entry(*h).or_default() += 1;
            }
            assert_eq!(per_block.len(), lru.live);
            for (h, n) in per_block {
                let shard = idx.shards[shard_of(h)].read();
                let e = shard.iter_hash(h).find(|e| e.slot == lru.slot).unwrap();
                assert_eq!(e.count, n, "count of {h:x}");
            }
        }
        for c in &chains {
            let walked = c
                .iter()
                .take_while(|h| idx.match_prefix(&[**h]).blocks_for(7) == 1)
                .count();
            assert_eq!(idx.match_prefix(c).blocks_for(7), walked);
        }
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
    fn lru_evicts_least_recently_used_tail_first() {
        let idx = PrefixIndex::new(4);
        let a = hashes(0..3);
        let b = hashes(10..13);
        idx.record(1, &a);
        idx.record(1, &b);
        // 6 blocks into a capacity of 4: the two oldest go, and within request `a` its tail
        // blocks (recorded first) are the oldest.
        assert_eq!(idx.pod_len(1), 4);
        assert_eq!(idx.match_prefix(&a).blocks_for(1), 1);
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
        let held: Vec<bool> = h[..4]
            .iter()
            .map(|x| idx.match_prefix(&[*x]).blocks_for(1) == 1)
            .collect();
        assert_eq!(held, vec![true, false, true, true]);
        assert_eq!(idx.len(), 3);
    }

    #[test]
    fn repeated_refresh_keeps_ring_bounded() {
        let idx = PrefixIndex::new(1000);
        let h = hashes(0..8);
        for _ in 0..10_000 {
            idx.record(1, &h);
        }
        assert_eq!(idx.pod_len(1), 8);
        let lru = idx.pod_lru(1).unwrap();
        assert!(lru.lock().ring.len() <= 2 * 8 + RING_SLACK + 8);
        assert_eq!(idx.match_prefix(&h).blocks_for(1), 8);
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
    fn shrinking_capacity_evicts() {
        let idx = PrefixIndex::new(100);
        idx.record(1, &hashes(0..50));
        idx.set_capacity(1, 10);
        assert_eq!(idx.pod_len(1), 10);
        assert_eq!(idx.len(), 10);
        assert_eq!(idx.capacity(1), 10);
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
        assert!(idx.pod_len(0) <= 500);
    }
}
