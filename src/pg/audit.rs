//! The per-tenant audit log: an append-only, hash-chained `_tenancy_audit`
//! table in each tenant schema, fed by triggers on every tenant table, and
//! read auditing through pgaudit (docs/audit.md).
//!
//! Takes a validated [`TenantName`] (schema and role identifiers come only
//! from it; table names come from the catalog and are quoted); gives the
//! observed audit state, the statements that converge it, chain
//! verification, export and pruning. Side effects: DDL in the tenant schema
//! as its owner role (tables `_tenancy_audit` and `_tenancy_audit_head`,
//! three functions, triggers on the tenant's tables), `ALTER ROLE <app> SET
//! pgaudit.log` where the admin may, and DELETE/INSERT on the audit table
//! when pruning.
//!
//! The chain: every audit row carries `prev_hash` and `hash =
//! sha256(prev_hash || content)`, content being [`content_sql`] of the row
//! (a JSON array text of its fields). The first row's `prev_hash` is 32
//! zero bytes; `_tenancy_audit_head` holds the last row's id and hash (set
//! at commit by a deferred constraint trigger, so deleting the entries of
//! the last transaction is found too), and its row lock serializes appends
//! per tenant until commit, so the chain is linear under concurrency (and a
//! REPEATABLE READ writer that raced gets a serialization failure instead
//! of forking it).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{Acquire, PgConnection, PgPool, Row};

use super::{query_err, quote_ident, quote_literal, PgError};
use crate::names::TenantName;

/// The audit table in every tenant schema.
pub const AUDIT_TABLE: &str = "_tenancy_audit";
/// Its one-row chain head (last id, last hash, last prune).
pub const HEAD_TABLE: &str = "_tenancy_audit_head";
const TRIGGER_FN: &str = "_tenancy_audit_trigger";
const WRITE_FN: &str = "_tenancy_audit_write";
const GUARD_FN: &str = "_tenancy_audit_guard";
const GUARD_TRIGGER: &str = "_tenancy_audit_guard";
const TAIL_FN: &str = "_tenancy_audit_tail";
/// The deferred (commit-time) trigger that moves the head to the last entry.
const TAIL_TRIGGER: &str = "_tenancy_audit_tail";
/// The triggers on each tenant table: INSERT and DELETE statement-level with
/// transition tables (one append per statement, however many rows), UPDATE
/// per row (old and new row side by side for the changed columns), TRUNCATE.
pub const TABLE_TRIGGERS: [&str; 4] = ["_tenancy_audit_ins", "_tenancy_audit_upd", "_tenancy_audit_del", "_tenancy_audit_trunc"];
/// Keys per audit entry of an INSERT or DELETE statement: a statement of
/// 100,000 rows appends 10 entries, each a JSON array of 10,000 keys
/// (bounded, far below jsonb's 255 MB limit).
pub const CHUNK_ROWS: usize = 10_000;
/// The `prev_hash` of the first row.
pub const GENESIS: [u8; 32] = [0; 32];
/// What the operator asks pgaudit to log for each tenant's app role.
pub const PGAUDIT_CLASSES: &str = "read, write";
/// The `search_path` of the audit functions: only the catalog, so no object
/// a tenant creates can stand in for a built-in.
const FN_SEARCH_PATH: &str = "search_path=pg_catalog, pg_temp";

/// The canonical content of an audit row that its hash covers, as UTF-8:
/// three lines, `header \n row_pk \n changed_columns`, where the header is
/// the JSON array text of (epoch seconds with microseconds, actor,
/// actor_given, request_id, operation, table_name) and the others are jsonb
/// texts (`null` when NULL). jsonb's text form is deterministic and never
/// holds a raw newline; the epoch does not depend on the session's TimeZone.
/// Verification uses this over the columns; the write function computes
/// [`header_sql`] and [`tail_sql`] once per statement and only the key per
/// row (the same bytes).
pub fn content_sql(time: &str, actor: &str, given: &str, request: &str, op: &str, table: &str, pk: &str, changed: &str) -> String {
    format!(
        "pg_catalog.convert_to({} || E'\\n' || {} || E'\\n' || {}, 'UTF8')",
        header_sql(time, actor, given, request, op, table),
        pk_sql(pk),
        tail_sql(changed)
    )
}

/// The first line of the content (text).
pub fn header_sql(time: &str, actor: &str, given: &str, request: &str, op: &str, table: &str) -> String {
    format!("pg_catalog.jsonb_build_array(EXTRACT(EPOCH FROM {time}), {actor}, {given}, {request}, {op}, {table})::text")
}

/// The second line (text).
fn pk_sql(pk: &str) -> String {
    format!("coalesce({pk}::text, 'null')")
}

/// The third line (text).
pub fn tail_sql(changed: &str) -> String {
    format!("coalesce(pg_catalog.to_jsonb({changed})::text, 'null')")
}

/// The audit objects of one tenant schema, as the catalog shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditState {
    pub schema_exists: bool,
    pub table: bool,
    pub head: bool,
    /// The three functions exist with the expected body, owner, SECURITY
    /// DEFINER flag and search_path.
    pub functions_current: bool,
    /// The append-only guard trigger on the audit table exists and is enabled.
    pub guard: bool,
    /// Tenant tables lacking one of [`TABLE_TRIGGERS`] (or with one disabled
    /// or pointing elsewhere).
    pub untriggered: Vec<String>,
    /// Those of `untriggered` that already carry a trigger of one of those
    /// names (to be replaced); the others, typically a migration's new
    /// tables, only get them created.
    pub stale: Vec<String>,
}

/// What the server and the app role say about pgaudit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PgauditState {
    /// `pgaudit.log` is a known setting: the library is loaded
    /// (`shared_preload_libraries`).
    pub loaded: bool,
    /// The admin may set it on a role: superuser, or `GRANT SET ON
    /// PARAMETER pgaudit.log` (Postgres 15+).
    pub can_set: bool,
    /// The app role's own `pgaudit.log`, if set.
    pub app_setting: Option<String>,
    /// The admin role (for the condition's message).
    pub admin: String,
}

impl PgauditState {
    /// Whether the app role's setting logs reads and writes.
    pub fn satisfied(&self) -> bool {
        let Some(v) = &self.app_setting else { return false };
        let classes: Vec<String> = v.split(',').map(|c| c.trim().to_ascii_lowercase()).collect();
        let has = |c: &str| classes.iter().any(|x| x == c || x == "all");
        has("read") && has("write")
    }
}

/// Read auditing of one tenant: the `ReadAuditing` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadAuditing {
    /// The app role's statements are logged by pgaudit.
    On,
    /// The pgaudit library is not loaded on the server.
    NotInstalled,
    /// pgaudit is loaded but `pgaudit.log` is superuser-only and the admin
    /// may not set it.
    NeedsSuperuser { app_role: String, admin: String },
}

