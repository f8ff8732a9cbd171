//! The rate-limit writer: the one task that writes the envoyproxy/ratelimit
//! ConfigMap(s), so tenants never contend for them.
//!
//! Takes the operator's Tenant cache ([`crate::controller::tenant_watch`])
//! and its changes; on any change, debounced, and on every resync, renders the whole
//! store with [`crate::ratelimit_config::render`] and converges the ConfigMaps in
//! the operator namespace: get, then apply only the ones whose data
//! differ, then delete shards no longer needed. Publishes a
//! `RateLimitsChanged` Event on each tenant whose rendered limits changed.
//! An unchanged set of tenants writes nothing.
//!
//! The writer is the one who makes a tenant's `RateLimitsApplied` true, so
//! it reports it: after each pass it publishes what the ConfigMaps now hold
//! ([`Applied`], in the [`Context`]) and brings back for reconcile the
//! tenants whose condition no longer says so; the Tenant controller, the
//! one status writer, sets the condition from that ([`condition`], pure).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio::time::{sleep_until, Instant};

use crate::api::{Condition, Tenant};
use crate::controller::kit::{self, conditions::Cond, labels};
use crate::controller::tenant_watch::TenantWatch;
use crate::controller::Context;
use crate::ratelimit_config::{self, Entry, Limit, RenderError, RenderSettings};

/// Label on every rendered ConfigMap; its value is the configured (first)
/// ConfigMap name, so shards of another configuration are left alone.
pub const CONFIG_LABEL: &str = "tenancy.dev/ratelimit-config";

/// Quiet time after a change before rendering: a burst of changes (an Argo
/// CD sync of many Tenants) gives one write.
const DEBOUNCE: Duration = Duration::from_secs(1);
/// Longest a change waits while changes keep coming.
const MAX_DELAY: Duration = Duration::from_secs(5);
/// Most `RateLimitsChanged` events per render (a bulk change of thousands of
/// tenants must not flood the API server; the rest are logged as a count).
const MAX_EVENTS: usize = 100;

/// Errors of one render-and-write pass, named after the failed action.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error("listing the rate-limit ConfigMaps: {0}")]
    ListConfigMaps(#[source] kube::Error),
    #[error("reading ConfigMap {0}: {1}")]
    ReadConfigMap(String, #[source] kube::Error),
    #[error("writing ConfigMap {0}: {1}")]
    WriteConfigMap(String, #[source] kube::Error),
    #[error("deleting ConfigMap {0}: {1}")]
    DeleteConfigMap(String, #[source] kube::Error),
}

impl Error {
    /// A fixed word for logs and metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Render(_) => "RenderRateLimits",
            Error::ListConfigMaps(_) => "ListConfigMaps",
            Error::ReadConfigMap(..) => "ReadConfigMap",
            Error::WriteConfigMap(..) => "WriteConfigMap",
            Error::DeleteConfigMap(..) => "DeleteConfigMap",
        }
    }
}

/// The limits the rate-limit ConfigMaps hold, per (domain, tenant).
pub type Held = BTreeMap<(String, String), Limit>;

/// What the writer reports: the limits the ConfigMaps held after its last
/// successful pass (they were compared with the API server's or written
/// then); None until the first pass since the start.
#[derive(Debug, Default)]
pub struct Applied(RwLock<Option<Arc<Held>>>);

impl Applied {
    /// The limits held after the last pass, None before the first.
    pub fn get(&self) -> Option<Arc<Held>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, held: Arc<Held>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(held);
    }
}

/// The condition type the writer makes true.
pub const CONDITION: &str = "RateLimitsApplied";

