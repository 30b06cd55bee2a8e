//! Recording off the request path: a decision hands the chosen pod and the prompt's block
//! hashes to a background thread that applies them to the index, so the decision does not
//! pay for the table writes (a few hundred random memory accesses for a long prompt).
//!
//! A later decision does not see a stale index because of this: before matching it applies
//! whatever the thread has not picked up yet ([`Recorder::flush`]) — on an idle process the
//! thread has long done it and the check is one uncontended lock; on a starved one the
//! deciding threads share the work. Only the one record the thread is applying at that very
//! moment (tens of microseconds) may not be visible yet. The queue is bounded: past [`QUEUE`] pending records a
//! decision records inline (backpressure, never loss).

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::{BlockHash, PodId, PrefixIndex};

/// Records pending before decisions record inline instead.
const QUEUE: usize = 4096;

#[derive(Debug, Default)]
struct Queue {
    jobs: VecDeque<(PodId, Vec<BlockHash>)>,
    /// Jobs the thread has taken, and finished applying.
    taken: u64,
    applied: u64,
    closed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    idle: Condvar,
}

/// A background recorder for one index.
#[derive(Debug)]
pub struct Recorder {
    index: Arc<PrefixIndex>,
    shared: Arc<Shared>,
}

impl Recorder {
    /// Starts the recording thread; it ends when the recorder is dropped.
    pub fn spawn(index: Arc<PrefixIndex>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let (worker_index, worker_shared) = (index.clone(), shared.clone());
        std::thread::Builder::new()
            .name("epp-prefix-recorder".into())
            .spawn(move || drain(&worker_index, &worker_shared))?;
        Ok(Self { index, shared })
    }

    /// Records `hashes` for `pod`, in the background when the queue has room.
    pub fn record(&self, pod: PodId, hashes: Vec<BlockHash>) {
        let mut q = self.shared.queue.lock();
        if q.jobs.len() >= QUEUE {
            drop(q);
            self.index.record(pod, &hashes);
            return;
        }
        q.jobs.push_back((pod, hashes));
        drop(q);
        self.shared.ready.notify_one();
    }

    /// Applies every pending record now, then waits for the one the thread may be applying
    /// (called before matching, so a match always sees every earlier decision; the thread
    /// pops a job before applying it, and a match that ran meanwhile missed it: regression
    /// found as a flaky stickiness test under load).
    pub fn sync(&self) {
        loop {
            let job = self.shared.queue.lock().jobs.pop_front();
            match job {
                Some((pod, hashes)) => self.index.record(pod, &hashes),
                None => break,
            }
        }
        // Only the jobs taken so far: later decisions may keep the thread busy indefinitely.
        let mut q = self.shared.queue.lock();
        let taken = q.taken;
        while q.applied < taken {
            self.shared.idle.wait(&mut q);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.shared.queue.lock().closed = true;
        self.shared.ready.notify_all();
    }
}

fn drain(index: &PrefixIndex, shared: &Shared) {
    let mut q = shared.queue.lock();
    loop {
        if let Some((pod, hashes)) = q.jobs.pop_front() {
            q.taken += 1;
            drop(q);
            index.record(pod, &hashes);
            q = shared.queue.lock();
            q.applied += 1;
            shared.idle.notify_all();
        } else if q.closed {
            return;
        } else {
            shared.ready.wait(&mut q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_records_become_visible() {
        let index = Arc::new(PrefixIndex::new(1000));
        let r = Recorder::spawn(index.clone()).unwrap();
        let hashes: Vec<u64> = (1..=20u64).map(|i| i << 8).collect();
        r.record(3, hashes.clone());
        for _ in 0..1000 {
            if index.match_prefix(&hashes).blocks_for(3) == 20 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("the record never became visible");
    }

    #[test]
    fn flush_applies_pending_records_at_once() {
        let index = Arc::new(PrefixIndex::new(100_000));
        let r = Recorder::spawn(index.clone()).unwrap();
        let chains: Vec<Vec<u64>> = (0..200u64)
            .map(|c| (0..50u64).map(|i| (c * 1000 + i + 1) << 8).collect())
            .collect();
        for (pod, c) in chains.iter().enumerate() {
            r.record(pod as u32, c.clone());
        }
        r.sync();
        for (pod, c) in chains.iter().enumerate() {
            assert_eq!(index.match_prefix(c).blocks_for(pod as u32), 50);
        }
    }
}
