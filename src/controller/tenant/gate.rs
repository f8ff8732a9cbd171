//! The Tenant controller's front queue: the tenants waiting for a reconcile,
//! held by name, and handed to the controller's own queue a bounded number
//! at a time.
//!
//! kube-runtime's queue holds each request it is given until the request
//! runs: the object's reference (for a watch event, with its
//! resourceVersion and uid as owned strings) twice, in tables that keep the
//! capacity they grew to. At 10,000 tenants two bursts filled it: the
//! Tenants applied faster than they are provisioned, and every follower of
//! a set at the start of a rollout (about 600 bytes per waiting tenant,
//! `cargo bench --bench tenant_memory`). Now the Tenant events, a set's
//! followers, the resyncs that are due, and the tenants a shard change, a
//! root-key rotation or the rate-limit writer's report brings back wait
//! here instead ([`Gate::push`]): each name once, in one of two lanes (the
//! Secrets and Jobs the controller watches still queue their tenant
//! directly: an event per object, not a burst of every tenant). At most
//! the bound ([`RELEASED`] by default) of them are in the controller's
//! queue at once ([`released`], for `reconcile_on`); the end of a
//! reconcile ([`Gate::done`], from the controller's outcomes) lets the
//! next one in.
//!
//! - **Lanes.** [`Lane::Change`] (a Tenant's own events, a shard that
//!   changed, the rate-limit writer's report) goes before [`Lane::Bulk`]
//!   (a set's followers, the periodic resync, a rotation): a Tenant
//!   applied during a rollout's start does not wait for 10,000 light
//!   reconciles. A name waiting in the bulk lane and pushed
//!   into the change lane moves up.
//! - **A name waits once.** Pushed again while it waits, or while it is in
//!   the controller's queue and its reconcile has not started
//!   ([`Gate::started`]: that reconcile reads the cache and the marks when
//!   it starts, so it sees the change), nothing is added, as the
//!   controller's own queue merges a request for an object already in it.
//!   Pushed once its reconcile started, it waits again (the reconcile may
//!   have read the tenant before the change).
//! - **Never stuck.** A name handed over longer than [`STALE`] ago no longer
//!   counts against the bound (a reconcile the controller dropped, such as
//!   one whose Tenant was deleted in between, gives no outcome by name in
//!   every case), and a deleted tenant is forgotten ([`Gate::forget`]).
//!
//! Why [`RELEASED`] (the default of `--queue-bound`) is 256: the
//! controller delays every request by its debounce (200 ms) before it may run, so the requests in its queue must
//! cover that delay at the reconcile rate: 256 allow some 1,200 reconciles
//! a second, above what light reconciles reach on this machine.
//!
//! Takes names; no I/O.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::Stream;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::api::Tenant;

/// The most tenants handed to the controller's queue and not yet reconciled.
pub const RELEASED: usize = 256;

/// After this, a name handed over no longer counts against [`RELEASED`].
pub const STALE: Duration = Duration::from_secs(60);

/// Which tenants go first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lane {
    /// A change to the Tenant itself or to where it can be placed.
    Change = 0,
    /// Work for many tenants at once: a set's followers, the resync.
    Bulk = 1,
}

/// The tenants waiting for a reconcile, and those handed over.
pub struct Gate {
    inner: Mutex<Inner>,
    /// Told when a name is pushed or a handed-over one is done.
    wake: Notify,
    limit: usize,
}

#[derive(Default)]
struct Inner {
    /// The waiting names and their lanes; the names are shared with
    /// `lanes`, whose entries that no longer match are skipped.
    waiting: HashMap<Arc<str>, Lane>,
    lanes: [VecDeque<Arc<str>>; 2],
    /// The names handed over: when, and whether their reconcile started.
    released: HashMap<Arc<str>, Handed>,
}

#[derive(Clone, Copy, Debug)]
struct Handed {
    at: Instant,
    started: bool,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new(RELEASED)
    }
}

