//! The pool queue: requests waiting for a backend below its request limit.
//!
//! A backend with `max_requests` takes at most that many requests at once (HAProxy's
//! server `maxconn`, Envoy's `max_requests`). When every backend a request may go to is
//! full, the request waits here rather than in a backend's own queue, as in HAProxy's
//! backend queue (`timeout queue`): when an attempt on a limited backend ends
//! ([`ReleaseListener::slot_freed`]), the first waiter is woken and picks again among the
//! backends that now have room.
//!
//! Waiting here rather than at the backend lets the proxy choose the order. With
//! [`QueuePriority::Class`] short requests go before long ones: when sizes are known,
//! serving short jobs first minimises the mean response time (the shortest-processing-time
//! rule; for M/G/k queues with non-preemptive class priorities see Cobham, "Priority
//! assignment in waiting line problems", 1954, and for web servers Harchol-Balter et al.,
//! "Size-based scheduling to improve web performance", ACM TOCS 2003). A long request's
//! priority key is its arrival time plus an offset (HAProxy's `set-priority-offset`), so
//! a long request yields only to short requests that arrived less than the offset after
//! it, and is never starved.
//!
//! Waiters are kept in key order in a map under a mutex held for a few map operations,
//! never across an await. Waking is a hand-off: the waker removes the waiter's entry and
//! sends on its channel; a woken waiter that finds no room (another request took the
//! slot) queues again with its old key, and passes the wake-up on to the next waiter when
//! some backend still has room (a room it may not use: a backend it already tried, or one
//! its route's tags exclude).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};
use std::time::Duration;

use fulcrum_balance::ReleaseListener;
use fulcrum_stats::clock::duration_ns;
use parking_lot::Mutex;
use tokio::sync::oneshot;

/// Order in which waiting requests get freed slots (`pools.*.queue.priority`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueuePriority {
    /// Arrival order.
    Fifo,
    /// Short requests first: a long request's key is its arrival plus `long_offset`.
    Class {
        /// How much later than its arrival a long request is ordered.
        long_offset: Duration,
    },
}

/// A pool's queue settings (`pools.*.queue`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueSettings {
    /// Most requests waiting at once; more get `503 queue_full`.
    pub max_size: usize,
    /// Longest wait; then `503 queue_timeout`.
    pub timeout: Duration,
    /// Which waiter goes first.
    pub priority: QueuePriority,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            max_size: 1024,
            timeout: Duration::from_secs(5),
            priority: QueuePriority::Class {
                long_offset: Duration::from_secs(5),
            },
        }
    }
}

impl QueueSettings {
    /// The priority key of a request that arrived at `arrived_ns` (clock ns) in class
    /// `long`: lower goes first.
    pub fn key(&self, arrived_ns: u64, long: bool) -> u64 {
        match self.priority {
            QueuePriority::Class { long_offset } if long => {
                arrived_ns.saturating_add(duration_ns(long_offset))
            }
            _ => arrived_ns,
        }
    }
}

/// A waiter's place: its priority key, then a sequence number that breaks ties in join
/// order and makes every place unique.
type Place = (u64, u64);

/// The requests of one pool waiting for a backend with room. Shared by the pool and, as
/// their [`ReleaseListener`], by its backends.
#[derive(Debug, Default)]
pub struct PoolQueue {
    waiters: Mutex<BTreeMap<Place, oneshot::Sender<()>>>,
    /// `waiters.len()`, readable without the lock (the release path checks it first).
    len: AtomicUsize,
    seq: AtomicU64,
}

