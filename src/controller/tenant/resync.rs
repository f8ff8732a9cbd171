//! The Tenant controller's periodic resync, held compactly.
//!
//! A tenant is looked at again one period after its last reconcile that
//! ended well (to catch what was changed inside Postgres or in Secrets the
//! operator cannot watch), as a requeue would do it. Until stop 51 each
//! such reconcile requeued its own tenant (`Action::requeue`), which kept
//! an entry per settled tenant in kube-runtime's scheduler (the request
//! twice, each with the name, resourceVersion and uid as owned strings,
//! in tables that keep the capacity they grew to: about 600 bytes per
//! tenant, some 6 MiB at 10,000). Now such a reconcile waits for a change
//! (`Action::await_change`) and notes the tenant here ([`Resyncs::after`]):
//! its name once, and when it is due: 150 bytes per tenant at 10,000
//! (`cargo bench --bench tenant_memory`); [`due`] hands each
//! tenant to the front queue ([`super::gate`]) when its time comes, so
//! only the tenants due at that moment wait for a reconcile.
//!
//! A later reconcile that ends well moves the tenant's time on; a deleted
//! tenant is forgotten ([`Resyncs::forget`]). Takes names and times; no
//! I/O.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::Stream;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The tenants waiting for their resync, and when each is due.
#[derive(Default)]
pub struct Resyncs {
    due: Mutex<Due>,
    /// Told when the earliest time changes (a tenant noted into an empty
    /// set, or before every other).
    earlier: Notify,
}

#[derive(Default)]
struct Due {
    /// When each tenant is due; the name is shared with `order`.
    at: HashMap<Arc<str>, Instant>,
    /// The same, by time.
    order: BTreeSet<(Instant, Arc<str>)>,
}

impl Resyncs {
    fn lock(&self) -> MutexGuard<'_, Due> {
        self.due.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `name` is due `after` from now (when it was due before no longer
    /// counts).
    pub fn after(&self, name: &str, after: Duration) {
        let when = Instant::now() + after;
        let mut due = self.lock();
        let key = match due.at.get_key_value(name) {
            Some((key, old)) => {
                let (key, old) = (key.clone(), *old);
                due.order.remove(&(old, key.clone()));
                key
            }
            None => Arc::from(name),
        };
        due.order.insert((when, key.clone()));
        let first = due.order.first().is_some_and(|(w, k)| *w == when && *k == key);
        due.at.insert(key, when);
        drop(due);
        if first {
            self.earlier.notify_one();
        }
    }

    /// `name` is due no more (it was deleted).
    pub fn forget(&self, name: &str) {
        let mut due = self.lock();
        if let Some((key, when)) = due.at.remove_entry(name) {
            due.order.remove(&(when, key));
        }
    }

    /// How many tenants wait for their resync.
    pub fn len(&self) -> usize {
        self.lock().at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the tenants due by `now`, and says when the next one is.
    fn take(&self, now: Instant) -> (Vec<Arc<str>>, Option<Instant>) {
        let mut due = self.lock();
        let mut taken = Vec::new();
        while let Some((when, _)) = due.order.first() {
            if *when > now {
                break;
            }
            if let Some((_, name)) = due.order.pop_first() {
                due.at.remove(&name);
                taken.push(name);
            }
        }
        let next = due.order.first().map(|(when, _)| *when);
        (taken, next)
    }
}

/// The name of every tenant of `resyncs` when it is due, for the front
/// queue.
pub fn due(resyncs: Arc<Resyncs>) -> impl Stream<Item = Arc<str>> + Send + 'static {
    crate::controller::kit::handed_out(resyncs, |r| &r.earlier, Resyncs::take)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// The resyncs `resyncs` gives until `end`, by tenant, with the time
    /// since `start` each came at.
    async fn until(
        resyncs: &mut (impl Stream<Item = Arc<str>> + Unpin),
        start: Instant,
        end: Instant,
    ) -> Vec<(String, Duration)> {
        let mut seen = Vec::new();
        while let Ok(Some(r)) = tokio::time::timeout_at(end, resyncs.next()).await {
            seen.push((r.to_string(), start.elapsed()));
        }
        seen
    }

    /// A tenant comes back a period after its last reconcile that ended
    /// well, once; a second reconcile moves its time on; one forgotten
    /// does not come back; one noted while the stream sleeps wakes it.
    #[tokio::test(start_paused = true)]
    async fn a_tenant_comes_back_a_period_after_its_last_good_reconcile() {
        let r = Arc::new(Resyncs::default());
        let period = Duration::from_secs(300);
        let start = Instant::now();
        r.after("a", period);
        r.after("b", period);
        r.after("c", period);
        let mut resyncs = Box::pin(due(r.clone()));
        // b reconciled again 100 s later; c deleted.
        let seen = until(&mut resyncs, start, start + Duration::from_secs(100)).await;
        assert!(seen.is_empty(), "{seen:?}");
        r.after("b", period);
        r.forget("c");
        assert_eq!(r.len(), 2);
        let seen = until(&mut resyncs, start, start + Duration::from_secs(1000)).await;
        assert_eq!(
            seen,
            vec![("a".to_string(), period), ("b".to_string(), Duration::from_secs(400))],
            "each once, a period after its last reconcile"
        );
        assert!(r.is_empty(), "a tenant handed over is no longer held");
        // Noted while the stream waits with nothing held: it wakes for it.
        r.after("d", Duration::from_secs(5));
        let seen = until(&mut resyncs, start, start + Duration::from_secs(2000)).await;
        assert_eq!(seen, vec![("d".to_string(), Duration::from_secs(1005))]);
    }

    /// A tenant noted with a shorter wait than those already held is not
    /// kept waiting behind them.
    #[tokio::test(start_paused = true)]
    async fn an_earlier_time_wakes_the_stream() {
        let r = Arc::new(Resyncs::default());
        let start = Instant::now();
        r.after("late", Duration::from_secs(600));
        let mut resyncs = Box::pin(due(r.clone()));
        let seen = until(&mut resyncs, start, start + Duration::from_secs(10)).await;
        assert!(seen.is_empty());
        r.after("soon", Duration::from_secs(20));
        let seen = until(&mut resyncs, start, start + Duration::from_secs(700)).await;
        assert_eq!(
            seen,
            vec![
                ("soon".to_string(), Duration::from_secs(30)),
                ("late".to_string(), Duration::from_secs(600))
            ]
        );
    }

    /// Many tenants due at once come in one batch; the set is empty after.
    #[tokio::test(start_paused = true)]
    async fn ten_thousand_tenants_due_together_all_come_back() {
        let r = Arc::new(Resyncs::default());
        for i in 0..10_000 {
            r.after(&format!("tenant-{i:05}"), Duration::from_secs(60));
        }
        assert_eq!(r.len(), 10_000);
        let start = Instant::now();
        let mut resyncs = Box::pin(due(r.clone()));
        let seen = until(&mut resyncs, start, start + Duration::from_secs(61)).await;
        assert_eq!(seen.len(), 10_000);
        let names: std::collections::HashSet<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), 10_000, "a tenant came twice");
        assert!(r.is_empty());
    }
}