impl ReadAuditing {
    pub fn reason(&self) -> &'static str {
        match self {
            ReadAuditing::On => "Applied",
            ReadAuditing::NotInstalled => "PgauditNotInstalled",
            ReadAuditing::NeedsSuperuser { .. } => "PgauditNeedsSuperuser",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ReadAuditing::On => format!("pgaudit logs the app role's reads and writes (pgaudit.log = '{PGAUDIT_CLASSES}')"),
            ReadAuditing::NotInstalled => {
                "read auditing is off: the pgaudit library is not loaded (shared_preload_libraries); writes are still audited in _tenancy_audit".into()
            }
            ReadAuditing::NeedsSuperuser { app_role, admin } => format!(
                "read auditing is off: pgaudit.log is superuser-only; as a superuser (RDS: rds_superuser) run ALTER ROLE {app_role} SET pgaudit.log = '{PGAUDIT_CLASSES}', \
                 or GRANT SET ON PARAMETER pgaudit.log TO {admin} so the operator sets it (docs/audit.md)"
            ),
        }
    }
}

/// One converging step of the audit objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditAction {
    CreateTables,
    ReplaceFunctions,
    GuardTable,
    /// The audit triggers of a table; `replace` when some of them exist
    /// (dropped first).
    TriggerTable { table: String, replace: bool },
    SetPgauditLog,
}

impl AuditAction {
    pub fn label(&self) -> &'static str {
        match self {
            AuditAction::CreateTables => "CreateAuditTables",
            AuditAction::ReplaceFunctions => "ReplaceAuditFunctions",
            AuditAction::GuardTable => "GuardAuditTable",
            AuditAction::TriggerTable { .. } => "AuditTable",
            AuditAction::SetPgauditLog => "SetPgauditLog",
        }
    }

    /// Runs as the tenant's owner role (everything but the role setting).
    fn as_owner(&self) -> bool {
        !matches!(self, AuditAction::SetPgauditLog)
    }
}

/// The steps that converge the audit objects. Pure. `pgaudit` is None where
/// read auditing is not converged (inside a migration's transaction).
pub fn plan(state: &AuditState, pgaudit: Option<&PgauditState>) -> Vec<AuditAction> {
    let mut actions = Vec::new();
    if !state.schema_exists {
        return actions;
    }
    if !state.table || !state.head {
        actions.push(AuditAction::CreateTables);
    }
    if !state.functions_current {
        actions.push(AuditAction::ReplaceFunctions);
    }
    if !state.guard {
        actions.push(AuditAction::GuardTable);
    }
    actions.extend(state.untriggered.iter().map(|t| AuditAction::TriggerTable { table: t.clone(), replace: state.stale.contains(t) }));
    if let Some(p) = pgaudit {
        if p.loaded && p.can_set && !p.satisfied() {
            actions.push(AuditAction::SetPgauditLog);
        }
    }
    actions
}

/// The `ReadAuditing` outcome once `plan`'s actions ran. Pure.
pub fn read_auditing(p: &PgauditState, app_role: &str, admin: &str) -> ReadAuditing {
    if !p.loaded {
        ReadAuditing::NotInstalled
    } else if p.satisfied() || p.can_set {
        ReadAuditing::On
    } else {
        ReadAuditing::NeedsSuperuser { app_role: app_role.to_owned(), admin: admin.to_owned() }
    }
}