impl PoolQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests waiting now.
    #[inline]
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Whether no request is waiting.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues a request with priority `key` (see [`QueueSettings::key`]); `None` if
    /// `max_size` requests are already waiting.
    pub fn join(self: &Arc<Self>, key: u64, max_size: usize) -> Option<Ticket> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut waiters = self.waiters.lock();
        if waiters.len() >= max_size {
            return None;
        }
        waiters.insert((key, seq), tx);
        self.len.store(waiters.len(), Ordering::Release);
        drop(waiters);
        // Pairs with the fence in `slot_freed`: either the releaser sees this waiter, or
        // the caller's look for room after joining sees the freed slot.
        fence(Ordering::SeqCst);
        Some(Ticket {
            queue: Arc::clone(self),
            place: (key, seq),
            rx,
            done: false,
        })
    }

    /// Wakes the first waiter, if any.
    pub fn wake_first(&self) {
        self.wake(None);
    }

    /// Wakes the first waiter after `after` in queue order (all of them if `None`);
    /// waiters that have gone meanwhile are skipped.
    fn wake(&self, after: Option<Place>) {
        if self.is_empty() {
            return;
        }
        let mut waiters = self.waiters.lock();
        loop {
            let next = match after {
                None => waiters.keys().next().copied(),
                Some(place) => waiters
                    .range((Bound::Excluded(place), Bound::Unbounded))
                    .next()
                    .map(|(k, _)| *k),
            };
            let Some(place) = next else {
                break;
            };
            let tx = waiters
                .remove(&place)
                .expect("invariant: `place` was just read from the map under the same lock");
            if tx.send(()).is_ok() {
                break;
            }
        }
        self.len.store(waiters.len(), Ordering::Release);
    }
}

impl ReleaseListener for PoolQueue {
    fn slot_freed(&self) {
        // The slot was released before this call; see `join` and `Ticket::requeue`.
        fence(Ordering::SeqCst);
        self.wake(None);
    }
}

/// A request's place in a [`PoolQueue`]. Dropping it leaves the queue; a wake-up it
/// received and did not use ([`Ticket::done`] not called) is passed to the next waiter.
#[derive(Debug)]
pub struct Ticket {
    queue: Arc<PoolQueue>,
    place: Place,
    rx: oneshot::Receiver<()>,
    done: bool,
}

impl Ticket {
    /// Waits until this request is woken: a slot may be free for it. Its place has then
    /// been taken out of the queue; [`Ticket::requeue`] puts it back.
    pub async fn woken(&mut self) {
        // The sender is only dropped unsent when its place is removed by this ticket's own
        // `requeue` or `drop`, which replace or end the receiver: an error cannot be seen
        // here, and is harmless (a spurious wake-up) if it were.
        let _ = (&mut self.rx).await;
    }

    /// Puts a woken request back in the queue at its old place (it found no room). The
    /// caller then looks for room again: a slot freed while this request was out of the
    /// queue woke nobody.
    pub fn requeue(&mut self) {
        let (tx, rx) = oneshot::channel();
        let mut waiters = self.queue.waiters.lock();
        waiters.insert(self.place, tx);
        self.queue.len.store(waiters.len(), Ordering::Release);
        drop(waiters);
        self.rx = rx;
        fence(Ordering::SeqCst);
    }

    /// Passes a wake-up on to the next waiter after this one: some backend has room that
    /// this request cannot use (one it already tried, or one its route excludes).
    pub fn pass_on(&self) {
        self.queue.wake(Some(self.place));
    }

