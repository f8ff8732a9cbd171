//! Logical replication for a tenant's move between shards (docs/shards.md,
//! "Moving a tenant": strategy `Logical`).
//!
//! On the source: a replication login of its own (`tenancy_move_<uid>`,
//! REPLICATION, reading only the tenant's schema), a publication of every
//! table of the tenant's schema and a logical replication slot; on the
//! target: a subscription to them, which copies the tables and then
//! streams their changes while the tenant keeps serving from the source.
//! All four carry the same name, derived from the tenant's uid, so that
//! [`clear`] finds and drops them on either side whatever step a move
//! stopped at.
//!
//! Postgres 15 allows CREATE SUBSCRIPTION, publications `FOR TABLES IN
//! SCHEMA` and roles with REPLICATION to superusers only: [`check`] says
//! whether both shards' admins may, and why not (the move then copies with
//! writes stopped). Statements that carry the replication login's password
//! run with statement logging off for their transaction.

use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::{query_err, quote_ident, quote_literal, PgError, Target};

/// The name of a move's publication, slot, subscription and replication
/// login: `tenancy_move_` and the uid's hex digits.
pub fn object_name(uid: &str) -> String {
    let hex: String = uid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    format!("tenancy_move_{hex}")
}

/// Whether a move from `from` to `to` can replicate the tenant's schema
/// `schema`: `Err` says why not (the move then copies with writes
/// stopped).
pub async fn check(from: &PgPool, to: &PgPool, schema: &str, to_name: &str, from_name: &str) -> Result<(), String> {
    type Side = (bool, String, i32, i64, i64, i64, i64);
    let side = |pool: &PgPool| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, Side>(
                "SELECT r.rolsuper, current_setting('wal_level'), current_setting('server_version_num')::int4,
                        current_setting('max_replication_slots')::int8 - (SELECT count(*) FROM pg_catalog.pg_replication_slots),
                        current_setting('max_logical_replication_workers')::int8,
                        current_setting('max_wal_senders')::int8 - (SELECT count(*) FROM pg_catalog.pg_stat_replication),
                        current_setting('max_sync_workers_per_subscription')::int8
                   FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
            )
            .fetch_one(&pool)
            .await
            .map_err(|e| format!("reading the admin's rights failed: {e}"))
        }
    };
    let (src_super, wal_level, src_version, free_slots, _, free_senders, _) = side(from).await?;
    let (dst_super, _, dst_version, _, workers, _, sync_workers) = side(to).await?;
    if src_version < 150000 || dst_version < 150000 {
        return Err("logical replication of a schema needs PostgreSQL 15 or later on both shards".into());
    }
    if !dst_super {
        return Err(format!(
            "logical replication needs CREATE SUBSCRIPTION, which PostgreSQL 15 allows superusers only, and the admin of shard {to_name} is not one"
        ));
    }
    if !src_super {
        return Err(format!(
            "logical replication needs a publication of the tenant's schema and a replication login on the source, which PostgreSQL 15 allows superusers only, and the admin of shard {from_name} is not one"
        ));
    }
    if wal_level != "logical" {
        return Err(format!(
            "shard {from_name} runs with wal_level={wal_level}; logical replication needs wal_level=logical"
        ));
    }
    // The move's slot, and one per table copied at once.
    let needed = 1 + sync_workers;
    if free_slots < needed {
        return Err(format!(
            "shard {from_name} has {free_slots} free replication slot(s) and a move needs {needed} (max_replication_slots)"
        ));
    }
    if free_senders < needed {
        return Err(format!(
            "shard {from_name} has {free_senders} free WAL sender(s) and a move needs {needed} (max_wal_senders)"
        ));
    }
    if workers < 1 {
        return Err(format!("shard {to_name} runs with max_logical_replication_workers=0"));
    }
    // Tables replication cannot carry, or whose UPDATEs and DELETEs a
    // publication would refuse while the tenant keeps serving.
    let odd: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text,
                CASE WHEN c.relkind = 'm' THEN 'is a materialized view (logical replication does not carry it)'
                     WHEN c.relpersistence = 'u' THEN 'is unlogged (logical replication does not carry it)'
                     ELSE 'has no primary key or replica identity (its UPDATEs and DELETEs would fail while published)' END
           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1
            AND (c.relkind = 'm'
              OR (c.relkind = 'r'
                AND (c.relpersistence = 'u'
                  OR c.relreplident = 'n'
                  OR (c.relreplident = 'd' AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))))
          ORDER BY 1 LIMIT 3",
    )
    .bind(schema)
    .fetch_all(from)
    .await
    .map_err(|e| format!("reading the tenant's tables failed: {e}"))?;
    if let Some((table, why)) = odd.first() {
        return Err(format!("the tenant's table {table} {why}"));
    }
    Ok(())
}