/// The expected source of each audit function, by name.
fn function_bodies(name: &TenantName) -> Result<BTreeMap<&'static str, String>, PgError> {
    let schema = quote_ident(&name.schema())?;
    let owner = quote_literal(&name.owner_role())?;
    let header = header_sql("v_time", "v_actor", "v_given", "v_request", "p_op", "p_table");
    let tail = tail_sql("p_changed");
    let pk = pk_sql("v_pk");
    let write = format!(
        r#"
DECLARE
  v_hash bytea;
  v_time timestamptz;
  v_actor text;
  v_given boolean;
  v_request text;
  v_header bytea;
  v_tail bytea;
  v_pk jsonb;
  v_prevs bytea[] := '{{}}';
  v_hashes bytea[] := '{{}}';
  v_i integer := 0;
  v_xid bigint;
  v_last bigint;
BEGIN
  IF coalesce(cardinality(p_pks), 0) = 0 THEN
    RETURN;
  END IF;
  -- The head row's lock serializes appends per tenant until commit. The
  -- first append of a transaction records where the chain stood (one head
  -- update per transaction: updating it per append would make a long
  -- transaction quadratic); a REPEATABLE READ writer that raced another
  -- fails here (40001) rather than fork the chain.
  SELECT h.xid INTO STRICT v_xid FROM {schema}.{HEAD_TABLE} h FOR UPDATE;
  SELECT a.id, a.hash INTO v_last, v_hash FROM {schema}.{AUDIT_TABLE} a ORDER BY a.id DESC LIMIT 1;
  v_hash := coalesce(v_hash, decode(repeat('00', 32), 'hex'));
  IF v_xid IS DISTINCT FROM txid_current() THEN
    UPDATE {schema}.{HEAD_TABLE} SET xid = txid_current(), last_id = coalesce(v_last, 0), hash = v_hash;
  END IF;
  v_time := clock_timestamp();
  v_actor := nullif(current_setting('tenancy.actor', true), '');
  v_given := v_actor IS NOT NULL;
  v_actor := coalesce(v_actor, session_user::text);
  v_request := nullif(current_setting('tenancy.request_id', true), '');
  -- The content's first and last lines are the statement's; only the key
  -- differs per row.
  v_header := convert_to({header} || E'\n', 'UTF8');
  v_tail := convert_to(E'\n' || {tail}, 'UTF8');
  FOREACH v_pk IN ARRAY p_pks LOOP
    v_i := v_i + 1;
    v_prevs[v_i] := v_hash;
    v_hash := sha256(v_hash || v_header || convert_to({pk}, 'UTF8') || v_tail);
    v_hashes[v_i] := v_hash;
  END LOOP;
  -- Ids are drawn in unnest's order: the chain's order.
  INSERT INTO {schema}.{AUDIT_TABLE} ("time", actor, actor_given, request_id, operation, table_name, row_pk, changed_columns, prev_hash, hash)
  SELECT v_time, v_actor, v_given, v_request, p_op, p_table, u.pk, p_changed, u.prev, u.hash
    FROM unnest(p_pks, v_prevs, v_hashes) AS u(pk, prev, hash);
END
"#
    );
    let trigger = format!(
        r#"
DECLARE
  v_cols text;
  v_all jsonb[];
  v_pks jsonb[] := '{{}}';
  v_i integer;
  v_pk jsonb;
  v_new jsonb;
  v_old jsonb;
  v_changed text[];
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    PERFORM {schema}.{WRITE_FN}('TRUNCATE', TG_TABLE_NAME::text, ARRAY[NULL::jsonb], NULL);
    RETURN NULL;
  END IF;
  IF TG_LEVEL = 'ROW' THEN
    v_new := to_jsonb(NEW);
    v_old := to_jsonb(OLD);
    SELECT coalesce(array_agg(n.key ORDER BY n.key), '{{}}') INTO v_changed
      FROM jsonb_each(v_new) n WHERE (v_old -> n.key) IS DISTINCT FROM n.value;
    SELECT jsonb_object_agg(a.attname, v_new -> a.attname::text) INTO v_pk
      FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = TG_RELID AND i.indisprimary;
    PERFORM {schema}.{WRITE_FN}(TG_OP, TG_TABLE_NAME::text, ARRAY[jsonb_build_array(v_pk)], v_changed);
    RETURN NULL;
  END IF;
  SELECT string_agg(format('%L, t.%I', a.attname, a.attname), ', ' ORDER BY array_position(i.indkey::int2[], a.attnum)) INTO v_cols
    FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
   WHERE i.indrelid = TG_RELID AND i.indisprimary;
  EXECUTE format('SELECT array_agg(%s) FROM %I t',
                 CASE WHEN v_cols IS NULL THEN 'NULL::jsonb' ELSE 'pg_catalog.jsonb_build_object(' || v_cols || ')' END,
                 CASE TG_OP WHEN 'INSERT' THEN 'tenancy_new' ELSE 'tenancy_old' END)
    INTO v_all;
  -- One entry per {CHUNK_ROWS} rows of the statement: their keys as a JSON
  -- array (a row without a primary key counts as null), in the transition
  -- table's order. No rows: no entry.
  IF coalesce(cardinality(v_all), 0) = 0 THEN
    RETURN NULL;
  END IF;
  FOR v_i IN 0 .. (coalesce(cardinality(v_all), 0) - 1) / {CHUNK_ROWS} LOOP
    v_pks[v_i + 1] := to_jsonb(v_all[v_i * {CHUNK_ROWS} + 1 : (v_i + 1) * {CHUNK_ROWS}]);
  END LOOP;
  PERFORM {schema}.{WRITE_FN}(TG_OP, TG_TABLE_NAME::text, v_pks, NULL);
  RETURN NULL;
END
"#
    );
    let guard = format!(
        r#"
BEGIN
  -- Pruning (as the owner, with the setting on) is the only delete.
  IF TG_OP = 'DELETE' AND current_user = {owner} AND current_setting('tenancy.audit_prune', true) = 'on' THEN
    RETURN NULL;
  END IF;
  RAISE EXCEPTION 'the audit log %.% is append-only: % refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
    USING ERRCODE = 'insufficient_privilege';
END
"#
    );
    // At commit (deferred, once per entry of the transaction): the entry with
    // the highest id moves the head to itself. Appends are serialized by the
    // head's row lock, so the highest id is this transaction's last entry.
    let tail = format!(
        r#"
BEGIN
  IF NEW.id = (SELECT max(a.id) FROM {schema}.{AUDIT_TABLE} a) THEN
    UPDATE {schema}.{HEAD_TABLE} SET last_id = NEW.id, hash = NEW.hash;
  END IF;
  RETURN NULL;
END
"#
    );
    Ok(BTreeMap::from([(WRITE_FN, write), (TRIGGER_FN, trigger), (GUARD_FN, guard), (TAIL_FN, tail)]))
}

/// The SQL of one action. Identifiers are quoted; the functions' bodies are
/// dollar-quoted with a tag no identifier of a validated name can contain.
pub fn render(action: &AuditAction, name: &TenantName) -> Result<Vec<String>, PgError> {
    let schema = quote_ident(&name.schema())?;
    let app = quote_ident(&name.app_role())?;
    Ok(match action {
        AuditAction::CreateTables => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {schema}.{AUDIT_TABLE} (
                    id bigserial PRIMARY KEY,
                    \"time\" timestamptz NOT NULL,
                    actor text NOT NULL,
                    actor_given boolean NOT NULL,
                    request_id text,
                    operation text NOT NULL,
                    table_name text,
                    row_pk jsonb,
                    changed_columns text[],
                    prev_hash bytea NOT NULL,
                    hash bytea NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {schema}.{HEAD_TABLE} (
                    one boolean PRIMARY KEY DEFAULT true CHECK (one),
                    xid bigint,
                    last_id bigint NOT NULL DEFAULT 0,
                    hash bytea NOT NULL,
                    pruned_at timestamptz)"
            ),
            // An INSERT or DELETE entry holds up to CHUNK_ROWS keys (~150 KB
            // of JSON): lz4 compresses it several times faster than the
            // default pglz. Servers built without lz4 keep pglz.
            format!(
                "DO $tenancy_lz4$ BEGIN ALTER TABLE {schema}.{AUDIT_TABLE} ALTER COLUMN row_pk SET COMPRESSION lz4; EXCEPTION WHEN feature_not_supported THEN NULL; END $tenancy_lz4$"
            ),
            format!("INSERT INTO {schema}.{HEAD_TABLE} (hash) VALUES (decode(repeat('00', 32), 'hex')) ON CONFLICT DO NOTHING"),
            // The owner's default privileges gave the app DML; it keeps only
            // SELECT on the log, nothing on the head or the id sequence.
            format!("REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON TABLE {schema}.{AUDIT_TABLE} FROM {app}"),
            format!("REVOKE ALL ON TABLE {schema}.{HEAD_TABLE} FROM {app}"),
            format!("REVOKE ALL ON SEQUENCE {schema}.{AUDIT_TABLE}_id_seq FROM {app}"),
        ],
        AuditAction::ReplaceFunctions => {
            let bodies = function_bodies(name)?;
            let mut v = Vec::new();
            for (f, args, ret, definer) in [
                (WRITE_FN, "p_op text, p_table text, p_pks jsonb[], p_changed text[]", "void", true),
                (TRIGGER_FN, "", "trigger", true),
                (GUARD_FN, "", "trigger", false),
                (TAIL_FN, "", "trigger", true),
            ] {
                let security = if definer { "SECURITY DEFINER" } else { "SECURITY INVOKER" };
                v.push(format!(
                    "CREATE OR REPLACE FUNCTION {schema}.{f}({args}) RETURNS {ret} LANGUAGE plpgsql {security} SET search_path = pg_catalog, pg_temp AS $tenancy_fn${}$tenancy_fn$",
                    bodies[f]
                ));
                let sig = if args.is_empty() { String::new() } else { "text, text, jsonb[], text[]".into() };
                v.push(format!("REVOKE ALL ON FUNCTION {schema}.{f}({sig}) FROM PUBLIC"));
            }
            v
        }
        AuditAction::GuardTable => vec![
            format!("DROP TRIGGER IF EXISTS {GUARD_TRIGGER} ON {schema}.{AUDIT_TABLE}"),
            format!(
                "CREATE TRIGGER {GUARD_TRIGGER} BEFORE UPDATE OR DELETE OR TRUNCATE ON {schema}.{AUDIT_TABLE} FOR EACH STATEMENT EXECUTE FUNCTION {schema}.{GUARD_FN}()"
            ),
            format!("DROP TRIGGER IF EXISTS {TAIL_TRIGGER} ON {schema}.{AUDIT_TABLE}"),
            format!(
                "CREATE CONSTRAINT TRIGGER {TAIL_TRIGGER} AFTER INSERT ON {schema}.{AUDIT_TABLE} DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {schema}.{TAIL_FN}()"
            ),
        ],
        AuditAction::TriggerTable { table, replace } => {
            let t = format!("{schema}.{}", quote_ident(table)?);
            let f = format!("{schema}.{TRIGGER_FN}()");
            let [ins, upd, del, trunc] = TABLE_TRIGGERS;
            // A table without any of them (a migration's new table) skips
            // the drops: 4 statements fewer per table in a rollout.
            let mut v: Vec<String> = if *replace { TABLE_TRIGGERS.iter().map(|tg| format!("DROP TRIGGER IF EXISTS {tg} ON {t}")).collect() } else { Vec::new() };
            v.extend([
                format!("CREATE TRIGGER {ins} AFTER INSERT ON {t} REFERENCING NEW TABLE AS tenancy_new FOR EACH STATEMENT EXECUTE FUNCTION {f}"),
                format!("CREATE TRIGGER {upd} AFTER UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {f}"),
                format!("CREATE TRIGGER {del} AFTER DELETE ON {t} REFERENCING OLD TABLE AS tenancy_old FOR EACH STATEMENT EXECUTE FUNCTION {f}"),
                format!("CREATE TRIGGER {trunc} AFTER TRUNCATE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION {f}"),
            ]);
            v
        }
        AuditAction::SetPgauditLog => vec![format!("ALTER ROLE {app} SET pgaudit.log TO {}", quote_literal(PGAUDIT_CLASSES)?)],
    })
}

