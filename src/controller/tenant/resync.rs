//! The Tenant controller's periodic resync: one rolling pass over the
//! cache per period.
//!
//! A reconcile that ends well waits for a change (`Action::await_change`);
//! [`rolling`] brings every cached Tenant back once per period (to catch
//! what was changed inside Postgres or in Secrets the operator cannot
//! watch), each in a fixed slot of the period chosen by its name
//! ([`slot_of`]), so the resyncs of many tenants are spread evenly over the
//! period. Until stop 51 each reconcile requeued its own tenant one period
//! later, which kept an entry per tenant in kube-runtime's scheduler (the
//! request twice, each with the name, resourceVersion and uid as owned
//! strings: about 600 bytes per tenant, some 6 MiB at 10,000); this holds
//! nothing per tenant, and reads the cache once per slot (`SLOTS` a period).
//!
//! The first pass starts one period after the watch (the watch's initial
//! list reconciles every tenant already). Takes the Tenant cache and the
//! period; no I/O.

use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::time::{Instant, MissedTickBehavior};

use crate::api::Tenant;

/// Slots a period is cut into, at most.
pub const SLOTS: u32 = 600;

/// The shortest time between two slots (a short period has fewer slots).
pub const MIN_TICK: Duration = Duration::from_millis(50);

/// How `period` is cut: the number of slots and the time between two.
pub fn slots(period: Duration) -> (u32, Duration) {
    let tick = (period / SLOTS).max(MIN_TICK);
    let n = (period.as_nanos() / tick.as_nanos()).clamp(1, u128::from(SLOTS));
    (n as u32, tick)
}

/// The slot of the tenant `name` among `slots`: FNV-1a of the name (the
/// same in every process and build, so a restart keeps each tenant's slot).
pub fn slot_of(name: &str, slots: u32) -> u32 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash % u64::from(slots.max(1))) as u32
}

/// The names of the cached tenants whose slot is `slot`.
fn due(store: &Store<Tenant>, slot: u32, slots: u32) -> Vec<ObjectRef<Tenant>> {
    store
        .state()
        .iter()
        .filter_map(|t| t.metadata.name.as_deref())
        .filter(|name| slot_of(name, slots) == slot)
        .map(ObjectRef::new)
        .collect()
}

/// Every Tenant in `store`, once per `period`, each in its slot; for
/// `Controller::reconcile_on`. A slot missed while the process was busy is
/// taken as soon as it can be (none is skipped).
pub fn rolling(store: Store<Tenant>, period: Duration) -> impl Stream<Item = ObjectRef<Tenant>> + Send + 'static {
    let (n, tick) = slots(period);
    let mut ticks = tokio::time::interval_at(Instant::now() + period, tick);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    futures::stream::unfold((ticks, 0_u32), move |(mut ticks, slot)| {
        let store = store.clone();
        async move {
            ticks.tick().await;
            let refs = due(&store, slot, n);
            Some((futures::stream::iter(refs), (ticks, (slot + 1) % n)))
        }
    })
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;
    use std::collections::HashMap;

    #[test]
    fn a_period_is_cut_into_at_most_slots_of_at_least_the_shortest_tick() {
        assert_eq!(slots(Duration::from_secs(300)), (600, Duration::from_millis(500)));
        assert_eq!(slots(Duration::from_secs(2)), (40, MIN_TICK));
        assert_eq!(slots(Duration::from_millis(10)), (1, MIN_TICK));
        assert_eq!(slots(Duration::ZERO), (1, MIN_TICK));
        let (n, tick) = slots(Duration::from_secs(86_400));
        assert_eq!((n, tick), (600, Duration::from_secs(144)));
    }

    #[test]
    fn ten_thousand_tenants_spread_evenly_over_the_slots_and_keep_theirs() {
        let mut load: HashMap<u32, usize> = HashMap::new();
        for i in 0..10_000 {
            let name = format!("tenant-{i:05}");
            let slot = slot_of(&name, SLOTS);
            assert!(slot < SLOTS);
            assert_eq!(slot, slot_of(&name, SLOTS), "a tenant's slot moved");
            *load.entry(slot).or_default() += 1;
        }
        // 16.7 a slot on average: no slot empty, none more than twice that.
        assert_eq!(load.len(), SLOTS as usize, "a slot got no tenant");
        let most = load.values().max().copied().unwrap_or_default();
        assert!(most <= 34, "a slot got {most} of 10,000 tenants");
        // The value is fixed (FNV-1a 64 of "acme" is 0x0724d383f4f6de0f),
        // not a per-process hash.
        assert_eq!(slot_of("acme", SLOTS), 287);
        assert_eq!(slot_of("anything", 1), 0);
    }

    fn tenant(name: &str) -> Tenant {
        let mut t = Tenant::new(
            name,
            serde_json::from_value(serde_json::json!({})).expect("an empty spec"),
        );
        t.metadata.resource_version = Some("1".into());
        t
    }

    /// The resyncs `resyncs` gives until `end`, by tenant, with the time
    /// since `start` each came at.
    async fn until(
        resyncs: &mut (impl Stream<Item = ObjectRef<Tenant>> + Unpin),
        start: Instant,
        end: Instant,
    ) -> HashMap<String, Vec<Duration>> {
        let mut seen: HashMap<String, Vec<Duration>> = HashMap::new();
        while let Ok(Some(r)) = tokio::time::timeout_at(end, resyncs.next()).await {
            seen.entry(r.name).or_default().push(start.elapsed());
        }
        seen
    }

    /// Every tenant comes back exactly once a period, a period apart, none
    /// before the first period has gone by; a tenant added later is in the
    /// next pass, and one deleted is in none.
    #[tokio::test(start_paused = true)]
    async fn every_cached_tenant_comes_back_once_a_period() {
        let (store, mut writer) = reflector::store::<Tenant>();
        writer.apply_watcher_event(&Event::Init);
        for i in 0..50 {
            writer.apply_watcher_event(&Event::InitApply(tenant(&format!("t{i}"))));
        }
        writer.apply_watcher_event(&Event::InitDone);
        let period = Duration::from_secs(2);
        let start = Instant::now();
        let mut resyncs = Box::pin(rolling(store, period));

        // Up to just before the third pass's first slot.
        let seen = until(&mut resyncs, start, start + 3 * period - MIN_TICK / 2).await;
        assert_eq!(seen.len(), 50, "not every tenant came back: {seen:?}");
        for (name, at) in &seen {
            assert_eq!(at.len(), 2, "{name} came back {} times in two periods", at.len());
            assert!(at[0] >= period, "{name} came back before a period: {at:?}");
            assert_eq!(at[1] - at[0], period, "{name}'s resyncs were not a period apart");
        }

        writer.apply_watcher_event(&Event::Apply(tenant("late")));
        writer.apply_watcher_event(&Event::Delete(tenant("t0")));
        let seen = until(&mut resyncs, start, start + 4 * period - MIN_TICK / 2).await;
        assert_eq!(seen.len(), 50, "{seen:?}");
        assert_eq!(seen.get("late").map(Vec::len), Some(1), "the new tenant");
        assert!(!seen.contains_key("t0"), "a deleted tenant came back");
        assert!(seen.values().all(|at| at.len() == 1));
    }
}
