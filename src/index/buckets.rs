//! A pod's recency order as generation buckets: the block hashes recorded in each generation,
//! oldest bucket first. A block's table entry carries the generation it was last recorded in;
//! a hash in an older bucket whose entry has moved on is stale and skipped.
//!
//! * Recording a block already recorded in the current generation costs nothing more; one
//!   recorded earlier moves to the current bucket (its old bucket's live count drops, and a
//!   bucket whose live count reaches zero frees its storage at once).
//! * A new generation starts once the current bucket holds [`PodBuckets::target`] hashes
//!   (about one long prompt's record, [`TARGET`], or 1/32 of a small capacity), so an eviction
//!   — one whole bucket — costs about as much as a record.
//! * Eviction takes whole buckets, oldest first. Every record stamps all blocks of a prompt
//!   with the same (current) generation, so a block's generation is never older than that of
//!   any block after it in the same prompt; evicting whole buckets therefore keeps every pod's
//!   set of blocks closed under prefixes (what the index's binary-search matching relies on)
//!   — no per-block order needs keeping, and there are no duplicate slots to compact.
//! * At most [`PodBuckets::max_buckets`] generations are kept (2 × capacity / target, at
//!   least 64; memory ≤ 2 × capacity hashes): when more are needed the oldest bucket goes even
//!   under capacity (its blocks were not recorded while the pod recorded about twice its
//!   capacity).

use std::collections::VecDeque;

use super::BlockHash;

/// Hashes per generation.
pub const TARGET: usize = 256;
/// Fewest generations kept per pod.
const MIN_BUCKETS: usize = 64;
/// Most generations kept per pod: generation numbers (u16) must not wrap within the window.
const MAX_WINDOW: usize = 16_384;

/// One generation's hashes.
#[derive(Debug, Default)]
pub struct Bucket {
    pub hashes: Vec<BlockHash>,
    /// Hashes here whose entry still carries this generation.
    pub live: u32,
}

/// The buckets of one pod. Generation numbers wrap (u16); fewer than 2^15 are ever alive, so
/// wrapping comparisons are exact.
#[derive(Debug, Default)]
pub struct PodBuckets {
    buckets: VecDeque<Bucket>,
    /// Generation of `buckets[0]`.
    oldest: u16,
}

impl PodBuckets {
    /// Hashes per generation for a pod of `capacity` blocks.
    pub fn target(capacity: usize) -> usize {
        TARGET.min(capacity.div_ceil(32)).max(1)
    }

    /// Generations kept for a pod of `capacity` blocks.
    pub fn max_buckets(capacity: usize) -> usize {
        (2 * capacity)
            .div_ceil(Self::target(capacity))
            .clamp(MIN_BUCKETS, MAX_WINDOW)
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// The current generation (starting one if there is none).
    pub fn current(&mut self) -> u16 {
        if self.buckets.is_empty() {
            self.buckets.push_back(Bucket::default());
        }
        self.oldest.wrapping_add(self.buckets.len() as u16 - 1)
    }

    /// Whether `generation` is alive (within the kept window).
    pub fn alive(&self, generation: u16) -> bool {
        (generation.wrapping_sub(self.oldest) as usize) < self.buckets.len()
    }

    /// Records `h` in the current generation (its entry must already carry it).
    pub fn push_current(&mut self, h: BlockHash) {
        let generation = self.current();
        let b = self.bucket_mut(generation);
        b.hashes.push(h);
        b.live += 1;
    }

    fn bucket_mut(&mut self, generation: u16) -> &mut Bucket {
        let i = generation.wrapping_sub(self.oldest) as usize;
        &mut self.buckets[i]
    }

    /// An entry left generation `generation` (moved on, or was removed).
    pub fn leave(&mut self, generation: u16) {
        if !self.alive(generation) {
            return;
        }
        let b = self.bucket_mut(generation);
        b.live = b.live.saturating_sub(1);
        if b.live == 0 {
            b.hashes = Vec::new();
        }
    }

    /// Hashes in the current bucket.
    pub fn current_len(&self) -> usize {
        self.buckets.back().map_or(0, |b| b.hashes.len())
    }

    /// Whether a new generation would need the oldest bucket's place.
    pub fn full(&self, capacity: usize) -> bool {
        self.buckets.len() >= Self::max_buckets(capacity)
    }

    /// Starts a new generation (the caller has made room).
    pub fn advance(&mut self) {
        self.buckets.push_back(Bucket::default());
    }

    /// Removes the oldest bucket; returns its generation and hashes.
    pub fn pop_oldest(&mut self) -> Option<(u16, Vec<BlockHash>)> {
        let b = self.buckets.pop_front()?;
        let generation = self.oldest;
        self.oldest = self.oldest.wrapping_add(1);
        Some((generation, b.hashes))
    }

    /// Drops leading buckets with nothing alive (no lookups needed).
    pub fn drop_dead_front(&mut self) {
        while self.buckets.len() > 1 && self.buckets.front().is_some_and(|b| b.live == 0) {
            self.buckets.pop_front();
            self.oldest = self.oldest.wrapping_add(1);
        }
    }

    /// Every hash held in any bucket (stale ones included).
    pub fn all_hashes(&self) -> impl Iterator<Item = BlockHash> + '_ {
        self.buckets.iter().flat_map(|b| b.hashes.iter().copied())
    }

    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        self.buckets
            .iter()
            .map(|b| b.hashes.capacity() * std::mem::size_of::<BlockHash>())
            .sum::<usize>()
            + self.buckets.capacity() * std::mem::size_of::<Bucket>()
    }

    /// Live blocks in the generations after `generation` (all of them if it is gone).
    pub fn live_after(&self, generation: u16) -> usize {
        let skip = if self.alive(generation) {
            generation.wrapping_sub(self.oldest) as usize + 1
        } else {
            0
        };
        self.buckets
            .iter()
            .skip(skip)
            .map(|b| b.live as usize)
            .sum()
    }

    /// Hashes stored (live and stale).
    pub fn stored(&self) -> usize {
        self.buckets.iter().map(|b| b.hashes.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_wrap_and_dead_buckets_free_at_once() {
        let mut p = PodBuckets {
            oldest: u16::MAX - 1,
            ..Default::default()
        };
        let g0 = p.current();
        p.push_current(1);
        p.advance();
        let g1 = p.current();
        p.push_current(2);
        p.advance();
        let g2 = p.current();
        assert_eq!((g0, g1, g2), (u16::MAX - 1, u16::MAX, 0));
        assert!(p.alive(g0) && p.alive(g2) && !p.alive(1));
        p.leave(g0);
        assert_eq!(p.stored(), 1, "a dead bucket frees its storage");
        p.drop_dead_front();
        assert_eq!(p.len(), 2);
        assert_eq!(p.pop_oldest(), Some((u16::MAX, vec![2])));
        assert_eq!(PodBuckets::max_buckets(31_250), 245);
        assert_eq!(PodBuckets::max_buckets(3), 64);
        assert_eq!(PodBuckets::target(40), 2);
        assert_eq!(PodBuckets::max_buckets(100_000_000), 16_384);
    }
}
