//! The controllers and what they share.
//!
//! Takes a Kubernetes client, the admin pool and the operator's settings;
//! gives `run`, which drives the Tenant controller and the rate-limit
//! ConfigMap writer until shutdown.

pub mod anchoring;
pub mod gateway;
pub mod kit;
pub mod migration_set;
pub mod ratelimits;
pub mod shards;
pub mod tenant;
pub mod tenant_restore;
pub mod tenant_watch;
pub mod usage;
pub mod watchdog;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::runtime::events::Reporter;
use kube::Client;
use sqlx::PgPool;

use tenant::plan::Endpoint;

/// Settings every reconcile reads.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespace of the per-tenant Secrets and other namespaced objects.
    pub namespace: String,
    /// How tenants' applications reach Postgres.
    pub endpoint: Endpoint,
    /// Reconciles at once, at most.
    pub concurrency: u16,
    /// Tenants let into the controller's queue at once, at most
    /// ([`tenant::gate`]).
    pub queue_bound: u16,
    /// The period of the resyncs, to catch changes made inside Postgres
    /// (for Tenants, a period after each one's last good reconcile:
    /// `tenant::resync`).
    pub resync: Duration,
    /// Names, domains and descriptor key of the rendered rate-limit config.
    pub ratelimit: crate::ratelimit_config::RenderSettings,
    /// `lock_timeout` and `statement_timeout` of each tenant migration.
    pub migration_timeouts: crate::pg::migrations::Timeouts,
    /// Where the root keys live (reloaded when that Secret changes).
    pub root_keys: crate::keys::KeySource,
    /// Backup CronJobs, restore Jobs and the backup store.
    pub backup: tenant::backup_jobs::BackupSettings,
    /// Which Secrets may be sources of tenants' sealed secrets.
    pub secret_sources: tenant::sealing::SourcePolicy,
    /// Time between audit anchoring passes ([`anchoring`]).
    pub audit_anchor_interval: Duration,
    /// Time between passes sealing the audit entries no commit sealed
    /// ([`anchoring`]).
    pub audit_seal_interval: Duration,
    /// The gateway login of this database (`--gateway-role`); None: no
    /// gateway (`--gateway-role=""`).
    pub gateway: Option<crate::pg::gateway::GatewayName>,
    /// The caps watchdog ([`watchdog`]).
    pub watchdog: watchdog::WatchdogSettings,
    /// Time between usage samples ([`usage`]); None: off.
    pub usage_interval: Option<Duration>,
    /// Admin connections of each Shard's pool, at most.
    pub shard_max_connections: u32,
}

