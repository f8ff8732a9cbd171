//! Shards: the Postgres databases tenants live on, and the controller that
//! connects to them.
//!
//! Takes the `Shard` objects and their admin Secrets (operator namespace);
//! gives [`Shards`], the registry of open shards every per-tenant step asks
//! for its tenant's pool and endpoint. The operator's own `DATABASE_URL` is
//! the shard `default`, registered at start without an object; a Shard
//! named `default` only sets its state, capacity, labels and tenant host.
//! A Shard with tenants placed on it cannot be deleted (finalizer
//! `tenancy.dev/shard`) until they are gone. See docs/shards.md.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use futures::channel::mpsc;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use sha2::Digest;
use sqlx::PgPool;

use crate::api::{Shard, ShardSpec, ShardState, ShardStatus, Tenant, DEFAULT_SHARD};
use crate::controller::kit::{self, conditions::Cond};
use crate::controller::tenant::plan::Endpoint;
use crate::controller::Context;
use crate::pg::{PgError, Target};

/// The finalizer that holds a Shard while tenants are placed on it.
pub const FINALIZER: &str = "tenancy.dev/shard";

/// One open shard: its admin pool, where applications reach it, and what
/// placement needs to know.
pub struct ShardConn {
    pub name: String,
    pub pool: PgPool,
    pub target: Target,
    /// Host, port and database written into its tenants' Secrets.
    pub endpoint: Endpoint,
    pub state: ShardState,
    pub max_tenants: Option<u32>,
    /// While Draining, moves out at once.
    pub max_concurrent_moves: u32,
    pub labels: BTreeMap<String, String>,
    /// SHA-256 of the admin URL it was opened with (None: the operator's
    /// own DATABASE_URL): a changed Secret reopens it.
    url_digest: Option<[u8; 32]>,
}

impl std::fmt::Debug for ShardConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardConn")
            .field("name", &self.name)
            .field("target", &self.target)
            .field("state", &self.state)
            .finish()
    }
}

impl ShardConn {
    /// The shard `default`: the operator's own database.
    pub fn default_of(pool: PgPool, endpoint: Endpoint) -> Self {
        ShardConn {
            name: DEFAULT_SHARD.into(),
            target: Target::of_pool(&pool),
            pool,
            endpoint,
            state: ShardState::Open,
            max_tenants: None,
            max_concurrent_moves: 1,
            labels: BTreeMap::new(),
            url_digest: None,
        }
    }

    /// This shard with the settings of `spec` and `labels` (the pool kept).
    fn with_spec(&self, spec: &ShardSpec, labels: BTreeMap<String, String>, base: &Endpoint) -> Self {
        ShardConn {
            name: self.name.clone(),
            pool: self.pool.clone(),
            target: self.target.clone(),
            endpoint: Endpoint {
                host: spec.tenant_host.clone().unwrap_or_else(|| base.host.clone()),
                port: spec.tenant_port.unwrap_or(base.port),
                database: base.database.clone(),
            },
            state: spec.state,
            max_tenants: spec.max_tenants,
            max_concurrent_moves: spec.max_concurrent_moves.unwrap_or(1),
            labels,
            url_digest: self.url_digest,
        }
    }
}

/// The registry of open shards. Cheap to read; written by the Shard
/// controller.
pub struct Shards {
    map: RwLock<BTreeMap<String, Arc<ShardConn>>>,
    /// Where the default shard's applications go by default (the
    /// operator's `--tenant-db-host`/`--tenant-db-port`).
    default_endpoint: Endpoint,
    listeners: Mutex<Vec<mpsc::UnboundedSender<()>>>,
}

