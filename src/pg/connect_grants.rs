//! `GRANT CONNECT ON DATABASE` for tenants' logins, batched.
//!
//! Every tenant's app and ops logins need CONNECT on the database, and the
//! database's ACL is one `pg_database` row: each GRANT rewrites all of it
//! (two entries per tenant), works out the admin's whole role membership
//! to choose the grantor (two roles per tenant), and must hold the
//! database-ACL lock ([`super::LOCK_DATABASE_ACL`]) to commit, because a
//! second writer of that row fails instead of waiting. One GRANT per
//! tenant made every provisioning of a burst wait on the others' GRANTs in
//! turn (65 s of lock waits over 1,000 tenants, docs/scale.md).
//!
//! So the grants of tenants reconciled at the same time are combined: a
//! caller queues its logins; whoever holds the run lock takes everything
//! queued and grants it in one transaction (one lock, one ACL rewrite, one
//! commit), and answers every caller in it. Callers that arrive while a
//! batch runs form the next one. No background task: the caller that finds
//! the lock free runs the batch on its own pool. A batch that fails is run
//! again one caller at a time, so each caller gets its own answer (a
//! tenant's failure is not another's).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use sqlx::PgPool;
use tokio::sync::oneshot;

use super::{query_err, quote_ident, PgError, LOCK_DATABASE_ACL};

type Reply = oneshot::Sender<Result<usize, PgError>>;

#[derive(Default)]
struct Combiner {
    queued: Mutex<Vec<(Vec<String>, Reply)>>,
    run: tokio::sync::Mutex<()>,
}

/// One combiner per database (host, port, name): the pools of one shard
/// are interchangeable for this.
fn combiner(key: String) -> Arc<Combiner> {
    static ALL: OnceLock<Mutex<HashMap<String, Arc<Combiner>>>> = OnceLock::new();
    let mut all = ALL
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    all.entry(key).or_default().clone()
}

/// Grants CONNECT on the pool's database (`database`, its name) to those
/// of `logins` that exist and lack it, combined with the grants other
/// reconciles ask for at the same time. Returns the number of statements
/// run for this caller (1 when its batch granted anything, else 0).
pub async fn grant_connect(pool: &PgPool, database: &str, logins: Vec<String>) -> Result<usize, PgError> {
    let opts = pool.connect_options();
    let combiner = combiner(format!("{}:{}/{database}", opts.get_host(), opts.get_port()));
    loop {
        let (tx, mut rx) = oneshot::channel();
        combiner
            .queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((logins.clone(), tx));
        let answer = tokio::select! {
            answer = &mut rx => answer.map_err(|_| ()),
            guard = combiner.run.lock() => {
                // An earlier batch may have taken (and answered) this
                // caller's request before the lock came free.
                match rx.try_recv() {
                    Ok(answer) => Ok(answer),
                    Err(oneshot::error::TryRecvError::Closed) => Err(()),
                    Err(oneshot::error::TryRecvError::Empty) => {
                        let batch = std::mem::take(&mut *combiner.queued.lock().unwrap_or_else(|p| p.into_inner()));
                        run_batch(pool, database, batch).await;
                        drop(guard);
                        rx.await.map_err(|_| ())
                    }
                }
            }
        };
        match answer {
            Ok(answer) => return answer,
            // The caller running the batch that held this request was
            // cancelled (shutdown) before it answered: queue it again.
            Err(_) => continue,
        }
    }
}

async fn run_batch(pool: &PgPool, database: &str, batch: Vec<(Vec<String>, Reply)>) {
    if batch.is_empty() {
        return;
    }
    let all: BTreeSet<&str> = batch.iter().flat_map(|(l, _)| l.iter().map(String::as_str)).collect();
    let all: Vec<&str> = all.into_iter().collect();
    match grant(pool, database, &all).await {
        Ok(n) => {
            for (_, reply) in batch {
                let _ = reply.send(Ok(n.min(1)));
            }
        }
        Err(e) if batch.len() == 1 => {
            let (_, reply) = batch.into_iter().next().expect("one");
            let _ = reply.send(Err(e));
        }
        Err(e) => {
            tracing::debug!(error = %e, callers = batch.len(), "a combined CONNECT grant failed; granting one caller at a time");
            for (logins, reply) in batch {
                let logins: Vec<&str> = logins.iter().map(String::as_str).collect();
                let _ = reply.send(grant(pool, database, &logins).await);
            }
        }
    }
}

/// One transaction: the ACL lock, the logins that exist and lack CONNECT
/// (read under the lock: a tenant dropped meanwhile has committed), one
/// GRANT for them. Returns 1 when it granted, 0 when nothing was missing.
async fn grant(pool: &PgPool, database: &str, logins: &[&str]) -> Result<usize, PgError> {
    let mut tx = pool.begin().await.map_err(query_err("starting a transaction"))?;
    sqlx::raw_sql(LOCK_DATABASE_ACL)
        .execute(&mut *tx)
        .await
        .map_err(query_err("GrantConnect"))?;
    let missing: Vec<String> = sqlx::query_scalar(
        // has_database_privilege, not aclexplode over the ACL: exploding two
        // entries per tenant took 34 ms at 1,000 tenants, under the lock.
        "SELECT r.rolname::text FROM pg_roles r
          WHERE r.rolname = ANY ($1) AND NOT has_database_privilege(r.oid, current_database(), 'CONNECT')
          ORDER BY 1",
    )
    .bind(logins)
    .fetch_all(&mut *tx)
    .await
    .map_err(query_err("GrantConnect"))?;
    if missing.is_empty() {
        return Ok(0);
    }
    let to = missing
        .iter()
        .map(|r| quote_ident(r))
        .collect::<Result<Vec<_>, _>>()?
        .join(", ");
    // The commit does not wait for the disk (`synchronous_commit` off): the
    // batch holds the database-ACL lock, which every other tenant's grant
    // waits for, until it ends, and with fsync on the flush was most of
    // it. A grant lost with the last fraction of a second's WAL in a crash
    // fails closed (a login that cannot connect yet) and is made again by
    // the tenant's next reconcile; a new tenant's later steps commit
    // synchronously, which flushes it with them, before it is Ready.
    // Revokes keep the synchronous commit.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET LOCAL synchronous_commit = off; GRANT CONNECT ON DATABASE {} TO {to}",
        quote_ident(database)?
    )))
    .execute(&mut *tx)
    .await
    .map_err(query_err("GrantConnect"))?;
    tx.commit()
        .await
        .map_err(query_err("committing the database's CONNECT grant"))?;
    Ok(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_combiner_per_database() {
        let a = combiner("h:1/a".into());
        let b = combiner("h:1/a".into());
        let c = combiner("h:1/b".into());
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
    }
}