/// Step 1, on the source (admin, a superuser): the replication login with
/// a new password (read access to the schema only), the publication of
/// the schema's tables and the slot. Idempotent. Gives the password.
pub async fn publish(pool: &PgPool, schema: &str, uid: &str) -> Result<zeroize::Zeroizing<String>, PgError> {
    let name = object_name(uid);
    let (role, schema_q) = (quote_ident(&name)?, quote_ident(schema)?);
    let password = zeroize::Zeroizing::new(super::scram::generate_password());
    let verifier = quote_literal(&super::scram::verifier(&password))?;
    let (has_role, has_pub, has_slot, database): (bool, bool, bool, String) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1),
                EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1),
                EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1),
                current_database()::text",
    )
    .bind(&name)
    .fetch_one(pool)
    .await
    .map_err(query_err("reading the move's replication objects"))?;
    let mut tx = pool
        .begin()
        .await
        .map_err(query_err("starting the move's publication"))?;
    let mut statements = vec!["SET LOCAL log_statement = 'none'".to_owned()];
    // A week at most, a handful of connections (the apply worker and the
    // table-sync workers).
    let until = quote_literal(&(chrono::Utc::now() + chrono::Duration::days(7)).to_rfc3339())?;
    let attrs =
        format!("LOGIN REPLICATION BYPASSRLS NOINHERIT CONNECTION LIMIT 16 VALID UNTIL {until} PASSWORD {verifier}");
    statements.push(if has_role {
        format!("ALTER ROLE {role} WITH {attrs}")
    } else {
        format!("CREATE ROLE {role} WITH {attrs}")
    });
    statements.push(format!(
        "GRANT CONNECT ON DATABASE {} TO {role}",
        quote_ident(&database)?
    ));
    statements.push(format!("GRANT USAGE ON SCHEMA {schema_q} TO {role}"));
    statements.push(format!("GRANT SELECT ON ALL TABLES IN SCHEMA {schema_q} TO {role}"));
    if !has_pub {
        statements.push(format!("CREATE PUBLICATION {role} FOR TABLES IN SCHEMA {schema_q}"));
    }
    super::execute_all(&mut tx, "publishing the tenant's schema for its move", statements).await?;
    tx.commit()
        .await
        .map_err(query_err("committing the move's publication"))?;
    if !has_slot {
        // A slot is made in a transaction of its own that has written
        // nothing (and waits for the transactions running).
        sqlx::query("SELECT pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(&name)
            .execute(pool)
            .await
            .map_err(query_err("creating the move's replication slot"))?;
    }
    Ok(password)
}

