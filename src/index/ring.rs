//! A pod's LRU ring of block hashes: a deque stored in fixed 4 KiB chunks, so it grows and
//! shrinks a chunk at a time (no doubling slack, no large copies on growth).

use std::collections::VecDeque;

use super::BlockHash;

const CHUNK: usize = 512;

#[derive(Debug, Default)]
pub(super) struct Ring {
    chunks: VecDeque<Box<[BlockHash; CHUNK]>>,
    /// Offset of the first element in the first chunk.
    head: usize,
    len: usize,
}

impl Ring {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> usize {
        self.chunks.len() * std::mem::size_of::<[BlockHash; CHUNK]>()
            + self.chunks.capacity() * std::mem::size_of::<usize>()
    }

    #[inline]
    fn get(&self, i: usize) -> BlockHash {
        let p = self.head + i;
        self.chunks[p / CHUNK][p % CHUNK]
    }

    pub fn push_back(&mut self, h: BlockHash) {
        let p = self.head + self.len;
        if p / CHUNK == self.chunks.len() {
            self.chunks.push_back(Box::new([0; CHUNK]));
        }
        self.chunks[p / CHUNK][p % CHUNK] = h;
        self.len += 1;
    }

    /// Removes and returns up to `n` hashes from the front, oldest first.
    pub fn drain_front(&mut self, n: usize) -> Vec<BlockHash> {
        let n = n.min(self.len);
        let out: Vec<BlockHash> = (0..n).map(|i| self.get(i)).collect();
        self.head += n;
        self.len -= n;
        while self.head >= CHUNK {
            self.chunks.pop_front();
            self.head -= CHUNK;
        }
        if self.len == 0 {
            self.chunks.clear();
            self.head = 0;
        }
        out
    }

    /// All hashes, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = BlockHash> + '_ {
        (0..self.len).map(|i| self.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_across_chunks() {
        let mut r = Ring::default();
        for i in 0..2000 {
            r.push_back(i);
        }
        assert_eq!(r.drain_front(700), (0..700).collect::<Vec<_>>());
        assert_eq!(r.len(), 1300);
        assert_eq!(r.iter().next(), Some(700));
        assert_eq!(r.iter().next_back(), Some(1999));
        assert_eq!(r.chunks.len(), 3, "the first chunk was freed");
        assert_eq!(r.drain_front(5000).len(), 1300);
        assert_eq!(r.bytes(), r.chunks.capacity() * 8);
        r.push_back(9);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![9]);
    }
}

/// A pod's recency order, oldest first: `clean ++ dirty… ++ fresh`. New slots go to `fresh`.
/// An incremental compaction round moves everything but `fresh` into `dirty` and then, a
/// bounded batch per record, drops the stale slots from the front of `dirty` and appends the
/// live ones to `clean`, so no single call pays for the whole ring.
#[derive(Debug, Default)]
pub(super) struct LruOrder {
    clean: Ring,
    dirty: VecDeque<Ring>,
    fresh: Ring,
}

impl LruOrder {
    pub fn len(&self) -> usize {
        self.clean.len() + self.dirty.iter().map(Ring::len).sum::<usize>() + self.fresh.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        self.clean.bytes() + self.dirty.iter().map(Ring::bytes).sum::<usize>() + self.fresh.bytes()
    }

    pub fn push_back(&mut self, h: BlockHash) {
        self.fresh.push_back(h);
    }

    /// Removes up to `n` of the oldest slots.
    pub fn drain_front(&mut self, n: usize) -> Vec<BlockHash> {
        let mut out = self.clean.drain_front(n);
        if out.len() < n {
            out.extend(self.take_dirty(n - out.len()));
        }
        if out.len() < n {
            out.extend(self.fresh.drain_front(n - out.len()));
        }
        out
    }

    /// Every slot, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = BlockHash> + '_ {
        self.clean
            .iter()
            .chain(self.dirty.iter().flat_map(Ring::iter))
            .chain(self.fresh.iter())
    }

    /// Whether a compaction round is in progress.
    pub fn compacting(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Starts a round: everything but nothing newer than now becomes dirty (O(1)).
    pub fn start_round(&mut self) {
        self.dirty.push_back(std::mem::take(&mut self.clean));
        self.dirty.push_back(std::mem::take(&mut self.fresh));
        self.dirty.retain(|s| !s.is_empty());
    }

    /// The next `n` dirty slots, oldest first.
    pub fn take_dirty(&mut self, n: usize) -> Vec<BlockHash> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n
            && let Some(seg) = self.dirty.front_mut()
        {
            out.extend(seg.drain_front(n - out.len()));
            if seg.is_empty() {
                self.dirty.pop_front();
            }
        }
        out
    }

    /// Appends a slot found live by compaction (older than every remaining dirty slot).
    pub fn push_clean(&mut self, h: BlockHash) {
        self.clean.push_back(h);
    }

    /// Replaces the whole order (after a full compaction).
    pub fn replace(&mut self, oldest_first: impl IntoIterator<Item = BlockHash>) {
        *self = Self::default();
        for h in oldest_first {
            self.clean.push_back(h);
        }
    }
}

#[cfg(test)]
mod order_tests {
    use super::*;

    #[test]
    fn order_is_clean_dirty_fresh() {
        let mut o = LruOrder::default();
        for i in 0..5 {
            o.push_back(i);
        }
        o.start_round();
        o.push_back(5);
        let batch = o.take_dirty(2);
        assert_eq!(batch, vec![0, 1]);
        o.push_clean(1); // 0 was stale
        assert_eq!(o.iter().collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert!(o.compacting());
        assert_eq!(o.drain_front(3), vec![1, 2, 3]);
        assert_eq!(o.len(), 2);
        assert_eq!(o.take_dirty(10), vec![4]);
        assert!(!o.compacting());
        o.replace([9, 8]);
        assert_eq!(o.iter().collect::<Vec<_>>(), vec![9, 8]);
    }
}
