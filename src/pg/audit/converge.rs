//! The audit half of a reconcile ([`converge`]) and of a migration's
//! transaction ([`statements_in_tx`]): observe, plan, run; and the record
//! of the tables left unaudited ([`record_exclusion`]).
//!
//! Takes the admin pool (or the migration's connection), the root keys, a
//! validated [`TenantName`] and its uid; gives what was done. Side effects:
//! writes the anchor function and the app role's pgaudit setting (admin),
//! the audit objects in the tenant schema (a confined session, as the
//! owner), prunes when due (see [`super::retention`]), and writes
//! `tenancy.tenants` and `tenancy.audit_log` for an exclusion change.

use chrono::Utc;
use sqlx::{Acquire, Connection, PgConnection, PgPool};

use super::observe::{observe, observe_anchor, observe_in_tx, observe_pgaudit};
use super::plan::{plan, plan_anchor, read_auditing, statements, AnchorState, AuditAction, ReadAuditing};
use super::retention::{prune_due, prune_on};
use super::session::{misshapen, open_confined};
use crate::crypto::Keyring;
use crate::names::TenantName;
use crate::pg::confined::Confined;
use crate::pg::{query_err, PgError};

/// Runs `actions` on `conn`, in the transaction the caller holds; owner
/// steps under `SET LOCAL ROLE <owner>` (left set: inside a migration the
/// role already is the owner). Returns the statements run.
async fn run(conn: &mut PgConnection, name: &TenantName, actions: &[AuditAction]) -> Result<usize, sqlx::Error> {
    let stmts = statements(name, actions)?;
    // All of them in one round trip (a migration rollout runs this for
    // every tenant).
    if !stmts.is_empty() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(stmts.join(";\n")))
            .execute(&mut *conn)
            .await?;
    }
    Ok(stmts.len())
}

/// The audit statements a migration's transaction needs (the triggers of
/// the tables it created; everything, should the audit objects be missing
/// or changed), read inside that transaction ([`observe_in_tx`]) and not
/// run: the caller sends them with its next statements. Leaves
/// `search_path` at `pg_catalog` and `plan_cache_mode` at
/// `force_generic_plan` for the rest of the transaction: the caller sets
/// both back in that same message (`migrations::run`), before anything of
/// the tenant's runs again.
pub async fn statements_in_tx(
    conn: &mut PgConnection,
    name: &TenantName,
    exclude: &[String],
) -> Result<Vec<String>, sqlx::Error> {
    let state = observe_in_tx(conn, name, exclude).await.map_err(into_sqlx)?;
    statements(name, &plan(&state, None))
}

fn into_sqlx(e: PgError) -> sqlx::Error {
    match e {
        PgError::Query { source, .. } => source,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

/// Records the tenant's unaudited tables (`spec.audit.excludeTables`,
/// sorted) in its registry row, where every migration's audit check reads
/// them with the ops login, and the change in `tenancy.audit_log`
/// (`AuditExclusionChanged`, with `actor`), in one transaction; called only
/// when the registry's list differs. Returns whether it changed.
pub async fn record_exclusion(
    pool: &PgPool,
    name: &TenantName,
    uid: &str,
    exclude: &[String],
    actor: &str,
) -> Result<bool, PgError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(query_err("starting the audit exclusion's transaction"))?;
    let before: Option<Vec<String>> = sqlx::query_scalar(
        "WITH old AS (SELECT audit_exclude FROM tenancy.tenants WHERE uid = $1 FOR UPDATE)
         UPDATE tenancy.tenants t SET audit_exclude = $2 FROM old
          WHERE t.uid = $1 AND old.audit_exclude IS DISTINCT FROM $2 RETURNING old.audit_exclude",
    )
    .bind(uid)
    .bind(exclude)
    .fetch_optional(&mut *tx)
    .await
    .map_err(query_err("recording the tables left unaudited"))?;
    let Some(before) = before else {
        return Ok(false);
    };
    let detail = serde_json::json!({"from": before, "to": exclude});
    crate::pg::registry::record_event(
        &mut *tx,
        uid,
        Some(name.as_str()),
        "AuditExclusionChanged",
        actor,
        detail,
    )
    .await?;
    tx.commit().await.map_err(query_err("committing the audit exclusion"))?;
    Ok(true)
}

/// What one audit convergence of a reconcile did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditOutcome {
    pub actions: Vec<AuditAction>,
    pub statements: usize,
    pub read_auditing: ReadAuditing,
    /// Rows removed by retention this time (None: no prune was due).
    pub pruned: Option<u64>,
}