/// `RateLimitsApplied` for a Tenant: True (`Rendered`) only when `held`,
/// what the writer last put in the ConfigMaps, has this tenant's current
/// limits on both surfaces; else False (`Pending`, the writer is behind or
/// failing). Before the writer's first pass (`held` None) the condition in
/// the status (`old`) stands when it is the True one for these very limits
/// (so a restart writes nothing), else Pending. None for a Tenant being
/// deleted (it has no entry). Pure.
pub fn condition(
    cfg: &RenderSettings,
    namespace: &str,
    t: &Tenant,
    held: Option<&Held>,
    old: Option<&Condition>,
) -> Option<Cond> {
    let entry = Entry::of(t)?;
    let target = format!(
        "ConfigMap {namespace}/{} (domains {}, {})",
        cfg.configmap, cfg.api_domain, cfg.webhook_domain
    );
    let rendered = format!("{} rendered into {target}", entry.summary());
    let applied = match held {
        Some(h) => holds(cfg, h, &entry),
        None => old.is_some_and(|c| c.status == "True" && c.reason == "Rendered" && c.message == rendered),
    };
    Some(if applied {
        Cond::new(CONDITION, true, "Rendered", rendered)
    } else {
        let message = format!(
            "waiting for the rate-limit writer to render {} into {target}",
            entry.summary()
        );
        Cond::new(CONDITION, false, "Pending", message)
    })
}

/// Whether `held` has `entry`'s limits on both surfaces.
fn holds(cfg: &RenderSettings, held: &Held, entry: &Entry) -> bool {
    let at = |domain: &str| held.get(&(domain.to_owned(), entry.tenant.clone()));
    at(&cfg.api_domain) == Some(&entry.api) && at(&cfg.webhook_domain) == Some(&entry.webhook)
}

/// Whether `t`'s status shows another `RateLimitsApplied` than `held` gives
/// (so the Tenant controller must write it).
fn report_due(cfg: &RenderSettings, namespace: &str, t: &Tenant, held: &Held) -> bool {
    let old = crate::controller::tenant::status::condition(t.status.as_ref(), CONDITION);
    let Some(want) = condition(cfg, namespace, t, Some(held), old) else {
        return false;
    };
    !old.is_some_and(|o| (o.status == "True") == want.status && o.reason == want.reason && o.message == want.message)
}

/// What a Tenant event means to the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// A full list ended: the store holds every Tenant.
    Relisted,
    /// A Tenant was created, changed or deleted.
    Changed,
}

/// The writer's view of the operator's Tenant watch: its store, and the
/// changes, as they come.
pub struct Tenants {
    store: Store<Tenant>,
    changes: futures::channel::mpsc::UnboundedReceiver<Change>,
    /// Tenants whose `RateLimitsApplied` a pass made stale, for the Tenant
    /// controller.
    report: futures::channel::mpsc::UnboundedSender<ObjectRef<Tenant>>,
}

/// Subscribes the writer to the Tenant watch (before it starts). Also
/// gives the stream of Tenants to reconcile because the writer changed
/// what their `RateLimitsApplied` should say (for the Tenant controller).
pub fn subscribe(watch: &mut TenantWatch) -> (Tenants, futures::channel::mpsc::UnboundedReceiver<ObjectRef<Tenant>>) {
    let changes = watch.listen(|ev| match ev {
        watcher::Event::InitDone => Some(Change::Relisted),
        watcher::Event::Apply(_) | watcher::Event::Delete(_) => Some(Change::Changed),
        // The store swaps its content on InitDone.
        watcher::Event::Init | watcher::Event::InitApply(_) => None,
    });
    let (report, reports) = futures::channel::mpsc::unbounded();
    (
        Tenants {
            store: watch.store(),
            changes,
            report,
        },
        reports,
    )
}