/// Reads the audit objects of the tenant schema: 1 query (constant text, so
/// one prepared statement for every tenant), no writes.
pub async fn observe(conn: &mut PgConnection, name: &TenantName) -> Result<AuditState, PgError> {
    let schema = name.schema();
    // Relations and functions of the schema are found through their
    // dependency on it (pg_depend's reference index): pg_class and pg_proc
    // have no index on the namespace alone, and a scan of either grows with
    // the number of tenants. Every table and function records that
    // dependency (TOAST tables and composite types excepted, neither audited).
    // Each function is current when sha256(name:source) is the expected one
    // and its owner, SECURITY DEFINER flag and search_path are right.
    let expected: Vec<String> =
        function_bodies(name)?.iter().map(|(f, body)| hex::encode(Sha256::digest(format!("{f}:{body}").as_bytes()))).collect();
    let row = sqlx::query(
        "SELECT n.oid IS NOT NULL AS schema_exists,
                EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid AND c.relname = $2 AND c.relkind = 'r') AS audit,
                EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid AND c.relname = $3 AND c.relkind = 'r') AS head,
                EXISTS (SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid
                         WHERE c.relnamespace = n.oid AND c.relname = $2 AND t.tgname = $4 AND t.tgenabled = 'O'
                           AND p.pronamespace = n.oid AND p.proname = $5)
                AND EXISTS (SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid
                         WHERE c.relnamespace = n.oid AND c.relname = $2 AND t.tgname = $11 AND t.tgenabled = 'O'
                           AND t.tgdeferrable AND t.tginitdeferred AND p.pronamespace = n.oid AND p.proname = $11) AS guard,
                coalesce(u.untriggered, '{}') AS untriggered,
                coalesce(u.stale, '{}') AS stale,
                (SELECT count(*) FROM pg_depend d JOIN pg_proc p ON p.oid = d.objid
                  WHERE d.refclassid = 'pg_namespace'::regclass AND d.refobjid = n.oid AND d.classid = 'pg_proc'::regclass
                    AND p.pronamespace = n.oid
                    AND encode(sha256(convert_to(p.proname || ':' || p.prosrc, 'UTF8')), 'hex') = ANY ($8)
                    AND p.prosecdef = (p.proname <> $5)
                    AND p.proowner = (SELECT oid FROM pg_roles WHERE rolname = $9)
                    AND p.proconfig = ARRAY[$10]) = cardinality($8) AS functions_current
           FROM (SELECT $1::text AS name) x LEFT JOIN pg_namespace n ON n.nspname = x.name
           LEFT JOIN LATERAL (
                SELECT array_agg(c.relname::text ORDER BY c.relname) FILTER (WHERE tg.good <> 4) AS untriggered,
                       array_agg(c.relname::text ORDER BY c.relname) FILTER (WHERE tg.good <> 4 AND tg.ours > 0) AS stale
                  FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
                 CROSS JOIN LATERAL (SELECT count(*) FILTER (WHERE t.tgenabled = 'O' AND p.pronamespace = n.oid AND p.proname = $7) AS good,
                                            count(*) AS ours
                                       FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
                                      WHERE t.tgrelid = c.oid AND t.tgname = ANY ($6)) tg
                 WHERE d.refclassid = 'pg_namespace'::regclass AND d.refobjid = n.oid AND d.classid = 'pg_class'::regclass
                   AND c.relnamespace = n.oid AND c.relkind IN ('r', 'p') AND NOT c.relispartition
                   AND c.relname NOT LIKE '\\_tenancy\\_%') u ON true",
    )
    .bind(&schema)
    .bind(AUDIT_TABLE)
    .bind(HEAD_TABLE)
    .bind(GUARD_TRIGGER)
    .bind(GUARD_FN)
    .bind(TABLE_TRIGGERS.to_vec())
    .bind(TRIGGER_FN)
    .bind(expected)
    .bind(name.owner_role())
    .bind(FN_SEARCH_PATH)
    .bind(TAIL_TRIGGER)
    .fetch_one(&mut *conn)
    .await
    .map_err(query_err("reading the tenant's audit objects"))?;
    let decode = || -> Result<AuditState, sqlx::Error> {
        Ok(AuditState {
            schema_exists: row.try_get("schema_exists")?,
            table: row.try_get("audit")?,
            head: row.try_get("head")?,
            guard: row.try_get("guard")?,
            untriggered: row.try_get("untriggered")?,
            stale: row.try_get("stale")?,
            functions_current: row.try_get::<Option<bool>, _>("functions_current")?.unwrap_or(false),
        })
    };
    decode().map_err(query_err("decoding the tenant's audit objects"))
}

