//! Ghosts of evicted blocks: how often the pool asks again for what the index evicted.
//!
//! When a pod's cache is full, each new block pushes an old one out. Whether that costs
//! anything depends on the old block: a system prompt or a popular document will be asked
//! for again and recomputed somewhere, a one-off question never will. The index cannot know
//! the future, but it can measure the past: it remembers a sample of the blocks it evicted
//! (their "ghosts", as in adaptive replacement caches) and counts how many come back, i.e.
//! are recorded again on some pod that did not hold them. [`Ghosts::share`] is that fraction,
//! pool-wide: near 0 where prompts are unique, near 1 where caches are too small for the
//! prefixes in use and evict blocks that are soon needed again.
//!
//! * Sampled by hash bits (1 in [`SAMPLE`]): both the evictions and the returns are counted
//!   on the same blocks, so the share is unbiased and the bookkeeping is a 32nd of the blocks
//!   a pod records and evicts.
//! * Bounded: at most [`CAPACITY`] ghosts, oldest forgotten first (a block that returns
//!   after that long is not counted as a return).
//! * Recent: both counts are halved whenever [`WINDOW`] sampled evictions have accumulated,
//!   so the share follows the traffic of the last few thousand evictions.
//! * No estimate from fewer than [`MIN_EVICTIONS`] sampled evictions (the share is 0).

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{BlockHash, IdHasher};

/// One block hash in this many is sampled.
pub const SAMPLE: u64 = 32;
/// Most ghosts remembered.
pub const CAPACITY: usize = 65_536;
/// Sampled evictions after which both counts are halved.
pub const WINDOW: f64 = 512.0;
/// Fewest sampled evictions the share is estimated from.
pub const MIN_EVICTIONS: f64 = 16.0;

pub fn sampled(h: BlockHash) -> bool {
    h.is_multiple_of(SAMPLE)
}

/// The ghosts and the counts (behind the index's mutex); the share is published for
/// lock-free reads.
#[derive(Debug, Default)]
pub struct Ghosts {
    /// Ghost → its sequence number (the newest insertion of that hash).
    seq_of: HashMap<BlockHash, u64, BuildHasherDefault<IdHasher>>,
    /// Insertion order; an entry whose sequence number is no longer the map's is stale.
    order: VecDeque<(BlockHash, u64)>,
    next_seq: u64,
    evicted: f64,
    returned: f64,
}

impl Ghosts {
    /// Remembers the sampled ones among `hashes`, just evicted from some pod.
    pub fn evicted(&mut self, hashes: impl IntoIterator<Item = BlockHash>) {
        for h in hashes.into_iter().filter(|&h| sampled(h)) {
            self.next_seq += 1;
            self.seq_of.insert(h, self.next_seq);
            self.order.push_back((h, self.next_seq));
            self.evicted += 1.0;
            if self.evicted > WINDOW {
                self.evicted /= 2.0;
                self.returned /= 2.0;
            }
        }
        while self.seq_of.len() > CAPACITY || self.order.len() > 2 * CAPACITY {
            let Some((h, seq)) = self.order.pop_front() else {
                break;
            };
            if self.seq_of.get(&h) == Some(&seq) {
                self.seq_of.remove(&h);
            }
        }
    }

    /// Counts the ghosts among `hashes`, just recorded on a pod that did not hold them.
    pub fn recorded(&mut self, hashes: impl IntoIterator<Item = BlockHash>) {
        for h in hashes.into_iter().filter(|&h| sampled(h)) {
            if self.seq_of.remove(&h).is_some() {
                self.returned += 1.0;
            }
        }
    }

    /// Share of the evicted blocks that came back, in `[0, 1]` (0 before [`MIN_EVICTIONS`]).
    pub fn share(&self) -> f64 {
        if self.evicted < MIN_EVICTIONS {
            return 0.0;
        }
        (self.returned / self.evicted).clamp(0.0, 1.0)
    }

    /// Ghosts remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.seq_of.len()
    }
}

/// [`Ghosts::share`] as last published, readable without the lock.
#[derive(Debug, Default)]
pub struct Share(AtomicU64);

impl Share {
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    pub fn set(&self, share: f64) {
        self.0.store(share.to_bits(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` distinct sampled hashes starting at `from`.
    fn hashes(from: u64, n: u64) -> impl Iterator<Item = BlockHash> {
        (from..from + n).map(|i| i * SAMPLE)
    }

    #[test]
    fn the_share_is_what_came_back_of_what_was_evicted() {
        let mut g = Ghosts::default();
        g.evicted(hashes(0, 10));
        g.recorded(hashes(0, 10));
        assert_eq!(g.share(), 0.0, "no estimate from 10 evictions");
        g.evicted(hashes(100, 30));
        g.recorded(hashes(100, 5));
        assert!((g.share() - 15.0 / 40.0).abs() < 1e-9, "{}", g.share());
        g.recorded(hashes(100, 5));
        assert!(
            (g.share() - 15.0 / 40.0).abs() < 1e-9,
            "a ghost counts once"
        );
        assert_eq!(g.len(), 25);
    }

    #[test]
    fn unsampled_hashes_cost_nothing() {
        let mut g = Ghosts::default();
        g.evicted((0..1000).map(|i| i * SAMPLE + 1));
        assert_eq!((g.len(), g.share()), (0, 0.0));
    }

    #[test]
    fn unique_prompts_share_nothing_and_old_counts_fade() {
        let mut g = Ghosts::default();
        g.evicted(hashes(0, 400));
        g.recorded(hashes(0, 400));
        assert!(g.share() > 0.99);
        // Then only blocks that never come back.
        g.evicted(hashes(1_000, 5_000));
        assert!(g.share() < 0.01, "{}", g.share());
    }

    #[test]
    fn ghosts_are_bounded_oldest_first() {
        let mut g = Ghosts::default();
        g.evicted(hashes(0, CAPACITY as u64 + 100));
        assert_eq!(g.len(), CAPACITY);
        let before = g.returned;
        g.recorded(hashes(0, 100));
        assert_eq!(g.returned, before, "the oldest 100 are forgotten");
        g.recorded(hashes(100, 1));
        assert!(g.returned > before);
        // A hash evicted again keeps its newer ghost when the older entry leaves.
        let mut g = Ghosts::default();
        g.evicted(hashes(0, 1));
        g.evicted(hashes(1, CAPACITY as u64 - 1));
        g.evicted(hashes(0, 1));
        g.evicted(hashes(CAPACITY as u64, 1));
        assert_eq!(g.len(), CAPACITY);
        g.recorded(hashes(0, 1));
        assert_eq!(g.len(), CAPACITY - 1, "hash 0 was still remembered");
    }
}
