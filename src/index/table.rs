//! The prefix index's hash table: open addressing with linear probing and backward-shift
//! deletion, storing 12-byte entries with no control bytes (an entry whose pod slot is
//! [`EMPTY_SLOT`] is an empty table slot).
//!
//! Why not hashbrown: under the index's constant insert/evict churn, hashbrown leaves tombstones
//! and doubles a table whenever it is more than half full at rehash time, so tables settled at
//! 35–45 % load (≈ 35 bytes per 12-byte entry, plus a control byte each). Backward-shift
//! deletion leaves no tombstones, so the load is simply live entries / slots: between 40 % and
//! [`MAX_LOAD`] (80 %), i.e. 15–30 bytes per entry. The block hash is already uniform, so its
//! low bits are the home slot. Several entries may share a hash (one per pod): a multimap.

use super::{BlockHash, Entry};

/// Grow past this load. Linear probing at 0.8 averages ~3 probes for a hit and ~13 for a miss,
/// contiguous in memory.
const MAX_LOAD_NUM: usize = 4;
const MAX_LOAD_DEN: usize = 5;
/// Shrink below this load (so a purged pod's space is returned).
const MIN_LOAD_DEN: usize = 8;
const MIN_SLOTS: usize = 16;

/// The pod slot marking an empty table slot (never given to a pod).
pub(super) const EMPTY_SLOT: u16 = u16::MAX;

const EMPTY: Entry = Entry {
    hash_lo: 0,
    hash_hi: 0,
    slot: EMPTY_SLOT,
    generation: 0,
};

#[derive(Debug, Clone)]
pub(super) struct Table {
    slots: Vec<Entry>,
    len: usize,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            slots: vec![EMPTY; MIN_SLOTS],
            len: 0,
        }
    }
}

impl Table {
    #[inline]
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    #[inline]
    fn home(&self, hash: BlockHash) -> usize {
        (hash as usize) & self.mask()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn allocation_size(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Entry>()
    }

    /// Indices of the probe run starting at `hash`'s home slot (up to the first empty slot).
    #[inline]
    fn run(&self, hash: BlockHash) -> impl Iterator<Item = usize> + '_ {
        let mask = self.mask();
        let start = self.home(hash);
        (0..self.slots.len())
            .map(move |i| (start + i) & mask)
            .take_while(|&i| self.slots[i].slot != EMPTY_SLOT)
    }

    /// Entries whose hash is `hash`.
    pub fn iter_hash(&self, hash: BlockHash) -> impl Iterator<Item = &Entry> + '_ {
        self.run(hash)
            .map(|i| &self.slots[i])
            .filter(move |e| e.hash() == hash)
    }

    /// Index of the entry with `hash` satisfying `pred`.
    pub fn find(&self, hash: BlockHash, mut pred: impl FnMut(&Entry) -> bool) -> Option<usize> {
        self.run(hash)
            .find(|&i| self.slots[i].hash() == hash && pred(&self.slots[i]))
    }

    pub fn find_mut(
        &mut self,
        hash: BlockHash,
        pred: impl FnMut(&Entry) -> bool,
    ) -> Option<&mut Entry> {
        let i = self.find(hash, pred)?;
        Some(&mut self.slots[i])
    }

    /// Adds an entry (for a real pod slot); duplicates are the caller's business.
    pub fn insert(&mut self, entry: Entry) {
        debug_assert!(entry.slot != EMPTY_SLOT);
        if (self.len + 1) * MAX_LOAD_DEN > self.slots.len() * MAX_LOAD_NUM {
            self.resize(self.slots.len() * 2);
        }
        self.place(entry);
        self.len += 1;
    }

    fn place(&mut self, entry: Entry) {
        let mask = self.mask();
        let mut i = self.home(entry.hash());
        while self.slots[i].slot != EMPTY_SLOT {
            i = (i + 1) & mask;
        }
        self.slots[i] = entry;
    }

    /// Removes the entry at `index`, shifting later entries of the run back into the gap.
    pub fn remove_at(&mut self, index: usize) {
        let mask = self.mask();
        let mut gap = index;
        let mut j = index;
        loop {
            j = (j + 1) & mask;
            if self.slots[j].slot == EMPTY_SLOT {
                break;
            }
            let home = self.home(self.slots[j].hash());
            // The entry at j may move to the gap iff its home is not cyclically in (gap, j].
            let stays = if gap <= j {
                gap < home && home <= j
            } else {
                gap < home || home <= j
            };
            if !stays {
                self.slots[gap] = self.slots[j];
                gap = j;
            }
        }
        self.slots[gap] = EMPTY;
        self.len -= 1;
        if self.slots.len() > MIN_SLOTS && self.len * MIN_LOAD_DEN < self.slots.len() {
            self.resize(self.slots.len() / 2);
        }
    }

    fn resize(&mut self, slots: usize) {
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; slots.max(MIN_SLOTS)]);
        for e in old.into_iter().filter(|e| e.slot != EMPTY_SLOT) {
            self.place(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn entry(hash: u64, slot: u16, generation: u16) -> Entry {
        Entry {
            hash_lo: hash as u32,
            hash_hi: (hash >> 32) as u32,
            slot,
            generation,
        }
    }

    #[test]
    fn matches_a_model_under_random_churn() {
        let mut rng = fastrand::Rng::with_seed(11);
        let mut t = Table::default();
        let mut model: HashMap<(u64, u16), u16> = HashMap::new();
        // Few distinct low bits: long shared runs, the hard case for backward shifts.
        let keys: Vec<u64> = (0..300).map(|_| rng.u64(..) & !0xfff0).collect();
        for step in 0..60_000 {
            let h = keys[rng.usize(..keys.len())];
            let s = rng.u16(0..3);
            match model.get(&(h, s)).copied() {
                Some(c) if rng.bool() => {
                    let i = t.find(h, |e| e.slot == s).expect("present");
                    t.remove_at(i);
                    model.remove(&(h, s));
                    let _ = c;
                }
                Some(c) => {
                    t.find_mut(h, |e| e.slot == s).unwrap().generation = c.wrapping_add(1);
                    model.insert((h, s), c.wrapping_add(1));
                }
                None => {
                    t.insert(entry(h, s, 1));
                    model.insert((h, s), 1);
                }
            }
            if step % 997 == 0 {
                assert_eq!(t.len(), model.len());
                for (&(h, s), &c) in &model {
                    let e = t.iter_hash(h).find(|e| e.slot == s).expect("entry lost");
                    assert_eq!(e.generation, c);
                }
            }
        }
        for (&(h, s), _) in model.iter() {
            let i = t.find(h, |e| e.slot == s).unwrap();
            t.remove_at(i);
        }
        assert!(t.is_empty());
        assert_eq!(t.slots.len(), MIN_SLOTS, "shrinks back when emptied");
    }

    #[test]
    fn load_stays_within_bounds() {
        let mut t = Table::default();
        for i in 0..10_000u64 {
            t.insert(entry(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), 0, 1));
            assert!(t.len() * MAX_LOAD_DEN <= t.slots.len() * MAX_LOAD_NUM);
        }
        assert!(
            t.len() * 5 > t.slots.len() * 2,
            "at least 40 % full after growth"
        );
    }
}