impl Shards {
    /// A registry holding `default` only.
    pub fn new(default: ShardConn) -> Self {
        let default_endpoint = default.endpoint.clone();
        let mut map = BTreeMap::new();
        map.insert(default.name.clone(), Arc::new(default));
        Shards {
            map: RwLock::new(map),
            default_endpoint,
            listeners: Mutex::new(Vec::new()),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<ShardConn>> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// Every open shard, by name.
    pub fn all(&self) -> Vec<Arc<ShardConn>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The shard `default`, always registered.
    pub fn default_shard(&self) -> Arc<ShardConn> {
        self.get(DEFAULT_SHARD).expect("the default shard is always registered")
    }

    /// Registers (or replaces) `conn` and tells the listeners when it
    /// changed placement's view.
    pub fn put(&self, conn: ShardConn) {
        let changed = {
            let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
            let old = map.get(&conn.name);
            let changed = old.is_none_or(|o| {
                o.state != conn.state
                    || o.max_tenants != conn.max_tenants
                    || o.labels != conn.labels
                    || o.url_digest != conn.url_digest
            });
            map.insert(conn.name.clone(), Arc::new(conn));
            changed
        };
        if changed {
            self.notify();
        }
    }

    /// Removes a shard; never `default`, which [`Shards::default_shard`]
    /// relies on.
    fn remove(&self, name: &str) -> Option<Arc<ShardConn>> {
        if name == DEFAULT_SHARD {
            return None;
        }
        self.map.write().unwrap_or_else(|p| p.into_inner()).remove(name)
    }

    /// A signal each time a shard opens, closes or changes state, capacity
    /// or labels (tenants waiting for a shard try again).
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<()> {
        let (tx, rx) = mpsc::unbounded();
        self.listeners.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
        rx
    }

    fn notify(&self) {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|tx| tx.unbounded_send(()).is_ok());
    }
}

/// Runs `each` for every open shard, as a task of its own: started when a
/// shard opens, restarted when it is reopened (a new admin URL), stopped
/// when it closes. For the leader's loops that work database by database
/// (caps watchdog, usage sampler). Never returns.
pub async fn each_shard<F, Fut>(ctx: Arc<Context>, each: F)
where
    F: Fn(Arc<Context>, Arc<ShardConn>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use futures::StreamExt;
    let mut changes = ctx.shards.subscribe();
    let mut running: BTreeMap<String, (Option<[u8; 32]>, tokio::task::JoinHandle<()>)> = BTreeMap::new();
    // Aborts the tasks when this future is dropped (leadership lost).
    struct AbortAll<'a>(&'a mut BTreeMap<String, (Option<[u8; 32]>, tokio::task::JoinHandle<()>)>);
    impl Drop for AbortAll<'_> {
        fn drop(&mut self) {
            for (_, (_, h)) in self.0.iter() {
                h.abort();
            }
        }
    }
    let guard = AbortAll(&mut running);
    loop {
        let open = ctx.shards.all();
        guard.0.retain(|name, (digest, handle)| {
            let keep = open.iter().any(|c| &c.name == name && &c.url_digest == digest);
            if !keep {
                handle.abort();
            }
            keep
        });
        for conn in open {
            if !guard.0.contains_key(&conn.name) {
                let handle = tokio::spawn(each(ctx.clone(), conn.clone()));
                guard.0.insert(conn.name.clone(), (conn.url_digest, handle));
            }
        }
        if changes.next().await.is_none() {
            return futures::future::pending().await;
        }
    }
}