impl Gate {
    /// A gate that hands over at most `limit` names at once (at least one).
    pub fn new(limit: usize) -> Self {
        Self {
            inner: Mutex::default(),
            wake: Notify::new(),
            limit: limit.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `name` waits for a reconcile in `lane` (or a faster one it waits in
    /// already).
    pub fn push(&self, name: &str, lane: Lane) {
        let mut g = self.lock();
        if g.released.get(name).is_some_and(|h| !h.started) {
            return;
        }
        let key = match g.waiting.get_key_value(name) {
            Some((_, held)) if *held <= lane => return,
            Some((key, _)) => key.clone(),
            None => Arc::from(name),
        };
        g.lanes[lane as usize].push_back(key.clone());
        g.waiting.insert(key, lane);
        drop(g);
        self.wake.notify_one();
    }

    /// The reconcile of `name` starts: a change from now on needs another.
    pub fn started(&self, name: &str) {
        if let Some(h) = self.lock().released.get_mut(name) {
            h.started = true;
        }
    }

    /// The reconcile of `name` ended (or the controller dropped it).
    pub fn done(&self, name: &str) {
        if self.lock().released.remove(name).is_some() {
            self.wake.notify_one();
        }
    }

    /// `name` was deleted: it waits no more.
    pub fn forget(&self, name: &str) {
        let mut g = self.lock();
        g.waiting.remove(name);
        let freed = g.released.remove(name).is_some();
        drop(g);
        if freed {
            self.wake.notify_one();
        }
    }

    /// How many names wait, and how many are handed over.
    pub fn counts(&self) -> (usize, usize) {
        let g = self.lock();
        (g.waiting.len(), g.released.len())
    }

    /// Hands over what the bound allows at `now`, and says when a handed
    /// over name goes stale (when names still wait).
    fn take(&self, now: Instant) -> (Vec<ObjectRef<Tenant>>, Option<Instant>) {
        let mut g = self.lock();
        let limit = self.limit;
        if g.released.len() >= limit && !g.waiting.is_empty() {
            g.released.retain(|_, h| now.saturating_duration_since(h.at) < STALE);
        }
        let Inner {
            waiting,
            lanes,
            released,
        } = &mut *g;
        let mut taken = Vec::new();
        'lanes: for (lane, queue) in [Lane::Change, Lane::Bulk].into_iter().zip(lanes.iter_mut()) {
            while released.len() < limit {
                let Some(name) = queue.pop_front() else {
                    continue 'lanes;
                };
                if waiting.get(&name) != Some(&lane) {
                    continue;
                }
                waiting.remove(&name);
                taken.push(ObjectRef::new(&name));
                released.insert(
                    name,
                    Handed {
                        at: now,
                        started: false,
                    },
                );
            }
            break;
        }
        if waiting.is_empty() {
            // Only stale entries can be left in the lanes: let their
            // memory go.
            lanes.iter_mut().for_each(VecDeque::clear);
        }
        let stale = (!waiting.is_empty())
            .then(|| released.values().map(|h| h.at).min().map(|at| at + STALE))
            .flatten();
        (taken, stale)
    }
}

/// The names of `gate` as the bound lets them through, for
/// `Controller::reconcile_on`.
pub fn released(gate: Arc<Gate>) -> impl Stream<Item = ObjectRef<Tenant>> + Send + 'static {
    crate::controller::kit::handed_out(gate, |g| &g.wake, Gate::take)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use futures::StreamExt;

    fn names(refs: &[ObjectRef<Tenant>]) -> Vec<&str> {
        refs.iter().map(|r| r.name.as_str()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_the_bound_is_handed_over_and_each_done_lets_one_more_in() {
        let gate = Gate::new(3);
        for i in 0..10 {
            gate.push(&format!("t{i}"), Lane::Bulk);
        }
        // Pushed again while it waits: nothing is added.
        gate.push("t0", Lane::Bulk);
        assert_eq!(gate.counts(), (10, 0));
        let (first, _) = gate.take(Instant::now());
        assert_eq!(names(&first), ["t0", "t1", "t2"]);
        assert_eq!(gate.counts(), (7, 3));
        let (none, stale) = gate.take(Instant::now());
        assert!(none.is_empty(), "the bound is reached");
        assert_eq!(stale, Some(Instant::now() + STALE));
        // A done for a name never handed over frees nothing.
        gate.done("t7");
        assert!(gate.take(Instant::now()).0.is_empty());
        gate.done("t1");
        assert_eq!(names(&gate.take(Instant::now()).0), ["t3"]);
        // A deleted tenant frees its place and no longer waits.
        gate.forget("t0");
        gate.forget("t4");
        assert_eq!(names(&gate.take(Instant::now()).0), ["t5"]);
        for n in ["t2", "t3", "t5"] {
            gate.done(n);
        }
        assert_eq!(names(&gate.take(Instant::now()).0), ["t6", "t7", "t8"]);
        for n in ["t6", "t7", "t8"] {
            gate.done(n);
        }
        assert_eq!(names(&gate.take(Instant::now()).0), ["t9"]);
        gate.done("t9");
        assert_eq!(gate.counts(), (0, 0));
        assert_eq!(gate.take(Instant::now()), (vec![], None));
    }

    #[tokio::test(start_paused = true)]
    async fn changes_go_before_bulk_and_a_waiting_name_moves_up() {
        let gate = Gate::new(2);
        for n in ["f1", "f2", "f3", "f4"] {
            gate.push(n, Lane::Bulk);
        }
        gate.push("new", Lane::Change);
        // f3 waits in the bulk lane and changes: it moves up, once.
        gate.push("f3", Lane::Change);
        // A change already waiting is not sent back to the bulk lane.
        gate.push("new", Lane::Bulk);
        assert_eq!(gate.counts(), (5, 0));
        assert_eq!(names(&gate.take(Instant::now()).0), ["new", "f3"]);
        gate.done("new");
        gate.done("f3");
        assert_eq!(names(&gate.take(Instant::now()).0), ["f1", "f2"]);
        gate.done("f1");
        gate.done("f2");
        // f3's old bulk entry was skipped: it is not handed over twice.
        assert_eq!(names(&gate.take(Instant::now()).0), ["f4"]);
        gate.done("f4");
        assert_eq!(gate.take(Instant::now()), (vec![], None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_pushed_once_its_reconcile_started_waits_again() {
        let gate = Gate::new(4);
        gate.push("a", Lane::Change);
        assert_eq!(names(&gate.take(Instant::now()).0), ["a"]);
        // Not started: the reconcile to come sees this change.
        gate.push("a", Lane::Change);
        assert_eq!(gate.counts(), (0, 1));
        gate.started("a");
        // Its reconcile may have read the Tenant before this change.
        gate.push("a", Lane::Change);
        assert_eq!(gate.counts(), (1, 1));
        assert_eq!(names(&gate.take(Instant::now()).0), ["a"]);
        gate.done("a");
        assert_eq!(gate.counts(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_never_done_stops_counting_when_stale() {
        let gate = Arc::new(Gate::new(1));
        gate.push("dropped", Lane::Change);
        gate.push("next", Lane::Change);
        let mut stream = std::pin::pin!(released(gate.clone()));
        let start = Instant::now();
        assert_eq!(stream.next().await.map(|r| r.name), Some("dropped".into()));
        // No outcome ever comes for "dropped": "next" goes when it is stale.
        assert_eq!(stream.next().await.map(|r| r.name), Some("next".into()));
        assert_eq!(Instant::now() - start, STALE);
    }

    #[tokio::test(start_paused = true)]
    async fn the_stream_wakes_on_a_push_and_on_a_done() {
        let gate = Arc::new(Gate::new(1));
        let mut stream = std::pin::pin!(released(gate.clone()));
        assert!(stream.next().now_or_never().is_none(), "nothing waits");
        gate.push("a", Lane::Bulk);
        assert_eq!(stream.next().await.map(|r| r.name), Some("a".into()));
        gate.push("b", Lane::Bulk);
        assert!(stream.next().now_or_never().is_none(), "the bound is reached");
        gate.done("a");
        assert_eq!(stream.next().await.map(|r| r.name), Some("b".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn ten_thousand_names_pass_a_bound_of_256_each_once_in_order() {
        let gate = Arc::new(Gate::default());
        for i in 0..10_000 {
            gate.push(&format!("tenant-{i:05}"), Lane::Bulk);
        }
        let mut stream = std::pin::pin!(released(gate.clone()));
        let mut seen = Vec::new();
        while seen.len() < 10_000 {
            let r = stream.next().await.expect("the stream goes on");
            let (_, out) = gate.counts();
            assert!(out <= RELEASED, "{out} handed over");
            // The controller ends reconciles in a different order than
            // they were handed over: end every other one at once.
            if seen.len() % 2 == 1 {
                gate.done(&r.name);
            }
            seen.push(r.name);
            if gate.counts().1 == RELEASED {
                let handed: Vec<String> = seen.iter().rev().take(RELEASED).cloned().collect();
                handed.iter().for_each(|n| gate.done(n));
            }
        }
        let expected: Vec<String> = (0..10_000).map(|i| format!("tenant-{i:05}")).collect();
        assert_eq!(seen, expected);
        assert_eq!(gate.counts().0, 0);
    }
}