/// Reads what pgaudit can do here and the app role's setting: 1 or 2
/// queries, no writes.
pub async fn observe_pgaudit(conn: &mut PgConnection, name: &TenantName) -> Result<PgauditState, PgError> {
    let (admin, loaded, superuser, version, settings): (String, bool, bool, i32, Vec<String>) = sqlx::query_as(
        "SELECT current_user::text, EXISTS (SELECT 1 FROM pg_settings WHERE name = 'pgaudit.log'),
                (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
                current_setting('server_version_num')::int,
                coalesce((SELECT array_agg(x) FROM pg_db_role_setting s, unnest(s.setconfig) x
                           WHERE s.setrole = (SELECT oid FROM pg_roles WHERE rolname = $1)
                             AND s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))), '{}')",
    )
    .bind(name.app_role())
    .fetch_one(&mut *conn)
    .await
    .map_err(query_err("reading pgaudit's availability"))?;
    let app_setting = settings.iter().find_map(|kv| kv.strip_prefix("pgaudit.log=").map(str::to_owned));
    let can_set = if !loaded {
        false
    } else if superuser {
        true
    } else if version >= 150000 {
        // Postgres 15 lets a superuser grant one parameter (GRANT SET ON PARAMETER).
        sqlx::query_scalar("SELECT has_parameter_privilege('pgaudit.log', 'SET')")
            .fetch_one(&mut *conn)
            .await
            .map_err(query_err("reading the admin's right to set pgaudit.log"))?
    } else {
        false
    };
    Ok(PgauditState { loaded, can_set, app_setting, admin })
}

/// Runs `actions` on `conn`, in the transaction the caller holds; owner
/// steps under `SET LOCAL ROLE <owner>` (left set: inside a migration the
/// role already is the owner). Returns the statements run.
async fn run(conn: &mut PgConnection, name: &TenantName, actions: &[AuditAction]) -> Result<usize, sqlx::Error> {
    let stmts = statements(name, actions)?;
    // All of them in one round trip (a migration rollout runs this for
    // every tenant).
    if !stmts.is_empty() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(stmts.join(";\n"))).execute(&mut *conn).await?;
    }
    Ok(stmts.len())
}

/// The SQL of `actions`: admin steps first, then the owner's after a
/// `SET LOCAL ROLE` to the owner.
fn statements(name: &TenantName, actions: &[AuditAction]) -> Result<Vec<String>, sqlx::Error> {
    let rendered = |a: &AuditAction| render(a, name).map_err(|e| sqlx::Error::Protocol(e.to_string()));
    let mut stmts: Vec<String> = Vec::new();
    for a in actions.iter().filter(|a| !a.as_owner()) {
        stmts.extend(rendered(a)?);
    }
    if actions.iter().any(AuditAction::as_owner) {
        let owner = quote_ident(&name.owner_role()).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        stmts.push(format!("SET LOCAL ROLE {owner}"));
        for a in actions.iter().filter(|a| a.as_owner()) {
            stmts.extend(rendered(a)?);
        }
    }
    Ok(stmts)
}

/// The audit statements a migration's transaction needs (the triggers of
/// the tables it created; everything, should the audit objects be missing),
/// read inside that transaction in two round trips and not run: the caller
/// sends them with its next statements. Leaves `search_path` at
/// `pg_catalog` and `plan_cache_mode` at `force_generic_plan` for the rest
/// of the transaction: the caller sets both back in that same message
/// (`migrations::run`), before anything of the tenant's runs again.
pub async fn statements_in_tx(conn: &mut PgConnection, name: &TenantName) -> Result<Vec<String>, sqlx::Error> {
    // A rollout runs this once per tenant on a few long-lived sessions: one
    // generic plan of the catalog query per session instead of planning it
    // for every tenant (~2 ms each, measured by `cargo bench --bench
    // migrations`). Postgres re-plans a cached statement whenever the
    // search_path differs from when it was planned, and a migration's is
    // the tenant schema: observe under a fixed one.
    sqlx::query("SELECT set_config('search_path', 'pg_catalog', true), set_config('plan_cache_mode', 'force_generic_plan', true)")
        .execute(&mut *conn)
        .await?;
    let state = observe(conn, name).await.map_err(into_sqlx)?;
    statements(name, &plan(&state, None))
}

fn into_sqlx(e: PgError) -> sqlx::Error {
    match e {
        PgError::Query { source, .. } => source,
        other => sqlx::Error::Protocol(other.to_string()),
    }
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

/// Whether a prune is due, and its cutoff: at most once a day. Pure.
pub fn prune_due(retention_days: Option<u32>, last_pruned: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let days = retention_days?;
    if last_pruned.is_some_and(|t| now - t < chrono::Duration::days(1)) {
        return None;
    }
    Some(now - chrono::Duration::days(days as i64))
}

/// The audit half of a reconcile: observe, then converge (one transaction)
/// the audit objects and the app role's pgaudit setting; then prune when
/// retention is set and a day has passed since the last prune. A converged
/// tenant with nothing to prune runs no statement.
pub async fn converge(pool: &PgPool, name: &TenantName, retention_days: Option<u32>) -> Result<AuditOutcome, PgError> {
    let mut conn = pool.acquire().await.map_err(query_err("connecting to converge the audit log"))?;
    let state = observe(&mut conn, name).await?;
    let pgaudit = observe_pgaudit(&mut conn, name).await?;
    let actions = plan(&state, Some(&pgaudit));
    let mut statements = 0;
    if !actions.is_empty() {
        let mut tx = conn.begin().await.map_err(query_err("starting the audit log's transaction"))?;
        statements = run(&mut tx, name, &actions).await.map_err(query_err("converging the audit log"))?;
        tx.commit().await.map_err(query_err("committing the audit log"))?;
    }
    let read = read_auditing(&pgaudit, &name.app_role(), &pgaudit.admin);
    let mut pruned = None;
    if retention_days.is_some() && state.schema_exists {
        let last: Option<DateTime<Utc>> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT pruned_at FROM {}.{HEAD_TABLE}", quote_ident(&name.schema())?)))
                .fetch_optional(&mut *conn)
                .await
                .map_err(query_err("reading the audit log's last prune"))?
                .flatten();
        if let Some(cutoff) = prune_due(retention_days, last, Utc::now()) {
            drop(conn);
            let p = prune(pool, name, cutoff, "tenant-operator (retention)").await?;
            statements += p.statements;
            pruned = Some(p.deleted);
        }
    }
    Ok(AuditOutcome { actions, statements, read_auditing: read, pruned })
}

/// What a prune did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneOutcome {
    /// Rows deleted (a previous anchor included).
    pub deleted: u64,
    /// The id of the new ANCHOR row (the last pruned row's id), if any.
    pub anchor: Option<i64>,
    pub statements: usize,
}