/// Runs the writer until the process stops. Returns only if the Tenant
/// watch ends, which it does not by itself.
pub async fn run(ctx: Arc<Context>, tenants: Tenants) {
    let Tenants {
        store,
        mut changes,
        report,
    } = tenants;
    let mut resync = tokio::time::interval(ctx.settings.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Nothing is rendered before the first full list: an empty store would
    // wipe every tenant's limits.
    let mut ready = false;
    let mut due: Option<Instant> = None;
    let mut first_change: Option<Instant> = None;
    let mut state = Written::default();
    // A resync compares with the API server (to repair hand edits); a
    // change compares with what this task last wrote first, so the status
    // writes that make up most Tenant events cost no API call.
    let mut full = true;
    let mut failures: u32 = 0;
    loop {
        let wake = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            ev = changes.next() => match ev {
                Some(Change::Relisted) => {
                    ready = true;
                    due = Some(Instant::now());
                }
                Some(Change::Changed) => {
                    let now = Instant::now();
                    let first = *first_change.get_or_insert(now);
                    due = Some((now + DEBOUNCE).min(first + MAX_DELAY));
                }
                None => {
                    tracing::error!("the Tenant watch of the rate-limit writer ended");
                    return;
                }
            },
            _ = resync.tick() => {
                // Repairs a ConfigMap edited or deleted by hand.
                full = true;
                if ready && due.is_none() {
                    due = Some(Instant::now());
                }
            }
            _ = sleep_until(wake), if ready && due.is_some() => {
                due = None;
                first_change = None;
                let started = Instant::now();
                let result = sync(&ctx, &store, &mut state, full, &report).await;
                ctx.metrics.reconciled("ratelimits", started.elapsed(), result.as_ref().err().map(Error::label));
                match result {
                    Ok(0) => {
                        failures = 0;
                        full = false;
                    }
                    Ok(writes) => {
                        failures = 0;
                        full = false;
                        tracing::info!(writes, "rate-limit ConfigMaps written");
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        let delay = Duration::from_secs(1u64 << failures.min(6));
                        tracing::warn!(error = %e, kind = e.label(), retry_in = ?delay, "writing the rate-limit ConfigMaps failed");
                        due = Some(Instant::now() + delay);
                        full = true;
                    }
                }
            }
        }
    }
}

/// What the writer last rendered and published, in memory.
#[derive(Default)]
struct Written {
    /// The limits the rate-limit service holds, per (domain, tenant): read
    /// back from the ConfigMaps at the first pass, then what was written
    /// (the same map [`Applied`] reports, shared).
    limits: Option<Arc<Held>>,
    /// The digest of the shards last converged
    /// ([`ratelimit_config::digest`]), not the shards: at 10,000 tenants
    /// the rendering is about 2 MB the writer would hold between passes.
    shards: Option<[u8; 32]>,
}

