//! Moving a placed tenant to another shard (docs/shards.md, "Moving a
//! tenant").
//!
//! A move starts when `spec.placement.shard` names another shard than
//! `status.shard`. Strategy `Logical` (both shards' admins superusers, the
//! source at `wal_level=logical`): the registry row, roles and schema
//! (without data) are made on the target, a publication of the tenant's
//! tables on the source and a subscription on the target copy the data and
//! stream every change while the tenant serves from the source
//! (`Copying`, with bytes and lag in status); then the cutover
//! (`CuttingOver`): writes stopped on the source, the target caught up to
//! the source's last WAL position, the sequences copied, the replication
//! objects dropped, the audit anchors rebased on the target, and the commit
//! as below. Strategy `Copy` (otherwise): the tenant's writes stop on the source
//! (login off, sessions ended, gateway revoked: as a suspend), its registry
//! row (uid, key salt, key version) is copied to the target, its roles and
//! schema are created there, a backup of the source (the backup store's
//! encrypted dump) is restored into the target's schema, the target's
//! backup records are synced from the store; then the move commits by
//! writing `status.shard`, the login is turned on at the target, and the
//! source's copy is dropped. Every step is idempotent.
//!
//! A failure before the commit rolls back: the target's copy is dropped and
//! the source serves again (`lastMove` Failed; retried when the spec
//! changes or after ten minutes). An operator that finds a move `Copying`
//! when it starts a reconcile was cut off mid-copy: it rolls back, then
//! starts again. After the commit (`CleaningUp`) only the source's drop is
//! left, retried until done. Never both copies live: the source's login is
//! off from the first step, the target's on only after the commit.
//!
//! `decide` is pure; `drive` does the work.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};

use crate::api::shard::{LastMove, MovePhase, MoveStatus};
use crate::api::{ShardState, Tenant};
use crate::controller::shards::ShardConn;
use crate::controller::Context;
use crate::names::TenantName;

use super::placement::{self, State};
use super::plan::DesiredDb;

/// A failed move is tried again after this long (or when the spec changes).
pub const RETRY_AFTER: Duration = Duration::from_secs(600);

/// Milliseconds a move waits between its commit and the source's drop
/// (tests only: the window in which they take the source down).
pub const PAUSE_AFTER_COMMIT_VAR: &str = "TENANT_OPERATOR_TEST_MOVE_PAUSE_AFTER_COMMIT_MS";

/// Milliseconds a `Logical` move waits in its cutover, writes stopped,
/// before it reads the source's last position (tests only: the window in
/// which they kill the operator).
pub const PAUSE_IN_CUTOVER_VAR: &str = "TENANT_OPERATOR_TEST_MOVE_PAUSE_IN_CUTOVER_MS";

/// Writes stopped on the source, then copied (a backup restored).
pub const STRATEGY_COPY: &str = "Copy";
/// Logical replication while the tenant serves; writes stop for the
/// cutover only.
pub const STRATEGY_LOGICAL: &str = "Logical";

/// How long a cutover waits for the target to apply the source's last
/// changes before it gives up (and rolls back).
const CATCH_UP_LIMIT: Duration = Duration::from_secs(30);

/// The cutover starts when the initial copy is done and the target is
/// this close (bytes of WAL) behind.
const CUTOVER_LAG: i64 = 16 << 20;

/// A `Logical` copy that makes no progress for this long fails.
const STALL_LIMIT: Duration = Duration::from_secs(300);

/// What a reconcile does about placement. Pure input: the Tenant, where it
/// is, whether the wanted shard is open and takes tenants, whether a backup
/// store is configured, and the time.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to move.
    Stay,
    /// The spec wants another shard but the move cannot start now: report
    /// `Placed` False with this reason and message, serve where it is.
    Blocked { reason: &'static str, message: String },
    /// Start (or, after a cut-off copy, restart) a move to this shard.
    Start(String),
    /// A copy was cut off (operator restart): roll it back first.
    RollBack(MoveStatus),
    /// The move committed: drop the source's copy.
    CleanUp(MoveStatus),
}

/// What placement needs to know of the wanted shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Registered and reachable, in this state, with room or not.
    Open { state: ShardState, has_room: bool },
    /// No such open shard.
    Unknown,
}

/// Decides. Pure.
/// `wanted`: the shard the tenant should be on (its `spec.placement.shard`,
/// or the one a drain of its shard chose).
pub fn decide(t: &Tenant, current: &str, wanted: Option<&str>, target: Target, now: DateTime<Utc>) -> Decision {
    let status = t.status.as_ref();
    match status.and_then(|s| s.moving.as_deref().cloned()) {
        Some(m) if m.phase == MovePhase::CleaningUp => return Decision::CleanUp(m),
        Some(m) => return Decision::RollBack(m),
        None => {}
    }
    let Some(wanted) = wanted.filter(|w| *w != current) else {
        return Decision::Stay;
    };
    let blocked = |reason: &'static str, why: String| Decision::Blocked {
        reason,
        message: format!("the tenant lives on shard {current} and should move to {wanted}: {why}"),
    };
    if let Some(last) = status.and_then(|s| s.last_move.as_ref()) {
        let same_spec = last.generation == t.metadata.generation && last.to == wanted;
        let recent = DateTime::parse_from_rfc3339(&last.finished_at)
            .map(|at| {
                now.signed_duration_since(at.with_timezone(&Utc))
                    < chrono::Duration::from_std(RETRY_AFTER).unwrap_or_default()
            })
            .unwrap_or(false);
        if last.result == "Failed" && same_spec && recent {
            return blocked(
                "MoveFailed",
                format!(
                    "the last move failed ({}); it is tried again after ten minutes or a spec change",
                    last.message
                ),
            );
        }
    }
    match target {
        Target::Unknown => blocked("ShardNotFound", format!("shard {wanted} is not open (see its status)")),
        Target::Open { state, .. } if state != ShardState::Open => blocked(
            "ShardNotOpen",
            format!("shard {wanted} is {state:?}: it takes no tenants"),
        ),
        Target::Open { has_room: false, .. } => blocked("ShardFull", format!("shard {wanted} is full")),
        Target::Open { .. } => Decision::Start(wanted.to_owned()),
    }
}