/// Step 2, on the target (admin, a superuser): the subscription to the
/// source's publication through its replication login, copying the tables
/// then streaming their changes. Idempotent (an existing one is kept).
pub async fn subscribe(
    pool: &PgPool,
    source: &Target,
    ssl_mode: &str,
    uid: &str,
    password: &str,
) -> Result<(), PgError> {
    use sqlx::{ConnectOptions, Connection};
    let name = object_name(uid);
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_subscription WHERE subname = $1
                          AND subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()))",
    )
    .bind(&name)
    .fetch_one(pool)
    .await
    .map_err(query_err("reading the move's subscription"))?;
    let conninfo = quote_literal(&format!(
        "host={} port={} dbname={} user={} password={} sslmode={ssl_mode} application_name={}",
        conninfo_value(&source.host),
        source.port,
        conninfo_value(&source.database),
        conninfo_value(&name),
        conninfo_value(password),
        conninfo_value(&name),
    ))?;
    let sub = quote_ident(&name)?;
    let statement = if exists {
        // A move started again: the login's password was set anew.
        format!("ALTER SUBSCRIPTION {sub} CONNECTION {conninfo}")
    } else {
        format!(
            "CREATE SUBSCRIPTION {sub} CONNECTION {conninfo} PUBLICATION {sub} WITH (create_slot = false, slot_name = {}, copy_data = true, disable_on_error = true)",
            quote_literal(&name)?
        )
    };
    // The statement carries the password: on a connection of its own that
    // logs no statement here, and with the server's statement logging,
    // error statement logging and utility tracking off for its transaction.
    let opts = pool
        .connect_options()
        .as_ref()
        .clone()
        .log_statements(tracing::log::LevelFilter::Off)
        .log_slow_statements(tracing::log::LevelFilter::Off, Duration::from_secs(3600));
    let mut conn = sqlx::PgConnection::connect_with(&opts)
        .await
        .map_err(query_err("connecting to subscribe the target"))?;
    let result = async {
        let mut tx = conn
            .begin()
            .await
            .map_err(query_err("starting the move's subscription"))?;
        super::execute_all(
            &mut tx,
            "subscribing the target to the tenant's publication",
            vec![
                "SET LOCAL log_statement = 'none'".to_owned(),
                "SET LOCAL log_min_duration_statement = -1".to_owned(),
                "SET LOCAL log_min_error_statement = 'panic'".to_owned(),
                "SET LOCAL pg_stat_statements.track_utility = off".to_owned(),
                statement,
            ],
        )
        .await?;
        tx.commit()
            .await
            .map_err(query_err("committing the move's subscription"))
    }
    .await;
    let _ = conn.close().await;
    result
}

/// A libpq connection-string value, single-quoted with `\` and `'`
/// escaped.
fn conninfo_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Where the initial copy is, read on the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncState {
    /// Tables not yet copied and caught up.
    pub tables_pending: i64,
    pub tables: i64,
    /// The subscription stopped on an error (`disable_on_error`).
    pub disabled: bool,
    pub errors: i64,
    /// The schema's table bytes on the target.
    pub bytes: i64,
}

/// The subscription's state on the target; None when it does not exist.
pub async fn sync_state(pool: &PgPool, schema: &str, uid: &str) -> Result<Option<SyncState>, PgError> {
    let row: Option<(i64, i64, bool, i64, i64)> = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_catalog.pg_subscription_rel r WHERE r.srsubid = s.oid AND r.srsubstate <> 'r'),
                (SELECT count(*) FROM pg_catalog.pg_subscription_rel r WHERE r.srsubid = s.oid),
                NOT s.subenabled,
                coalesce((SELECT apply_error_count + sync_error_count FROM pg_catalog.pg_stat_subscription_stats st WHERE st.subid = s.oid), 0),
                coalesce((SELECT sum(pg_catalog.pg_total_relation_size(c.oid)) FROM pg_catalog.pg_class c
                           WHERE c.relnamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $2) AND c.relkind = 'r'), 0)::int8
           FROM pg_catalog.pg_subscription s WHERE s.subname = $1 AND s.subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())",
    )
    .bind(object_name(uid))
    .bind(schema)
    .fetch_optional(pool)
    .await
    .map_err(query_err("reading the move's subscription state"))?;
    Ok(row.map(|(tables_pending, tables, disabled, errors, bytes)| SyncState {
        tables_pending,
        tables,
        disabled,
        errors,
        bytes,
    }))
}

/// On the source: the schema's table bytes, and how far (bytes of WAL)
/// the slot's confirmed position is behind the server's.
pub async fn source_state(pool: &PgPool, schema: &str, uid: &str) -> Result<(i64, Option<i64>), PgError> {
    sqlx::query_as(
        "SELECT coalesce((SELECT sum(pg_catalog.pg_total_relation_size(c.oid)) FROM pg_catalog.pg_class c
                           WHERE c.relnamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $1) AND c.relkind = 'r'), 0)::int8,
                (SELECT pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), confirmed_flush_lsn)::int8
                   FROM pg_catalog.pg_replication_slots WHERE slot_name = $2)",
    )
    .bind(schema)
    .bind(object_name(uid))
    .fetch_one(pool)
    .await
    .map_err(query_err("reading the move's replication lag"))
}

