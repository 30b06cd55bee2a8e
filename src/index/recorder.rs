//! Recording off the request path: a decision hands the chosen pod and the prompt's block
//! hashes to a queue, so the decision does not pay for the table writes (a few hundred random
//! memory accesses for a long prompt). Two ways to drain it:
//!
//! * [`Recorder::after_reply`] (epp's default): no thread. The ext_proc stream applies the
//!   queue once its routing reply is on its way to Envoy ([`Recorder::sync`] from a task it
//!   spawns), so the records cost the serving thread the same CPU as inline recording but no
//!   longer delay the answer, and no other thread has to be woken for them (a futex wake-up
//!   cost a decision 5–9 µs on this project's VM).
//! * [`Recorder::spawn`]: a background thread applies them, woken per record.
//!
//! Either way a later decision does not see a stale index: before matching it applies
//! whatever has not been picked up yet, and waits for records another thread is applying at
//! that moment ([`Recorder::sync`]). The queue is bounded: past [`QUEUE`] pending records a
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
    /// Jobs taken from the queue (by the thread or by [`Recorder::sync`]), and finished
    /// applying.
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

/// A deferred recorder for one index.
#[derive(Debug)]
pub struct Recorder {
    index: Arc<PrefixIndex>,
    shared: Arc<Shared>,
    /// Whether a thread drains the queue (it is woken per record).
    worker: bool,
}

impl Recorder {
    /// Starts the recording thread; it ends when the recorder is dropped.
    pub fn spawn(index: Arc<PrefixIndex>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let (worker_index, worker_shared) = (index.clone(), shared.clone());
        std::thread::Builder::new()
            .name("epp-prefix-recorder".into())
            .spawn(move || drain(&worker_index, &worker_shared))?;
        Ok(Self {
            index,
            shared,
            worker: true,
        })
    }

    /// A queue with no thread: records wait for the next [`Recorder::sync`] (the stream's
    /// after its reply, or the next decision's before it matches).
    pub fn after_reply(index: Arc<PrefixIndex>) -> Self {
        Self {
            index,
            shared: Arc::default(),
            worker: false,
        }
    }

    /// Records `hashes` for `pod`, deferred when the queue has room.
    pub fn record(&self, pod: PodId, hashes: Vec<BlockHash>) {
        let mut q = self.shared.queue.lock();
        if q.jobs.len() >= QUEUE {
            drop(q);
            self.index.record(pod, &hashes);
            return;
        }
        q.jobs.push_back((pod, hashes));
        drop(q);
        if self.worker {
            self.shared.ready.notify_one();
        }
    }

    /// Applies every pending record now, then waits for those another thread took before
    /// and is still applying (called before matching, so a match always sees every earlier
    /// decision; a job popped but not yet applied was missed by a match that ran meanwhile:
    /// regression found as a flaky stickiness test under load).
    pub fn sync(&self) {
        loop {
            let job = {
                let mut q = self.shared.queue.lock();
                let job = q.jobs.pop_front();
                q.taken += u64::from(job.is_some());
                job
            };
            let Some((pod, hashes)) = job else {
                break;
            };
            self.index.record(pod, &hashes);
            self.shared.queue.lock().applied += 1;
            self.shared.idle.notify_all();
        }
        // Only the jobs taken so far: later decisions may keep others busy indefinitely.
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
    fn after_reply_records_wait_for_sync_and_none_is_lost() {
        let index = Arc::new(PrefixIndex::new(1_000_000));
        let r = Recorder::after_reply(index.clone());
        let chain = |c: u64| -> Vec<u64> { (0..30u64).map(|i| (c * 1000 + i + 1) << 8).collect() };
        r.record(1, chain(1));
        assert_eq!(index.match_prefix(&chain(1)).blocks_for(1), 0, "deferred");
        r.sync();
        assert_eq!(index.match_prefix(&chain(1)).blocks_for(1), 30);
        // Past the queue bound, records are applied at once (backpressure, never loss).
        for c in 2..(QUEUE as u64 + 10) {
            r.record(2, chain(c));
        }
        let last = QUEUE as u64 + 9;
        assert_eq!(index.match_prefix(&chain(last)).blocks_for(2), 30);
        r.sync();
        for c in 2..=last {
            assert_eq!(index.match_prefix(&chain(c)).blocks_for(2), 30, "chain {c}");
        }
    }

    /// A sync must not return while another thread is still applying a record it took: the
    /// match after it would miss that record.
    #[test]
    fn sync_waits_for_a_record_another_thread_is_applying() {
        let index = Arc::new(PrefixIndex::new(10_000_000));
        let r = Arc::new(Recorder::after_reply(index.clone()));
        let long: Vec<u64> = (0..400_000u64).map(|i| (i + 1) << 8).collect();
        r.record(5, long.clone());
        let applier = {
            let r = r.clone();
            std::thread::spawn(move || r.sync())
        };
        while r.shared.queue.lock().taken == 0 {
            std::hint::spin_loop();
        }
        r.sync();
        assert_eq!(
            index.match_prefix(&long[..1000]).blocks_for(5),
            1000,
            "sync returned before the other thread's record was applied"
        );
        applier.join().unwrap();
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