/// Deletes the audit rows older than `before`, as the owner role, and keeps
/// the rest verifiable: an ANCHOR row takes the last pruned row's id, with
/// `prev_hash` and `hash` both that row's hash (the hash at the cut), so the
/// next row links to it; and a PRUNE row appended to the chain records the
/// cut (`row_pk`: through_id, cut_hash, rows), binding the anchor into the
/// chain. Appends wait meanwhile (the head row is locked).
pub async fn prune(pool: &PgPool, name: &TenantName, before: DateTime<Utc>, actor: &str) -> Result<PruneOutcome, PgError> {
    let schema = quote_ident(&name.schema())?;
    let owner = quote_ident(&name.owner_role())?;
    let mut tx = pool.begin().await.map_err(query_err("starting the prune"))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET LOCAL ROLE {owner}"))).execute(&mut *tx).await.map_err(query_err("becoming the owner to prune"))?;
    sqlx::query("SELECT set_config('tenancy.audit_prune', 'on', true), set_config('tenancy.actor', $1, true), set_config('tenancy.request_id', '', true)")
        .bind(actor)
        .execute(&mut *tx)
        .await
        .map_err(query_err("marking the prune"))?;
    let mut statements = 2;
    sqlx::query(sqlx::AssertSqlSafe(format!("SELECT 1 FROM {schema}.{HEAD_TABLE} FOR UPDATE")))
        .execute(&mut *tx)
        .await
        .map_err(query_err("locking the audit chain"))?;
    let cut: Option<(i64, Vec<u8>, DateTime<Utc>, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, hash, \"time\", operation FROM {schema}.{AUDIT_TABLE} WHERE \"time\" < $1 ORDER BY id DESC LIMIT 1"
    )))
    .bind(before)
    .fetch_optional(&mut *tx)
    .await
    .map_err(query_err("finding the audit log's cut"))?;
    let mut out = PruneOutcome { deleted: 0, anchor: None, statements };
    if let Some((id, hash, time, op)) = cut.filter(|c| c.3 != "ANCHOR") {
        let _ = op;
        let deleted = sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {schema}.{AUDIT_TABLE} WHERE id <= $1")))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(query_err("pruning the audit log"))?
            .rows_affected();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {schema}.{AUDIT_TABLE} (id, \"time\", actor, actor_given, operation, row_pk, prev_hash, hash)
             VALUES ($1, $2, $3, true, 'ANCHOR', jsonb_build_object('through_id', $1, 'before', $4::timestamptz, 'rows', $5::bigint), $6, $6)"
        )))
        .bind(id)
        .bind(time)
        .bind(actor)
        .bind(before)
        .bind(deleted as i64)
        .bind(&hash)
        .execute(&mut *tx)
        .await
        .map_err(query_err("writing the audit log's anchor"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {schema}.{WRITE_FN}('PRUNE', NULL, ARRAY[jsonb_build_object('through_id', $1::bigint, 'cut_hash', encode($2, 'hex'), 'rows', $3::bigint)], NULL)"
        )))
        .bind(id)
        .bind(&hash)
        .bind(deleted as i64)
        .execute(&mut *tx)
        .await
        .map_err(query_err("recording the prune in the chain"))?;
        statements += 3;
        out = PruneOutcome { deleted, anchor: Some(id), statements };
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE {schema}.{HEAD_TABLE} SET pruned_at = now()")))
        .execute(&mut *tx)
        .await
        .map_err(query_err("recording the prune time"))?;
    out.statements += 2;
    tx.commit().await.map_err(query_err("committing the prune"))?;
    Ok(out)
}

/// Where the chain breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainBreak {
    /// The audit row where the break is found.
    pub id: i64,
    pub what: String,
}

/// The outcome of walking a tenant's chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub rows: u64,
    /// The ANCHOR row the walk started from, after a prune.
    pub anchor: Option<i64>,
    /// The hash of the last row (hex).
    pub head: String,
    pub first_break: Option<ChainBreak>,
}

/// One row as the walk sees it.
#[derive(Clone, Debug)]
pub struct ChainRow {
    pub id: i64,
    pub operation: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
    pub content: Vec<u8>,
    pub row_pk: Option<serde_json::Value>,
}

/// The walk itself, over rows in id order, then the head. Pure.
pub struct Walker {
    expected: Vec<u8>,
    rows: u64,
    anchor: Option<(i64, Vec<u8>)>,
    anchor_confirmed: bool,
    last_id: i64,
    first_break: Option<ChainBreak>,
    /// The head row: the last entry as of the last commit (its id and
    /// hash); whether that row was seen; the first row after it.
    head: Option<(i64, Vec<u8>)>,
    head_seen: bool,
    after_head: Option<i64>,
}

impl Walker {
    /// A walk that ends by checking the head row's (last id, hash).
    pub fn new(head: Option<(i64, Vec<u8>)>) -> Self {
        Walker { expected: GENESIS.to_vec(), rows: 0, anchor: None, anchor_confirmed: false, last_id: 0, first_break: None, head, head_seen: false, after_head: None }
    }

    fn see(&mut self, r: &ChainRow) {
        if let Some((id, hash)) = &self.head {
            if r.id > *id && self.after_head.is_none() {
                self.after_head = Some(r.id);
            }
            if *id == r.id {
                self.head_seen = true;
                if *hash != r.hash {
                    let what = format!("the chain head records hash {} for row {id} but the row has {}: the head or the row was edited", short(hash), short(&r.hash));
                    self.broke(r.id, what);
                }
            }
        }
    }

    fn broke(&mut self, id: i64, what: String) {
        if self.first_break.is_none() {
            self.first_break = Some(ChainBreak { id, what });
        }
    }

