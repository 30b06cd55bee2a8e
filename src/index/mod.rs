//! The prefix index: which pods (probably) hold which prompt blocks in their KV cache.
//!
//! Layout, chosen for a small per-entry footprint and no global lock:
//!
//! * **Reverse map**, sharded: `SHARDS` hash tables behind their own `RwLock`, each storing
//!   16-byte entries `(block hash, pod, tick)`. A block held by several pods has one entry per
//!   pod (a multimap), so "who holds block h" is a single probe sequence over one table. The
//!   block hash is already uniformly distributed, so it is used as the table hash directly; the
//!   shard is picked from bits 32..40, which hashbrown uses for neither bucket index nor tag.
//! * **Per-pod LRU**: a ring of block hashes in recency order behind the pod's own mutex. Ring
//!   slot `i` has tick `base + i`; the reverse-map entry stores the tick of the pod's latest
//!   touch, so older ring slots for the same block are recognised as stale and skipped. Eviction
//!   pops the front; compaction drops stale slots once they outnumber live ones. Cost: 8 bytes
//!   per live entry plus bounded slack.
//!
//! A request's blocks are pushed last-block-first, so when a pod is full its tail blocks are
//! evicted before the shared head of the prompt (the order vLLM frees blocks in).
//!
//! Lock order: pod mutex, then one shard lock at a time. Matching takes only shard read locks,
//! so concurrent scheduling decisions contend only when they touch the same shard at the same
//! instant.

pub mod hash;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hashbrown::HashTable;
use parking_lot::{Mutex, RwLock};

pub use hash::{BlockHash, BlockHasher};

/// Index-local identity of a pod (the datastore's endpoint id).
pub type PodId = u32;

/// Default per-pod capacity in blocks (GIE's default, sized for an H100 80 GB serving an 8B
/// model: ~73 GB of HBM for KV at 128 KiB per token is ~500k tokens = 31,250 blocks of 16).
pub const DEFAULT_LRU_CAPACITY_PER_SERVER: usize = 31_250;

const SHARDS: usize = 128;
/// Extra stale ring slots tolerated before a pod's ring is compacted.
const RING_SLACK: usize = 256;

#[derive(Debug, Clone, Copy)]
struct Entry {
    hash: BlockHash,
    pod: PodId,
    tick: u32,
}

#[derive(Debug)]
struct PodLru {
    /// Block hashes, oldest first; slot `i` has tick `base + i` (wrapping).
    ring: VecDeque<BlockHash>,
    base: u32,
    live: usize,
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

/// Sharded reverse map plus per-pod LRUs. See the module docs.
#[derive(Debug)]
pub struct PrefixIndex {
    shards: Box<[RwLock<HashTable<Entry>>]>,
    pods: RwLock<PodMap<Arc<Mutex<PodLru>>>>,
    default_capacity: usize,
    entries: AtomicUsize,
}

/// How long a prefix each pod holds, in blocks.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrefixMatch {
    /// `(pod, leading blocks held)`, for pods holding at least the first block.
    pub pods: Vec<(PodId, usize)>,
    /// Length of the longest match.
    pub longest: usize,
}

impl PrefixMatch {
    pub fn blocks_for(&self, pod: PodId) -> usize {
        self.pods
            .iter()
            .find(|(p, _)| *p == pod)
            .map_or(0, |(_, n)| *n)
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
            shards: (0..SHARDS).map(|_| RwLock::new(HashTable::new())).collect(),
            pods: RwLock::new(PodMap::default()),
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
            .values()
            .map(|p| p.lock().ring.capacity() * std::mem::size_of::<BlockHash>())
            .sum();
        tables + rings
    }

    /// For each pod, how many of the leading `hashes` it holds. Walks the blocks in order and
    /// stops at the first block that no pod still in the running holds.
    pub fn match_prefix(&self, hashes: &[BlockHash]) -> PrefixMatch {
        let mut lens: PodMap<usize> = PodMap::default();
        let mut longest = 0;
        for (i, &h) in hashes.iter().enumerate() {
            let shard = self.shards[shard_of(h)].read();
            let mut advanced = false;
            for e in shard.iter_hash(h) {
                if e.hash != h {
                    continue;
                }
                if i == 0 {
                    lens.insert(e.pod, 1);
                    advanced = true;
                } else if let Some(n) = lens.get_mut(&e.pod)
                    && *n == i
                {
                    *n = i + 1;
                    advanced = true;
                }
            }
            drop(shard);
            if !advanced {
                break;
            }
            longest = i + 1;
        }
        let mut pods: Vec<(PodId, usize)> = lens.into_iter().collect();
        pods.sort_unstable();
        PrefixMatch { pods, longest }
    }