/// One pass: render the store, converge the ConfigMaps, publish events,
/// then what the ConfigMaps hold ([`Applied`]) and the tenants whose
/// condition that changes (to `report`). Returns the number of ConfigMap
/// writes. Unless `full`, a rendering equal to the last one converged
/// returns at once.
async fn sync(
    ctx: &Context,
    store: &Store<Tenant>,
    written: &mut Written,
    full: bool,
    report: &futures::channel::mpsc::UnboundedSender<ObjectRef<Tenant>>,
) -> Result<usize, Error> {
    let cfg = &ctx.settings.ratelimit;
    let tenants = store.state();
    let entries = ratelimit_config::entries(tenants.iter().map(|t| t.as_ref()));
    let shards = ratelimit_config::render(cfg, &entries)?;
    let rendered = ratelimit_config::digest(&shards);
    if !full && written.shards == Some(rendered) {
        return Ok(0);
    }
    let previous = &mut written.limits;

    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let wanted_labels = labels::managed(&[(CONFIG_LABEL, &cfg.configmap)]);
    let selector = format!("{CONFIG_LABEL}={}", cfg.configmap);
    let listed = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(Error::ListConfigMaps)?;
    let mut existing: BTreeMap<String, ConfigMap> = listed
        .items
        .into_iter()
        .filter_map(|c| Some((c.metadata.name.clone()?, c)))
        .collect();
    if previous.is_none() {
        // After a start, what the rate-limit service holds now is the
        // baseline for events, so a restart publishes none.
        let files: Vec<_> = existing.values().filter_map(|c| c.data.as_ref()).collect();
        *previous = Some(Arc::new(ratelimit_config::read_back(cfg, &files)));
    }

    let mut writes = 0;
    // Shard 0 first: when the shard count grows, it sheds tenants before
    // the new shards name them again.
    for shard in &shards {
        let current = match existing.remove(&shard.name) {
            Some(c) => Some(c),
            // Not labelled (made by hand, or by an older version): adopt it.
            None => api
                .get_opt(&shard.name)
                .await
                .map_err(|e| Error::ReadConfigMap(shard.name.clone(), e))?,
        };
        if let Some(c) = &current {
            if c.data.as_ref() == Some(&shard.data)
                && labels::carries(c.labels(), &wanted_labels)
                && c.binary_data.is_none()
            {
                continue;
            }
        }
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(shard.name.clone()),
                namespace: Some(ctx.settings.namespace.clone()),
                labels: Some(wanted_labels.clone()),
                ..ObjectMeta::default()
            },
            data: Some(shard.data.clone()),
            ..ConfigMap::default()
        };
        kit::apply(&api, &cm)
            .await
            .map_err(|e| Error::WriteConfigMap(shard.name.clone(), e))?;
        writes += 1;
    }
    // Written: the rendering is not kept (its digest is, below).
    drop(shards);
    for name in existing.into_keys() {
        if kit::delete(&api, &name, &DeleteParams::default())
            .await
            .map_err(|e| Error::DeleteConfigMap(name.clone(), e))?
        {
            writes += 1;
        }
    }

    // Events for tenants whose limits were rendered before and differ now
    // (a new tenant's limits are announced by its Provisioned event).
    let now = Arc::new(ratelimit_config::by_domain(cfg, &entries));
    let before = previous.replace(now.clone()).unwrap_or_default();
    let changed: BTreeSet<&str> = now
        .iter()
        .filter(|(k, l)| before.get(*k).is_some_and(|p| p != *l))
        .map(|((_, tenant), _)| tenant.as_str())
        .collect();
    if changed.len() > MAX_EVENTS {
        tracing::info!(
            tenants = changed.len(),
            published = MAX_EVENTS,
            "rate limits changed for many tenants; publishing the first events only"
        );
    }
    for name in changed.into_iter().take(MAX_EVENTS) {
        let (Some(t), Some(e)) = (
            tenants.iter().find(|t| t.name_any() == name),
            entries.iter().find(|e| e.tenant == name),
        ) else {
            continue;
        };
        let note = format!(
            "rate limits now {} (ConfigMap {}/{})",
            e.summary(),
            ctx.settings.namespace,
            cfg.configmap
        );
        kit::event(ctx, t.as_ref(), false, "RateLimitsChanged", note).await;
    }
    written.shards = Some(rendered);
    // The ConfigMaps hold `now` from here on: the conditions may say so,
    // published before the tenants come back so their reconciles see it.
    let ns = &ctx.settings.namespace;
    let due: Vec<ObjectRef<Tenant>> = tenants
        .iter()
        .filter(|t| report_due(cfg, ns, t, &now))
        .map(|t| ObjectRef::new(&t.name_any()))
        .collect();
    ctx.rate_limits.set(now);
    for r in due {
        let _ = report.unbounded_send(r);
    }
    Ok(writes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{RateLimitUnit, TenantSpec, TenantState};

    fn tenant(name: &str, api_rpu: u32) -> Tenant {
        let mut spec: TenantSpec = serde_json::from_value(serde_json::json!({})).expect("defaults");
        spec.rate_limits.api.requests_per_unit = api_rpu;
        Tenant::new(name, spec)
    }

    fn held_for(cfg: &RenderSettings, tenants: &[&Tenant]) -> Held {
        ratelimit_config::by_domain(cfg, &ratelimit_config::entries(tenants.iter().copied()))
    }

    fn shown(c: &Cond) -> Condition {
        crate::controller::kit::conditions::merge_conditions(&[], std::slice::from_ref(c), Some(1), "t").remove(0)
    }

    #[test]
    fn the_condition_is_true_only_when_the_configmap_holds_the_current_limits() {
        let cfg = RenderSettings::default();
        let acme = tenant("acme", 100);
        // Nothing written yet, another tenant only, an older limit, a
        // webhook limit missing: Pending.
        let other = tenant("beta", 100);
        let older = tenant("acme", 50);
        let mut api_only = held_for(&cfg, &[&acme]);
        api_only.remove(&(cfg.webhook_domain.clone(), "acme".into()));
        for held in [
            Held::new(),
            held_for(&cfg, &[&other]),
            held_for(&cfg, &[&older]),
            api_only,
        ] {
            let c = condition(&cfg, "ns", &acme, Some(&held), None).unwrap();
            assert_eq!((c.status, c.reason), (false, "Pending"), "{held:?}");
            assert!(c.message.contains("api 100/second"), "{}", c.message);
        }
        let c = condition(&cfg, "ns", &acme, Some(&held_for(&cfg, &[&acme, &other])), None).unwrap();
        assert_eq!((c.status, c.reason), (true, "Rendered"));
        assert_eq!(
            c.message,
            "api 100/second, webhook 20/second rendered into ConfigMap ns/tenant-ratelimits (domains tenant-api, tenant-webhook)"
        );
        // A suspended tenant's limits are 0: its old ones do not count.
        let mut suspended = acme.clone();
        suspended.spec.state = TenantState::Suspended;
        let c = condition(&cfg, "ns", &suspended, Some(&held_for(&cfg, &[&acme])), None).unwrap();
        assert!(!c.status);
        // Being deleted: no entry, no condition.
        let mut gone = acme.clone();
        gone.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert_eq!(condition(&cfg, "ns", &gone, Some(&Held::new()), None), None);
    }

    #[test]
    fn before_the_writers_first_pass_only_a_true_condition_for_the_same_limits_stands() {
        let cfg = RenderSettings::default();
        let acme = tenant("acme", 100);
        let true_now = condition(&cfg, "ns", &acme, Some(&held_for(&cfg, &[&acme])), None).unwrap();
        assert!(true_now.status);
        let kept = condition(&cfg, "ns", &acme, None, Some(&shown(&true_now))).unwrap();
        assert_eq!(kept, true_now, "a restart must not flip the condition");
        // The spec changed while the operator was down: Pending.
        let changed = tenant("acme", 7);
        let c = condition(&cfg, "ns", &changed, None, Some(&shown(&true_now))).unwrap();
        assert_eq!((c.status, c.reason), (false, "Pending"));
        assert!(!condition(&cfg, "ns", &acme, None, None).unwrap().status);
    }

    #[test]
    fn a_pass_brings_back_only_the_tenants_whose_condition_it_changes() {
        let cfg = RenderSettings::default();
        let mut acme = tenant("acme", 100);
        let beta = tenant("beta", 5);
        let held = held_for(&cfg, &[&acme, &beta]);
        // No status yet: due.
        assert!(report_due(&cfg, "ns", &acme, &held));
        let now = condition(&cfg, "ns", &acme, Some(&held), None).unwrap();
        acme.status = Some(crate::api::TenantStatus {
            conditions: vec![shown(&now)],
            ..Default::default()
        });
        assert!(
            !report_due(&cfg, "ns", &acme, &held),
            "the steady state brings nothing back"
        );
        // Pending shown, the pass wrote the limits: due.
        let pending = condition(&cfg, "ns", &acme, Some(&Held::new()), None).unwrap();
        acme.status.as_mut().unwrap().conditions = vec![shown(&pending)];
        assert!(report_due(&cfg, "ns", &acme, &held));
        // True shown for limits the ConfigMaps no longer hold: due.
        acme.status.as_mut().unwrap().conditions = vec![shown(&now)];
        acme.spec.rate_limits.api.unit = RateLimitUnit::Minute;
        assert!(report_due(&cfg, "ns", &acme, &held));
    }
}
