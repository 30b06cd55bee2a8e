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