/// Errors of one Shard reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the shard's admin Secret: {0}")]
    ReadSecret(#[source] kube::Error),
    #[error("writing the Shard's status: {0}")]
    PatchStatus(#[source] kube::Error),
    #[error("updating the Shard's finalizers: {0}")]
    PatchFinalizer(#[source] kube::Error),
}

impl kit::ReconcileError for Error {
    fn label(&self) -> &'static str {
        match self {
            Error::ReadSecret(_) => "ReadSecret",
            Error::PatchStatus(_) => "PatchStatus",
            Error::PatchFinalizer(_) => "PatchFinalizer",
        }
    }
}

const CONTROLLER: &str = "shard";

/// Starts the Shard controller and drives it until shutdown.
pub async fn run(ctx: Arc<Context>) {
    use futures::StreamExt;
    let shards: Api<Shard> = Api::all(ctx.client.clone());
    // A change of a Secret in the operator's namespace brings back the
    // Shards that name it (admin URL rotated).
    let secrets: Api<kube::core::PartialObjectMeta<Secret>> =
        Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let controller = Controller::new(shards, watcher::Config::default());
    let store = controller.store();
    controller
        .watches(secrets, watcher::Config::default(), move |s| {
            let name = s.name_any();
            store
                .state()
                .iter()
                .filter(|sh| sh.spec.admin_secret_ref.as_ref().is_some_and(|r| r.name == name))
                .map(|sh| kube::runtime::reflector::ObjectRef::from_obj(sh.as_ref()))
                .collect::<Vec<_>>()
        })
        .with_config(kit::queue(4, Duration::from_millis(500)))
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// Opens every Shard once, before the controllers that use them start, so
/// that the tenants placed on them do not report their shard unavailable
/// while the Shard controller catches up. Failures are the Shard
/// controller's to report.
pub async fn open_all(ctx: &Context) {
    let api: Api<Shard> = Api::all(ctx.client.clone());
    let list = match api.list(&Default::default()).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "listing Shards");
            return;
        }
    };
    for s in list.items.iter().filter(|s| s.metadata.deletion_timestamp.is_none()) {
        match open(s, ctx).await {
            Ok(Ok(_)) => {}
            Ok(Err((reason, message))) => tracing::warn!(shard = %s.name_any(), reason, %message, "shard not open"),
            Err(e) => tracing::warn!(shard = %s.name_any(), error = %e, "shard not open"),
        }
    }
}

fn error_policy(s: Arc<Shard>, err: &Error, ctx: Arc<Context>) -> Action {
    kit::error_policy(&ctx, CONTROLLER, &s.name_any(), err)
}

async fn reconcile(s: Arc<Shard>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = s.name_any();
    let span = tracing::info_span!("reconcile", controller = CONTROLLER, shard = %name);
    kit::reconcile(&ctx, CONTROLLER, &name, span, async {
        if s.metadata.deletion_timestamp.is_some() {
            retire(&s, &ctx).await
        } else {
            converge(&s, &ctx).await
        }
    })
    .await
}

/// Tenants placed on each shard, as the Tenant cache shows them (with the
/// placements this process made that the cache may not show yet).
pub fn tenants_per_shard(ctx: &Context) -> HashMap<String, usize> {
    let tenants: Vec<Arc<Tenant>> = ctx.metrics.tenant_store.get().map(|s| s.state()).unwrap_or_default();
    ctx.placements.counts_of(&tenants)
}

/// Opens (or keeps) the shard, registers it, and reports on it.
async fn converge(s: &Shard, ctx: &Context) -> Result<Action, Error> {
    let name = s.name_any();
    if !s.finalizers().iter().any(|f| f == FINALIZER) {
        kit::add_finalizer(ctx, s, FINALIZER)
            .await
            .map_err(Error::PatchFinalizer)?;
    }
    let opened = open(s, ctx).await?;
    let tenants = tenants_per_shard(ctx).get(&name).copied().unwrap_or(0) as i64;
    let (conds, facts) = match opened {
        Ok(conn) => match describe(&conn.pool).await {
            Ok((version, bytes)) => {
                let msg = format!("{tenants} tenant(s), {} as {}", conn.target.host, conn.target.database);
                (vec![Cond::new("Ready", true, "Connected", msg)], Some((version, bytes)))
            }
            Err(e) => (vec![Cond::new("Ready", false, "Unreachable", e.to_string())], None),
        },
        Err((reason, message)) => {
            tracing::warn!(shard = %name, reason, %message, "shard not open");
            (vec![Cond::new("Ready", false, reason, message)], None)
        }
    };
    write_status(ctx, s, tenants, facts, &conds).await?;
    Ok(Action::requeue(ctx.settings.resync))
}