    /// Checks one row; stops checking after the first break.
    pub fn push(&mut self, r: &ChainRow) {
        if self.first_break.is_some() {
            return;
        }
        let first = self.rows == 0;
        self.rows += 1;
        self.last_id = r.id;
        if r.operation == "ANCHOR" {
            if !first {
                return self.broke(r.id, "an ANCHOR row in the middle of the chain (only a prune's cut, at the start, may hold one)".into());
            }
            if r.prev_hash != r.hash {
                return self.broke(r.id, "the ANCHOR row's prev_hash and hash differ (both must be the hash at the cut)".into());
            }
            self.anchor = Some((r.id, r.hash.clone()));
            self.expected = r.hash.clone();
            return self.see(r);
        }
        if r.prev_hash != self.expected {
            return self.broke(
                r.id,
                format!(
                    "prev_hash {} is not the hash of the row before it ({}): a row was deleted, inserted or reordered",
                    short(&r.prev_hash),
                    short(&self.expected)
                ),
            );
        }
        let mut h = Sha256::new();
        h.update(&r.prev_hash);
        h.update(&r.content);
        let computed = h.finalize().to_vec();
        if computed != r.hash {
            return self.broke(
                r.id,
                format!("the row's content does not match its hash (stored {}, content gives {}): the row was edited", short(&r.hash), short(&computed)),
            );
        }
        if r.operation == "PRUNE" {
            if let (Some((aid, ahash)), Some(pk)) = (&self.anchor, &r.row_pk) {
                let through = pk.get("through_id").and_then(|v| v.as_i64());
                let cut = pk.get("cut_hash").and_then(|v| v.as_str());
                if through == Some(*aid) && cut == Some(hex::encode(ahash).as_str()) {
                    self.anchor_confirmed = true;
                }
            }
        }
        self.expected = r.hash.clone();
        self.see(r);
    }

    /// Ends the walk: the anchor must be confirmed and the head's row seen.
    pub fn finish(mut self) -> VerifyReport {
        if self.first_break.is_none() {
            if let Some((aid, _)) = &self.anchor {
                if !self.anchor_confirmed {
                    let aid = *aid;
                    self.broke(aid, "the ANCHOR row is not confirmed by a PRUNE row in the chain (through_id and cut_hash): rows before it may have been removed".into());
                }
            }
        }
        if self.first_break.is_none() {
            match (self.head.clone(), self.after_head) {
                (Some((0, hash)), _) if hash != GENESIS => self.broke(0, "the chain head was edited (it records a start at row 0 with a hash that is not the genesis)".into()),
                (Some((id, _)), _) if id > 0 && !self.head_seen => self.broke(
                    id,
                    format!("the chain head names row {id} (the last entry at the last commit) but there is no such row: rows at the end were deleted"),
                ),
                (Some((id, _)), Some(after)) => {
                    self.broke(after, format!("row {after} comes after the chain head (row {id}): appended without the commit-time head update, or the head was set back"))
                }
                (None, _) if self.rows > 0 => self.broke(self.last_id, "the chain head row is missing".into()),
                _ => {}
            }
        }
        VerifyReport { rows: self.rows, anchor: self.anchor.map(|a| a.0), head: hex::encode(&self.expected), first_break: self.first_break }
    }
}

fn short(h: &[u8]) -> String {
    let s = hex::encode(h);
    s[..s.len().min(16)].to_string()
}

async fn require_audit(conn: &mut PgConnection, name: &TenantName) -> Result<(), PgError> {
    let state = observe(conn, name).await?;
    if !state.table || !state.head {
        return Err(PgError::MissingPrivilege { role: name.schema(), what: "an audit log (the tenant does not exist or was never reconciled)".into() });
    }
    Ok(())
}

/// Walks the tenant's whole chain (streamed, in id order) and reports the
/// first break.
pub async fn verify(pool: &PgPool, name: &TenantName) -> Result<VerifyReport, PgError> {
    let schema = quote_ident(&name.schema())?;
    let mut conn = pool.acquire().await.map_err(query_err("connecting to verify the audit log"))?;
    require_audit(&mut conn, name).await?;
    // One snapshot for the rows and the head.
    let mut tx = conn.begin().await.map_err(query_err("starting the verification"))?;
    sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await.map_err(query_err("starting the verification"))?;
    let content = content_sql("a.\"time\"", "a.actor", "a.actor_given", "a.request_id", "a.operation", "a.table_name", "a.row_pk", "a.changed_columns");
    let sql = format!("SELECT a.id, a.operation, a.prev_hash, a.hash, {content} AS content, a.row_pk FROM {schema}.{AUDIT_TABLE} a ORDER BY a.id");
    let head: Option<(i64, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT last_id, hash FROM {schema}.{HEAD_TABLE}")))
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_err("reading the audit chain head"))?;
    let mut walker = Walker::new(head);
    {
        let mut rows = sqlx::query_as::<_, (i64, String, Vec<u8>, Vec<u8>, Vec<u8>, Option<serde_json::Value>)>(sqlx::AssertSqlSafe(sql)).fetch(&mut *tx);
        while let Some((id, operation, prev_hash, hash, content, row_pk)) = rows.try_next().await.map_err(query_err("reading the audit log"))? {
            walker.push(&ChainRow { id, operation, prev_hash, hash, content, row_pk });
        }
    }
    tx.rollback().await.map_err(query_err("ending the verification"))?;
    Ok(walker.finish())
}

/// One audit row as exported (JSON lines, for a SIEM).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub tenant: String,
    pub id: i64,
    /// RFC 3339, UTC, microseconds.
    pub time: String,
    pub actor: String,
    pub actor_given: bool,
    pub request_id: Option<String>,
    pub operation: String,
    pub table: Option<String>,
    pub row_pk: Option<serde_json::Value>,
    pub changed_columns: Option<Vec<String>>,
    /// Lower-case hex.
    pub prev_hash: String,
    pub hash: String,
}

