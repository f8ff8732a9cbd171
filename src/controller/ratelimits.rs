//! The rate-limit writer: the one task that writes the envoyproxy/ratelimit
//! ConfigMap(s), so tenants never contend for them.
//!
//! Takes the operator's Tenant cache ([`crate::controller::tenant_watch`])
//! and its changes; on any change, debounced, and on every resync, renders the whole
//! store with [`crate::ratelimit::render`] and converges the ConfigMaps in
//! the operator namespace: get, then apply only the ones whose data
//! differ, then delete shards no longer needed. Publishes a
//! `RateLimitsChanged` Event on each tenant whose rendered limits changed.
//! An unchanged set of tenants writes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio::time::{sleep_until, Instant};

use crate::api::Tenant;
use crate::controller::kit::{self, labels};
use crate::controller::tenant_watch::TenantWatch;
use crate::controller::Context;
use crate::ratelimit::{self, Limit, RenderError};

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
}

/// Subscribes the writer to the Tenant watch (before it starts).
pub fn subscribe(watch: &mut TenantWatch) -> Tenants {
    let changes = watch.listen(|ev| match ev {
        watcher::Event::InitDone => Some(Change::Relisted),
        watcher::Event::Apply(_) | watcher::Event::Delete(_) => Some(Change::Changed),
        // The store swaps its content on InitDone.
        watcher::Event::Init | watcher::Event::InitApply(_) => None,
    });
    Tenants {
        store: watch.store(),
        changes,
    }
}

/// Runs the writer until the process stops. Returns only if the Tenant
/// watch ends, which it does not by itself.
pub async fn run(ctx: Arc<Context>, tenants: Tenants) {
    let Tenants { store, mut changes } = tenants;
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
                let result = sync(&ctx, &store, &mut state, full).await;
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
    /// back from the ConfigMaps at the first pass, then what was written.
    limits: Option<BTreeMap<(String, String), Limit>>,
    /// The shards last converged.
    shards: Option<Vec<ratelimit::Shard>>,
}

/// One pass: render the store, converge the ConfigMaps, publish events.
/// Returns the number of ConfigMap writes. Unless `full`, a rendering equal
/// to the last one converged returns at once.
async fn sync(ctx: &Context, store: &Store<Tenant>, written: &mut Written, full: bool) -> Result<usize, Error> {
    let cfg = &ctx.settings.ratelimit;
    let tenants = store.state();
    let entries = ratelimit::entries(tenants.iter().map(|t| t.as_ref()));
    let shards = ratelimit::render(cfg, &entries)?;
    if !full && written.shards.as_ref() == Some(&shards) {
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
        *previous = Some(ratelimit::read_back(cfg, &files));
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
        kit::apply(ctx, &api, &cm)
            .await
            .map_err(|e| Error::WriteConfigMap(shard.name.clone(), e))?;
        writes += 1;
    }
    for name in existing.into_keys() {
        if kit::delete(ctx, &api, &name, &DeleteParams::default())
            .await
            .map_err(|e| Error::DeleteConfigMap(name.clone(), e))?
        {
            writes += 1;
        }
    }

    // Events for tenants whose limits were rendered before and differ now
    // (a new tenant's limits are announced by its Provisioned event).
    let now = ratelimit::by_domain(cfg, &entries);
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
    written.shards = Some(shards);
    Ok(writes)
}