/// The source's current WAL position (after writes stopped: the last
/// change the target must have applied).
pub async fn current_lsn(pool: &PgPool) -> Result<String, PgError> {
    // The insert position: a commit made with synchronous_commit off is
    // acknowledged before the write position passes it.
    sqlx::query_scalar("SELECT pg_catalog.pg_current_wal_insert_lsn()::text")
        .fetch_one(pool)
        .await
        .map_err(query_err("reading the source's WAL position"))
}

/// Waits until the target's subscription has applied the source's WAL up
/// to `lsn` (its apply worker reported that position back: everything
/// before it was applied in order). Err after `limit`.
pub async fn wait_applied(pool: &PgPool, uid: &str, lsn: &str, limit: Duration) -> Result<Duration, PgError> {
    let started = Instant::now();
    let name = object_name(uid);
    loop {
        let done: Option<bool> = sqlx::query_scalar(
            "SELECT coalesce(st.latest_end_lsn >= $2::pg_lsn, false) FROM pg_catalog.pg_stat_subscription st
               JOIN pg_catalog.pg_subscription s ON s.oid = st.subid
              WHERE s.subname = $1 AND st.relid IS NULL
                AND s.subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())",
        )
        .bind(&name)
        .bind(lsn)
        .fetch_optional(pool)
        .await
        .map_err(query_err("reading the subscription's applied position"))?;
        if done == Some(true) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            return Err(PgError::Replication(format!(
                "the target did not apply the source's changes up to {lsn} within {} s (apply worker {})",
                limit.as_secs(),
                if done.is_some() {
                    "running"
                } else {
                    "not running: see the target server's log"
                }
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether the move's publication (on the source) still publishes the
/// live schema named `schema`: a schema renamed aside and replaced (a
/// restore) is no longer it, and its tables would not reach the target.
pub async fn publishes(pool: &PgPool, schema: &str, uid: &str) -> Result<bool, PgError> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_namespace pn JOIN pg_catalog.pg_publication p ON p.oid = pn.pnpubid
                         WHERE p.pubname = $1 AND pn.pnnspid = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $2))",
    )
    .bind(object_name(uid))
    .bind(schema)
    .fetch_one(pool)
    .await
    .map_err(query_err("reading the move's publication"))
}

/// A digest of the schema's structure, by name (OIDs differ between
/// servers): its relations, columns, constraints, indexes, triggers,
/// views and functions. Equal on source and target when no DDL ran on the
/// source after its schema was copied (a migration during a `Logical`
/// copy would otherwise leave the target without it while the replicated
/// version table says it ran).
pub async fn schema_fingerprint(pool: &PgPool, schema: &str) -> Result<String, PgError> {
    sqlx::query_scalar(
        "WITH rel AS (
           SELECT c.oid, c.relname, c.relkind FROM pg_catalog.pg_class c
            WHERE c.relnamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $1))
         SELECT md5(coalesce(string_agg(x, E'\\n' ORDER BY x COLLATE \"C\"), '')) FROM (
           SELECT 'rel ' || relname || ' ' || relkind::text AS x FROM rel
           UNION ALL
           SELECT 'col ' || r.relname || '.' || a.attname || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod)
                  || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                  || coalesce(' default ' || pg_catalog.pg_get_expr(d.adbin, d.adrelid), '')
                  || CASE WHEN a.attgenerated <> '' THEN ' generated' ELSE '' END
             FROM rel r JOIN pg_catalog.pg_attribute a ON a.attrelid = r.oid
             LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE a.attnum > 0 AND NOT a.attisdropped
           UNION ALL
           SELECT 'con ' || r.relname || '.' || co.conname || ' ' || pg_catalog.pg_get_constraintdef(co.oid)
             FROM rel r JOIN pg_catalog.pg_constraint co ON co.conrelid = r.oid
           UNION ALL
           SELECT 'idx ' || pg_catalog.pg_get_indexdef(i.indexrelid)
             FROM rel r JOIN pg_catalog.pg_index i ON i.indrelid = r.oid
           UNION ALL
           SELECT 'trg ' || pg_catalog.pg_get_triggerdef(t.oid)
             FROM rel r JOIN pg_catalog.pg_trigger t ON t.tgrelid = r.oid WHERE NOT t.tgisinternal
           UNION ALL
           SELECT 'pol ' || r.relname || '.' || po.polname || ' ' || po.polcmd::text || ' '
                  || coalesce(pg_catalog.pg_get_expr(po.polqual, po.polrelid), '') || ' '
                  || coalesce(pg_catalog.pg_get_expr(po.polwithcheck, po.polrelid), '')
             FROM rel r JOIN pg_catalog.pg_policy po ON po.polrelid = r.oid
           UNION ALL
           SELECT 'rls ' || c.relname || ' ' || c.relrowsecurity::text || c.relforcerowsecurity::text
             FROM rel r JOIN pg_catalog.pg_class c ON c.oid = r.oid WHERE r.relkind IN ('r', 'p')
           UNION ALL
           SELECT 'type ' || t.typname || ' ' || t.typtype::text
                  || coalesce(' ' || (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) FROM pg_catalog.pg_enum e WHERE e.enumtypid = t.oid), '')
             FROM pg_catalog.pg_type t
            WHERE t.typnamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $1) AND t.typtype IN ('e', 'd')
           UNION ALL
           SELECT 'view ' || relname || ' ' || pg_catalog.pg_get_viewdef(oid) FROM rel WHERE relkind IN ('v', 'm')
           UNION ALL
           SELECT 'fn ' || p.proname || ' ' || md5(pg_catalog.pg_get_functiondef(p.oid))
             FROM pg_catalog.pg_proc p
            WHERE p.pronamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $1) AND p.prokind IN ('f', 'p')
         ) s",
    )
    .bind(schema)
    .fetch_one(pool)
    .await
    .map_err(query_err("reading the tenant's schema structure"))
}