/// Streams the tenant's audit rows with `time >= since`, in id order, to
/// `out` as JSON lines. Returns how many were written.
pub async fn export<W: std::io::Write>(pool: &PgPool, name: &TenantName, since: DateTime<Utc>, out: &mut W) -> Result<u64, PgError> {
    let schema = quote_ident(&name.schema())?;
    let mut conn = pool.acquire().await.map_err(query_err("connecting to export the audit log"))?;
    require_audit(&mut conn, name).await?;
    let sql = format!(
        "SELECT id, \"time\", actor, actor_given, request_id, operation, table_name, row_pk, changed_columns, prev_hash, hash
           FROM {schema}.{AUDIT_TABLE} WHERE \"time\" >= $1 ORDER BY id"
    );
    let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(since).fetch(&mut *conn);
    let mut n = 0;
    while let Some(r) = rows.try_next().await.map_err(query_err("reading the audit log"))? {
        let decode = || -> Result<AuditRecord, sqlx::Error> {
            let time: DateTime<Utc> = r.try_get("time")?;
            Ok(AuditRecord {
                tenant: name.as_str().to_owned(),
                id: r.try_get("id")?,
                time: time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                actor: r.try_get("actor")?,
                actor_given: r.try_get("actor_given")?,
                request_id: r.try_get("request_id")?,
                operation: r.try_get("operation")?,
                table: r.try_get("table_name")?,
                row_pk: r.try_get("row_pk")?,
                changed_columns: r.try_get("changed_columns")?,
                prev_hash: hex::encode(r.try_get::<Vec<u8>, _>("prev_hash")?),
                hash: hex::encode(r.try_get::<Vec<u8>, _>("hash")?),
            })
        };
        let rec = decode().map_err(query_err("decoding an audit row"))?;
        let line = serde_json::to_string(&rec).map_err(|e| PgError::MissingPrivilege { role: "export".into(), what: e.to_string() })?;
        writeln!(out, "{line}").map_err(|e| PgError::Query { action: "writing the export", source: sqlx::Error::Io(e) })?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> TenantName {
        TenantName::parse(s).unwrap()
    }

    fn full() -> AuditState {
        AuditState { schema_exists: true, table: true, head: true, functions_current: true, guard: true, untriggered: vec![], stale: vec![] }
    }

    #[test]
    fn a_converged_schema_plans_nothing() {
        assert!(plan(&full(), None).is_empty());
        let p = PgauditState { loaded: true, can_set: false, app_setting: None, ..Default::default() };
        assert!(plan(&full(), Some(&p)).is_empty(), "nothing to do when pgaudit.log cannot be set");
        let p = PgauditState { loaded: true, can_set: true, app_setting: Some("READ, write, ddl".into()), ..Default::default() };
        assert!(plan(&full(), Some(&p)).is_empty());
        assert!(plan(&AuditState::default(), None).is_empty(), "no schema, nothing to do");
    }

    #[test]
    fn a_new_schema_gets_tables_functions_guard_and_triggers() {
        let s = AuditState { schema_exists: true, untriggered: vec!["docs".into()], ..Default::default() };
        let p = PgauditState { loaded: true, can_set: true, app_setting: None, ..Default::default() };
        let labels: Vec<_> = plan(&s, Some(&p)).iter().map(AuditAction::label).collect();
        assert_eq!(labels, ["CreateAuditTables", "ReplaceAuditFunctions", "GuardAuditTable", "AuditTable", "SetPgauditLog"]);
    }

    #[test]
    fn read_auditing_degrades_with_a_reason() {
        let off = PgauditState::default();
        assert_eq!(read_auditing(&off, "a", "adm").reason(), "PgauditNotInstalled");
        let su = PgauditState { loaded: true, can_set: false, app_setting: None, ..Default::default() };
        let r = read_auditing(&su, "tenant_x_app", "adm");
        assert_eq!(r.reason(), "PgauditNeedsSuperuser");
        assert!(r.message().contains("ALTER ROLE tenant_x_app SET pgaudit.log"), "{}", r.message());
        let granted = PgauditState { loaded: true, can_set: false, app_setting: Some("all".into()), ..Default::default() };
        assert_eq!(read_auditing(&granted, "a", "adm"), ReadAuditing::On);
    }

    #[test]
    fn table_names_are_quoted_in_triggers() {
        let sql = render(&AuditAction::TriggerTable { table: "we\"ird; DROP".into(), replace: true }, &n("acme")).unwrap();
        assert!(sql.iter().all(|s| s.contains("\"tenant_acme\".\"we\"\"ird; DROP\"")), "{sql:?}");
        assert_eq!(sql.len(), 8);
    }

    #[test]
    fn only_tables_with_stale_triggers_get_drops() {
        let s = AuditState { untriggered: vec!["new".into(), "tampered".into()], stale: vec!["tampered".into()], ..full() };
        let actions = plan(&s, None);
        assert_eq!(
            actions,
            [AuditAction::TriggerTable { table: "new".into(), replace: false }, AuditAction::TriggerTable { table: "tampered".into(), replace: true }]
        );
        let new = render(&actions[0], &n("acme")).unwrap();
        assert_eq!(new.len(), 4);
        assert!(new.iter().all(|s| s.starts_with("CREATE TRIGGER")), "{new:?}");
        let tampered = render(&actions[1], &n("acme")).unwrap();
        assert_eq!(tampered.iter().filter(|s| s.starts_with("DROP TRIGGER IF EXISTS")).count(), 4, "{tampered:?}");
    }

    #[test]
    fn prune_runs_at_most_daily() {
        let now = Utc::now();
        assert_eq!(prune_due(None, None, now), None);
        assert_eq!(prune_due(Some(30), None, now), Some(now - chrono::Duration::days(30)));
        assert_eq!(prune_due(Some(30), Some(now - chrono::Duration::hours(3)), now), None);
        assert!(prune_due(Some(30), Some(now - chrono::Duration::hours(25)), now).is_some());
    }

    fn chain(n: usize) -> Vec<ChainRow> {
        let mut prev = GENESIS.to_vec();
        (1..=n as i64)
            .map(|id| {
                let content = format!("row {id}").into_bytes();
                let hash = Sha256::new().chain_update(&prev).chain_update(&content).finalize().to_vec();
                let r = ChainRow { id, operation: "INSERT".into(), prev_hash: prev.clone(), hash: hash.clone(), content, row_pk: None };
                prev = hash;
                r
            })
            .collect()
    }

    fn walk(rows: &[ChainRow], head: Option<(i64, Vec<u8>)>) -> VerifyReport {
        let mut w = Walker::new(head);
        rows.iter().for_each(|r| w.push(r));
        w.finish()
    }

    #[test]
    fn the_walk_finds_edits_removals_and_a_cut_tail() {
        let rows = chain(5);
        // The head is the last entry.
        let head = Some((5, rows[4].hash.clone()));
        assert_eq!(walk(&rows, head.clone()).first_break, None);
        // Rows beyond the head: appended without it moving, or it was set back.
        let b = walk(&rows, Some((3, rows[2].hash.clone()))).first_break.unwrap();
        assert_eq!(b.id, 4);
        assert!(b.what.contains("after the chain head"), "{}", b.what);
        let mut edited = rows.clone();
        edited[2].content = b"row 3 edited".to_vec();
        assert_eq!(walk(&edited, head.clone()).first_break.unwrap().id, 3);
        let mut removed = rows.clone();
        removed.remove(1);
        let b = walk(&removed, head.clone()).first_break.unwrap();
        assert_eq!(b.id, 3);
        assert!(b.what.contains("deleted"), "{}", b.what);
        let b = walk(&rows[..2], head).first_break.unwrap();
        assert!(b.what.contains("rows at the end"), "{}", b.what);
        assert_eq!(walk(&[], Some((0, GENESIS.to_vec()))).first_break, None);
    }
}