/// The shard's conn after this reconcile: opened (or kept, when its admin
/// URL did not change), registered, with the spec's settings; or why not.
/// A shard that was open stays registered when its new URL fails, so that
/// its tenants keep being served.
async fn open(s: &Shard, ctx: &Context) -> Result<Result<Arc<ShardConn>, (&'static str, String)>, Error> {
    let name = s.name_any();
    let labels = s.labels().clone();
    if name == DEFAULT_SHARD {
        let conn = ctx.shards.default_shard();
        ctx.shards
            .put(conn.with_spec(&s.spec, labels, &ctx.shards.default_endpoint));
        return Ok(Ok(ctx.shards.default_shard()));
    }
    let Some(r) = s.spec.admin_secret_ref.as_ref() else {
        return Ok(Err(("InvalidSpec", "spec.adminSecretRef is required".into())));
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let Some(secret) = secrets.get_opt(&r.name).await.map_err(Error::ReadSecret)? else {
        return Ok(Err((
            "SecretNotFound",
            format!("Secret {}/{} does not exist", ctx.settings.namespace, r.name),
        )));
    };
    let Some(url) = secret.data.as_ref().and_then(|d| d.get(&r.key)) else {
        return Ok(Err((
            "SecretKeyNotFound",
            format!("Secret {}/{} has no key {:?}", ctx.settings.namespace, r.name, r.key),
        )));
    };
    let url = zeroize::Zeroizing::new(String::from_utf8_lossy(&url.0).trim().to_string());
    let digest: [u8; 32] = sha2::Sha256::digest(url.as_bytes()).into();
    if let Some(old) = ctx.shards.get(&name).filter(|c| c.url_digest == Some(digest)) {
        let base = base_endpoint(&old.target);
        ctx.shards.put(old.with_spec(&s.spec, labels, &base));
        return Ok(Ok(ctx.shards.get(&name).unwrap_or(old)));
    }
    let (pool, target, facts, warnings) = match crate::pg::open_admin(url, ctx.settings.shard_max_connections).await {
        Ok(o) => o,
        Err(e) => return Ok(Err((open_failure_reason(&e), e.to_string()))),
    };
    for warning in warnings {
        tracing::warn!(shard = %name, %warning, "shard hardening skipped");
    }
    if let Err(msg) = keys_cover(ctx, &pool).await {
        pool.close().await;
        return Ok(Err(("RootKeysMissing", msg)));
    }
    tracing::info!(shard = %name, host = %target.host, database = %target.database, admin = %facts.role, "shard opened");
    let base = base_endpoint(&target);
    let fresh = ShardConn {
        name: name.clone(),
        pool,
        target,
        endpoint: base.clone(),
        state: s.spec.state,
        max_tenants: s.spec.max_tenants,
        max_concurrent_moves: s.spec.max_concurrent_moves.unwrap_or(1),
        labels: labels.clone(),
        url_digest: Some(digest),
    };
    let conn = fresh.with_spec(&s.spec, labels, &base);
    let old = ctx.shards.get(&name);
    ctx.shards.put(conn);
    // The gateway role on the new shard, before its tenants are granted to
    // it.
    if let Some(g) = &ctx.settings.gateway {
        if let Err(e) = crate::controller::gateway::converge(ctx, g).await {
            tracing::warn!(shard = %name, error = %e, "converging the gateway role after a shard opened");
        }
    }
    if let Some(old) = old {
        // Sessions in use finish; the pool closes when they are returned.
        let pool = old.pool.clone();
        tokio::spawn(async move { pool.close().await });
    }
    Ok(ctx
        .shards
        .get(&name)
        .ok_or(("Unreachable", "the shard was removed".into())))
}

fn base_endpoint(t: &Target) -> Endpoint {
    Endpoint {
        host: t.host.clone(),
        port: t.port,
        database: t.database.clone(),
    }
}

/// The reason of a shard that could not be opened. Pure.
pub fn open_failure_reason(e: &PgError) -> &'static str {
    match e {
        PgError::BadUrl(_) => "InvalidUrl",
        PgError::MissingPrivilege { .. } => "AdminRightsMissing",
        e if e.is_unreachable() => "Unreachable",
        _ => "DatabaseError",
    }
}

/// Whether the loaded root keys hold every version the shard's tenants'
/// sealed data uses.
async fn keys_cover(ctx: &Context, pool: &PgPool) -> Result<(), String> {
    let in_use = crate::pg::registry::key_versions_in_use(pool)
        .await
        .map_err(|e| e.to_string())?;
    let Some(ring) = ctx.keys.current() else {
        return Err("the root keys are not loaded".into());
    };
    let missing: Vec<String> = in_use
        .iter()
        .filter_map(|v| crate::crypto::KeyVersion::new(*v).ok())
        .filter(|v| !ring.contains(*v))
        .map(|v| v.to_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the root keys lack version(s) {} that tenants on this shard still use",
            missing.join(", ")
        ))
    }
}