/// The schema's sequences as the source has them (name, last value);
/// sequences never used are left out.
pub async fn sequences(pool: &PgPool, schema: &str) -> Result<Vec<(String, i64)>, PgError> {
    sqlx::query_as(
        "SELECT sequencename::text, last_value FROM pg_catalog.pg_sequences WHERE schemaname = $1 AND last_value IS NOT NULL ORDER BY 1",
    )
    .bind(schema)
    .fetch_all(pool)
    .await
    .map_err(query_err("reading the tenant's sequences"))
}

/// Sets the target's sequences to the source's values (logical
/// replication in Postgres 15 does not carry them). Gives how many.
pub async fn set_sequences(pool: &PgPool, schema: &str, values: &[(String, i64)]) -> Result<usize, PgError> {
    if values.is_empty() {
        return Ok(0);
    }
    let (names, last): (Vec<String>, Vec<i64>) = values.iter().cloned().unzip();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(pg_catalog.setval(pg_catalog.format('%I.%I', $1::text, s)::regclass, v, true))
           FROM unnest($2::text[], $3::int8[]) AS x(s, v)",
    )
    .bind(schema)
    .bind(&names)
    .bind(&last)
    .fetch_one(pool)
    .await
    .map_err(query_err("setting the tenant's sequences on the target"))?;
    Ok(n as usize)
}

/// The move's replication login, when it is this database's to drop: it
/// holds nothing in another database (two shards on one server see the
/// same role; the source's database holds its grants).
const ROLE_HERE: &str = "SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = $1 AND NOT EXISTS (
     SELECT 1 FROM pg_catalog.pg_shdepend d WHERE d.refclassid = 'pg_catalog.pg_authid'::regclass AND d.refobjid = r.oid
        AND d.dbid <> 0 AND d.dbid <> (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()))";