/// What each reconcile gets.
pub struct Context {
    pub client: Client,
    pub pool: PgPool,
    pub settings: Settings,
    /// Who publishes the Events (`kit::publish` makes a `Recorder` of it
    /// per Event).
    pub reporter: Reporter,
    /// The root keys in use.
    pub keys: std::sync::Arc<crate::keys::KeyHolder>,
    /// Which source Secrets each tenant's sealed secrets come from, so a
    /// change to one brings its tenants back for reconcile.
    pub sources: tenant::sealing::SourceIndex,
    /// The MigrationSets (a watch cache the Tenant controller fills when it
    /// starts); without it a reconcile reads the set from the API server.
    pub migration_sets: std::sync::OnceLock<kube::runtime::reflector::Store<crate::api::MigrationSet>>,
    /// Prometheus metrics (served by `telemetry::serve`).
    pub metrics: std::sync::Arc<crate::telemetry::Metrics>,
    /// What `/healthz` and `/readyz` report.
    pub health: std::sync::Arc<crate::telemetry::Health>,
    /// What the rate-limit ConfigMaps hold, as their writer last converged
    /// them: `RateLimitsApplied` says True only for limits found here.
    pub rate_limits: ratelimits::Applied,
    /// The gateway role, once it was converged: tenant reconciles make it a
    /// member of each Active tenant's app role.
    pub gateway: std::sync::OnceLock<String>,
    /// The open shards ([`shards`]); `default` is the pool above.
    pub shards: shards::Shards,
    /// The placements this process made ([`tenant::placement`]).
    pub placements: tenant::placement::Placements,
    /// This process's Tenant writes whose echo starts no reconcile
    /// ([`tenant::echoes`]).
    pub own_writes: tenant::echoes::OwnWrites,
    /// Which Tenants only the MigrationSet watch brought back, to say
    /// `RollingOut` ([`tenant::triggers`]).
    pub triggers: tenant::triggers::Triggers,
    /// The Tenants waiting for their periodic resync ([`tenant::resync`]).
    pub resyncs: std::sync::Arc<tenant::resync::Resyncs>,
    /// The Tenants waiting for a reconcile, let into the controller's
    /// queue a bounded number at a time ([`tenant::gate`]).
    pub gate: std::sync::Arc<tenant::gate::Gate>,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, pool: PgPool, settings: Settings) -> Self {
        let reporter = Reporter {
            controller: "tenant-operator".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let shards = shards::Shards::new(shards::ShardConn::default_of(pool.clone(), settings.endpoint.clone()));
        Self {
            client,
            pool,
            shards,
            placements: Default::default(),
            own_writes: Default::default(),
            triggers: Default::default(),
            resyncs: Default::default(),
            gate: std::sync::Arc::new(tenant::gate::Gate::new(settings.queue_bound.into())),
            settings,
            reporter,
            keys: Default::default(),
            sources: Default::default(),
            migration_sets: std::sync::OnceLock::new(),
            metrics: Default::default(),
            health: Default::default(),
            rate_limits: Default::default(),
            gateway: std::sync::OnceLock::new(),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Uses `keys` as the root keys.
    pub fn with_keys(mut self, keys: crate::keys::KeyHolder) -> Self {
        self.keys = std::sync::Arc::new(keys);
        self
    }

    /// The next retry delay for `key`: 2s, 4s, 8s ... capped at 5 minutes.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        let secs = 1u64.checked_shl((*n).min(9)).unwrap_or(300).min(300);
        Duration::from_secs(secs)
    }

    pub fn reset_backoff(&self, key: &str) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// Runs every controller until a shutdown signal. The Tenant controller
/// owns shutdown; the rate-limit writer runs beside it and is dropped when
/// it returns, as is the MigrationSet controller. Neither returns on its
/// own: if one does, that is a bug, logged loudly, and the operator stops so
/// that it gets restarted.
pub async fn run(ctx: std::sync::Arc<Context>) {
    // The gateway first, so that tenants are granted to a role that exists
    // (a failure is retried by its loop; tenants then go without it).
    let gateway = ctx.settings.gateway.clone();
    if let Some(g) = &gateway {
        if let Err(e) = gateway::converge(&ctx, g).await {
            tracing::error!(error = %e, "converging the gateway role failed; tenants are not granted to it until it succeeds");
        }
    }
    let gateway_loop = async {
        match gateway {
            Some(g) => gateway::run(ctx.clone(), g).await,
            None => futures::future::pending::<()>().await,
        }
    };
    // The shards, before anything asks for a tenant's.
    shards::open_all(&ctx).await;
    // One watch and one cache of every Tenant: the Tenant controller drives
    // it, the rate-limit writer and the MigrationSet controller read its
    // store and hear of the changes they care about.
    let mut tenants = tenant_watch::TenantWatch::new(ctx.client.clone());
    let (ratelimit_input, ratelimit_reports) = ratelimits::subscribe(&mut tenants);
    let migration_set_input = migration_set::subscribe(&mut tenants);
    tokio::select! {
        _ = gateway_loop => ctx.health.task_died("gateway"),
        _ = tenant::run(ctx.clone(), tenants, ratelimit_reports) => {}
        _ = ratelimits::run(ctx.clone(), ratelimit_input) => ctx.health.task_died("ratelimits"),
        _ = migration_set::run(ctx.clone(), migration_set_input) => ctx.health.task_died("migrationset-controller"),
        _ = tenant_restore::run(ctx.clone()) => ctx.health.task_died("tenantrestore-controller"),
        _ = anchoring::run(ctx.clone()) => ctx.health.task_died("audit-anchoring"),
        _ = watchdog::run(ctx.clone()) => ctx.health.task_died("watchdog"),
        _ = usage::run(ctx.clone()) => ctx.health.task_died("usage-sampler"),
        _ = shards::run(ctx.clone()) => ctx.health.task_died("shard-controller"),
    }
}