/// The server's version and the database's size, rounded to MiB.
async fn describe(pool: &PgPool) -> Result<(String, i64), PgError> {
    let (version, bytes): (String, i64) =
        sqlx::query_as("SELECT current_setting('server_version'), pg_database_size(current_database())")
            .fetch_one(pool)
            .await
            .map_err(crate::pg::query_err("describing the shard"))?;
    Ok((version, bytes / (1 << 20) * (1 << 20)))
}

async fn write_status(
    ctx: &Context,
    s: &Shard,
    tenants: i64,
    facts: Option<(String, i64)>,
    conds: &[Cond],
) -> Result<(), Error> {
    let old = s.status.as_ref();
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
    let old_conds = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let reachable = facts.is_some();
    let (version, bytes) = match facts {
        Some((v, b)) => (Some(v), Some(b)),
        None => (old.and_then(|s| s.postgres_version.clone()), old.and_then(|s| s.bytes)),
    };
    let new = ShardStatus {
        reachable: Some(reachable),
        postgres_version: version,
        tenants: Some(tenants),
        bytes,
        observed_generation: s.metadata.generation,
        conditions: kit::conditions::merge_conditions(old_conds, conds, s.metadata.generation, &now),
    };
    let was_ready = old
        .and_then(|o| o.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| (c.status.clone(), c.reason.clone()));
    kit::write_status(ctx, s, old, &new).await.map_err(Error::PatchStatus)?;
    if let Some(c) = conds.first() {
        let status = if c.status { "True" } else { "False" };
        if was_ready.as_ref().is_none_or(|(s, r)| *s != status || *r != c.reason) {
            kit::event(ctx, s, !c.status, c.reason, c.message.clone()).await;
        }
    }
    Ok(())
}

/// A Shard being deleted: held while tenants are placed on it; then its
/// pool is closed and it leaves the registry (the shard `default` goes back
/// to its defaults: Open, no limit, no labels).
async fn retire(s: &Shard, ctx: &Context) -> Result<Action, Error> {
    let name = s.name_any();
    if !s.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    if name == DEFAULT_SHARD {
        let conn = ctx.shards.default_shard();
        ctx.shards.put(conn.with_spec(
            &ShardSpec {
                admin_secret_ref: None,
                tenant_host: None,
                tenant_port: None,
                max_tenants: None,
                state: ShardState::Open,
                max_concurrent_moves: None,
            },
            BTreeMap::new(),
            &ctx.shards.default_endpoint,
        ));
    } else {
        let tenants = tenants_per_shard(ctx).get(&name).copied().unwrap_or(0);
        if tenants > 0 {
            let msg = format!("{tenants} tenant(s) are placed on this shard: delete or move them first");
            let conds = [Cond::new("Ready", false, "DeletionBlocked", msg)];
            write_status(ctx, s, tenants as i64, None, &conds).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        if let Some(old) = ctx.shards.remove(&name) {
            old.pool.close().await;
            ctx.shards.notify();
            tracing::info!(shard = %name, "shard closed");
        }
    }
    kit::remove_finalizer(ctx, s, FINALIZER)
        .await
        .map_err(Error::PatchFinalizer)?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_to_open_is_named_by_its_cause() {
        assert_eq!(
            open_failure_reason(&PgError::MissingPrivilege {
                role: "a".into(),
                what: "CREATEROLE".into()
            }),
            "AdminRightsMissing"
        );
        let bad = "not a url".parse::<sqlx::postgres::PgConnectOptions>().unwrap_err();
        assert_eq!(open_failure_reason(&PgError::BadUrl(bad)), "InvalidUrl");
        let down = PgError::Connect {
            target: "x".into(),
            source: sqlx::Error::PoolTimedOut,
        };
        assert_eq!(open_failure_reason(&down), "Unreachable");
    }
}