    /// Records that `pod` now holds all of `hashes` (refreshing their recency), evicting the
    /// pod's least recently used blocks past its capacity.
    pub fn record(&self, pod: PodId, hashes: &[BlockHash]) {
        if hashes.is_empty() {
            return;
        }
        let lru = self.pod_lru(pod);
        let mut lru = lru.lock();
        if lru.removed {
            return;
        }
        for &h in hashes.iter().rev() {
            let tick = lru.base.wrapping_add(lru.ring.len() as u32);
            lru.ring.push_back(h);
            let mut shard = self.shards[shard_of(h)].write();
            if let Some(e) = shard.find_mut(h, |e| e.hash == h && e.pod == pod) {
                e.tick = tick;
            } else {
                shard.insert_unique(h, Entry { hash: h, pod, tick }, |e| e.hash);
                lru.live += 1;
                self.entries.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.evict_to_capacity(pod, &mut lru);
        if lru.ring.len() > 2 * lru.live + RING_SLACK {
            self.compact(pod, &mut lru);
        }
    }

    /// Sets one pod's capacity in blocks (e.g. its `num_gpu_blocks` when autoTune is on),
    /// evicting at once if it shrank.
    pub fn set_capacity(&self, pod: PodId, capacity: usize) {
        let lru = self.pod_lru(pod);
        let mut lru = lru.lock();
        lru.capacity = capacity.max(1);
        self.evict_to_capacity(pod, &mut lru);
    }

    /// Capacity of one pod in blocks.
    pub fn capacity(&self, pod: PodId) -> usize {
        self.pods
            .read()
            .get(&pod)
            .map_or(self.default_capacity, |l| l.lock().capacity)
    }

    /// Number of live blocks held by one pod.
    pub fn pod_len(&self, pod: PodId) -> usize {
        self.pods.read().get(&pod).map_or(0, |l| l.lock().live)
    }

    /// Forgets a pod and every entry it held (called when it leaves the datastore).
    pub fn remove_pod(&self, pod: PodId) {
        let Some(lru) = self.pods.write().remove(&pod) else {
            return;
        };
        let mut lru = lru.lock();
        lru.removed = true;
        let ring = std::mem::take(&mut lru.ring);
        let mut removed = 0;
        for h in ring {
            let mut shard = self.shards[shard_of(h)].write();
            if let Ok(entry) = shard.find_entry(h, |e| e.hash == h && e.pod == pod) {
                entry.remove();
                removed += 1;
            }
        }
        lru.live = 0;
        self.entries.fetch_sub(removed, Ordering::Relaxed);
    }

    fn pod_lru(&self, pod: PodId) -> Arc<Mutex<PodLru>> {
        if let Some(l) = self.pods.read().get(&pod) {
            return l.clone();
        }
        self.pods
            .write()
            .entry(pod)
            .or_insert_with(|| {
                Arc::new(Mutex::new(PodLru {
                    ring: VecDeque::new(),
                    base: 0,
                    live: 0,
                    capacity: self.default_capacity,
                    removed: false,
                }))
            })
            .clone()
    }

    fn evict_to_capacity(&self, pod: PodId, lru: &mut PodLru) {
        while lru.live > lru.capacity {
            let Some(h) = lru.ring.pop_front() else {
                break;
            };
            let tick = lru.base;
            lru.base = lru.base.wrapping_add(1);
            let mut shard = self.shards[shard_of(h)].write();
            if let Ok(entry) =
                shard.find_entry(h, |e| e.hash == h && e.pod == pod && e.tick == tick)
            {
                entry.remove();
                lru.live -= 1;
                self.entries.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Drops stale ring slots, keeping live ones in order and renumbering their ticks.
    fn compact(&self, pod: PodId, lru: &mut PodLru) {
        let old = std::mem::take(&mut lru.ring);
        let old_base = lru.base;
        let mut ring = VecDeque::with_capacity(lru.live + RING_SLACK);
        let new_base = old_base.wrapping_add(old.len() as u32);
        for (i, h) in old.into_iter().enumerate() {
            let tick = old_base.wrapping_add(i as u32);
            let mut shard = self.shards[shard_of(h)].write();
            if let Some(e) = shard.find_mut(h, |e| e.hash == h && e.pod == pod && e.tick == tick) {
                e.tick = new_base.wrapping_add(ring.len() as u32);
                ring.push_back(h);
            }
        }
        lru.ring = ring;
        lru.base = new_base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(range: std::ops::Range<u64>) -> Vec<u64> {
        // Spread ids over shards and tags the way real hashes are spread.
        range
            .map(|i| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()))
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
    fn match_stops_at_first_block_nobody_holds() {
        let idx = PrefixIndex::new(100);
        let h = hashes(0..6);
        // Pod 3 holds blocks 0,1 and 3,4 but not 2: only the leading run counts.
        idx.record(3, &[h[0], h[1], h[3], h[4]]);
        let m = idx.match_prefix(&h);
        assert_eq!(m.pods, vec![(3, 2)]);
        assert!(idx.match_prefix(&hashes(100..103)).pods.is_empty());
        assert_eq!(idx.match_prefix(&[]), PrefixMatch::default());
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
        let lru = idx.pod_lru(1);
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