/// Drops whatever of a move's replication objects this database holds (a
/// subscription, a slot, a publication, the replication login), in that
/// order. Idempotent; nothing to drop costs one catalog query. A
/// subscription whose source cannot be reached to drop its slot there is
/// detached from it and dropped here (the source's slot is then dropped
/// when this runs there).
pub async fn clear(pool: &PgPool, uid: &str) -> Result<(), PgError> {
    let name = object_name(uid);
    let (sub, slot, publication, role): (bool, bool, bool, bool) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_subscription WHERE subname = $1 AND subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())),
                EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1),
                EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1),
                EXISTS ({ROLE_HERE})"
    )))
    .bind(&name)
    .fetch_one(pool)
    .await
    .map_err(query_err("reading the move's replication objects"))?;
    let q = quote_ident(&name)?;
    if sub {
        let dropped = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SUBSCRIPTION IF EXISTS {q}")))
            .execute(pool)
            .await;
        if let Err(e) = dropped {
            let oid: Option<i64> =
                sqlx::query_scalar("SELECT oid::int8 FROM pg_catalog.pg_subscription WHERE subname = $1")
                    .bind(&name)
                    .fetch_optional(pool)
                    .await
                    .ok()
                    .flatten();
            tracing::warn!(subscription = %name, oid = ?oid, error = %e, "dropping the move's subscription with its slot failed; detaching it from the source (its table-sync slots there, pg_<oid>_sync_*, are left to drop by hand)");
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ALTER SUBSCRIPTION {q} DISABLE")))
                .execute(pool)
                .await
                .map_err(query_err("disabling the move's subscription"))?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER SUBSCRIPTION {q} SET (slot_name = NONE)"
            )))
            .execute(pool)
            .await
            .map_err(query_err("detaching the move's subscription from its slot"))?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SUBSCRIPTION IF EXISTS {q}")))
                .execute(pool)
                .await
                .map_err(query_err("dropping the move's subscription"))?;
        }
    }
    if slot {
        // Its walsender (the subscription's, if still connected) ends
        // first: an active slot cannot be dropped.
        let mut tries = 0;
        loop {
            sqlx::query(
                "SELECT pg_catalog.pg_terminate_backend(active_pid, 5000) FROM pg_catalog.pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
            )
            .bind(&name)
            .execute(pool)
            .await
            .map_err(query_err("ending the move's replication connection"))?;
            let dropped = sqlx::query(
                "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            )
            .bind(&name)
            .execute(pool)
            .await;
            match dropped {
                Ok(_) => break,
                Err(_) if tries < 20 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(query_err("dropping the move's replication slot")(e)),
            }
        }
    }
    if publication {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP PUBLICATION IF EXISTS {q}")))
            .execute(pool)
            .await
            .map_err(query_err("dropping the move's publication"))?;
    }
    if role {
        // Its grants (schema, tables, database) go with it.
        let mut tx = pool.begin().await.map_err(query_err("dropping the move's login"))?;
        super::execute_all(
            &mut tx,
            "dropping the move's replication login",
            vec![format!("DROP OWNED BY {q}"), format!("DROP ROLE IF EXISTS {q}")],
        )
        .await?;
        tx.commit().await.map_err(query_err("dropping the move's login"))?;
    }
    Ok(())
}

/// Which of a move's replication objects this database still holds (for
/// the check after a move's cleanup).
pub async fn leftovers(pool: &PgPool, uid: &str) -> Result<Vec<String>, PgError> {
    let name = object_name(uid);
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT kind FROM (
           SELECT 'subscription ' || subname AS kind FROM pg_catalog.pg_subscription WHERE subname = $1
                  AND subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
           UNION ALL SELECT 'replication slot ' || slot_name FROM pg_catalog.pg_replication_slots WHERE slot_name = $1
           UNION ALL SELECT 'publication ' || pubname FROM pg_catalog.pg_publication WHERE pubname = $1
           UNION ALL SELECT 'role ' || $1 WHERE EXISTS ({ROLE_HERE})) o"
    )))
    .bind(&name)
    .fetch_all(pool)
    .await
    .map_err(query_err("reading the move's replication objects"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_name_is_the_uid_s_hex_and_a_valid_slot_name() {
        let n = object_name("6F1C2A3B-0000-4d5e-8f90-ABCDEF012345");
        assert_eq!(n, "tenancy_move_6f1c2a3b00004d5e8f90abcdef012345");
        assert!(n.len() <= 63);
        assert!(n
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        // Nothing of a hostile uid but hex digits reaches SQL.
        assert_eq!(object_name("x'; DROP ROLE postgres; --"), "tenancy_move_dee");
    }

    #[test]
    fn conninfo_values_are_quoted() {
        assert_eq!(conninfo_value("a b"), "'a b'");
        assert_eq!(conninfo_value("it's\\"), "'it\\'s\\\\'");
    }
}