/// Errors of a move step.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("{0}")]
    Db(#[from] crate::pg::PgError),
    #[error("{0}")]
    Converge(#[from] super::ConvergeError),
    #[error("{0}")]
    Backup(#[from] crate::backup::BackupError),
    #[error("{0}")]
    Store(#[from] crate::backup::StoreError),
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Other(String),
}

/// Where the reconcile goes on after the move step: the shard to converge
/// on, and a `Placed` condition (reason, message) when the spec's shard is
/// not where the tenant is.
pub struct After {
    pub shard: Arc<ShardConn>,
    pub placed: Option<(&'static str, String)>,
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The move step of a reconcile: decides, and does what is decided.
pub async fn drive(
    ctx: &Context,
    t: &Tenant,
    name: &TenantName,
    uid: &str,
    current: Arc<ShardConn>,
    desired: &DesiredDb,
) -> Result<After, MoveError> {
    let latest = placement::with_latest(ctx, t);
    let t = latest.as_ref();
    let stay = |placed| After {
        shard: current.clone(),
        placed,
    };
    // Where the tenant should be: where the spec pins it, or, on a
    // Draining shard, where placement would put it now.
    let pinned = t.spec.placement.shard.clone();
    let draining = current.state == ShardState::Draining && t.status.as_ref().is_none_or(|s| s.moving.is_none());
    let wanted = match (&pinned, draining) {
        (Some(p), true) if *p == current.name => {
            return Ok(stay(Some((
                "ShardDraining",
                format!(
                    "shard {} is Draining, but spec.placement.shard pins the tenant to it: change that to let the drain move it",
                    current.name
                ),
            ))))
        }
        (Some(p), _) => Some(p.clone()),
        (None, true) => match drain_target(ctx, t, &current) {
            Ok(to) => Some(to),
            Err(e) => {
                return Ok(stay(Some((
                    "ShardDraining",
                    format!("shard {} is Draining, but the tenant has nowhere to go: {e}", current.name),
                ))))
            }
        },
        (None, false) => None,
    };
    // A drain moves at most the shard's maxConcurrentMoves tenants at once.
    let _slot = match (draining && pinned.is_none(), wanted.is_some()) {
        (true, true) => match ctx.placements.drain_slot(&current.name, current.max_concurrent_moves) {
            Some(slot) => Some(slot),
            None => {
                return Ok(stay(Some((
                    "ShardDraining",
                    format!(
                        "shard {} is Draining; this tenant waits for one of its {} move slot(s)",
                        current.name, current.max_concurrent_moves
                    ),
                ))))
            }
        },
        _ => None,
    };
    // Counted only when the tenant should be elsewhere (a pinned tenant's
    // resync counts nothing).
    let target = match wanted
        .as_deref()
        .filter(|w| *w != current.name)
        .and_then(|w| ctx.shards.get(w))
    {
        Some(c) => {
            let count = crate::controller::shards::tenants_per_shard(ctx)
                .get(&c.name)
                .copied()
                .unwrap_or(0);
            Target::Open {
                state: c.state,
                has_room: c.max_tenants.is_none_or(|m| count < m as usize),
            }
        }
        None => Target::Unknown,
    };
    match decide(t, &current.name, wanted.as_deref(), target, Utc::now()) {
        Decision::Stay => Ok(stay(None)),
        Decision::Blocked { reason, message } => Ok(stay(Some((reason, message)))),
        // The tenant serves from here whatever happens to the source.
        Decision::CleanUp(m) => match clean_up(ctx, t, name, uid, &current, &m).await {
            Ok(()) => Ok(stay(None)),
            Err(e) => {
                tracing::warn!(tenant = %name, shard = %m.from, error = %e, "dropping the moved tenant's source copy failed; retrying");
                Ok(stay(Some((
                    "SourceCleanupPending",
                    format!(
                        "moved from shard {}; dropping the copy there failed, retrying: {e}",
                        m.from
                    ),
                ))))
            }
        },
        Decision::RollBack(m) => {
            // Cut off during the copy: rolled back, and started again by the
            // next reconcile (an interruption is not a failure). Rolling back
            // already: only the target's copy is left to drop.
            let (why, reason, message) = match m.phase {
                MovePhase::Copying => (
                    Some(("Interrupted", "the operator stopped during the copy")),
                    "Moving",
                    "a move cut off during its copy was rolled back; it starts again".to_string(),
                ),
                MovePhase::CuttingOver => (
                    Some(("Interrupted", "the operator stopped during the cutover")),
                    "Moving",
                    "a move cut off during its cutover was rolled back; it starts again".to_string(),
                ),
                _ => (
                    None,
                    "MoveFailed",
                    format!("the move to {} failed; dropping its copy there, retrying", m.to),
                ),
            };
            roll_back(ctx, t, name, uid, &m, why).await?;
            let from = ctx
                .shards
                .get(&m.from)
                .ok_or_else(|| MoveError::Other(format!("shard {} is not open", m.from)))?;
            Ok(After {
                shard: from,
                placed: Some((reason, message)),
            })
        }
        Decision::Start(to) => {
            let to = ctx
                .shards
                .get(&to)
                .ok_or_else(|| MoveError::Other(format!("shard {to} is not open")))?;
            // A restore under way (its schema aside) finishes first.
            if crate::pg::backup_sql::pending_restore(&current.pool, name, uid)
                .await?
                .is_some()
            {
                return Ok(stay(Some((
                    "RestoreRunning",
                    format!(
                        "a restore of the tenant is under way on shard {}; the move to {} starts after it",
                        current.name, to.name
                    ),
                ))));
            }
            // The move as `status.moving` shows it, also what a rollback
            // records (its start, its strategy).
            // Read from both shards only when a move starts.
            let (strategy, reason) = strategy(t, &current, &to, name).await;
            let m = MoveStatus {
                from: current.name.clone(),
                to: to.name.clone(),
                phase: MovePhase::Copying,
                strategy: strategy.into(),
                strategy_reason: reason,
                started_at: now(),
                bytes_copied: None,
                bytes_total: None,
                lag_bytes: None,
                tables_pending: None,
            };
            match run(ctx, t, name, uid, &current, &to, desired, m.clone()).await {
                Ok(()) => Ok(After {
                    shard: to,
                    placed: None,
                }),
                // Committed: the tenant is on the target; the reconcile
                // converges it there, the next one drops the source's copy.
                Err(Failure::AfterCommit(e)) => {
                    tracing::warn!(tenant = %name, to = %to.name, error = %e, "finishing the committed move failed; retrying");
                    let message = format!("the move to {} committed; finishing it: {e}", to.name);
                    Ok(After {
                        shard: to,
                        placed: Some(("Moving", message)),
                    })
                }
                Err(Failure::BeforeCommit(e)) => {
                    tracing::warn!(tenant = %name, from = %m.from, to = %m.to, error = %e, "moving the tenant failed; rolling back");
                    roll_back(ctx, t, name, uid, &m, Some(("Failed", &e.to_string()))).await?;
                    Ok(stay(Some((
                        "MoveFailed",
                        format!("moving to shard {} failed and was rolled back: {e}", m.to),
                    ))))
                }
            }
        }
    }
}

/// Where a drain sends the tenant: the shard placement would choose for it
/// now (its selector kept), never the draining one.
fn drain_target(ctx: &Context, t: &Tenant, current: &ShardConn) -> Result<String, placement::PlacementError> {
    let open = ctx.shards.all();
    let candidates: Vec<placement::Candidate<'_>> = open
        .iter()
        .filter(|c| c.name != current.name)
        .map(|c| placement::Candidate {
            name: &c.name,
            state: c.state,
            max_tenants: c.max_tenants,
            labels: &c.labels,
        })
        .collect();
    let spec = crate::api::PlacementSpec {
        shard: None,
        shard_selector: t.spec.placement.shard_selector.clone(),
    };
    placement::choose(&spec, &candidates, &crate::controller::shards::tenants_per_shard(ctx))
}

/// The strategy of a move from `from` to `to`, and why.
async fn strategy(t: &Tenant, from: &ShardConn, to: &ShardConn, name: &TenantName) -> (&'static str, String) {
    if let Some(why) = copy_after_failure(
        t.status.as_ref().and_then(|s| s.last_move.as_deref()),
        &from.name,
        &to.name,
    ) {
        return (STRATEGY_COPY, why);
    }
    match crate::pg::replication::check(&from.pool, &to.pool, &name.schema(), &to.name, &from.name).await {
        Ok(()) => (
            STRATEGY_LOGICAL,
            format!(
                "the admins of shards {} and {} may replicate and the source runs wal_level=logical: the tenant serves during the copy, writes stop for the cutover only",
                from.name, to.name
            ),
        ),
        Err(why) => (STRATEGY_COPY, format!("{why}: writes stop for the copy")),
    }
}

/// What a `Logical` move's failure says when replication could not copy
/// the data at all (the target cannot reach the source, the subscription
/// stops on an error): the next move between the same shards copies.
const CANNOT_REPLICATE: &str = "logical replication could not copy the tenant";

/// Why a move copies although both shards could replicate: the last move
/// between them was `Logical` and failed because replication could not copy
/// the data (not a cutover that ran out of time, nor a migration). Pure.
fn copy_after_failure(last: Option<&LastMove>, from: &str, to: &str) -> Option<String> {
    let last = last?;
    (last.result == "Failed"
        && last.strategy == STRATEGY_LOGICAL
        && last.from == from
        && last.to == to
        && last.message.contains(CANNOT_REPLICATE))
    .then(|| {
        format!(
            "the last Logical move from shard {from} to {to} failed ({}): this one copies, writes stop for the copy",
            last.message
        )
    })
}

/// A failed copy: before the commit (rolled back) or after it (finished
/// later).
enum Failure {
    BeforeCommit(MoveError),
    AfterCommit(MoveError),
}

/// The move `m` by its strategy, from the first step to the commit and
/// the target's login on.
#[allow(clippy::too_many_arguments)]
async fn run(
    ctx: &Context,
    t: &Tenant,
    name: &TenantName,
    uid: &str,
    from: &Arc<ShardConn>,
    to: &Arc<ShardConn>,
    desired: &DesiredDb,
    m: MoveStatus,
) -> Result<(), Failure> {
    let committed = if m.strategy == STRATEGY_LOGICAL {
        replicate_until_commit(ctx, t, name, uid, from, to, desired, m).await
    } else {
        copy_until_commit(ctx, t, name, uid, from, to, desired, m).await
    }
    .map_err(Failure::BeforeCommit)?;
    finish(ctx, t, name, uid, from, to, desired, committed)
        .await
        .map_err(Failure::AfterCommit)
}

/// A move at its commit: the tenant is on the target, login still off.
struct Committed {
    m: MoveStatus,
    /// When writes stopped on the source.
    stopped: Instant,
    /// The app role's password (from its Secret), kept across the move.
    password: Option<zeroize::Zeroizing<String>>,
    /// What was copied (`lastMove.bytes`).
    bytes: i64,
    /// For the `Moved` audit row.
    detail: serde_json::Value,
    ring: Arc<crate::crypto::Keyring>,
}

/// What both strategies read of the source when they start.
struct Start {
    ring: Arc<crate::crypto::Keyring>,
    /// The source's catalog of the tenant.
    catalog: crate::pg::tenant::CatalogState,
    /// The app role's password (from its Secret), kept across the move.
    password: Option<zeroize::Zeroizing<String>>,
    /// The spec's database state with the login off.
    off: DesiredDb,
}

impl Start {
    fn password(&self) -> Option<&str> {
        self.password.as_ref().map(|p| p.as_str())
    }
}

/// The move's start: `status.moving` written and an Event; the keys and
/// the source's state read.
#[allow(clippy::too_many_arguments)]
async fn begin(
    ctx: &Context,
    t: &Tenant,
    name: &TenantName,
    uid: &str,
    from: &ShardConn,
    to: &ShardConn,
    desired: &DesiredDb,
    m: &MoveStatus,
) -> Result<Start, MoveError> {
    write_moving(ctx, t, uid, &from.name, m).await?;
    crate::controller::kit::event(
        ctx,
        t,
        false,
        "MoveStarted",
        format!("moving to shard {} ({}: {})", to.name, m.strategy, m.strategy_reason),
    )
    .await;
    let ring = ctx
        .keys
        .current()
        .ok_or_else(|| MoveError::Other("the root keys are not loaded".into()))?;
    let observed = super::observe::observe(ctx, &from.pool, name)
        .await
        .map_err(|e| MoveError::Other(e.to_string()))?;
    let password = observed.secret_password();
    Ok(Start {
        ring,
        catalog: observed.catalog.clone(),
        password,
        off: DesiredDb {
            login: false,
            ..desired.clone()
        },
    })
}

/// The target made ready, login off: the registry row (same uid, key salt
/// and key version), the roles, the schema and its audit objects.
async fn make_target(
    from: &ShardConn,
    to: &ShardConn,
    name: &TenantName,
    uid: &str,
    start: &Start,
) -> Result<(), MoveError> {
    crate::pg::registry::copy_row(&from.pool, &to.pool, uid).await?;
    let catalog = crate::pg::tenant::observe(&to.pool, name).await?;
    super::converge_db(
        &to.pool,
        &start.ring,
        name,
        uid,
        &start.off,
        &catalog,
        start.password(),
        ACTOR,
    )
    .await?;
    Ok(())
}

/// Writes stop on the source: login off, the gateway's grant revoked, the
/// app's sessions ended, and waited for (a commit under way when a session
/// is signalled is in the WAL, or in the dump, before the copy goes on).
async fn stop_writes(from: &ShardConn, name: &TenantName, uid: &str, start: &Start) -> Result<Instant, MoveError> {
    super::converge_db(
        &from.pool,
        &start.ring,
        name,
        uid,
        &start.off,
        &start.catalog,
        start.password(),
        ACTOR,
    )
    .await?;
    crate::pg::tenant::end_sessions_and_wait(&from.pool, name, Duration::from_secs(10)).await?;
    crate::pg::tenant::fence_writes(&from.pool, name, Duration::from_secs(10)).await?;
    Ok(Instant::now())
}

/// A `Copy` move's private backup folder when the operator runs without a
/// backup store: removed (with the sealed dump in it) when dropped.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(uid: &str) -> Self {
        Scratch(std::env::temp_dir().join(format!(
            "tenant-operator-move-{}-{:016x}",
            crate::pg::replication::object_name(uid),
            rand::random::<u64>()
        )))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Who the audit log names for a move's steps.
const ACTOR: &str = "tenant-operator (move)";

/// Strategy `Logical`, up to the commit: the target made (registry row,
/// roles, schema without data), the data replicated while the tenant
/// serves, then the cutover.
#[allow(clippy::too_many_arguments)]
async fn replicate_until_commit(
    ctx: &Context,
    t: &Tenant,
    name: &TenantName,
    uid: &str,
    from: &Arc<ShardConn>,
    to: &Arc<ShardConn>,
    desired: &DesiredDb,
    mut m: MoveStatus,
) -> Result<Committed, MoveError> {
    use crate::pg::replication;
    let start = begin(ctx, t, name, uid, from, to, desired, &m).await?;
    let ring = start.ring.clone();
    let schema = name.schema();
    // 1. The target: registry row, roles and schema (login off), then the
    // source's schema without its data.
    make_target(from, to, name, uid, &start).await?;
    let tools = crate::backup::Tools::default();
    let from_access = crate::backup::TenantAccess::derive(&from.pool, &from.target, name, &ring).await?;
    let to_access = crate::backup::TenantAccess::derive(&to.pool, &to.target, name, &ring).await?;
    crate::backup::copy_schema(&to.pool, &from_access, &to_access, &tools, ACTOR).await?;
    // 2. Publication, slot and subscription: the tables copied, then
    // every change streamed, while the tenant serves from the source.
    let secret = replication::publish(&from.pool, &schema, uid).await?;
    replication::subscribe(
        &to.pool,
        &from.target,
        crate::backup::libpq_ssl_mode(&from.target),
        uid,
        &secret,
    )
    .await?;
    drop(secret);
    let bytes = follow_copy(ctx, t, uid, from, to, &schema, &mut m).await?;
    crate::controller::kit::event(
        ctx,
        t,
        false,
        "MoveCopied",
        format!(
            "the tenant's tables are on shard {} ({bytes} bytes) and follow the source; cutting over",
            to.name
        ),
    )
    .await;
    // 3. The cutover: writes stop; the target applies the source's last
    // change; the sequences follow.
    m.phase = MovePhase::CuttingOver;
    write_moving(ctx, t, uid, &from.name, &m).await?;
    crate::controller::kit::event(
        ctx,
        t,
        false,
        "MoveCuttingOver",
        format!(
            "writes stop on shard {} until shard {} has the last change",
            from.name, to.name
        ),
    )
    .await;
    // No migration of the tenant runs on the source from here to the
    // commit (one under way is waited for). Not held during the copy: the
    // lock's transaction has an xid, and a replication slot (the table-sync
    // workers' too) waits for every transaction with one to end.
    let mut migrations_held = crate::pg::locks::hold_migrations(&from.pool, uid, CATCH_UP_LIMIT).await?;
    let stopped = stop_writes(from, name, uid, &start).await?;
    if let Some(ms) = std::env::var(PAUSE_IN_CUTOVER_VAR)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let lsn = replication::current_lsn(&from.pool).await?;
    let caught_up = replication::wait_applied(&to.pool, uid, &lsn, CATCH_UP_LIMIT).await?;
    // The migration lock still held (its session alive), and the
    // publication still the live schema's (a restore would have replaced
    // it).
    sqlx::query("SELECT 1")
        .execute(&mut *migrations_held)
        .await
        .map_err(|e| MoveError::Other(format!("the migration lock on shard {} was lost: {e}", from.name)))?;
    if !replication::publishes(&from.pool, &schema, uid).await? {
        return Err(MoveError::Other(
            "the tenant's schema on the source was replaced during the copy (a restore?)".into(),
        ));
    }
    // DDL on the source since its schema was copied (a migration, which
    // runs as the ops login, not stopped above) did not replicate.
    if replication::schema_fingerprint(&from.pool, &schema).await?
        != replication::schema_fingerprint(&to.pool, &schema).await?
    {
        return Err(MoveError::Other(
            "the tenant's schema changed on the source during the copy (a migration?); the target's differs".into(),
        ));
    }
    let sequences = replication::sequences(&from.pool, &schema).await?;
    replication::set_sequences(&to.pool, &schema, &sequences).await?;
    // The replication objects go before the commit (the source is known
    // reachable here): the subscription with its slot, the publication,
    // the replication login.
    replication::clear(&to.pool, uid).await?;
    replication::clear(&from.pool, uid).await?;
    // The replicated audit chain is anchored on the target as after a
    // restore (its head read there, recorded).
    crate::pg::audit::rebase_after_restore(
        &to.pool,
        &ring,
        &to_access.login,
        ACTOR,
        serde_json::json!({ "move": { "from": from.name, "to": to.name } }),
    )
    .await?;
    if let Some(cfg) = ctx.settings.backup.store.as_ref() {
        let store = crate::backup::Store::open(cfg)?;
        crate::backup::sync_registry(&to.pool, &store, uid).await?;
    }
    tracing::info!(tenant = %name, to = %to.name, lsn = %lsn, caught_up_ms = caught_up.as_millis() as u64, sequences = sequences.len(), "cutover: the target has the source's last change");
    // 4. Commit.
    m.phase = MovePhase::CleaningUp;
    (m.bytes_copied, m.bytes_total, m.lag_bytes, m.tables_pending) = (None, None, None, None);
    commit(ctx, t, uid, to, &m).await?;
    // Migrations follow `status.shard` to the target from here.
    let _ = migrations_held.rollback().await;
    Ok(Committed {
        m,
        stopped,
        password: start.password,
        bytes,
        detail: serde_json::json!({ "strategy": STRATEGY_LOGICAL, "lsn": lsn, "sequences": sequences.len() }),
        ring,
    })
}

/// Waits for the subscription's initial copy and for the target to come
/// within [`CUTOVER_LAG`] of the source, writing bytes and lag to
/// `status.moving` every few seconds when they change. Gives the bytes on
/// the target.
async fn follow_copy(
    ctx: &Context,
    t: &Tenant,
    uid: &str,
    from: &ShardConn,
    to: &ShardConn,
    schema: &str,
    m: &mut MoveStatus,
) -> Result<i64, MoveError> {
    use crate::pg::replication;
    let mut written = Instant::now();
    let mut progressed = (Instant::now(), -1i64, i64::MAX);
    loop {
        let state = replication::sync_state(&to.pool, schema, uid)
            .await?
            .ok_or_else(|| MoveError::Other(format!("the move's subscription on shard {} is gone", to.name)))?;
        if state.disabled || state.errors > 0 {
            return Err(MoveError::Other(format!(
                "{CANNOT_REPLICATE}: the subscription on shard {} stopped on an error ({} error(s); the target server's log says which)",
                to.name, state.errors
            )));
        }
        let (total, lag) = replication::source_state(&from.pool, schema, uid).await?;
        let lag =
            lag.ok_or_else(|| MoveError::Other(format!("the move's replication slot on shard {} is gone", from.name)))?;
        if state.tables_pending == 0 && lag <= CUTOVER_LAG {
            return Ok(state.bytes);
        }
        if state.bytes > progressed.1 || lag < progressed.2 {
            progressed = (Instant::now(), state.bytes, lag);
        } else if progressed.0.elapsed() > STALL_LIMIT {
            return Err(MoveError::Other(format!(
                "{CANNOT_REPLICATE}: the copy to shard {} made no progress for {} s ({} of {} bytes, {lag} bytes behind; can the target's server reach the source's?)",
                to.name,
                STALL_LIMIT.as_secs(),
                state.bytes,
                total
            )));
        }
        let now = (Some(state.bytes), Some(total), Some(lag), Some(state.tables_pending));
        if written.elapsed() >= Duration::from_secs(3)
            && now != (m.bytes_copied, m.bytes_total, m.lag_bytes, m.tables_pending)
        {
            (m.bytes_copied, m.bytes_total, m.lag_bytes, m.tables_pending) = now;
            write_moving(ctx, t, uid, &from.name, m).await?;
            written = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The commit: `status.shard` names the target (and `moving` says
/// CleaningUp) from here on.
async fn commit(ctx: &Context, t: &Tenant, uid: &str, to: &ShardConn, m: &MoveStatus) -> Result<(), MoveError> {
    write_moving(ctx, t, uid, &to.name, m).await
}

/// `status.shard` and `status.moving` written, `lastMove` kept.
async fn write_moving(ctx: &Context, t: &Tenant, uid: &str, shard: &str, m: &MoveStatus) -> Result<(), MoveError> {
    placement::write(
        ctx,
        t,
        uid,
        &State {
            shard: shard.to_owned(),
            moving: Some(m.clone()),
            last_move: t.status.as_ref().and_then(|s| s.last_move.as_deref().cloned()),
        },
    )
    .await?;
    Ok(())
}

/// Steps 1 to 4: writes stopped, the target prepared and filled, the
/// commit.
#[allow(clippy::too_many_arguments)]
async fn copy_until_commit(
    ctx: &Context,
    t: &Tenant,
    name: &TenantName,
    uid: &str,
    from: &Arc<ShardConn>,
    to: &Arc<ShardConn>,
    desired: &DesiredDb,
    mut m: MoveStatus,
) -> Result<Committed, MoveError> {
    let start = begin(ctx, t, name, uid, from, to, desired, &m).await?;
    let ring = start.ring.clone();
    // 1. Writes stop on the source.
    let stopped = stop_writes(from, name, uid, &start).await?;
    // 2. The registry row (same uid and key salt) and the roles and schema
    // on the target, login off.
    make_target(from, to, name, uid, &start).await?;
    // 3. The data: a backup of the source (sealed under the tenant's
    // backup key) restored into the target: through the backup store, or,
    // when the operator runs without one, a private folder of its own
    // removed after the move (the backup is then not kept).
    let (store, scratch) = match ctx.settings.backup.store.as_ref() {
        Some(cfg) => (crate::backup::Store::open(cfg)?, None),
        None => {
            let scratch = Scratch::new(uid);
            let cfg = crate::backup::StoreConfig {
                url: format!("file://{}", scratch.0.display()),
                ..Default::default()
            };
            (crate::backup::Store::open(&cfg)?, Some(scratch))
        }
    };
    let tools = crate::backup::Tools::default();
    let access = crate::backup::TenantAccess::derive(&from.pool, &from.target, name, &ring).await?;
    let taken = crate::backup::backup(&access, &tools, &store, crate::backup::Retention::default()).await?;
    if scratch.is_none() {
        crate::backup::record(&from.pool, &taken).await?;
    }
    let access = crate::backup::TenantAccess::derive(&to.pool, &to.target, name, &ring).await?;
    let selector = crate::backup::Selector::Id(taken.manifest.id.clone());
    crate::backup::restore(&to.pool, &ring, &access, &tools, &store, &selector, ACTOR).await?;
    if scratch.is_none() {
        crate::backup::sync_registry(&to.pool, &store, uid).await?;
    }
    drop(scratch);
    // 4. Commit: the tenant is on the target from here on.
    m.phase = MovePhase::CleaningUp;
    commit(ctx, t, uid, to, &m).await?;
    Ok(Committed {
        m,
        stopped,
        password: start.password,
        bytes: taken.manifest.bytes as i64,
        detail: serde_json::json!({ "strategy": STRATEGY_COPY, "backup": taken.manifest.id }),
        ring,
    })
}

/// Steps 5 and 6, after the commit: login on at the target, the source's
/// copy dropped, `lastMove` written.
#[allow(clippy::too_many_arguments)]
async fn finish(
    ctx: &Context,
    t: &Tenant,
    name: &TenantName,
    uid: &str,
    from: &Arc<ShardConn>,
    to: &Arc<ShardConn>,
    desired: &DesiredDb,
    committed: Committed,
) -> Result<(), MoveError> {
    let Committed {
        m,
        stopped,
        password,
        bytes,
        detail,
        ring,
    } = committed;
    let actor = ACTOR;
    // 5. Login on at the target (as the spec says).
    let catalog = crate::pg::tenant::observe(&to.pool, name).await?;
    super::converge_db(
        &to.pool,
        &ring,
        name,
        uid,
        desired,
        &catalog,
        password.as_ref().map(|p| p.as_str()),
        actor,
    )
    .await?;
    let window = stopped.elapsed();
    crate::pg::registry::record_event(&to.pool, uid, Some(name.as_str()), "Moved", actor, {
        let mut d =
            serde_json::json!({ "from": from.name, "to": to.name, "writeUnavailableMs": window.as_millis() as i64 });
        if let (Some(d), Some(more)) = (d.as_object_mut(), detail.as_object()) {
            d.extend(more.clone());
        }
        d
    })
    .await?;
    let done = LastMove {
        from: from.name.clone(),
        to: to.name.clone(),
        strategy: m.strategy.clone(),
        result: "Succeeded".into(),
        started_at: m.started_at.clone(),
        finished_at: now(),
        write_unavailable_ms: Some(window.as_millis() as i64),
        bytes: Some(bytes),
        message: m.strategy_reason.clone(),
        generation: t.metadata.generation,
    };
    tracing::info!(tenant = %name, from = %from.name, to = %to.name, strategy = %m.strategy, write_unavailable_ms = window.as_millis() as u64, bytes, "tenant moved");
    // A test hook (failpoint): hold the move between its commit and the
    // source's drop, so that a test can take the source down there.
    if let Some(ms) = std::env::var(PAUSE_AFTER_COMMIT_VAR)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    // 6. The source's copy.
    let cleaned = drop_source(name, uid, from).await;
    placement::write(
        ctx,
        t,
        uid,
        &State {
            shard: to.name.clone(),
            moving: cleaned.is_err().then(|| m.clone()),
            last_move: Some(done.clone()),
        },
    )
    .await?;
    crate::controller::kit::event(
        ctx,
        t,
        false,
        "Moved",
        format!(
            "moved from shard {} to {} ({}): writes unavailable for {} ms",
            from.name,
            to.name,
            m.strategy,
            window.as_millis()
        ),
    )
    .await;
    if let Err(e) = cleaned {
        tracing::warn!(tenant = %name, shard = %from.name, error = %e, "dropping the moved tenant's source copy failed; retrying");
    }
    Ok(())
}

/// Drops the tenant from `shard` and checks nothing is left there.
async fn drop_source(name: &TenantName, uid: &str, shard: &ShardConn) -> Result<(), MoveError> {
    crate::pg::replication::clear(&shard.pool, uid).await?;
    crate::pg::tenant::drop_tenant(&shard.pool, name, uid, ACTOR).await?;
    let mut left = crate::pg::tenant::leftovers(&shard.pool, name, uid).await?;
    left.extend(crate::pg::replication::leftovers(&shard.pool, uid).await?);
    if left.is_empty() {
        Ok(())
    } else {
        Err(MoveError::Other(format!(
            "still present after drop: {}",
            left.join(", ")
        )))
    }
}

/// After the commit: drops the source's copy, then clears `moving`.
async fn clean_up(
    ctx: &Context,
    t: &Tenant,
    name: &TenantName,
    uid: &str,
    current: &Arc<ShardConn>,
    m: &MoveStatus,
) -> Result<(), MoveError> {
    let from = ctx
        .shards
        .get(&m.from)
        .ok_or_else(|| MoveError::Other(format!("the move's source shard {} is not open", m.from)))?;
    drop_source(name, uid, &from).await?;
    placement::write(
        ctx,
        t,
        uid,
        &State {
            shard: current.name.clone(),
            moving: None,
            last_move: t.status.as_ref().and_then(|s| s.last_move.as_deref().cloned()),
        },
    )
    .await?;
    Ok(())
}

/// Before the commit: drops the target's copy and, with `why` (result,
/// message), records how the move ended (a new `lastMove` and an Event);
/// the source serves again once the reconcile converges it.
async fn roll_back(
    ctx: &Context,
    t: &Tenant,
    name: &TenantName,
    uid: &str,
    m: &MoveStatus,
    why: Option<(&str, &str)>,
) -> Result<(), MoveError> {
    let mut back = m.clone();
    back.phase = MovePhase::RollingBack;
    let ended = match why {
        Some((result, message)) => Some(LastMove {
            from: m.from.clone(),
            to: m.to.clone(),
            strategy: m.strategy.clone(),
            result: result.into(),
            started_at: m.started_at.clone(),
            finished_at: now(),
            write_unavailable_ms: None,
            bytes: None,
            message: message.to_owned(),
            generation: t.metadata.generation,
        }),
        None => t.status.as_ref().and_then(|s| s.last_move.as_deref().cloned()),
    };
    // The target's copy, when its shard is reachable (else kept in
    // `moving` as RollingBack and retried).
    // A `Logical` move's subscription goes first (with its slot on the
    // source), then what the source holds of it.
    let cleaned = match ctx.shards.get(&m.to) {
        Some(to) => drop_source(name, uid, &to).await,
        None => Err(MoveError::Other(format!("shard {} is not open", m.to))),
    };
    // The source's slot, publication and login go whatever became of the
    // target (a slot left there would hold the source's WAL).
    let source = match ctx.shards.get(&m.from) {
        Some(from) => crate::pg::replication::clear(&from.pool, uid)
            .await
            .map_err(MoveError::from),
        None => Err(MoveError::Other(format!("shard {} is not open", m.from))),
    };
    let cleaned = cleaned.and(source);
    if let Err(e) = &cleaned {
        tracing::warn!(tenant = %name, shard = %m.to, error = %e, "dropping the failed move's target copy failed; retrying");
    }
    placement::write(
        ctx,
        t,
        uid,
        &State {
            shard: m.from.clone(),
            moving: cleaned.is_err().then_some(back),
            last_move: ended,
        },
    )
    .await?;
    if let Some((result, message)) = why {
        let note = format!(
            "moving to shard {} ended ({result}) and was rolled back: {message}",
            m.to
        );
        crate::controller::kit::event(ctx, t, true, "MoveRolledBack", note).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(wanted: Option<&str>, moving: Option<MovePhase>, last: Option<(&str, i64, &str)>) -> Tenant {
        let mut spec = serde_json::json!({});
        if let Some(w) = wanted {
            spec["placement"] = serde_json::json!({ "shard": w });
        }
        let mut t = Tenant::new("acme", serde_json::from_value(spec).unwrap());
        t.metadata.generation = Some(3);
        t.status = Some(crate::api::TenantStatus {
            shard: Some("a".into()),
            moving: moving.map(|phase| {
                Box::new(MoveStatus {
                    from: "a".into(),
                    to: "b".into(),
                    phase,
                    strategy: STRATEGY_COPY.into(),
                    strategy_reason: String::new(),
                    started_at: "2026-12-02T00:00:00Z".into(),
                    bytes_copied: None,
                    bytes_total: None,
                    lag_bytes: None,
                    tables_pending: None,
                })
            }),
            last_move: last.map(|(result, generation, at)| {
                Box::new(LastMove {
                    from: "a".into(),
                    to: "b".into(),
                    strategy: STRATEGY_COPY.into(),
                    result: result.into(),
                    started_at: at.into(),
                    finished_at: at.into(),
                    write_unavailable_ms: None,
                    bytes: None,
                    message: "boom".into(),
                    generation: Some(generation),
                })
            }),
            ..Default::default()
        });
        t
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    const OPEN: Target = Target::Open {
        state: ShardState::Open,
        has_room: true,
    };

    #[test]
    fn a_new_shard_in_the_spec_starts_a_move_when_it_can() {
        let now = at("2026-12-02T01:00:00Z");
        assert_eq!(decide(&tenant(None, None, None), "a", None, OPEN, now), Decision::Stay);
        assert_eq!(
            decide(&tenant(Some("a"), None, None), "a", Some("a"), OPEN, now),
            Decision::Stay
        );
        assert_eq!(
            decide(&tenant(Some("b"), None, None), "a", Some("b"), OPEN, now),
            Decision::Start("b".into())
        );
        let reason = |d: Decision| match d {
            Decision::Blocked { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            reason(decide(
                &tenant(Some("b"), None, None),
                "a",
                Some("b"),
                Target::Unknown,
                now
            )),
            "ShardNotFound"
        );
        let closed = Target::Open {
            state: ShardState::Closed,
            has_room: true,
        };
        assert_eq!(
            reason(decide(&tenant(Some("b"), None, None), "a", Some("b"), closed, now)),
            "ShardNotOpen"
        );
        let full = Target::Open {
            state: ShardState::Open,
            has_room: false,
        };
        assert_eq!(
            reason(decide(&tenant(Some("b"), None, None), "a", Some("b"), full, now)),
            "ShardFull"
        );
    }

    #[test]
    fn a_failed_move_waits_ten_minutes_or_a_spec_change() {
        let failed = tenant(Some("b"), None, Some(("Failed", 3, "2026-12-02T01:00:00Z")));
        let soon = at("2026-12-02T01:05:00Z");
        assert!(matches!(
            decide(&failed, "a", Some("b"), OPEN, soon),
            Decision::Blocked {
                reason: "MoveFailed",
                ..
            }
        ));
        assert_eq!(
            decide(&failed, "a", Some("b"), OPEN, at("2026-12-02T01:11:00Z")),
            Decision::Start("b".into())
        );
        let changed = tenant(Some("b"), None, Some(("Failed", 2, "2026-12-02T01:00:00Z")));
        assert_eq!(
            decide(&changed, "a", Some("b"), OPEN, soon),
            Decision::Start("b".into())
        );
        let succeeded_back = tenant(Some("b"), None, Some(("Succeeded", 3, "2026-12-02T01:00:00Z")));
        assert_eq!(
            decide(&succeeded_back, "a", Some("b"), OPEN, soon),
            Decision::Start("b".into())
        );
    }

    #[test]
    fn a_logical_move_that_could_not_replicate_is_followed_by_a_copy() {
        let last = |strategy: &str, result: &str, message: &str| LastMove {
            from: "a".into(),
            to: "b".into(),
            strategy: strategy.into(),
            result: result.into(),
            started_at: String::new(),
            finished_at: String::new(),
            write_unavailable_ms: None,
            bytes: None,
            message: message.into(),
            generation: Some(1),
        };
        let stalled = last(
            STRATEGY_LOGICAL,
            "Failed",
            &format!("{CANNOT_REPLICATE}: the copy to shard b made no progress"),
        );
        assert!(copy_after_failure(Some(&stalled), "a", "b")
            .unwrap()
            .contains("this one copies"));
        // Not for another pair of shards, a cutover's failure, a copy's, a
        // success, or an interruption.
        assert_eq!(copy_after_failure(Some(&stalled), "a", "c"), None);
        assert_eq!(copy_after_failure(Some(&stalled), "c", "b"), None);
        let schema = last(STRATEGY_LOGICAL, "Failed", "the tenant's schema changed on the source");
        assert_eq!(copy_after_failure(Some(&schema), "a", "b"), None);
        let copy = last(STRATEGY_COPY, "Failed", CANNOT_REPLICATE);
        assert_eq!(copy_after_failure(Some(&copy), "a", "b"), None);
        let fine = last(STRATEGY_LOGICAL, "Succeeded", CANNOT_REPLICATE);
        assert_eq!(copy_after_failure(Some(&fine), "a", "b"), None);
        let cut = last(STRATEGY_LOGICAL, "Interrupted", CANNOT_REPLICATE);
        assert_eq!(copy_after_failure(Some(&cut), "a", "b"), None);
        assert_eq!(copy_after_failure(None, "a", "b"), None);
    }

    #[test]
    fn a_move_found_under_way_is_rolled_back_before_the_commit_and_cleaned_up_after() {
        let now = at("2026-12-02T01:00:00Z");
        assert!(matches!(
            decide(
                &tenant(Some("b"), Some(MovePhase::Copying), None),
                "a",
                Some("b"),
                OPEN,
                now
            ),
            Decision::RollBack(_)
        ));
        assert!(matches!(
            decide(
                &tenant(Some("b"), Some(MovePhase::RollingBack), None),
                "a",
                Some("b"),
                OPEN,
                now
            ),
            Decision::RollBack(_)
        ));
        assert!(matches!(
            decide(
                &tenant(Some("b"), Some(MovePhase::CleaningUp), None),
                "b",
                Some("b"),
                OPEN,
                now
            ),
            Decision::CleanUp(_)
        ));
    }
}