    /// Marks the wake-up as used: the request got a backend.
    pub fn done(mut self) {
        self.done = true;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut waiters = self.queue.waiters.lock();
        let was_waiting = waiters.remove(&self.place).is_some();
        self.queue.len.store(waiters.len(), Ordering::Release);
        drop(waiters);
        // Woken (its place was removed by the waker) but leaving without using the slot
        // (a timeout at the same moment, or the client went away): pass it on.
        if !was_waiting && !self.done && self.rx.try_recv().is_ok() {
            self.queue.wake(Some(self.place));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn woken(ticket: &mut Ticket) -> bool {
        ticket.rx.try_recv().is_ok()
    }

    #[test]
    fn class_priority_puts_short_requests_first_within_the_offset() {
        let settings = QueueSettings {
            priority: QueuePriority::Class {
                long_offset: Duration::from_millis(200),
            },
            ..QueueSettings::default()
        };
        let ms = 1_000_000;
        // A long request that arrived at 0 goes after a short one from 100 ms, before
        // one from 300 ms.
        assert!(settings.key(100 * ms, false) < settings.key(0, true));
        assert!(settings.key(300 * ms, false) > settings.key(0, true));
        let fifo = QueueSettings {
            priority: QueuePriority::Fifo,
            ..settings
        };
        assert!(fifo.key(0, true) < fifo.key(100 * ms, false));
    }

    #[test]
    fn wakes_in_key_order_then_join_order() {
        let queue = Arc::new(PoolQueue::new());
        let mut late = queue.join(20, 10).unwrap();
        let mut first = queue.join(10, 10).unwrap();
        let mut tie = queue.join(20, 10).unwrap();
        assert_eq!(queue.len(), 3);
        queue.slot_freed();
        assert!(woken(&mut first) && !woken(&mut late) && !woken(&mut tie));
        queue.slot_freed();
        assert!(woken(&mut late) && !woken(&mut tie));
        queue.slot_freed();
        assert!(woken(&mut tie));
        assert!(queue.is_empty());
        // Waking an empty queue does nothing.
        queue.slot_freed();
    }

    #[test]
    fn full_queue_refuses() {
        let queue = Arc::new(PoolQueue::new());
        let _a = queue.join(1, 2).unwrap();
        let _b = queue.join(2, 2).unwrap();
        assert!(queue.join(3, 2).is_none());
        assert_eq!(queue.len(), 2);
    }

    #[test]
    fn a_departed_waiter_is_skipped_and_leaves_no_trace() {
        let queue = Arc::new(PoolQueue::new());
        let gone = queue.join(1, 10).unwrap();
        let mut next = queue.join(2, 10).unwrap();
        drop(gone);
        assert_eq!(queue.len(), 1);
        queue.slot_freed();
        assert!(woken(&mut next));
    }

    #[test]
    fn an_unused_wake_up_passes_to_the_next_waiter() {
        let queue = Arc::new(PoolQueue::new());
        let first = queue.join(1, 10).unwrap();
        let mut second = queue.join(2, 10).unwrap();
        queue.slot_freed(); // wakes `first`, which then leaves without the slot
        drop(first);
        assert!(woken(&mut second));
        // A used wake-up is not passed on.
        let used = queue.join(3, 10).unwrap();
        let mut after = queue.join(4, 10).unwrap();
        queue.slot_freed();
        used.done();
        assert!(!woken(&mut after));
        assert_eq!(queue.len(), 1);
    }

    #[test]
    fn requeue_keeps_the_place_and_passes_room_on() {
        let queue = Arc::new(PoolQueue::new());
        let mut first = queue.join(1, 10).unwrap();
        let mut second = queue.join(2, 10).unwrap();
        queue.slot_freed();
        assert!(woken(&mut first));
        // No room for `first`: back in place, nobody else woken.
        first.requeue();
        assert!(!woken(&mut second));
        queue.slot_freed();
        assert!(woken(&mut first));
        // Room `first` cannot use: `second` gets the wake-up, `first` keeps its place.
        first.requeue();
        first.pass_on();
        assert!(woken(&mut second));
        queue.slot_freed();
        assert!(woken(&mut first));
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_a_slot_frees() {
        let queue = Arc::new(PoolQueue::new());
        let mut ticket = queue.join(1, 10).unwrap();
        let q = Arc::clone(&queue);
        let waker = tokio::spawn(async move {
            tokio::task::yield_now().await;
            q.slot_freed();
        });
        tokio::time::timeout(Duration::from_secs(10), ticket.woken())
            .await
            .expect("woken within the deadline");
        ticket.done();
        waker.await.unwrap();
    }
}