/// How long the audit step waits for a migration run of the tenant under
/// way ([`converge_keeping`]); past it the reconcile fails with the reason
/// and is tried again.
const MIGRATION_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The audit half of a reconcile: observe (admin: catalogs and
/// `tenancy.*`), then converge the anchor function and the app role's
/// pgaudit setting (admin, one transaction) and the audit objects in the
/// schema (a confined session, one transaction, under the tenant's
/// migration lock); then prune when retention
/// is set and a day has passed since the last prune (the same confined
/// session). A converged tenant with nothing to prune runs no statement and
/// opens no confined session.
pub async fn converge(
    pool: &PgPool,
    ring: &Keyring,
    name: &TenantName,
    uid: &str,
    retention_days: Option<u32>,
    exclude: &[String],
) -> Result<AuditOutcome, PgError> {
    let (outcome, session) = converge_keeping(pool, ring, name, uid, retention_days, exclude).await?;
    if let Some(c) = session {
        c.close().await;
    }
    Ok(outcome)
}

/// [`converge`], giving back the confined session it opened (when it
/// opened one and did not prune on it), logged in and acting as nobody
/// ([`Confined::leave_owner`]), for the reconcile's next step of the same
/// tenant (a new schema's first migrations): one server process per new
/// tenant instead of two.
pub async fn converge_keeping(
    pool: &PgPool,
    ring: &Keyring,
    name: &TenantName,
    uid: &str,
    retention_days: Option<u32>,
    exclude: &[String],
) -> Result<(AuditOutcome, Option<Confined>), PgError> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(query_err("connecting to converge the audit log"))?;
    let state = observe(&mut conn, name, exclude).await?;
    if !state.misshapen.is_empty() {
        return Err(misshapen(name, &state.misshapen));
    }
    let anchor = if state.schema_exists {
        observe_anchor(&mut conn, name, uid).await?
    } else {
        AnchorState::default()
    };
    let pgaudit = observe_pgaudit(&mut conn, name).await?;
    let mut actions = plan(&state, Some(&pgaudit));
    actions.extend(plan_anchor(&state, &anchor, uid));
    let (admin, owner): (Vec<AuditAction>, Vec<AuditAction>) = actions.iter().cloned().partition(|a| !a.as_owner());
    let mut statements = 0;
    if !admin.is_empty() {
        let mut tx = conn
            .begin()
            .await
            .map_err(query_err("starting the audit log's transaction"))?;
        statements += run(&mut tx, name, &admin)
            .await
            .map_err(query_err("converging the audit log's anchoring"))?;
        tx.commit()
            .await
            .map_err(query_err("committing the audit log's anchoring"))?;
    }
    drop(conn);
    let mut session: Option<Confined> = None;
    if !owner.is_empty() {
        // A migration run creates the audit objects it finds missing in its
        // own transaction, under the tenant's migration lock: two sessions
        // creating the same table at once (`CREATE TABLE IF NOT EXISTS`
        // included) make one fail on pg_type's unique index, which a
        // rollout reaching a tenant still being provisioned recorded as a
        // failure of the tenant's first migration. So this step takes the
        // lock too (waiting for a run under way), and plans its owner steps
        // again from what it then finds. The login first, holding no admin
        // connection: a password reset borrows one from `pool`.
        let mut c = open_confined(pool, ring, name, uid).await?;
        let result = async {
            let mut held = crate::pg::locks::hold_migrations(pool, uid, MIGRATION_WAIT).await?;
            let again = observe(&mut held, name, exclude).await?;
            if !again.misshapen.is_empty() {
                return Err(misshapen(name, &again.misshapen));
            }
            let owner: Vec<AuditAction> = plan(&again, Some(&pgaudit))
                .into_iter()
                .chain(plan_anchor(&again, &anchor, uid))
                .filter(AuditAction::as_owner)
                .collect();
            let mut n = 0;
            if !owner.is_empty() {
                let ran = async {
                    let mut tx = Connection::begin(&mut *c).await?;
                    let n = run(&mut tx, name, &owner).await?;
                    tx.commit().await?;
                    Ok::<usize, sqlx::Error>(n)
                };
                n = ran.await.map_err(query_err("converging the audit log"))?;
            }
            held.commit()
                .await
                .map_err(query_err("releasing the tenant's migration lock"))?;
            Ok((owner, n))
        }
        .await;
        match result {
            Ok((again, n)) => {
                statements += n;
                // What was done: as planned, unless the plan under the lock
                // differs (a migration run made some of it meanwhile).
                if again != owner {
                    actions.retain(|a| !a.as_owner());
                    actions.extend(again);
                }
            }
            Err(e) => {
                c.close().await;
                return Err(e);
            }
        }
        session = Some(c);
    }
    let read = read_auditing(&pgaudit, &name.app_role(), &pgaudit.admin);
    let mut pruned = None;
    if state.schema_exists {
        if let Some(cutoff) = prune_due(retention_days, anchor.pruned_at, Utc::now()) {
            let mut c = match session.take() {
                Some(c) => c,
                None => open_confined(pool, ring, name, uid).await?,
            };
            let p = prune_on(pool, &mut c, name, uid, cutoff, "tenant-operator (retention)").await;
            c.close().await;
            let p = p?;
            statements += p.statements;
            pruned = Some(p.deleted);
        }
    }
    let session = match session {
        Some(c) => c.leave_owner().await,
        None => None,
    };
    Ok((
        AuditOutcome {
            actions,
            statements,
            read_auditing: read,
            pruned,
        },
        session,
    ))
}
