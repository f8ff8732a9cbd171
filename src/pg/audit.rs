//! The per-tenant audit log: an append-only, hash-chained `_tenancy_audit`
//! table in each tenant schema, fed by triggers on every tenant table, its
//! head anchored outside the schema under a key only the operator holds,
//! and read auditing through pgaudit (docs/audit.md).
//!
//! Takes a validated [`TenantName`] (schema and role identifiers come only
//! from it; table names come from the catalog and are quoted), the tenant's
//! uid and the root keys; gives the observed audit state, the statements
//! that converge it, anchoring, chain verification, export and pruning.
//!
//! Who runs what: the admin pool reads catalogs and `tenancy.*` and writes
//! `tenancy.*` (heads, anchors), the anchor functions in schema
//! `tenancy_audit` and `ALTER ROLE <app> SET pgaudit.log`. Everything that
//! reads or writes a relation in the tenant schema, and the audit DDL there,
//! runs on a confined session ([`super::confined`]: session user
//! `tenant_<x>_ops`, acting as the tenant's owner), opened only when there
//! is something to do, so nothing the owner wrote (a trigger, an RLS policy,
//! a view in place of a table) ever runs as the admin.
//!
//! The chain: every audit row carries `prev_hash` and `hash =
//! sha256(prev_hash || content)`, content being [`content_sql`] of the row
//! (a JSON array text of its fields). The first row's `prev_hash` is 32
//! zero bytes; `_tenancy_audit_head` holds the last row's id and hash (set
//! at commit, once per transaction, by a deferred constraint trigger on the
//! head that the transaction's first append queues, so deleting the entries
//! of the last transaction is found too), and its row lock serializes appends
//! per tenant until commit, so the chain is linear under concurrency (and a
//! REPEATABLE READ writer that raced gets a serialization failure instead
//! of forking it). The same commit-time trigger moves the tenant's head in
//! `tenancy.audit_heads` through its anchor function (forward only); the
//! operator periodically writes an HMAC'd anchor of each head that moved
//! (`tenancy.audit_anchors`), so rewriting the chain before the latest
//! anchor is found by [`verify`] even when every hash is recomputed.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{Acquire, Connection, PgConnection, PgPool, Row};

use super::confined::{self, Confined, OpsLogin};
use super::{query_err, quote_ident, quote_literal, PgError};
use crate::crypto::{KeyVersion, Keyring, Purpose, TenantSalt};
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
/// The triggers on each tenant table: INSERT, UPDATE and DELETE
/// statement-level with transition tables (one append per statement,
/// however many rows), TRUNCATE.
pub const TABLE_TRIGGERS: [&str; 4] = [
    "_tenancy_audit_ins",
    "_tenancy_audit_update",
    "_tenancy_audit_del",
    "_tenancy_audit_trunc",
];
/// Table triggers of earlier versions, dropped when a table's triggers are
/// replaced: the per-row UPDATE trigger (one append per updated row, before
/// 2026-12).
const LEGACY_TABLE_TRIGGERS: [&str; 1] = ["_tenancy_audit_upd"];
/// Keys per audit entry of an INSERT or DELETE statement: a statement of
/// 100,000 rows appends 10 entries, each a JSON array of 10,000 keys
/// (bounded, far below jsonb's 255 MB limit).
pub const CHUNK_ROWS: usize = 10_000;
/// Below this many rows, an INSERT or DELETE statement's keys are read
/// with a statically planned query (no planning per statement).
const SMALL_STATEMENT: usize = 64;
/// The `prev_hash` of the first row.
pub const GENESIS: [u8; 32] = [0; 32];
/// What the operator asks pgaudit to log for each tenant's app role.
pub const PGAUDIT_CLASSES: &str = "read, write";
/// The `search_path` of the audit functions: only the catalog, so no object
/// a tenant creates can stand in for a built-in.
const FN_SEARCH_PATH: &str = "search_path=pg_catalog, pg_temp";
/// The schema of the per-tenant anchor functions (one per tenant, named
/// like the tenant's schema), owned by the admin; each tenant's owner may
/// use it (to call its own function) and nothing else.
pub const ANCHOR_SCHEMA: &str = "tenancy_audit";
/// The anchor role is this prefix and the database's oid (roles are
/// cluster-wide, anchor functions per database): NOLOGIN, owns the anchor
/// functions, may write `tenancy.audit_heads` and nothing else.
pub const ANCHOR_ROLE_PREFIX: &str = "tenancy_anchor_";
/// The domain separator of an anchor's MAC input ([`anchor_message`]).
pub const ANCHOR_DOMAIN: &[u8] = b"tenancy.dev/audit-anchor/v1\0";

/// The canonical content of an audit row that its hash covers, as UTF-8:
/// three lines, `header \n row_pk \n changed_columns`, where the header is
/// the JSON array text of (epoch seconds with microseconds, actor,
/// actor_given, request_id, operation, table_name) and the others are jsonb
/// texts (`null` when NULL). jsonb's text form is deterministic and never
/// holds a raw newline; the epoch does not depend on the session's TimeZone.
/// Verification uses this over the columns; the write function computes
/// [`header_sql`] and [`tail_sql`] once per statement and only the key per
/// row (the same bytes).
pub fn content_sql(
    time: &str,
    actor: &str,
    given: &str,
    request: &str,
    op: &str,
    table: &str,
    pk: &str,
    changed: &str,
) -> String {
    format!(
        "pg_catalog.convert_to({} || E'\\n' || {} || E'\\n' || {}, 'UTF8')",
        header_sql(time, actor, given, request, op, table),
        pk_sql(pk),
        tail_sql(changed)
    )
}

/// The first line of the content (text).
pub fn header_sql(time: &str, actor: &str, given: &str, request: &str, op: &str, table: &str) -> String {
    format!(
        "pg_catalog.jsonb_build_array(EXTRACT(EPOCH FROM {time}), {actor}, {given}, {request}, {op}, {table})::text"
    )
}

/// The second line (text).
fn pk_sql(pk: &str) -> String {
    format!("coalesce({pk}::text, 'null')")
}

/// The third line (text).
pub fn tail_sql(changed: &str) -> String {
    format!("coalesce(pg_catalog.to_jsonb({changed})::text, 'null')")
}

/// One entry's fields as the walk reads them, rendered into the bytes
/// [`content_sql`] gives on the server: jsonb's text form (`[a, b]`,
/// strings escaped as PostgreSQL's `escape_json` does), the epoch as
/// numeric text (`EXTRACT(EPOCH FROM time)::text`) and the key as its
/// jsonb text. Checked against the SQL by `verify_builds_the_content_the_server_builds`
/// (tests/pg_audit.rs).
#[derive(Clone, Copy, Debug)]
pub struct Content<'a> {
    pub epoch: &'a str,
    pub actor: &'a str,
    pub actor_given: bool,
    pub request_id: Option<&'a str>,
    pub operation: &'a str,
    pub table: Option<&'a str>,
    pub row_pk: Option<&'a str>,
    pub changed: Option<&'a [String]>,
}

impl Content<'_> {
    /// Appends the content to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(b'[');
        out.extend_from_slice(self.epoch.as_bytes());
        out.extend_from_slice(b", ");
        json_string(out, self.actor);
        out.extend_from_slice(if self.actor_given { b", true, " } else { b", false, " });
        json_opt(out, self.request_id);
        out.extend_from_slice(b", ");
        json_string(out, self.operation);
        out.extend_from_slice(b", ");
        json_opt(out, self.table);
        out.extend_from_slice(b"]\n");
        out.extend_from_slice(self.row_pk.unwrap_or("null").as_bytes());
        out.push(b'\n');
        match self.changed {
            None => out.extend_from_slice(b"null"),
            Some(cols) => {
                out.push(b'[');
                for (i, c) in cols.iter().enumerate() {
                    if i > 0 {
                        out.extend_from_slice(b", ");
                    }
                    json_string(out, c);
                }
                out.push(b']');
            }
        }
    }
}

fn json_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string as jsonb's text output writes it: `"`, `\\`, `\\b`,
/// `\\f`, `\\n`, `\\r`, `\\t` escaped, other bytes below 0x20 as
/// `\\u00xx`, everything else (UTF-8 included) as it is. Runs of plain
/// bytes are copied at once (verify renders every entry's strings).
fn json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut plain = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x0c => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            c if c < 0x20 => {
                out.extend_from_slice(&bytes[plain..i]);
                out.extend_from_slice(format!("\\u{c:04x}").as_bytes());
                plain = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain..i]);
        out.extend_from_slice(escaped);
        plain = i + 1;
    }
    out.extend_from_slice(&bytes[plain..]);
    out.push(b'"');
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
    /// Tables listed in `spec.audit.excludeTables` that still carry one of
    /// the audit triggers (of [`TABLE_TRIGGERS`] or an earlier version's):
    /// their triggers are dropped.
    pub excluded_triggered: Vec<String>,
    /// `_tenancy_audit` or `_tenancy_audit_head` exists as something else
    /// than a table (a view, say): put there by the tenant's owner. The
    /// reconcile reports it and leaves it alone.
    pub misshapen: Vec<String>,
}

/// The tenant's anchoring, as the catalog and `tenancy.audit_heads` show
/// it (read by the admin: catalogs and the control schema only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnchorState {
    /// The anchor role of this database ([`ANCHOR_ROLE_PREFIX`] + oid).
    pub role: String,
    /// The tenant's anchor function exists with the expected body, owner,
    /// SECURITY DEFINER, search_path and marker, EXECUTE only for the
    /// tenant's owner, who may use its schema.
    pub function_current: bool,
    /// The tenant has a head in `tenancy.audit_heads`.
    pub seeded: bool,
    /// When the operator last pruned the tenant's log.
    pub pruned_at: Option<DateTime<Utc>>,
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
    TriggerTable {
        table: String,
        replace: bool,
    },
    /// The audit triggers of a table excluded from auditing, dropped.
    UntriggerTable {
        table: String,
    },
    SetPgauditLog,
    /// The tenant's anchor function in [`ANCHOR_SCHEMA`] (admin), owned by
    /// the anchor `role`, its uid a literal in its body.
    AnchorFunction {
        uid: String,
        role: String,
    },
    /// The first head in `tenancy.audit_heads`: the in-schema head, through
    /// the anchor function (as the owner; a tenant whose chain predates
    /// anchoring keeps its chain).
    SeedHead,
}

impl AuditAction {
    pub fn label(&self) -> &'static str {
        match self {
            AuditAction::CreateTables => "CreateAuditTables",
            AuditAction::ReplaceFunctions => "ReplaceAuditFunctions",
            AuditAction::GuardTable => "GuardAuditTable",
            AuditAction::TriggerTable { .. } => "AuditTable",
            AuditAction::UntriggerTable { .. } => "UnauditTable",
            AuditAction::SetPgauditLog => "SetPgauditLog",
            AuditAction::AnchorFunction { .. } => "AnchorFunction",
            AuditAction::SeedHead => "SeedAuditHead",
        }
    }

    /// Runs as the tenant's owner role, on a confined session (everything
    /// but the role setting and the anchor function).
    fn as_owner(&self) -> bool {
        !matches!(self, AuditAction::SetPgauditLog | AuditAction::AnchorFunction { .. })
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
    actions.extend(state.untriggered.iter().map(|t| AuditAction::TriggerTable {
        table: t.clone(),
        replace: state.stale.contains(t),
    }));
    actions.extend(
        state
            .excluded_triggered
            .iter()
            .map(|t| AuditAction::UntriggerTable { table: t.clone() }),
    );
    if let Some(p) = pgaudit {
        if p.loaded && p.can_set && !p.satisfied() {
            actions.push(AuditAction::SetPgauditLog);
        }
    }
    actions
}

/// The steps that converge the tenant's anchoring: its anchor function
/// (admin) and its first head (owner, after the owner's other steps). Pure.
pub fn plan_anchor(state: &AuditState, anchor: &AnchorState, uid: &str) -> Vec<AuditAction> {
    let mut actions = Vec::new();
    if !state.schema_exists {
        return actions;
    }
    if !anchor.function_current {
        actions.push(AuditAction::AnchorFunction {
            uid: uid.to_owned(),
            role: anchor.role.clone(),
        });
    }
    if !anchor.seeded {
        actions.push(AuditAction::SeedHead);
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
        ReadAuditing::NeedsSuperuser {
            app_role: app_role.to_owned(),
            admin: admin.to_owned(),
        }
    }
}

/// The expected source of each audit function, by name.
fn function_bodies(name: &TenantName) -> Result<BTreeMap<&'static str, String>, PgError> {
    let schema = quote_ident(&name.schema())?;
    let owner = quote_literal(&name.owner_role())?;
    let schema_lit = quote_literal(&name.schema())?;
    // The append, shared by the write function (prune's PRUNE entry) and the
    // trigger function, which runs it inline (a nested SECURITY DEFINER call
    // per statement costs a GUC save/restore and a function call):
    // `{op}`, `{table}`, `{pks}` (jsonb[]) and `{changed}` (text[]) are
    // expressions of the enclosing function.
    let append = |op: &str, table: &str, pks: &str, changed: &str, ret: &str| {
        let header = header_sql("v_time", "v_actor", "v_given", "v_request", op, table);
        let tail = tail_sql(changed);
        format!(
            r#"
  IF coalesce(cardinality({pks}), 0) = 0 THEN
    RETURN{ret};
  END IF;
  -- The head row's lock serializes appends per tenant until commit. The
  -- first append of a transaction marks the head with its xid (the update
  -- takes the lock, waiting for the writer before), which queues the
  -- deferred tail trigger on the head: at commit, once per transaction
  -- however many entries it appended, it moves the head to the last entry.
  -- (Updating the head per append would make a long transaction
  -- quadratic.) A later append finds the mark, and the lock, its own. A
  -- REPEATABLE READ writer that raced another fails here (40001) rather
  -- than fork the chain.
  UPDATE {schema}.{HEAD_TABLE} SET xid = txid_current() WHERE xid IS DISTINCT FROM txid_current();
  IF NOT FOUND THEN
    SELECT h.xid INTO v_xid FROM {schema}.{HEAD_TABLE} h WHERE h.xid = txid_current();
    IF NOT FOUND THEN
      RAISE EXCEPTION 'the audit chain head %.{HEAD_TABLE} has no row', {schema_lit}
        USING ERRCODE = 'no_data_found';
    END IF;
  END IF;
  SELECT a.hash INTO v_hash FROM {schema}.{AUDIT_TABLE} a ORDER BY a.id DESC LIMIT 1;
  v_hash := coalesce(v_hash, decode(repeat('00', 32), 'hex'));
  v_time := clock_timestamp();
  v_actor := nullif(current_setting('tenancy.actor', true), '');
  v_given := v_actor IS NOT NULL;
  v_actor := coalesce(v_actor, session_user::text);
  v_request := nullif(current_setting('tenancy.request_id', true), '');
  -- The content's first and last lines are the statement's; only the key
  -- differs per row.
  v_header := convert_to({header} || E'\n', 'UTF8');
  v_tail := convert_to(E'\n' || {tail}, 'UTF8');
  FOREACH v_pk IN ARRAY {pks} LOOP
    v_i := v_i + 1;
    v_prevs[v_i] := v_hash;
    v_hash := sha256(v_hash || v_header || convert_to({pk}, 'UTF8') || v_tail);
    v_hashes[v_i] := v_hash;
  END LOOP;
  -- Ids are drawn in unnest's order: the chain's order.
  INSERT INTO {schema}.{AUDIT_TABLE} ("time", actor, actor_given, request_id, operation, table_name, row_pk, changed_columns, prev_hash, hash)
  SELECT v_time, v_actor, v_given, v_request, {op}, {table}, u.pk, {changed}, u.prev, u.hash
    FROM unnest({pks}, v_prevs, v_hashes) AS u(pk, prev, hash);"#,
            pk = pk_sql("v_pk"),
        )
    };
    const APPEND_VARS: &str = "
  v_hash bytea;
  v_time timestamptz;
  v_actor text;
  v_given boolean;
  v_request text;
  v_header bytea;
  v_tail bytea;
  v_pk jsonb;
  v_prevs bytea[] := '{}';
  v_hashes bytea[] := '{}';
  v_i integer := 0;
  v_xid bigint;";
    let write = format!(
        "\nDECLARE{APPEND_VARS}\nBEGIN{}\nEND\n",
        append("p_op", "p_table", "p_pks", "p_changed", "")
    );
    let trigger = format!(
        r#"
DECLARE{APPEND_VARS}
  v_cols text;
  v_keys text[];
  v_all jsonb[];
  v_pks jsonb[] := '{{}}';
  v_new jsonb;
  v_old jsonb;
  v_changed text[];
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    v_pks := ARRAY[NULL::jsonb];
  ELSIF TG_LEVEL = 'ROW' THEN
    -- A per-row UPDATE trigger of an earlier version, until the reconcile
    -- replaces it.
    v_new := to_jsonb(NEW);
    v_old := to_jsonb(OLD);
    SELECT coalesce(array_agg(n.key ORDER BY n.key), '{{}}') INTO v_changed
      FROM jsonb_each(v_new) n WHERE (v_old -> n.key) IS DISTINCT FROM n.value;
    v_pks := ARRAY[jsonb_build_array((
      SELECT jsonb_object_agg(a.attname, v_new -> a.attname::text)
        FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
       WHERE i.indrelid = TG_RELID AND i.indisprimary))];
  ELSIF TG_OP = 'UPDATE' THEN
    -- The old and new transition tables hold each updated row at the same
    -- position. The keys are the new rows' (as the per-row trigger gave);
    -- the changed columns are those any row of the statement changed.
    SELECT array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum)) INTO v_keys
      FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = TG_RELID AND i.indisprimary;
    WITH o AS (SELECT to_jsonb(o) AS j, row_number() OVER () AS n FROM tenancy_old o),
         u AS (SELECT to_jsonb(u) AS j, row_number() OVER () AS n FROM tenancy_new u),
         p AS (SELECT o.j AS old, u.j AS new, n FROM o JOIN u USING (n))
    SELECT (SELECT array_agg((SELECT jsonb_object_agg(k, p.new -> k) FROM unnest(v_keys) k) ORDER BY p.n) FROM p),
           (SELECT coalesce(array_agg(DISTINCT e.key ORDER BY e.key), '{{}}') FROM p, jsonb_each(p.new) e WHERE (p.old -> e.key) IS DISTINCT FROM e.value)
      INTO v_all, v_changed;
  ELSE
    SELECT array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum)),
           string_agg(format('%L, t.%I', a.attname, a.attname), ', ' ORDER BY array_position(i.indkey::int2[], a.attnum))
      INTO v_keys, v_cols
      FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = TG_RELID AND i.indisprimary;
    -- A statement of a few rows (the usual application write) reads its
    -- keys with a plan cached for the session; a large one with a query
    -- naming the key columns, planned per statement but touching only them.
    IF TG_OP = 'INSERT' THEN
      SELECT count(*) INTO v_i FROM (SELECT FROM tenancy_new LIMIT {SMALL_STATEMENT}) s;
    ELSE
      SELECT count(*) INTO v_i FROM (SELECT FROM tenancy_old LIMIT {SMALL_STATEMENT}) s;
    END IF;
    IF v_i < {SMALL_STATEMENT} AND TG_OP = 'INSERT' THEN
      SELECT array_agg((SELECT jsonb_object_agg(k, to_jsonb(t) -> k) FROM unnest(v_keys) k)) INTO v_all FROM tenancy_new t;
    ELSIF v_i < {SMALL_STATEMENT} THEN
      SELECT array_agg((SELECT jsonb_object_agg(k, to_jsonb(t) -> k) FROM unnest(v_keys) k)) INTO v_all FROM tenancy_old t;
    ELSE
      EXECUTE format('SELECT array_agg(%s) FROM %I t',
                     CASE WHEN v_cols IS NULL THEN 'NULL::jsonb' ELSE 'pg_catalog.jsonb_build_object(' || v_cols || ')' END,
                     CASE TG_OP WHEN 'INSERT' THEN 'tenancy_new' ELSE 'tenancy_old' END)
        INTO v_all;
    END IF;
    v_i := 0;
  END IF;
  IF TG_LEVEL = 'STATEMENT' AND TG_OP <> 'TRUNCATE' THEN
    IF coalesce(cardinality(v_all), 0) = 0 THEN
      RETURN NULL;
    END IF;
    -- One entry per {CHUNK_ROWS} rows of the statement: their keys as a JSON
    -- array (a row without a primary key counts as null), in the transition
    -- table's order. No rows: no entry.
    FOR v_i IN 0 .. (coalesce(cardinality(v_all), 0) - 1) / {CHUNK_ROWS} LOOP
      v_pks[v_i + 1] := to_jsonb(v_all[v_i * {CHUNK_ROWS} + 1 : (v_i + 1) * {CHUNK_ROWS}]);
    END LOOP;
  END IF;{}
  RETURN NULL;
END
"#,
        append("TG_OP", "TG_TABLE_NAME::text", "v_pks", "v_changed", " NULL")
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
    // At commit (deferred, once per transaction: queued by the first
    // append's update of the head's xid): the last entry moves the head to
    // itself, and the tenant's head in tenancy.audit_heads through its
    // anchor function (which refuses to move it back). Appends are
    // serialized by the head's row lock, so the last entry is this
    // transaction's. The update touches the head only when it moves, so a
    // tail trigger without its WHEN clause (put there by hand) still ends.
    let anchor = anchor_fn(name)?;
    let tail = format!(
        r#"
DECLARE
  v_last bigint;
  v_hash bytea;
BEGIN
  SELECT a.id, a.hash INTO v_last, v_hash FROM {schema}.{AUDIT_TABLE} a ORDER BY a.id DESC LIMIT 1;
  IF v_last IS NOT NULL THEN
    UPDATE {schema}.{HEAD_TABLE} SET last_id = v_last, hash = v_hash WHERE last_id IS DISTINCT FROM v_last OR hash IS DISTINCT FROM v_hash;
    PERFORM {anchor}(v_last, v_hash);
  END IF;
  RETURN NULL;
END
"#
    );
    Ok(BTreeMap::from([
        (WRITE_FN, write),
        (TRIGGER_FN, trigger),
        (GUARD_FN, guard),
        (TAIL_FN, tail),
    ]))
}

/// The tenant's anchor function, qualified and quoted.
fn anchor_fn(name: &TenantName) -> Result<String, PgError> {
    Ok(format!(
        "{}.{}",
        quote_ident(ANCHOR_SCHEMA)?,
        quote_ident(&name.schema())?
    ))
}

/// The source of the tenant's anchor function: moves the tenant's head in
/// `tenancy.audit_heads` forward (a later row, or the same row with the same
/// hash), refuses anything else. The uid is a literal, so the function can
/// only ever write its own tenant's row.
pub fn anchor_function_body(name: &TenantName, uid: &str) -> Result<String, PgError> {
    let uid = quote_literal(uid)?;
    let tenant = quote_literal(name.as_str())?;
    Ok(format!(
        r#"
BEGIN
  IF p_last_id IS NULL OR p_last_id < 0 OR p_hash IS NULL OR octet_length(p_hash) <> 32 THEN
    RAISE EXCEPTION 'not an audit chain head: row %', p_last_id USING ERRCODE = 'invalid_parameter_value';
  END IF;
  INSERT INTO tenancy.audit_heads AS h (tenant_uid, last_id, hash, moved_at) VALUES ({uid}, p_last_id, p_hash, now())
  ON CONFLICT (tenant_uid) DO UPDATE SET last_id = excluded.last_id, hash = excluded.hash, moved_at = excluded.moved_at
   WHERE h.last_id < excluded.last_id OR (h.last_id = excluded.last_id AND h.hash = excluded.hash);
  IF NOT FOUND THEN
    RAISE EXCEPTION 'the audit chain head of tenant % cannot move back or be rewritten (to row %)', {tenant}, p_last_id
      USING ERRCODE = 'insufficient_privilege';
  END IF;
END
"#
    ))
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
            // Before 2026-12 the tail was a deferred trigger per audit entry
            // on the audit table; it is now one per transaction on the head.
            format!("DROP TRIGGER IF EXISTS {TAIL_TRIGGER} ON {schema}.{AUDIT_TABLE}"),
            format!("DROP TRIGGER IF EXISTS {TAIL_TRIGGER} ON {schema}.{HEAD_TABLE}"),
            format!(
                "CREATE CONSTRAINT TRIGGER {TAIL_TRIGGER} AFTER UPDATE ON {schema}.{HEAD_TABLE} DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (OLD.xid IS DISTINCT FROM NEW.xid) EXECUTE FUNCTION {schema}.{TAIL_FN}()"
            ),
        ],
        AuditAction::TriggerTable { table, replace } => {
            let t = format!("{schema}.{}", quote_ident(table)?);
            let f = format!("{schema}.{TRIGGER_FN}()");
            let [ins, upd, del, trunc] = TABLE_TRIGGERS;
            // A table without any of them (a migration's new table) skips
            // the drops: 4 statements fewer per table in a rollout.
            let mut v: Vec<String> = if *replace {
                TABLE_TRIGGERS
                    .iter()
                    .chain(&LEGACY_TABLE_TRIGGERS)
                    .map(|tg| format!("DROP TRIGGER IF EXISTS {tg} ON {t}"))
                    .collect()
            } else {
                Vec::new()
            };
            v.extend([
                format!("CREATE TRIGGER {ins} AFTER INSERT ON {t} REFERENCING NEW TABLE AS tenancy_new FOR EACH STATEMENT EXECUTE FUNCTION {f}"),
                format!("CREATE TRIGGER {upd} AFTER UPDATE ON {t} REFERENCING OLD TABLE AS tenancy_old NEW TABLE AS tenancy_new FOR EACH STATEMENT EXECUTE FUNCTION {f}"),
                format!("CREATE TRIGGER {del} AFTER DELETE ON {t} REFERENCING OLD TABLE AS tenancy_old FOR EACH STATEMENT EXECUTE FUNCTION {f}"),
                format!("CREATE TRIGGER {trunc} AFTER TRUNCATE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION {f}"),
            ]);
            v
        }
        AuditAction::UntriggerTable { table } => {
            let t = format!("{schema}.{}", quote_ident(table)?);
            TABLE_TRIGGERS
                .iter()
                .chain(&LEGACY_TABLE_TRIGGERS)
                .map(|tg| format!("DROP TRIGGER IF EXISTS {tg} ON {t}"))
                .collect()
        }
        AuditAction::SetPgauditLog => vec![format!("ALTER ROLE {app} SET pgaudit.log TO {}", quote_literal(PGAUDIT_CLASSES)?)],
        AuditAction::AnchorFunction { uid, role } => {
            let f = anchor_fn(name)?;
            let owner = quote_ident(&name.owner_role())?;
            let role = quote_ident(role)?;
            let marker = quote_literal(&super::tenant::ownership_marker(uid))?;
            let body = anchor_function_body(name, uid)?;
            // Created by the admin (a member of the anchor role) and then
            // given to the anchor role, so it runs with the anchor role's
            // rights only; grants made before the owner change move with it.
            // Dropped first: a replaced function would keep grants made
            // by hand.
            vec![
                format!("DROP FUNCTION IF EXISTS {f}(bigint, bytea)"),
                format!(
                    "CREATE FUNCTION {f}(p_last_id bigint, p_hash bytea) RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $tenancy_fn${body}$tenancy_fn$"
                ),
                format!("REVOKE ALL ON FUNCTION {f}(bigint, bytea) FROM PUBLIC"),
                format!("GRANT EXECUTE ON FUNCTION {f}(bigint, bytea) TO {owner}"),
                format!("COMMENT ON FUNCTION {f}(bigint, bytea) IS {marker}"),
                format!("ALTER FUNCTION {f}(bigint, bytea) OWNER TO {role}"),
            ]
        }
        AuditAction::SeedHead => vec![format!("SELECT {}(h.last_id, h.hash) FROM {schema}.{HEAD_TABLE} h", anchor_fn(name)?)],
    })
}

/// Reads the audit objects of the tenant schema: 1 query (constant text, so
/// one prepared statement for every tenant), no writes. Every relation and
/// type it names is schema-qualified: inside a migration's transaction
/// ([`observe_in_tx`]) the session's temporary schema, searched before
/// `pg_catalog` for relations and types, could hold the owner's stand-ins.
pub async fn observe(conn: &mut PgConnection, name: &TenantName, exclude: &[String]) -> Result<AuditState, PgError> {
    let schema = name.schema();
    // Relations and functions of the schema are found through their
    // dependency on it (pg_depend's reference index): pg_class and pg_proc
    // have no index on the namespace alone, and a scan of either grows with
    // the number of tenants. Every table and function records that
    // dependency (TOAST tables and composite types excepted, neither audited).
    // Each function is current when sha256(name:source) is the expected one
    // and its owner, SECURITY DEFINER flag and search_path are right.
    let expected: Vec<String> = function_bodies(name)?
        .iter()
        .map(|(f, body)| hex::encode(Sha256::digest(format!("{f}:{body}").as_bytes())))
        .collect();
    let row = sqlx::query(
        "SELECT n.oid IS NOT NULL AS schema_exists,
                EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.relnamespace = n.oid AND c.relname = $2 AND c.relkind = 'r') AS audit,
                EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.relnamespace = n.oid AND c.relname = $3 AND c.relkind = 'r') AS head,
                EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
                         WHERE c.relnamespace = n.oid AND c.relname = $2 AND t.tgname = $4 AND t.tgenabled = 'O'
                           AND p.pronamespace = n.oid AND p.proname = $5)
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
                         WHERE c.relnamespace = n.oid AND c.relname = $3 AND t.tgname = $11 AND t.tgenabled = 'O'
                           AND t.tgdeferrable AND t.tginitdeferred AND p.pronamespace = n.oid AND p.proname = $11)
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
                         WHERE c.relnamespace = n.oid AND c.relname = $2 AND t.tgname = $11) AS guard,
                ARRAY(SELECT c.relname::pg_catalog.text FROM pg_catalog.pg_class c WHERE c.relnamespace = n.oid AND c.relname IN ($2, $3) AND c.relkind <> 'r' ORDER BY 1) AS misshapen,
                coalesce(u.untriggered, '{}') AS untriggered,
                coalesce(u.stale, '{}') AS stale,
                u.excluded_triggered,
                (SELECT count(*) FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_proc p ON p.oid = d.objid
                  WHERE d.refclassid = 'pg_catalog.pg_namespace'::pg_catalog.regclass AND d.refobjid = n.oid AND d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                    AND p.pronamespace = n.oid
                    AND encode(sha256(convert_to(p.proname || ':' || p.prosrc, 'UTF8')), 'hex') = ANY ($8)
                    AND p.prosecdef = (p.proname <> $5)
                    AND p.proowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $9)
                    AND p.proconfig = ARRAY[$10]) = cardinality($8) AS functions_current
           FROM (SELECT $1::pg_catalog.text AS name) x LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = x.name
           LEFT JOIN LATERAL (
                SELECT array_agg(c.relname::pg_catalog.text ORDER BY c.relname) FILTER (WHERE NOT ex.excluded AND tg.good <> 4) AS untriggered,
                       array_agg(c.relname::pg_catalog.text ORDER BY c.relname) FILTER (WHERE NOT ex.excluded AND tg.good <> 4 AND tg.ours > 0) AS stale,
                       array_agg(c.relname::pg_catalog.text ORDER BY c.relname) FILTER (WHERE ex.excluded AND tg.ours > 0) AS excluded_triggered
                  FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_class c ON c.oid = d.objid
                 CROSS JOIN LATERAL (SELECT c.relname::pg_catalog.text = ANY ($13) AS excluded) ex
                 CROSS JOIN LATERAL (SELECT count(*) FILTER (WHERE t.tgname = ANY ($6) AND t.tgenabled = 'O' AND p.pronamespace = n.oid AND p.proname = $7) AS good,
                                            count(*) AS ours
                                       FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
                                      WHERE t.tgrelid = c.oid AND t.tgname = ANY ($12)) tg
                 WHERE d.refclassid = 'pg_catalog.pg_namespace'::pg_catalog.regclass AND d.refobjid = n.oid AND d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
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
    .bind(TABLE_TRIGGERS.iter().chain(&LEGACY_TABLE_TRIGGERS).copied().collect::<Vec<_>>())
    .bind(exclude)
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
            excluded_triggered: row
                .try_get::<Option<Vec<String>>, _>("excluded_triggered")?
                .unwrap_or_default(),
            misshapen: row.try_get::<Option<Vec<String>>, _>("misshapen")?.unwrap_or_default(),
            functions_current: row.try_get::<Option<bool>, _>("functions_current")?.unwrap_or(false),
        })
    };
    decode().map_err(query_err("decoding the tenant's audit objects"))
}

/// Reads the tenant's anchoring (admin: catalogs and `tenancy.audit_heads`
/// only): 1 query, no writes.
pub async fn observe_anchor(conn: &mut PgConnection, name: &TenantName, uid: &str) -> Result<AnchorState, PgError> {
    let row = sqlx::query(
        "SELECT $5 || d.oid::text AS role,
                coalesce((SELECT p.prosrc = $3 AND p.prosecdef AND p.proowner = r.oid AND p.proconfig = ARRAY[$4]
                                 AND obj_description(p.oid, 'pg_proc') = $6
                                 AND EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = o.oid AND a.privilege_type = 'EXECUTE')
                                 AND NOT EXISTS (SELECT 1 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a WHERE a.grantee NOT IN (p.proowner, o.oid))
                                 AND has_schema_privilege(o.oid, s.oid, 'USAGE')
                            FROM pg_namespace s JOIN pg_proc p ON p.pronamespace = s.oid
                           WHERE s.nspname = $7 AND p.proname = $1 AND p.proargtypes = '20 17'::oidvector), false) AS function_current,
                h.tenant_uid IS NOT NULL AS seeded,
                h.pruned_at
           FROM pg_database d
           LEFT JOIN pg_roles r ON r.rolname = $5 || d.oid::text
           LEFT JOIN pg_roles o ON o.rolname = $8
           LEFT JOIN tenancy.audit_heads h ON h.tenant_uid = $2
          WHERE d.datname = current_database()",
    )
    .bind(name.schema())
    .bind(uid)
    .bind(anchor_function_body(name, uid)?)
    .bind(FN_SEARCH_PATH)
    .bind(ANCHOR_ROLE_PREFIX)
    .bind(super::tenant::ownership_marker(uid))
    .bind(ANCHOR_SCHEMA)
    .bind(name.owner_role())
    .fetch_one(&mut *conn)
    .await
    .map_err(query_err("reading the tenant's audit anchoring"))?;
    let decode = || -> Result<AnchorState, sqlx::Error> {
        Ok(AnchorState {
            role: row.try_get("role")?,
            function_current: row.try_get("function_current")?,
            seeded: row.try_get("seeded")?,
            pruned_at: row.try_get("pruned_at")?,
        })
    };
    decode().map_err(query_err("decoding the tenant's audit anchoring"))
}

/// Creates, once per database and idempotently, what anchoring needs: the
/// anchor role (NOLOGIN; the admin is a member so it can give it the
/// anchor functions) with the right to move heads in
/// `tenancy.audit_heads`, and the schema [`ANCHOR_SCHEMA`]. Called at start
/// after the control schema's migrations; serialized across operator
/// instances by a row lock on `tenancy.locks`.
pub async fn prepare_anchoring(pool: &PgPool) -> Result<(), PgError> {
    let mut tx = pool.begin().await.map_err(query_err("starting the anchoring set-up"))?;
    sqlx::raw_sql(
        "INSERT INTO tenancy.locks (kind, key) VALUES ('audit-anchoring', '') ON CONFLICT DO NOTHING;
         SELECT 1 FROM tenancy.locks WHERE kind = 'audit-anchoring' AND key = '' FOR UPDATE",
    )
    .execute(&mut *tx)
    .await
    .map_err(query_err("locking the anchoring set-up"))?;
    let sql = format!(
        r#"DO $tenancy_prep$
DECLARE
  v_role text := {prefix} || (SELECT oid FROM pg_database WHERE datname = current_database())::text;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
    EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
    EXECUTE format('COMMENT ON ROLE %I IS %L', v_role, 'tenancy.dev: owns the audit anchor functions of database ' || current_database());
  END IF;
  IF NOT pg_has_role(current_user, v_role, 'MEMBER') THEN
    EXECUTE format('GRANT %I TO %I', v_role, current_user);
  END IF;
  EXECUTE format('GRANT USAGE ON SCHEMA tenancy TO %I', v_role);
  EXECUTE format('GRANT SELECT, INSERT, UPDATE ON tenancy.audit_heads TO %I', v_role);
  IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = {schema}) THEN
    EXECUTE format('CREATE SCHEMA %I', {schema});
  END IF;
  -- Only so that the anchor functions can be given to the role (a new
  -- owner needs CREATE on the schema); nobody logs in as it.
  EXECUTE format('GRANT USAGE, CREATE ON SCHEMA %I TO %I', {schema}, v_role);
  -- Every tenant owner calls its own function here: USAGE for everyone,
  -- once, rather than one ACL entry per tenant on the schema's catalog row
  -- (a grant per tenant made concurrent reconciles fail with "tuple
  -- concurrently updated", and 10,000 entries would bloat the row). The
  -- schema holds only the anchor functions, whose EXECUTE is each revoked
  -- from PUBLIC and granted to one owner.
  EXECUTE format('GRANT USAGE ON SCHEMA %I TO PUBLIC', {schema});
END
$tenancy_prep$"#,
        prefix = quote_literal(ANCHOR_ROLE_PREFIX)?,
        schema = quote_literal(ANCHOR_SCHEMA)?,
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut *tx)
        .await
        .map_err(query_err("preparing the audit anchoring"))?;
    tx.commit()
        .await
        .map_err(query_err("committing the anchoring set-up"))?;
    Ok(())
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
    let app_setting = settings
        .iter()
        .find_map(|kv| kv.strip_prefix("pgaudit.log=").map(str::to_owned));
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
    Ok(PgauditState {
        loaded,
        can_set,
        app_setting,
        admin,
    })
}

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

/// The in-transaction check's query: what [`observe`] reads, as raw rows
/// for [`converged_untriggered`] to judge, cheap to plan in a new backend
/// (docs/migrations.md has the figures). Every object of the schema is
/// found through its dependency on the schema (`pg_depend`'s reference
/// index, once, in the CTE); each branch then reads one catalog by oid: no
/// join, no view, no function but `to_regnamespace`/`to_regrole`, every
/// relation and type schema-qualified (a temporary object never stands in
/// for a catalog). `2615`, `1259` and `1255` are the fixed oids of
/// `pg_namespace`, `pg_class` and `pg_proc` (wrong ones would find nothing:
/// the full observation then runs). Rows: `what` 1, a relation of the
/// schema (any kind); 2, a trigger named like one of the operator's
/// (`$2`) on one of them; 3, a function of the schema named like an audit
/// function (`$3`), `owned` when its owner is `$4`. Binds: the schema, the
/// trigger names, the function names, the owner role.
const IN_TX_SQL: &str = "WITH d AS (SELECT d.classid, d.objid FROM pg_catalog.pg_depend d
              WHERE d.refclassid = '2615' AND d.refobjid = pg_catalog.to_regnamespace($1))
SELECT 1 AS what, c.oid, c.relname AS name, c.relkind AS kind, c.relispartition AS partition,
       NULL::pg_catalog.oid AS function, NULL::pg_catalog.\"char\" AS enabled, NULL::pg_catalog.bool AS deferred,
       NULL::pg_catalog.bool AS definer, NULL::pg_catalog.bool AS owned, NULL::pg_catalog.text[] AS config, NULL::pg_catalog.text AS source
  FROM pg_catalog.pg_class c
 WHERE c.oid = ANY (ARRAY(SELECT d.objid FROM d WHERE d.classid = '1259'))
UNION ALL
SELECT 2, t.tgrelid, t.tgname, NULL, NULL, t.tgfoid, t.tgenabled, t.tgdeferrable AND t.tginitdeferred, NULL, NULL, NULL, NULL
  FROM pg_catalog.pg_trigger t
 WHERE t.tgrelid = ANY (ARRAY(SELECT d.objid FROM d WHERE d.classid = '1259')) AND t.tgname = ANY ($2)
UNION ALL
SELECT 3, p.oid, p.proname, NULL, NULL, NULL, NULL, NULL, p.prosecdef, p.proowner = pg_catalog.to_regrole($4), p.proconfig, p.prosrc
  FROM pg_catalog.pg_proc p
 WHERE p.oid = ANY (ARRAY(SELECT d.objid FROM d WHERE d.classid = '1255')) AND p.proname = ANY ($3)";

/// One row of the in-transaction check ([`IN_TX_SQL`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CatalogFact {
    /// A relation of the tenant schema, of any kind (`pg_class.relkind`).
    Relation {
        oid: u32,
        name: String,
        kind: char,
        partition: bool,
    },
    /// A trigger named like one of the operator's, on a relation of the
    /// schema: its function, whether it is enabled (`tgenabled = 'O'`) and
    /// whether it is deferrable and initially deferred.
    Trigger {
        relation: u32,
        name: String,
        function: u32,
        enabled: char,
        deferred: bool,
    },
    /// A function of the schema named like one of the audit functions.
    Function {
        oid: u32,
        name: String,
        definer: bool,
        owned: bool,
        config: Option<Vec<String>>,
        source: String,
    },
}

/// Judges the in-transaction check's rows. Pure. When they show the audit
/// log's own objects as [`observe`] requires them (the audit and head
/// tables, as tables; every audit function with its expected source
/// (`bodies`), SECURITY DEFINER flag, owner and search_path, counted as
/// `observe` counts them; the guard trigger on the audit table and the
/// deferred tail trigger on the head table (none on the audit table),
/// enabled, calling the schema's guard and tail functions),
/// gives what `observe` would say of the tenant tables: those lacking one
/// of [`TABLE_TRIGGERS`] (enabled, calling the schema's trigger function),
/// and those of them that carry one of those names, both sorted by name.
/// None otherwise: something of the audit log was dropped, disabled or
/// replaced, and the full observation decides what to put back.
pub fn converged_untriggered(
    facts: &[CatalogFact],
    bodies: &BTreeMap<&'static str, String>,
    exclude: &[String],
) -> Option<Untriggered> {
    let functions: BTreeMap<u32, &str> = facts
        .iter()
        .filter_map(|f| match f {
            CatalogFact::Function { oid, name, .. } => Some((*oid, name.as_str())),
            _ => None,
        })
        .collect();
    let current = facts
        .iter()
        .filter(|f| match f {
            CatalogFact::Function {
                name,
                definer,
                owned,
                config,
                source,
                ..
            } => {
                bodies.get(name.as_str()) == Some(source)
                    && *definer == (name != GUARD_FN)
                    && *owned
                    && config.as_deref() == Some(&[FN_SEARCH_PATH.to_owned()][..])
            }
            _ => false,
        })
        .count();
    if current != bodies.len() {
        return None;
    }
    let calls = |function: &u32, f: &str| functions.get(function) == Some(&f);
    let triggers = |rel: u32| {
        facts.iter().filter_map(move |f| match f {
            CatalogFact::Trigger {
                relation,
                name,
                function,
                enabled,
                deferred,
            } if *relation == rel => Some((name.as_str(), function, *enabled == 'O', *deferred)),
            _ => None,
        })
    };
    let table = |wanted: &str| {
        facts.iter().find_map(|f| match f {
            CatalogFact::Relation { oid, name, kind, .. } if name == wanted => Some((*oid, *kind)),
            _ => None,
        })
    };
    let (Some((audit, 'r')), Some((head, 'r'))) = (table(AUDIT_TABLE), table(HEAD_TABLE)) else {
        return None;
    };
    let guard = triggers(audit)
        .any(|(name, function, enabled, _)| name == GUARD_TRIGGER && enabled && calls(function, GUARD_FN));
    // The tail is on the head (once per transaction), not on the audit
    // table (once per entry, as before 2026-12).
    let tail = triggers(head).any(|(name, function, enabled, deferred)| {
        name == TAIL_TRIGGER && enabled && deferred && calls(function, TAIL_FN)
    }) && !triggers(audit).any(|(name, ..)| name == TAIL_TRIGGER);
    if !(guard && tail) {
        return None;
    }
    let mut tables: Vec<(&str, u32)> = facts
        .iter()
        .filter_map(|f| match f {
            CatalogFact::Relation {
                oid,
                name,
                kind: 'r' | 'p',
                partition: false,
            } if !name.starts_with("_tenancy_") => Some((name.as_str(), *oid)),
            _ => None,
        })
        .collect();
    tables.sort();
    let mut out = Untriggered::default();
    for (name, oid) in tables {
        let ours: Vec<_> = triggers(oid)
            .filter(|(t, ..)| TABLE_TRIGGERS.contains(t) || LEGACY_TABLE_TRIGGERS.contains(t))
            .collect();
        if exclude.iter().any(|e| e == name) {
            if !ours.is_empty() {
                out.excluded_triggered.push(name.to_owned());
            }
            continue;
        }
        let good = ours
            .iter()
            .filter(|(t, function, enabled, _)| TABLE_TRIGGERS.contains(t) && *enabled && calls(function, TRIGGER_FN))
            .count();
        if good != TABLE_TRIGGERS.len() {
            out.untriggered.push(name.to_owned());
            if !ours.is_empty() {
                out.stale.push(name.to_owned());
            }
        }
    }
    Some(out)
}

/// What the light check gives of the tenant tables, each list sorted by
/// name: tables lacking an audit trigger, those of them carrying one of
/// the audit trigger names (replaced), and excluded tables still carrying
/// one (dropped); as [`AuditState`] names them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Untriggered {
    pub untriggered: Vec<String>,
    pub stale: Vec<String>,
    pub excluded_triggered: Vec<String>,
}

/// How [`observe_in_tx`] came to its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The light check showed the audit log's objects intact: only tables
    /// may need their triggers.
    Light,
    /// Something of the audit log's own was changed or missing: the full
    /// [`observe`] ran.
    Full,
}

/// The audit state inside a migration's transaction, after its SQL, on
/// the tenant's confined session: the light check ([`IN_TX_SQL`], judged
/// by [`converged_untriggered`]), and the full [`observe`] only when that
/// finds the audit log's own objects changed or missing. Either way the
/// state is the one `observe` gives. Every tenant's run is a new backend,
/// whose catalog caches are cold: there the full query cost 13 ms to plan
/// and the light one 2.7 ms (`pg_stat_statements`, 300 tenants, 4 at once;
/// docs/migrations.md). Round trips: 2
/// (3 with the full observation). Leaves `search_path` at `pg_catalog`
/// (so no operator or object of the tenant's can stand in for a built-in)
/// and `plan_cache_mode` at `force_generic_plan` (one plan per session,
/// which may run several migrations) for the rest of the transaction.
pub async fn observe_in_tx(
    conn: &mut PgConnection,
    name: &TenantName,
    exclude: &[String],
) -> Result<(AuditState, Observation), PgError> {
    sqlx::query("SELECT set_config('search_path', 'pg_catalog', true), set_config('plan_cache_mode', 'force_generic_plan', true)")
        .execute(&mut *conn)
        .await
        .map_err(query_err("pinning the audit check's search_path"))?;
    let bodies = function_bodies(name)?;
    let trigger_names: Vec<&str> = TABLE_TRIGGERS
        .iter()
        .chain(&LEGACY_TABLE_TRIGGERS)
        .copied()
        .chain([GUARD_TRIGGER, TAIL_TRIGGER])
        .collect();
    let function_names: Vec<&str> = bodies.keys().copied().collect();
    let rows = sqlx::query(IN_TX_SQL)
        .bind(name.schema())
        .bind(trigger_names)
        .bind(function_names)
        .bind(name.owner_role())
        .fetch_all(&mut *conn)
        .await
        .map_err(query_err("checking the tenant's audit objects"))?;
    let facts = rows
        .iter()
        .map(catalog_fact)
        .collect::<Result<Vec<_>, _>>()
        .map_err(query_err("decoding the tenant's audit objects"))?;
    if let Some(u) = converged_untriggered(&facts, &bodies, exclude) {
        let state = AuditState {
            schema_exists: true,
            table: true,
            head: true,
            functions_current: true,
            guard: true,
            untriggered: u.untriggered,
            stale: u.stale,
            excluded_triggered: u.excluded_triggered,
            misshapen: Vec::new(),
        };
        return Ok((state, Observation::Light));
    }
    Ok((observe(conn, name, exclude).await?, Observation::Full))
}

fn catalog_fact(row: &sqlx::postgres::PgRow) -> Result<CatalogFact, sqlx::Error> {
    use sqlx::postgres::types::Oid;
    let oid = row.try_get::<Oid, _>("oid")?.0;
    let name: String = row.try_get("name")?;
    let char_of = |c: i8| c as u8 as char;
    Ok(match row.try_get::<i32, _>("what")? {
        1 => CatalogFact::Relation {
            oid,
            name,
            kind: char_of(row.try_get("kind")?),
            partition: row.try_get("partition")?,
        },
        2 => CatalogFact::Trigger {
            relation: oid,
            name,
            function: row.try_get::<Oid, _>("function")?.0,
            enabled: char_of(row.try_get("enabled")?),
            deferred: row.try_get("deferred")?,
        },
        _ => CatalogFact::Function {
            oid,
            name,
            definer: row.try_get("definer")?,
            owned: row.try_get::<Option<bool>, _>("owned")?.unwrap_or(false),
            config: row.try_get("config")?,
            source: row.try_get("source")?,
        },
    })
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
    let (state, _) = observe_in_tx(conn, name, exclude).await.map_err(into_sqlx)?;
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
    super::tenant::record_event(
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

/// Whether a prune is due, and its cutoff: at most once a day. Pure.
pub fn prune_due(
    retention_days: Option<u32>,
    last_pruned: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let days = retention_days?;
    if last_pruned.is_some_and(|t| now - t < chrono::Duration::days(1)) {
        return None;
    }
    Some(now - chrono::Duration::days(days as i64))
}

/// The tenant's HKDF salt (from the registry; made with the tenant).
async fn salt_of(pool: &PgPool, name: &TenantName, uid: &str) -> Result<TenantSalt, PgError> {
    super::tenant::existing_key_salt(pool, uid)
        .await?
        .ok_or_else(|| PgError::Audit {
            tenant: name.to_string(),
            what: "the tenant has no key salt in the registry (it is not provisioned)".into(),
        })
}

/// The uid of a tenant by name, from the registry.
async fn uid_for(pool: &PgPool, name: &TenantName) -> Result<String, PgError> {
    super::tenant::uid_of(pool, name.as_str())
        .await?
        .ok_or_else(|| PgError::Audit {
            tenant: name.to_string(),
            what: "the tenant is not in the registry".into(),
        })
}

/// A confined session of the tenant (its ops login, password derived from
/// the active root key), on the admin pool's server.
async fn open_confined(pool: &PgPool, ring: &Keyring, name: &TenantName, uid: &str) -> Result<Confined, PgError> {
    let salt = salt_of(pool, name, uid).await?;
    let login = OpsLogin::derive(&super::Target::of_pool(pool), name, uid, ring, &salt).map_err(PgError::Keys)?;
    confined::connect(pool, &login).await
}

fn misshapen(name: &TenantName, objects: &[String]) -> PgError {
    PgError::Audit {
        tenant: name.to_string(),
        what: format!(
            "{} in schema {} is not a table (the tenant's owner replaced it, e.g. by a view): the operator does not touch it; \
             the chain cannot be kept or verified until an administrator puts the table back (docs/audit.md)",
            objects.join(" and "),
            name.schema()
        ),
    }
}

/// The audit half of a reconcile: observe (admin: catalogs and
/// `tenancy.*`), then converge the anchor function and the app role's
/// pgaudit setting (admin, one transaction) and the audit objects in the
/// schema (a confined session, one transaction); then prune when retention
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
        let mut c = open_confined(pool, ring, name, uid).await?;
        let result = async {
            let mut tx = Connection::begin(&mut *c).await?;
            let n = run(&mut tx, name, &owner).await?;
            tx.commit().await?;
            Ok::<usize, sqlx::Error>(n)
        }
        .await;
        match result {
            Ok(n) => statements += n,
            Err(e) => {
                c.close().await;
                return Err(PgError::Query {
                    action: "converging the audit log",
                    source: e,
                });
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
    if let Some(c) = session {
        c.close().await;
    }
    Ok(AuditOutcome {
        actions,
        statements,
        read_auditing: read,
        pruned,
    })
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

/// Deletes the audit rows older than `before` and keeps the rest
/// verifiable: an ANCHOR row takes the last pruned row's id, with
/// `prev_hash` and `hash` both that row's hash (the hash at the cut), so the
/// next row links to it; and a PRUNE row appended to the chain records the
/// cut (`row_pk`: through_id, cut_hash, rows), binding the anchor into the
/// chain. The cut is recorded in `tenancy.audit_heads` (admin) before the
/// rows go, so [`verify`] accepts an ANCHOR row only at or before a cut the
/// operator made; anchors before the cut are then forgotten. The rows are
/// deleted on a confined session, as the owner; appends wait meanwhile (the
/// head row is locked).
pub async fn prune(
    pool: &PgPool,
    ring: &Keyring,
    name: &TenantName,
    before: DateTime<Utc>,
    actor: &str,
) -> Result<PruneOutcome, PgError> {
    let uid = uid_for(pool, name).await?;
    let mut c = open_confined(pool, ring, name, &uid).await?;
    let out = prune_on(pool, &mut c, name, &uid, before, actor).await;
    c.close().await;
    out
}

async fn prune_on(
    pool: &PgPool,
    conn: &mut PgConnection,
    name: &TenantName,
    uid: &str,
    before: DateTime<Utc>,
    actor: &str,
) -> Result<PruneOutcome, PgError> {
    let schema = quote_ident(&name.schema())?;
    let cut: Option<(i64, Vec<u8>, DateTime<Utc>, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, hash, \"time\", operation FROM {schema}.{AUDIT_TABLE} WHERE \"time\" < $1 ORDER BY id DESC LIMIT 1"
    )))
    .bind(before)
    .fetch_optional(&mut *conn)
    .await
    .map_err(query_err("finding the audit log's cut"))?;
    let mut out = PruneOutcome {
        deleted: 0,
        anchor: None,
        statements: 1,
    };
    if let Some((id, hash, time, _)) = cut.filter(|c| c.3 != "ANCHOR") {
        // The cut first, so that a crash between here and the delete
        // leaves a chain that still verifies (the cut row is still there).
        let recorded = sqlx::query("UPDATE tenancy.audit_heads SET cut_id = $2, cut_hash = $3 WHERE tenant_uid = $1")
            .bind(uid)
            .bind(id)
            .bind(&hash)
            .execute(pool)
            .await
            .map_err(query_err("recording the audit log's cut"))?
            .rows_affected();
        if recorded == 0 {
            return Err(PgError::Audit {
                tenant: name.to_string(),
                what: "its chain is not anchored yet (the next reconcile anchors it); not pruned".into(),
            });
        }
        let mut tx = Connection::begin(&mut *conn)
            .await
            .map_err(query_err("starting the prune"))?;
        sqlx::query("SELECT set_config('tenancy.audit_prune', 'on', true), set_config('tenancy.actor', $1, true), set_config('tenancy.request_id', '', true)")
            .bind(actor)
            .execute(&mut *tx)
            .await
            .map_err(query_err("marking the prune"))?;
        // Under the chain's lock: the cut row must still be there (another
        // prune may have cut further meanwhile).
        let still: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT (SELECT a.hash = $2 AND a.operation <> 'ANCHOR' FROM {schema}.{AUDIT_TABLE} a WHERE a.id = $1) FROM {schema}.{HEAD_TABLE} FOR UPDATE"
        )))
        .bind(id)
        .bind(&hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_err("locking the audit chain"))?
        .flatten();
        out.statements += 3;
        if still == Some(true) {
            let deleted = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {schema}.{AUDIT_TABLE} WHERE id <= $1"
            )))
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
            out.statements += 3;
            out.deleted = deleted;
            out.anchor = Some(id);
        }
        tx.commit().await.map_err(query_err("committing the prune"))?;
        // Anchors before the cut cannot be checked any more.
        sqlx::query(
            "WITH gone AS (DELETE FROM tenancy.audit_anchors WHERE tenant_uid = $1 AND last_id < $2)
             UPDATE tenancy.audit_heads SET pruned_at = now() WHERE tenant_uid = $1",
        )
        .bind(uid)
        .bind(id)
        .execute(pool)
        .await
        .map_err(query_err("recording the prune"))?;
        out.statements += 1;
        return Ok(out);
    }
    sqlx::query("UPDATE tenancy.audit_heads SET pruned_at = now() WHERE tenant_uid = $1")
        .bind(uid)
        .execute(pool)
        .await
        .map_err(query_err("recording the prune time"))?;
    out.statements += 1;
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
    /// Anchors (`tenancy.audit_anchors`) whose MAC verified and whose row
    /// the walk reached with the anchored hash.
    pub anchors_checked: u64,
    /// Anchors that could not be checked: before the retention cut, or made
    /// under a root key version no longer in the keyring.
    pub anchors_skipped: u64,
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

/// A point the walk must pass through: the hash of the chain at row `id`
/// (0: the empty chain, hash [`GENESIS`]), as recorded outside the tenant
/// schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub id: i64,
    pub hash: Vec<u8>,
    /// What recorded it, for the message ("anchor #3 of ...").
    pub what: String,
    /// An anchor (counted in the report) rather than the head or the cut.
    pub is_anchor: bool,
}

/// What the operator recorded outside the tenant schema, for the walk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Anchored {
    /// Checkpoints (the anchored head read before the walk, the verified
    /// anchors, the retention cut), in any order.
    pub checkpoints: Vec<Checkpoint>,
    /// The last retention cut the operator recorded (row id, hash): the
    /// only ANCHOR row the chain may start from is at or before it.
    pub cut: Option<(i64, Vec<u8>)>,
    /// The anchored head's row read after the walk's snapshot: a row of the
    /// snapshot beyond it was appended without moving it.
    pub head_after: Option<i64>,
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
    /// The anchoring, when checked: checkpoints sorted by id (the next one
    /// to reach first), how many were passed or skipped.
    anchored: Option<Anchored>,
    next_checkpoint: usize,
    anchors_checked: u64,
    anchors_skipped: u64,
}

impl Walker {
    /// A walk that ends by checking the head row's (last id, hash).
    pub fn new(head: Option<(i64, Vec<u8>)>) -> Self {
        Walker {
            expected: GENESIS.to_vec(),
            rows: 0,
            anchor: None,
            anchor_confirmed: false,
            last_id: 0,
            first_break: None,
            head,
            head_seen: false,
            after_head: None,
            anchored: None,
            next_checkpoint: 0,
            anchors_checked: 0,
            anchors_skipped: 0,
        }
    }

    /// A walk that also checks what the operator anchored outside the
    /// schema: every checkpoint must be passed with its hash, an ANCHOR row
    /// must be at or before the recorded cut, and no row may lie beyond the
    /// anchored head.
    pub fn with_anchors(head: Option<(i64, Vec<u8>)>, mut anchored: Anchored) -> Self {
        anchored.checkpoints.sort_by_key(|c| c.id);
        Walker {
            anchored: Some(anchored),
            ..Walker::new(head)
        }
    }

    /// Records a break found outside the walk (an anchor that does not
    /// verify); the walk then stops at once.
    pub fn broken(&mut self, b: ChainBreak) {
        self.broke(b.id, b.what);
    }

    /// Passes the checkpoints up to row `r` (all of them at the end, None).
    /// `start`: the chain's first row is an ANCHOR at this id: checkpoints
    /// before it were pruned away.
    fn pass_checkpoints(&mut self, r: Option<&ChainRow>) {
        let Some(anchored) = &self.anchored else { return };
        let start = self.anchor.as_ref().map(|a| a.0);
        let mut found: Option<ChainBreak> = None;
        let (mut checked, mut skipped) = (0, 0);
        let mut i = self.next_checkpoint;
        while let Some(c) = anchored.checkpoints.get(i) {
            if r.is_some_and(|r| c.id > r.id) {
                break;
            }
            i += 1;
            if start.is_some_and(|s| c.id < s) {
                skipped += u64::from(c.is_anchor);
                continue;
            }
            let ok = match r {
                Some(r) if r.id == c.id => r.hash == c.hash,
                _ if c.id == 0 && start.is_none() => c.hash == GENESIS,
                _ => false,
            };
            if ok {
                checked += u64::from(c.is_anchor);
                continue;
            }
            let what = match r {
                Some(r) if r.id == c.id => format!(
                    "{} records hash {} for row {} but the chain has {}: rows up to it were edited, inserted, deleted or re-chained",
                    c.what,
                    short(&c.hash),
                    c.id,
                    short(&r.hash)
                ),
                _ if c.id == 0 => format!("{} records the empty chain, but its hash is not the genesis", c.what),
                Some(r) => format!("{} names row {} but there is no such row (the next is {}): rows were deleted", c.what, c.id, r.id),
                None => format!("{} names row {} but the chain ends at row {}: rows at the end were deleted, or the chain was set back", c.what, c.id, self.last_id),
            };
            found = Some(ChainBreak { id: c.id, what });
            break;
        }
        self.next_checkpoint = i;
        self.anchors_checked += checked;
        self.anchors_skipped += skipped;
        if let Some(b) = found {
            self.broke(b.id, b.what);
        }
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
        if self.first_break.is_some() {
            return;
        }
        self.pass_checkpoints(Some(r));
        if let Some(after) = self.anchored.as_ref().and_then(|a| a.head_after) {
            if r.id > after && self.first_break.is_none() {
                self.broke(
                    r.id,
                    format!("row {} comes after the anchored head (row {after} in tenancy.audit_heads): appended without the commit-time head update (the trigger was off), or the head was set back", r.id),
                );
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
                return self.broke(
                    r.id,
                    "an ANCHOR row in the middle of the chain (only a prune's cut, at the start, may hold one)".into(),
                );
            }
            if r.prev_hash != r.hash {
                return self.broke(
                    r.id,
                    "the ANCHOR row's prev_hash and hash differ (both must be the hash at the cut)".into(),
                );
            }
            if let Some(anchored) = &self.anchored {
                match &anchored.cut {
                    None => {
                        return self.broke(r.id, "the chain starts at an ANCHOR row, but the operator recorded no retention cut: rows before it were removed".into())
                    }
                    Some((cut, _)) if r.id > *cut => {
                        let cut = *cut;
                        return self.broke(
                            r.id,
                            format!("the chain starts at an ANCHOR row (row {}) after the operator's last retention cut (row {cut}): rows were removed", r.id),
                        );
                    }
                    _ => {}
                }
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
                format!(
                    "the row's content does not match its hash (stored {}, content gives {}): the row was edited",
                    short(&r.hash),
                    short(&computed)
                ),
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
        if first {
            // The empty chain's checkpoints (row 0) come before the first row.
            self.pass_zero();
        }
        self.expected = r.hash.clone();
        self.see(r);
    }

    /// Checkpoints at row 0 (the empty chain), before a chain that starts
    /// at the genesis.
    fn pass_zero(&mut self) {
        let zero = ChainRow {
            id: 0,
            operation: String::new(),
            prev_hash: Vec::new(),
            hash: GENESIS.to_vec(),
            content: Vec::new(),
            row_pk: None,
        };
        self.pass_checkpoints(Some(&zero));
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
        if self.first_break.is_none() {
            if self.rows == 0 {
                self.pass_zero();
            }
            self.pass_checkpoints(None);
        }
        VerifyReport {
            rows: self.rows,
            anchor: self.anchor.map(|a| a.0),
            head: hex::encode(&self.expected),
            anchors_checked: self.anchors_checked,
            anchors_skipped: self.anchors_skipped,
            first_break: self.first_break,
        }
    }
}

fn short(h: &[u8]) -> String {
    let s = hex::encode(h);
    s[..s.len().min(16)].to_string()
}

async fn require_audit(conn: &mut PgConnection, name: &TenantName) -> Result<(), PgError> {
    let state = observe(conn, name, &[]).await?;
    if !state.misshapen.is_empty() {
        return Err(misshapen(name, &state.misshapen));
    }
    if !state.table || !state.head {
        return Err(PgError::Audit {
            tenant: name.to_string(),
            what: "it has no audit log (the tenant does not exist or was never reconciled)".into(),
        });
    }
    Ok(())
}

/// The canonical bytes an anchor's MAC covers: the domain
/// ([`ANCHOR_DOMAIN`]), then the tenant uid (u32 length, big-endian, then
/// its UTF-8), the anchor's sequence number, the chain row id (i64
/// big-endian each), the chain hash (u32 length, bytes), the anchoring time
/// (microseconds since the Unix epoch, i64 big-endian), the root key version
/// (u32 big-endian) and the previous anchor's MAC (one byte 0 when none;
/// else 1, u32 length, bytes). Every field has a fixed width or a length
/// prefix, so no two anchors share an encoding. Pure.
pub fn anchor_message(
    uid: &str,
    seq: i64,
    last_id: i64,
    hash: &[u8],
    anchored_at_micros: i64,
    key_version: u32,
    prev_mac: Option<&[u8]>,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(ANCHOR_DOMAIN.len() + uid.len() + hash.len() + 96);
    m.extend_from_slice(ANCHOR_DOMAIN);
    let field = |m: &mut Vec<u8>, b: &[u8]| {
        m.extend_from_slice(&(b.len() as u32).to_be_bytes());
        m.extend_from_slice(b);
    };
    field(&mut m, uid.as_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&last_id.to_be_bytes());
    field(&mut m, hash);
    m.extend_from_slice(&anchored_at_micros.to_be_bytes());
    m.extend_from_slice(&key_version.to_be_bytes());
    match prev_mac {
        None => m.push(0),
        Some(p) => {
            m.push(1);
            field(&mut m, p);
        }
    }
    m
}

/// The tenant's audit key under root key `version`: HKDF purpose `audit`.
/// Held by the operator only; never sent to the database.
fn audit_mac(ring: &Keyring, version: KeyVersion, salt: &TenantSalt, uid: &str) -> Result<Hmac<Sha256>, PgError> {
    let key = ring
        .derive_tenant_key(version, salt, uid, Purpose::Audit)
        .map_err(PgError::Keys)?;
    // HMAC takes keys of any length: this cannot fail.
    <Hmac<Sha256> as Mac>::new_from_slice(key.bytes()).map_err(|_| {
        PgError::Keys(crate::crypto::CryptoError::TooLong {
            what: "the audit key",
            len: 32,
            max: 0,
        })
    })
}

/// One row of `tenancy.audit_anchors`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnchorRow {
    pub seq: i64,
    pub last_id: i64,
    pub hash: Vec<u8>,
    pub anchored_at: DateTime<Utc>,
    pub key_version: i32,
    pub prev_mac: Option<Vec<u8>>,
    pub mac: Vec<u8>,
}

impl AnchorRow {
    fn message(&self, uid: &str) -> Vec<u8> {
        anchor_message(
            uid,
            self.seq,
            self.last_id,
            &self.hash,
            self.anchored_at.timestamp_micros(),
            self.key_version as u32,
            self.prev_mac.as_deref(),
        )
    }
}

/// A new anchor of (last_id, hash) after `prev` under the active root key.
pub fn make_anchor(
    ring: &Keyring,
    salt: &TenantSalt,
    uid: &str,
    prev: Option<(i64, &[u8])>,
    last_id: i64,
    hash: &[u8],
    now: DateTime<Utc>,
) -> Result<AnchorRow, PgError> {
    let version = ring.active_version();
    // Postgres keeps microseconds: the time the MAC covers is the stored one.
    let anchored_at = DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
    let mut row = AnchorRow {
        seq: prev.map_or(1, |p| p.0 + 1),
        last_id,
        hash: hash.to_vec(),
        anchored_at,
        key_version: version.get() as i32,
        prev_mac: prev.map(|p| p.1.to_vec()),
        mac: Vec::new(),
    };
    let mut mac = audit_mac(ring, version, salt, uid)?;
    mac.update(&row.message(uid));
    row.mac = mac.finalize().into_bytes().to_vec();
    Ok(row)
}

/// Checks the anchors of one tenant (ordered by seq): each MAC under its
/// root key version (constant-time), each linked to the one before. Gives
/// the checkpoints of those that verify, how many could not be checked (a
/// root key version no longer in the keyring), and the first that fails.
/// Pure but for the key derivation.
pub fn check_anchors(
    ring: &Keyring,
    salt: &TenantSalt,
    uid: &str,
    anchors: &[AnchorRow],
) -> (Vec<Checkpoint>, u64, Option<ChainBreak>) {
    let mut points = Vec::new();
    let mut unknown = 0;
    for (i, a) in anchors.iter().enumerate() {
        let what = format!(
            "anchor #{} of {} (tenancy.audit_anchors)",
            a.seq,
            a.anchored_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        if i > 0 && a.prev_mac.as_deref() != Some(anchors[i - 1].mac.as_slice()) {
            return (
                points,
                unknown,
                Some(ChainBreak {
                    id: a.last_id,
                    what: format!(
                        "{what} does not follow anchor #{}: an anchor was removed, inserted or edited",
                        anchors[i - 1].seq
                    ),
                }),
            );
        }
        let version = match u32::try_from(a.key_version).ok().and_then(|v| KeyVersion::new(v).ok()) {
            Some(v) if ring.contains(v) => v,
            _ => {
                unknown += 1;
                continue;
            }
        };
        let verified = audit_mac(ring, version, salt, uid).map(|mut m| {
            m.update(&a.message(uid));
            m.verify_slice(&a.mac).is_ok()
        });
        if !matches!(verified, Ok(true)) {
            return (
                points,
                unknown,
                Some(ChainBreak {
                    id: a.last_id,
                    what: format!("{what} does not verify (its MAC is wrong): it was forged or edited"),
                }),
            );
        }
        points.push(Checkpoint {
            id: a.last_id,
            hash: a.hash.clone(),
            what,
            is_anchor: true,
        });
    }
    (points, unknown, None)
}

/// Anchors every tenant (or only `uid`) whose head in `tenancy.audit_heads`
/// moved since its last anchor, or whose last anchor was made under another
/// root key than the active one: one query reads them, one statement
/// writes their anchors (admin, `tenancy.*` only). An idle tenant gets no
/// write. Returns how many anchors were written.
pub async fn anchor_heads(pool: &PgPool, ring: &Keyring, uid: Option<&str>) -> Result<usize, PgError> {
    #[allow(clippy::type_complexity)]
    let due: Vec<(String, i64, Vec<u8>, Option<Vec<u8>>, Option<i64>, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT h.tenant_uid, h.last_id, h.hash, t.key_salt, a.seq, a.mac
           FROM tenancy.audit_heads h
           JOIN tenancy.tenants t ON t.uid = h.tenant_uid
           LEFT JOIN LATERAL (SELECT x.seq, x.mac, x.last_id, x.hash, x.key_version FROM tenancy.audit_anchors x
                               WHERE x.tenant_uid = h.tenant_uid ORDER BY x.seq DESC LIMIT 1) a ON true
          WHERE ($1::text IS NULL OR h.tenant_uid = $1)
            AND (a.seq IS NULL OR a.last_id <> h.last_id OR a.hash <> h.hash OR a.key_version <> $2)",
    )
    .bind(uid)
    .bind(ring.active_version().get() as i32)
    .fetch_all(pool)
    .await
    .map_err(query_err("reading the audit heads to anchor"))?;
    let now = Utc::now();
    let mut rows: Vec<(String, AnchorRow)> = Vec::with_capacity(due.len());
    for (uid, last_id, hash, salt, seq, mac) in due {
        let Some(salt) = salt.and_then(|s| TenantSalt::from_bytes(&s).ok()) else {
            tracing::warn!(tenant_uid = %uid, "the tenant has no key salt: its audit head is not anchored");
            continue;
        };
        let prev = seq.zip(mac.as_deref());
        rows.push((uid.clone(), make_anchor(ring, &salt, &uid, prev, last_id, &hash, now)?));
    }
    if rows.is_empty() {
        return Ok(0);
    }
    let written = sqlx::query(
        "INSERT INTO tenancy.audit_anchors (tenant_uid, seq, last_id, hash, anchored_at, key_version, prev_mac, mac)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[], $5::timestamptz[], $6::int[], $7::bytea[], $8::bytea[])
         ON CONFLICT DO NOTHING",
    )
    .bind(rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.seq).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.last_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.hash.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.anchored_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.key_version).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.prev_mac.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.mac.clone()).collect::<Vec<_>>())
    .execute(pool)
    .await
    .map_err(query_err("writing audit anchors"))?
    .rows_affected();
    Ok(written as usize)
}

/// The tenant's anchoring as `tenancy.*` holds it: the head (row id, hash),
/// the recorded retention cut, the anchors by seq.
#[allow(clippy::type_complexity)]
async fn read_anchoring(
    pool: &PgPool,
    uid: &str,
) -> Result<(Option<(i64, Vec<u8>)>, Option<(i64, Vec<u8>)>, Vec<AnchorRow>), PgError> {
    let head: Option<(i64, Vec<u8>, Option<i64>, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT last_id, hash, cut_id, cut_hash FROM tenancy.audit_heads WHERE tenant_uid = $1")
            .bind(uid)
            .fetch_optional(pool)
            .await
            .map_err(query_err("reading the anchored audit head"))?;
    let anchors: Vec<(i64, i64, Vec<u8>, DateTime<Utc>, i32, Option<Vec<u8>>, Vec<u8>)> = sqlx::query_as(
        "SELECT seq, last_id, hash, anchored_at, key_version, prev_mac, mac FROM tenancy.audit_anchors WHERE tenant_uid = $1 ORDER BY seq",
    )
    .bind(uid)
    .fetch_all(pool)
    .await
    .map_err(query_err("reading the audit anchors"))?;
    let anchors = anchors
        .into_iter()
        .map(
            |(seq, last_id, hash, anchored_at, key_version, prev_mac, mac)| AnchorRow {
                seq,
                last_id,
                hash,
                anchored_at,
                key_version,
                prev_mac,
                mac,
            },
        )
        .collect();
    let cut = head.as_ref().and_then(|h| h.2.zip(h.3.clone()));
    Ok((head.map(|h| (h.0, h.1)), cut, anchors))
}

/// Verifies the tenant's chain: anchors its current head first (as the
/// periodic pass would), checks the anchors' MACs, then walks the whole
/// chain (streamed, in id order, one snapshot, on a confined session) and
/// checks it against the in-schema head, the anchored head and every kept
/// anchor. Reports the first break.
pub async fn verify(pool: &PgPool, ring: &Keyring, name: &TenantName) -> Result<VerifyReport, PgError> {
    let uid = uid_for(pool, name).await?;
    {
        let mut conn = pool
            .acquire()
            .await
            .map_err(query_err("connecting to verify the audit log"))?;
        require_audit(&mut conn, name).await?;
    }
    let salt = salt_of(pool, name, &uid).await?;
    anchor_heads(pool, ring, Some(&uid)).await?;
    // Read before the walk's snapshot: all of it was committed before it.
    let (head, cut, anchors) = read_anchoring(pool, &uid).await?;
    let Some((head_id, head_hash)) = head else {
        return Err(PgError::Audit {
            tenant: name.to_string(),
            what: "its chain is not anchored yet (the next reconcile anchors it)".into(),
        });
    };
    let (anchored, unknown, anchor_break) = check_anchors(ring, &salt, &uid, &anchors);
    // The head and the cut first: at the same row, theirs is the message.
    let mut checkpoints = vec![Checkpoint {
        id: head_id,
        hash: head_hash,
        what: "the anchored head (tenancy.audit_heads)".into(),
        is_anchor: false,
    }];
    if let Some((id, hash)) = &cut {
        checkpoints.push(Checkpoint {
            id: *id,
            hash: hash.clone(),
            what: "the operator's retention cut (the ANCHOR row it recorded in tenancy.audit_heads)".into(),
            is_anchor: false,
        });
    }
    checkpoints.extend(anchored);
    let mut c = open_confined(pool, ring, name, &uid).await?;
    let walked = walk(
        &mut c,
        name,
        Anchored {
            checkpoints,
            cut,
            head_after: None,
        },
        anchor_break,
        pool,
        &uid,
    )
    .await;
    c.close().await;
    let mut report = walked?;
    report.anchors_skipped += unknown;
    Ok(report)
}

/// The walk on a confined session, in one REPEATABLE READ snapshot; the
/// anchored head is read again (admin) once the snapshot is taken.
async fn walk(
    conn: &mut PgConnection,
    name: &TenantName,
    mut anchored: Anchored,
    anchor_break: Option<ChainBreak>,
    pool: &PgPool,
    uid: &str,
) -> Result<VerifyReport, PgError> {
    let schema = quote_ident(&name.schema())?;
    let mut tx = Connection::begin(&mut *conn)
        .await
        .map_err(query_err("starting the verification"))?;
    sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(query_err("starting the verification"))?;
    // The content is built here from the columns ([`Content`]), the same
    // bytes [`content_sql`] gives: the server only renders the epoch and
    // the key (jsonb text), and sends the key once. `row_pk` as a value
    // only where the walk reads it (PRUNE entries).
    let sql = format!(
        "SELECT a.id, a.operation, a.prev_hash, a.hash, EXTRACT(EPOCH FROM a.\"time\")::text, a.actor, a.actor_given, a.request_id,
                a.table_name, a.row_pk::text, a.changed_columns FROM {schema}.{AUDIT_TABLE} a ORDER BY a.id"
    );
    // The first query takes the snapshot.
    let head: Option<(i64, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT last_id, hash FROM {schema}.{HEAD_TABLE}"
    )))
    .fetch_optional(&mut *tx)
    .await
    .map_err(query_err("reading the audit chain head"))?;
    // Every commit in the snapshot moved the anchored head at or beyond its
    // last row: a row of the snapshot past it was appended without moving it.
    anchored.head_after = sqlx::query_scalar("SELECT last_id FROM tenancy.audit_heads WHERE tenant_uid = $1")
        .bind(uid)
        .fetch_optional(pool)
        .await
        .map_err(query_err("reading the anchored audit head"))?;
    let mut walker = Walker::with_anchors(head, anchored);
    if let Some(b) = anchor_break {
        walker.broken(b);
    }
    {
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(&mut *tx);
        let mut content = Vec::new();
        while let Some(row) = rows.try_next().await.map_err(query_err("reading the audit log"))? {
            // The columns' types are the query's own: decoded without the
            // per-value type check (a third of the walk's time).
            let mut decode = || -> Result<ChainRow, sqlx::Error> {
                let operation: String = row.try_get_unchecked(1)?;
                let pk: Option<&str> = row.try_get_unchecked(9)?;
                Content {
                    epoch: row.try_get_unchecked(4)?,
                    actor: row.try_get_unchecked(5)?,
                    actor_given: row.try_get_unchecked(6)?,
                    request_id: row.try_get_unchecked(7)?,
                    operation: &operation,
                    table: row.try_get_unchecked(8)?,
                    row_pk: pk,
                    changed: row.try_get_unchecked::<Option<Vec<String>>, _>(10)?.as_deref(),
                }
                .write(&mut content);
                let row_pk = match (operation.as_str(), pk) {
                    ("PRUNE", Some(pk)) => serde_json::from_str(pk).ok(),
                    _ => None,
                };
                Ok(ChainRow {
                    id: row.try_get_unchecked(0)?,
                    operation,
                    prev_hash: row.try_get_unchecked(2)?,
                    hash: row.try_get_unchecked(3)?,
                    content: std::mem::take(&mut content),
                    row_pk,
                })
            };
            let r = decode().map_err(query_err("decoding the audit log"))?;
            walker.push(&r);
            content = r.content;
            content.clear();
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
/// `out` as JSON lines (read on a confined session). Returns how many were
/// written.
pub async fn export<W: std::io::Write>(
    pool: &PgPool,
    ring: &Keyring,
    name: &TenantName,
    since: DateTime<Utc>,
    out: &mut W,
) -> Result<u64, PgError> {
    let uid = uid_for(pool, name).await?;
    {
        let mut conn = pool
            .acquire()
            .await
            .map_err(query_err("connecting to export the audit log"))?;
        require_audit(&mut conn, name).await?;
    }
    let mut c = open_confined(pool, ring, name, &uid).await?;
    let n = export_on(&mut c, name, since, out).await;
    c.close().await;
    n
}

async fn export_on<W: std::io::Write>(
    conn: &mut PgConnection,
    name: &TenantName,
    since: DateTime<Utc>,
    out: &mut W,
) -> Result<u64, PgError> {
    let schema = quote_ident(&name.schema())?;
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
        let line = serde_json::to_string(&rec).map_err(|e| PgError::Audit {
            tenant: name.to_string(),
            what: format!("encoding an exported row: {e}"),
        })?;
        writeln!(out, "{line}").map_err(|e| PgError::Query {
            action: "writing the export",
            source: sqlx::Error::Io(e),
        })?;
        n += 1;
    }
    Ok(n)
}

/// What [`rebase_after_restore`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebaseOutcome {
    /// The anchored head before (row id, hex hash), if there was one.
    pub from: Option<(i64, String)>,
    /// The restored chain's head (row id, hex hash), now anchored.
    pub to: (i64, String),
    /// Anchors of the replaced chain that were forgotten.
    pub anchors_dropped: u64,
}

/// After a restore put a backup's schema (and so its audit chain, which is
/// older than the anchored head) in place of the tenant's: reads the
/// restored chain's head and ANCHOR row on a confined session, then, in one
/// admin transaction, resets the tenant's head in `tenancy.audit_heads` to
/// it (and its retention cut to the restored ANCHOR row), forgets the
/// anchors of the replaced chain, writes a first anchor of the restored
/// head, and records `AuditRebased` in `tenancy.audit_log` (from, to, and
/// `detail`, e.g. the backup's id). Call it after `pg_restore` committed and
/// before the app role may log in again: until then the restored chain's
/// commits are refused (their head would move back).
pub async fn rebase_after_restore(
    pool: &PgPool,
    ring: &Keyring,
    login: &OpsLogin,
    actor: &str,
    detail: serde_json::Value,
) -> Result<RebaseOutcome, PgError> {
    let name = login.tenant().clone();
    let uid = login.uid().to_owned();
    let salt = salt_of(pool, &name, &uid).await?;
    let schema = quote_ident(&name.schema())?;
    let mut c = confined::connect(pool, login).await?;
    #[allow(clippy::type_complexity)]
    let read: Result<(Option<(i64, Vec<u8>)>, Option<(i64, Vec<u8>)>), sqlx::Error> = async {
        let head: Option<(i64, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT last_id, hash FROM {schema}.{HEAD_TABLE}"
        )))
        .fetch_optional(&mut *c)
        .await?;
        let anchor: Option<(i64, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, hash FROM {schema}.{AUDIT_TABLE} WHERE operation = 'ANCHOR' ORDER BY id LIMIT 1"
        )))
        .fetch_optional(&mut *c)
        .await?;
        Ok((head, anchor))
    }
    .await;
    c.close().await;
    let (head, cut) = read.map_err(query_err("reading the restored audit chain's head"))?;
    let (last_id, hash) = head.unwrap_or((0, GENESIS.to_vec()));
    let mut tx = pool.begin().await.map_err(query_err("starting the audit rebase"))?;
    let before: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT last_id, hash FROM tenancy.audit_heads WHERE tenant_uid = $1 FOR UPDATE")
            .bind(&uid)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_err("locking the anchored audit head"))?;
    let last_seq: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM tenancy.audit_anchors WHERE tenant_uid = $1")
        .bind(&uid)
        .fetch_one(&mut *tx)
        .await
        .map_err(query_err("reading the audit anchors"))?;
    let dropped = sqlx::query("DELETE FROM tenancy.audit_anchors WHERE tenant_uid = $1")
        .bind(&uid)
        .execute(&mut *tx)
        .await
        .map_err(query_err("forgetting the replaced chain's anchors"))?
        .rows_affected();
    sqlx::query(
        "INSERT INTO tenancy.audit_heads (tenant_uid, last_id, hash, moved_at, cut_id, cut_hash) VALUES ($1, $2, $3, now(), $4, $5)
         ON CONFLICT (tenant_uid) DO UPDATE SET last_id = excluded.last_id, hash = excluded.hash, moved_at = excluded.moved_at,
                                                cut_id = excluded.cut_id, cut_hash = excluded.cut_hash",
    )
    .bind(&uid)
    .bind(last_id)
    .bind(&hash)
    .bind(cut.as_ref().map(|c| c.0))
    .bind(cut.as_ref().map(|c| c.1.clone()))
    .execute(&mut *tx)
    .await
    .map_err(query_err("resetting the anchored audit head"))?;
    // The sequence goes on (a restored tenant's anchors never reuse a
    // number); the first anchor of the restored chain links to nothing.
    let mut first = make_anchor(ring, &salt, &uid, None, last_id, &hash, Utc::now())?;
    first.seq = last_seq.unwrap_or(0) + 1;
    let mut mac = audit_mac(ring, ring.active_version(), &salt, &uid)?;
    mac.update(&first.message(&uid));
    first.mac = mac.finalize().into_bytes().to_vec();
    sqlx::query(
        "INSERT INTO tenancy.audit_anchors (tenant_uid, seq, last_id, hash, anchored_at, key_version, prev_mac, mac) VALUES ($1, $2, $3, $4, $5, $6, NULL, $7)",
    )
    .bind(&uid)
    .bind(first.seq)
    .bind(first.last_id)
    .bind(&first.hash)
    .bind(first.anchored_at)
    .bind(first.key_version)
    .bind(&first.mac)
    .execute(&mut *tx)
    .await
    .map_err(query_err("anchoring the restored audit chain"))?;
    let from = before.map(|(id, h)| (id, hex::encode(h)));
    let to = (last_id, hex::encode(&hash));
    let record = serde_json::json!({
        "from": from.as_ref().map(|f| serde_json::json!({"last_id": f.0, "hash": f.1})),
        "to": {"last_id": to.0, "hash": to.1},
        "anchors_dropped": dropped,
        "restore": detail,
    });
    super::tenant::record_event(&mut *tx, &uid, Some(name.as_str()), "AuditRebased", actor, record).await?;
    tx.commit().await.map_err(query_err("committing the audit rebase"))?;
    Ok(RebaseOutcome {
        from,
        to,
        anchors_dropped: dropped,
    })
}

/// The anchoring of a deleted tenant goes with it (inside the delete's
/// transaction): its anchor function (when it carries this tenant's
/// marker), its head and its anchors. Returns the statements run.
pub async fn forget_tenant(tx: &mut PgConnection, name: &TenantName, uid: &str) -> Result<usize, PgError> {
    let ours: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace s ON s.oid = p.pronamespace
                         WHERE s.nspname = $1 AND p.proname = $2 AND obj_description(p.oid, 'pg_proc') = $3)",
    )
    .bind(ANCHOR_SCHEMA)
    .bind(name.schema())
    .bind(super::tenant::ownership_marker(uid))
    .fetch_one(&mut *tx)
    .await
    .map_err(query_err("reading the tenant's anchor function"))?;
    let mut n = 2;
    if ours {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP FUNCTION IF EXISTS {}(bigint, bytea)",
            anchor_fn(name)?
        )))
        .execute(&mut *tx)
        .await
        .map_err(query_err("dropping the tenant's anchor function"))?;
        n += 1;
    }
    sqlx::query("WITH a AS (DELETE FROM tenancy.audit_anchors WHERE tenant_uid = $1) DELETE FROM tenancy.audit_heads WHERE tenant_uid = $1")
        .bind(uid)
        .execute(&mut *tx)
        .await
        .map_err(query_err("forgetting the tenant's audit anchors"))?;
    Ok(n)
}

/// What of a deleted tenant's anchoring is still there, in words.
pub async fn leftovers(pool: &PgPool, name: &TenantName, uid: &str) -> Result<Vec<String>, PgError> {
    let (function, head, anchors): (bool, bool, i64) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace s ON s.oid = p.pronamespace
                         WHERE s.nspname = $1 AND p.proname = $2 AND obj_description(p.oid, 'pg_proc') = $3),
                EXISTS (SELECT 1 FROM tenancy.audit_heads WHERE tenant_uid = $4),
                (SELECT count(*) FROM tenancy.audit_anchors WHERE tenant_uid = $4)",
    )
    .bind(ANCHOR_SCHEMA)
    .bind(name.schema())
    .bind(super::tenant::ownership_marker(uid))
    .bind(uid)
    .fetch_one(pool)
    .await
    .map_err(query_err("reading the tenant's audit anchoring"))?;
    let mut left = Vec::new();
    if function {
        left.push(format!("function {ANCHOR_SCHEMA}.{}", name.schema()));
    }
    if head {
        left.push("audit head row".into());
    }
    if anchors > 0 {
        left.push(format!("{anchors} audit anchors"));
    }
    Ok(left)
}

#[cfg(test)]
mod sql_fingerprint {
    //! The rendered SQL, byte for byte: the installed functions are compared
    //! by sha256(name:source), so a changed byte makes every tenant's
    //! functions stale. The expected hashes were computed on the code before
    //! `pg::audit` was split into a module directory.
    use super::*;

    fn sha(s: &str) -> String {
        hex::encode(Sha256::digest(s.as_bytes()))
    }

    fn fingerprints() -> Vec<(String, String)> {
        let mut out = Vec::new();
        for tenant in ["acme", "a-b-9"] {
            let name = TenantName::parse(tenant).unwrap();
            for (f, body) in function_bodies(&name).unwrap() {
                out.push((format!("{tenant} body {f}"), sha(&body)));
            }
            for uid in ["0b9c-uid", "we\"ird'uid"] {
                out.push((
                    format!("{tenant} anchor body {uid}"),
                    sha(&anchor_function_body(&name, uid).unwrap()),
                ));
            }
            let mut actions = vec![
                AuditAction::CreateTables,
                AuditAction::ReplaceFunctions,
                AuditAction::GuardTable,
                AuditAction::SetPgauditLog,
                AuditAction::SeedHead,
            ];
            for table in ["orders", "we\"ird", "Mixed Case'q"] {
                actions.push(AuditAction::TriggerTable {
                    table: table.into(),
                    replace: false,
                });
                actions.push(AuditAction::TriggerTable {
                    table: table.into(),
                    replace: true,
                });
                actions.push(AuditAction::UntriggerTable { table: table.into() });
            }
            for (uid, role) in [("0b9c-uid", "tenancy_anchor_16384"), ("we\"ird'uid", "r\"o'le")] {
                actions.push(AuditAction::AnchorFunction {
                    uid: uid.into(),
                    role: role.into(),
                });
            }
            for a in &actions {
                out.push((
                    format!("{tenant} render {a:?}"),
                    sha(&render(a, &name).unwrap().join("\0")),
                ));
            }
        }
        out
    }

    const EXPECTED: &[(&str, &str)] = &[
        (
            "acme body _tenancy_audit_guard",
            "2eb80fff8ad2c5a39597d8c2d96055d1bb36ddae1d6f6c184bcb455c7d2fdbb3",
        ),
        (
            "acme body _tenancy_audit_tail",
            "3e2aaf2614af631508778ea5413851f5b57529c5f34978c1e08df7eaab19ccdd",
        ),
        (
            "acme body _tenancy_audit_trigger",
            "b9df6d9d5bc8d74a1e7ed7026b0e7f7048d88025967eb95bd8e80095d39d6d00",
        ),
        (
            "acme body _tenancy_audit_write",
            "10ce969c9be29bb19b86c7b4c15d3166c883bc7e954a99cc51a61d33796c4c08",
        ),
        (
            "acme anchor body 0b9c-uid",
            "69fe1309dd31856a6ec0b4684d3605f1779af345091288adb2d9f5de80c55196",
        ),
        (
            "acme anchor body we\"ird'uid",
            "59fa3da6bff6196b9523a1c82faff70557d976f2dd4602c1cf65250e7489ffc8",
        ),
        (
            "acme render CreateTables",
            "ac22da119e6942b4419f01e1e4e4ccbaa53f95974b4a4d71b3a912c7ae704ec6",
        ),
        (
            "acme render ReplaceFunctions",
            "785a7ba4c8f3365476438f010e0c9e0929eb28145839cb1e0c316a09851724b5",
        ),
        (
            "acme render GuardTable",
            "8839d75c1949116e5ab9955d3611d29982b911531d1dc62bd83fa1340a95785b",
        ),
        (
            "acme render SetPgauditLog",
            "e24a7385eb9b933edb8692515f7e68d09952e8598a3c3d03cff1258e9ddf23a5",
        ),
        (
            "acme render SeedHead",
            "c94853be1d7f3005b66004620b2b4a543e707217097c410cee97ab761f48504f",
        ),
        (
            "acme render TriggerTable { table: \"orders\", replace: false }",
            "77b020a320eef13a7e98a9bfa45b15831fd8fdaee427248e4c9a03b87b03c270",
        ),
        (
            "acme render TriggerTable { table: \"orders\", replace: true }",
            "40fe0d2e7b1a87c52134a8da2a69a63189382a110e81971751499d98af0a564f",
        ),
        (
            "acme render UntriggerTable { table: \"orders\" }",
            "f3697412c7bc9582db29350efaf8ed531a951344047c1184cc11fc22432c9578",
        ),
        (
            "acme render TriggerTable { table: \"we\\\"ird\", replace: false }",
            "1189c8849240fef2c80e8fc01f94a772bbf40abc87eb87c3ee9a0b755eca50bc",
        ),
        (
            "acme render TriggerTable { table: \"we\\\"ird\", replace: true }",
            "6fa088239ab6281284dccaaddce019fe837d9254a1124215f5a1c3c99a52ccc1",
        ),
        (
            "acme render UntriggerTable { table: \"we\\\"ird\" }",
            "247a30f76e44aef6776342d73bc027f7464c2358c9ccfd7b64cbbcf78064e927",
        ),
        (
            "acme render TriggerTable { table: \"Mixed Case'q\", replace: false }",
            "6edf779591192651480b9569e758f156983fbc6bb08f51def8920236e02cd595",
        ),
        (
            "acme render TriggerTable { table: \"Mixed Case'q\", replace: true }",
            "16456c6c83b3575fb61917bf83bd3e1f26ba298347f11c33f2062eb77812e347",
        ),
        (
            "acme render UntriggerTable { table: \"Mixed Case'q\" }",
            "8728617b58838af3b252037ebbe0f260121f50f16c7bb8075b21567d3f62175e",
        ),
        (
            "acme render AnchorFunction { uid: \"0b9c-uid\", role: \"tenancy_anchor_16384\" }",
            "d3312676f71d6c934bcd0201115752d38ecdd5c63e395600b7a3871b8e908c94",
        ),
        (
            "acme render AnchorFunction { uid: \"we\\\"ird'uid\", role: \"r\\\"o'le\" }",
            "dec21978078527cec2ef5b8c9dea147e22642f0a2685f0d28e58235b55e342d3",
        ),
        (
            "a-b-9 body _tenancy_audit_guard",
            "d65a9489b7b61fb6f2afcae18118682b08cfdb631629fe33f3587ad81c2b3912",
        ),
        (
            "a-b-9 body _tenancy_audit_tail",
            "3d8ec9ca1bfa22b6214cf9a660ebb5f8ec5e836d24a85e4ad11462cc130977da",
        ),
        (
            "a-b-9 body _tenancy_audit_trigger",
            "a1f3cb03543196c5bd9deb173e5686ba96bf4314884d7ff428008da99c244eb0",
        ),
        (
            "a-b-9 body _tenancy_audit_write",
            "14fed6b33d8ca10168ba44ef356dfb80a28757fbf1f81ce19621c4572334ecba",
        ),
        (
            "a-b-9 anchor body 0b9c-uid",
            "83dc45f6dc8d3c92260229619d77edb2394fd02a7a38a6fe55645e7992a44da9",
        ),
        (
            "a-b-9 anchor body we\"ird'uid",
            "f5ffb71bbc83cc90343c2e0c043faabc2a7fd540d467370066c40ae2ebe69132",
        ),
        (
            "a-b-9 render CreateTables",
            "2726d8732d3bd35c5cb3b18cc9dd31dba752fd24f6fd80d3b71546c28eb19126",
        ),
        (
            "a-b-9 render ReplaceFunctions",
            "2f9e4d0aacd2e26cb80df573bb4e67f029ddcbd0b57c3cd1224c7e6fd488e328",
        ),
        (
            "a-b-9 render GuardTable",
            "d50a922d39126b67b9201ad4e335b3147344cad12f85bcd2c304b6680876b011",
        ),
        (
            "a-b-9 render SetPgauditLog",
            "23ed449a4dd656ad60540ef5baa91083b523a003151e32cef4fd0d392bc95717",
        ),
        (
            "a-b-9 render SeedHead",
            "c3550ba44fe9b65bd2ab45e7d7b44eaae0710d682828d21a6531cbe75215918e",
        ),
        (
            "a-b-9 render TriggerTable { table: \"orders\", replace: false }",
            "1d5f79ad23e2ca9e17faecf92d1d29e093a2d451762d96c05c14a3034228274f",
        ),
        (
            "a-b-9 render TriggerTable { table: \"orders\", replace: true }",
            "5524852af7973fa6f99c314d67e14fcaf81b65bef6553738bbd374a154efb1b6",
        ),
        (
            "a-b-9 render UntriggerTable { table: \"orders\" }",
            "6d726b6e4e5023dd2556c060821f5c3db44350c08b82e499b5691e41164e9e55",
        ),
        (
            "a-b-9 render TriggerTable { table: \"we\\\"ird\", replace: false }",
            "12c8c98d17a241ba6bafe3f8ebb4b86cf9fadf4234a5492c41311a359ba60e55",
        ),
        (
            "a-b-9 render TriggerTable { table: \"we\\\"ird\", replace: true }",
            "64fc8b776a7f6ed895bb1c3c0e59ee01e98935b1d3f4a447f7e0311a56128612",
        ),
        (
            "a-b-9 render UntriggerTable { table: \"we\\\"ird\" }",
            "b5cd8f84631816f694a2db0d14e932a35b3b1b573d8c3afa1a9a96780e5a68e7",
        ),
        (
            "a-b-9 render TriggerTable { table: \"Mixed Case'q\", replace: false }",
            "ed399a303ef63e029a2d9d98021d5684999f550268149ffb296ac08e61298edf",
        ),
        (
            "a-b-9 render TriggerTable { table: \"Mixed Case'q\", replace: true }",
            "e5a0a5cfd64af7baa932279c07e8ca4fb288fde9ac23065e31a22f45a58eb09d",
        ),
        (
            "a-b-9 render UntriggerTable { table: \"Mixed Case'q\" }",
            "fdf47578ed20155119e50e819280cd876973f2478b36522f5d19f93de5bea6cc",
        ),
        (
            "a-b-9 render AnchorFunction { uid: \"0b9c-uid\", role: \"tenancy_anchor_16384\" }",
            "f5971775684eec70c40ede5ebbe57f82decafe2ce5ebaa8a39bf5f2c3b79e155",
        ),
        (
            "a-b-9 render AnchorFunction { uid: \"we\\\"ird'uid\", role: \"r\\\"o'le\" }",
            "d93b82652e97ece64d1a84c6d1b33b64be9841dd82c71678c4d72df1496609d7",
        ),
    ];

    #[test]
    fn rendered_sql_is_unchanged_byte_for_byte() {
        let got = fingerprints();
        let listing: String = got.iter().map(|(k, v)| format!("        ({k:?}, {v:?}),\n")).collect();
        assert_eq!(got.len(), EXPECTED.len(), "fingerprints:\n{listing}");
        for ((k, v), (ek, ev)) in got.iter().zip(EXPECTED) {
            assert_eq!((k.as_str(), v.as_str()), (*ek, *ev), "fingerprints:\n{listing}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> TenantName {
        TenantName::parse(s).unwrap()
    }

    fn full() -> AuditState {
        AuditState {
            schema_exists: true,
            table: true,
            head: true,
            functions_current: true,
            guard: true,
            untriggered: vec![],
            stale: vec![],
            excluded_triggered: vec![],
            misshapen: vec![],
        }
    }

    /// What the in-transaction check reads of a converged schema with the
    /// tables `docs` (audited) and `items` (audited), `_tenancy_migrations`,
    /// a sequence and a partition of `docs`.
    fn converged_facts(name: &TenantName) -> Vec<CatalogFact> {
        let rel = |oid: u32, name: &str, kind: char, partition: bool| CatalogFact::Relation {
            oid,
            name: name.into(),
            kind,
            partition,
        };
        let tg = |relation: u32, name: &str, function: u32, deferred: bool| CatalogFact::Trigger {
            relation,
            name: name.into(),
            function,
            enabled: 'O',
            deferred,
        };
        let mut facts = vec![
            rel(10, AUDIT_TABLE, 'r', false),
            rel(11, HEAD_TABLE, 'r', false),
            rel(12, "_tenancy_migrations", 'r', false),
            rel(13, "docs", 'p', false),
            rel(14, "docs_2026", 'r', true),
            rel(15, "items", 'r', false),
            rel(16, "items_id_seq", 'S', false),
            tg(10, GUARD_TRIGGER, 103, false),
            tg(11, TAIL_TRIGGER, 104, true),
        ];
        for t in [13, 15] {
            facts.extend(TABLE_TRIGGERS.iter().map(|n| tg(t, n, 102, false)));
        }
        for (oid, (f, body)) in (101..).zip(function_bodies(name).unwrap()) {
            facts.push(CatalogFact::Function {
                oid,
                name: f.into(),
                definer: f != GUARD_FN,
                owned: true,
                config: Some(vec![FN_SEARCH_PATH.into()]),
                source: body,
            });
        }
        // Ids of the functions by name (BTreeMap order): guard 101, tail 102, trigger 103, write 104.
        let ids: BTreeMap<String, u32> = facts
            .iter()
            .filter_map(|f| match f {
                CatalogFact::Function { oid, name, .. } => Some((name.clone(), *oid)),
                _ => None,
            })
            .collect();
        for f in facts.iter_mut() {
            if let CatalogFact::Trigger { name, function, .. } = f {
                *function = ids[match name.as_str() {
                    GUARD_TRIGGER => GUARD_FN,
                    TAIL_TRIGGER => TAIL_FN,
                    _ => TRIGGER_FN,
                }];
            }
        }
        facts
    }

    fn judge(name: &TenantName, facts: &[CatalogFact]) -> Option<(Vec<String>, Vec<String>)> {
        converged_untriggered(facts, &function_bodies(name).unwrap(), &[]).map(|u| {
            assert!(u.excluded_triggered.is_empty());
            (u.untriggered, u.stale)
        })
    }

    fn edit(facts: &mut [CatalogFact], pick: impl Fn(&CatalogFact) -> bool, change: impl Fn(&mut CatalogFact)) {
        let f = facts.iter_mut().find(|f| pick(f)).expect("the fact to edit");
        change(f);
    }

    fn is_fn(f: &CatalogFact, wanted: &str) -> bool {
        matches!(f, CatalogFact::Function { name, .. } if name == wanted)
    }

    fn is_trigger(f: &CatalogFact, rel: u32, wanted: &str) -> bool {
        matches!(f, CatalogFact::Trigger { relation, name, .. } if *relation == rel && name == wanted)
    }

    #[test]
    fn the_light_check_passes_a_converged_schema_and_lists_new_tables_sorted() {
        let t = n("acme");
        let mut facts = converged_facts(&t);
        assert_eq!(judge(&t, &facts), Some((vec![], vec![])));
        // A migration's new tables (a plain and a partitioned one); its
        // partitions, sequences and `_tenancy_*` tables are never audited.
        facts.push(CatalogFact::Relation {
            oid: 20,
            name: "orders".into(),
            kind: 'r',
            partition: false,
        });
        facts.push(CatalogFact::Relation {
            oid: 21,
            name: "b_events".into(),
            kind: 'p',
            partition: false,
        });
        facts.push(CatalogFact::Relation {
            oid: 22,
            name: "b_events_1".into(),
            kind: 'r',
            partition: true,
        });
        facts.push(CatalogFact::Relation {
            oid: 23,
            name: "_tenancy_scratch".into(),
            kind: 'r',
            partition: false,
        });
        facts.push(CatalogFact::Relation {
            oid: 24,
            name: "v".into(),
            kind: 'v',
            partition: false,
        });
        assert_eq!(
            judge(&t, &facts),
            Some((vec!["b_events".into(), "orders".into()], vec![]))
        );
    }

    #[test]
    fn an_excluded_table_is_never_untriggered_and_its_triggers_are_listed_for_dropping() {
        let t = n("acme");
        let bodies = function_bodies(&t).unwrap();
        let mut facts = converged_facts(&t);
        let items = vec!["items".to_string()];
        let u = converged_untriggered(&facts, &bodies, &items).unwrap();
        assert_eq!(u.excluded_triggered, ["items"]);
        assert!(u.untriggered.is_empty() && u.stale.is_empty());
        let s = AuditState {
            excluded_triggered: u.excluded_triggered,
            ..full()
        };
        let actions = plan(&s, None);
        assert_eq!(actions, [AuditAction::UntriggerTable { table: "items".into() }]);
        let sql = render(&actions[0], &t).unwrap();
        assert_eq!(sql.len(), TABLE_TRIGGERS.len() + LEGACY_TABLE_TRIGGERS.len());
        assert!(sql.iter().all(|s| s.starts_with("DROP TRIGGER IF EXISTS")), "{sql:?}");
        // Once dropped (only the legacy per-row trigger left counts too).
        facts.retain(|f| !matches!(f, CatalogFact::Trigger { relation: 15, .. }));
        let u = converged_untriggered(&facts, &bodies, &items).unwrap();
        assert_eq!(u, Untriggered::default());
        facts.push(CatalogFact::Trigger {
            relation: 15,
            name: LEGACY_TABLE_TRIGGERS[0].into(),
            function: 1,
            enabled: 'O',
            deferred: false,
        });
        let u = converged_untriggered(&facts, &bodies, &items).unwrap();
        assert_eq!(u.excluded_triggered, ["items"]);
        // Not excluded any more: the table needs its triggers, replacing the legacy one.
        let u = converged_untriggered(&facts, &bodies, &[]).unwrap();
        assert_eq!((u.untriggered, u.stale), (items.clone(), items));
    }

    #[test]
    fn a_table_trigger_dropped_disabled_or_replaced_makes_the_table_stale() {
        let t = n("acme");
        let mut facts = converged_facts(&t);
        edit(
            &mut facts,
            |f| is_trigger(f, 15, "_tenancy_audit_update"),
            |f| {
                if let CatalogFact::Trigger { enabled, .. } = f {
                    *enabled = 'D';
                }
            },
        );
        assert_eq!(judge(&t, &facts), Some((vec!["items".into()], vec!["items".into()])));
        let mut facts = converged_facts(&t);
        facts.retain(|f| !is_trigger(f, 13, "_tenancy_audit_del"));
        edit(
            &mut facts,
            |f| is_trigger(f, 15, "_tenancy_audit_ins"),
            |f| {
                if let CatalogFact::Trigger { function, .. } = f {
                    *function = 9999; // CREATE OR REPLACE TRIGGER ... EXECUTE FUNCTION something_else()
                }
            },
        );
        assert_eq!(
            judge(&t, &facts),
            Some((vec!["docs".into(), "items".into()], vec!["docs".into(), "items".into()]))
        );
        // Another function of the schema named like ours does not count
        // (only the trigger function's oid does).
        let mut facts = converged_facts(&t);
        edit(
            &mut facts,
            |f| is_trigger(f, 15, "_tenancy_audit_ins"),
            |f| {
                if let CatalogFact::Trigger { function, .. } = f {
                    *function = 101; // the guard function
                }
            },
        );
        assert_eq!(judge(&t, &facts), Some((vec!["items".into()], vec!["items".into()])));
    }

    #[test]
    fn any_change_to_the_audit_logs_own_objects_falls_back_to_the_full_observation() {
        let t = n("acme");
        type Tamper = Box<dyn Fn(&mut Vec<CatalogFact>)>;
        let set_fn = |wanted: &'static str, change: fn(&mut CatalogFact)| -> Tamper {
            Box::new(move |facts: &mut Vec<CatalogFact>| edit(facts, |f| is_fn(f, wanted), change))
        };
        let set_trigger = |wanted: &'static str, change: fn(&mut CatalogFact)| -> Tamper {
            Box::new(move |facts: &mut Vec<CatalogFact>| {
                edit(
                    facts,
                    |f| is_trigger(f, 10, wanted) || is_trigger(f, 11, wanted),
                    change,
                )
            })
        };
        let cases: Vec<(&str, Tamper)> = vec![
            (
                "audit table dropped",
                Box::new(|f: &mut Vec<CatalogFact>| {
                    f.retain(|x| !matches!(x, CatalogFact::Relation { name, .. } if name == AUDIT_TABLE))
                }),
            ),
            (
                "head table dropped",
                Box::new(|f: &mut Vec<CatalogFact>| {
                    f.retain(|x| !matches!(x, CatalogFact::Relation { name, .. } if name == HEAD_TABLE))
                }),
            ),
            (
                "head replaced by a view",
                Box::new(|f: &mut Vec<CatalogFact>| {
                    edit(
                        f,
                        |x| matches!(x, CatalogFact::Relation { name, .. } if name == HEAD_TABLE),
                        |x| {
                            if let CatalogFact::Relation { kind, .. } = x {
                                *kind = 'v';
                            }
                        },
                    )
                }),
            ),
            (
                "audit table partitioned",
                Box::new(|f: &mut Vec<CatalogFact>| {
                    edit(
                        f,
                        |x| matches!(x, CatalogFact::Relation { name, .. } if name == AUDIT_TABLE),
                        |x| {
                            if let CatalogFact::Relation { kind, .. } = x {
                                *kind = 'p';
                            }
                        },
                    )
                }),
            ),
            (
                "trigger function's source replaced",
                set_fn(TRIGGER_FN, |x| {
                    if let CatalogFact::Function { source, .. } = x {
                        source.push_str("-- evil")
                    }
                }),
            ),
            (
                "write function made SECURITY INVOKER",
                set_fn(WRITE_FN, |x| {
                    if let CatalogFact::Function { definer, .. } = x {
                        *definer = false
                    }
                }),
            ),
            (
                "guard function made SECURITY DEFINER",
                set_fn(GUARD_FN, |x| {
                    if let CatalogFact::Function { definer, .. } = x {
                        *definer = true
                    }
                }),
            ),
            (
                "tail function given to another owner",
                set_fn(TAIL_FN, |x| {
                    if let CatalogFact::Function { owned, .. } = x {
                        *owned = false
                    }
                }),
            ),
            (
                "search_path reset",
                set_fn(WRITE_FN, |x| {
                    if let CatalogFact::Function { config, .. } = x {
                        *config = None
                    }
                }),
            ),
            (
                "search_path changed",
                set_fn(TRIGGER_FN, |x| {
                    if let CatalogFact::Function { config, .. } = x {
                        *config = Some(vec!["search_path=public".into()])
                    }
                }),
            ),
            (
                "a setting added",
                set_fn(TRIGGER_FN, |x| {
                    if let CatalogFact::Function { config, .. } = x {
                        config.as_mut().unwrap().push("work_mem=1MB".into())
                    }
                }),
            ),
            (
                "write function dropped",
                Box::new(|f: &mut Vec<CatalogFact>| f.retain(|x| !is_fn(x, WRITE_FN))),
            ),
            (
                "guard trigger disabled",
                set_trigger(GUARD_TRIGGER, |x| {
                    if let CatalogFact::Trigger { enabled, .. } = x {
                        *enabled = 'D'
                    }
                }),
            ),
            (
                "guard trigger enabled only for replicas",
                set_trigger(GUARD_TRIGGER, |x| {
                    if let CatalogFact::Trigger { enabled, .. } = x {
                        *enabled = 'R'
                    }
                }),
            ),
            (
                "tail trigger disabled",
                set_trigger(TAIL_TRIGGER, |x| {
                    if let CatalogFact::Trigger { enabled, .. } = x {
                        *enabled = 'D'
                    }
                }),
            ),
            (
                "tail trigger not deferred",
                set_trigger(TAIL_TRIGGER, |x| {
                    if let CatalogFact::Trigger { deferred, .. } = x {
                        *deferred = false
                    }
                }),
            ),
            (
                "tail trigger calling another function",
                set_trigger(TAIL_TRIGGER, |x| {
                    if let CatalogFact::Trigger { function, .. } = x {
                        *function = 9999
                    }
                }),
            ),
            (
                "guard trigger renamed",
                set_trigger(GUARD_TRIGGER, |x| {
                    if let CatalogFact::Trigger { name, .. } = x {
                        *name = "renamed".into()
                    }
                }),
            ),
            (
                "tail trigger dropped",
                Box::new(|f: &mut Vec<CatalogFact>| f.retain(|x| !is_trigger(x, 11, TAIL_TRIGGER))),
            ),
            (
                "tail trigger on the audit table (per entry, as before 2026-12)",
                Box::new(|f: &mut Vec<CatalogFact>| {
                    for x in f.iter_mut() {
                        if let CatalogFact::Trigger { relation, name, .. } = x {
                            if name == TAIL_TRIGGER {
                                *relation = 10
                            }
                        }
                    }
                }),
            ),
            (
                "guard function renamed",
                set_fn(GUARD_FN, |x| {
                    if let CatalogFact::Function { name, .. } = x {
                        *name = "_tenancy_audit_guard2".into()
                    }
                }),
            ),
            ("no schema (no rows)", Box::new(|f: &mut Vec<CatalogFact>| f.clear())),
        ];
        for (what, tamper) in cases {
            let mut facts = converged_facts(&t);
            tamper(&mut facts);
            assert_eq!(judge(&t, &facts), None, "{what}: the light check passed");
        }
    }

    #[test]
    fn functions_are_counted_as_observe_counts_them() {
        let t = n("acme");
        // An overload of one of ours with another source does not count.
        let mut facts = converged_facts(&t);
        facts.push(CatalogFact::Function {
            oid: 200,
            name: TRIGGER_FN.into(),
            definer: true,
            owned: true,
            config: None,
            source: "other".into(),
        });
        assert!(judge(&t, &facts).is_some());
        // One that matches too makes five: observe says not current.
        let mut facts = converged_facts(&t);
        let copy = facts.iter().find(|f| is_fn(f, WRITE_FN)).unwrap().clone();
        if let CatalogFact::Function {
            name,
            definer,
            owned,
            config,
            source,
            ..
        } = copy
        {
            facts.push(CatalogFact::Function {
                oid: 201,
                name,
                definer,
                owned,
                config,
                source,
            });
        }
        assert_eq!(judge(&t, &facts), None);
        // Sources are another tenant's (its schema in every body).
        let facts = converged_facts(&n("other"));
        assert_eq!(judge(&t, &facts), None);
    }

    #[test]
    fn the_in_transaction_query_reads_catalogs_only_by_index_and_qualified() {
        // Constant text (one prepared statement per session), no view, no
        // join, every relation and type qualified, pg_class never scanned by
        // namespace.
        for catalog in ["pg_depend", "pg_class", "pg_trigger", "pg_proc"] {
            assert!(IN_TX_SQL.contains(&format!("FROM pg_catalog.{catalog} ")), "{catalog}");
        }
        assert!(!IN_TX_SQL.contains("JOIN") && !IN_TX_SQL.contains("pg_roles") && !IN_TX_SQL.contains("relnamespace"));
        assert!(
            !IN_TX_SQL.contains("::regclass") && !IN_TX_SQL.contains("::text"),
            "unqualified types"
        );
        assert!(
            IN_TX_SQL.contains("c.oid = ANY")
                && IN_TX_SQL.contains("t.tgrelid = ANY")
                && IN_TX_SQL.contains("p.oid = ANY")
        );
    }

    #[test]
    fn a_converged_schema_plans_nothing() {
        assert!(plan(&full(), None).is_empty());
        let p = PgauditState {
            loaded: true,
            can_set: false,
            app_setting: None,
            ..Default::default()
        };
        assert!(
            plan(&full(), Some(&p)).is_empty(),
            "nothing to do when pgaudit.log cannot be set"
        );
        let p = PgauditState {
            loaded: true,
            can_set: true,
            app_setting: Some("READ, write, ddl".into()),
            ..Default::default()
        };
        assert!(plan(&full(), Some(&p)).is_empty());
        assert!(
            plan(&AuditState::default(), None).is_empty(),
            "no schema, nothing to do"
        );
    }

    #[test]
    fn a_new_schema_gets_tables_functions_guard_and_triggers() {
        let s = AuditState {
            schema_exists: true,
            untriggered: vec!["docs".into()],
            ..Default::default()
        };
        let p = PgauditState {
            loaded: true,
            can_set: true,
            app_setting: None,
            ..Default::default()
        };
        let labels: Vec<_> = plan(&s, Some(&p)).iter().map(AuditAction::label).collect();
        assert_eq!(
            labels,
            [
                "CreateAuditTables",
                "ReplaceAuditFunctions",
                "GuardAuditTable",
                "AuditTable",
                "SetPgauditLog"
            ]
        );
    }

    #[test]
    fn read_auditing_degrades_with_a_reason() {
        let off = PgauditState::default();
        assert_eq!(read_auditing(&off, "a", "adm").reason(), "PgauditNotInstalled");
        let su = PgauditState {
            loaded: true,
            can_set: false,
            app_setting: None,
            ..Default::default()
        };
        let r = read_auditing(&su, "tenant_x_app", "adm");
        assert_eq!(r.reason(), "PgauditNeedsSuperuser");
        assert!(
            r.message().contains("ALTER ROLE tenant_x_app SET pgaudit.log"),
            "{}",
            r.message()
        );
        let granted = PgauditState {
            loaded: true,
            can_set: false,
            app_setting: Some("all".into()),
            ..Default::default()
        };
        assert_eq!(read_auditing(&granted, "a", "adm"), ReadAuditing::On);
    }

    #[test]
    fn table_names_are_quoted_in_triggers() {
        let sql = render(
            &AuditAction::TriggerTable {
                table: "we\"ird; DROP".into(),
                replace: true,
            },
            &n("acme"),
        )
        .unwrap();
        assert!(
            sql.iter().all(|s| s.contains("\"tenant_acme\".\"we\"\"ird; DROP\"")),
            "{sql:?}"
        );
        // 4 drops, the legacy per-row UPDATE trigger's drop, 4 creates.
        assert_eq!(sql.len(), 9);
    }

    #[test]
    fn only_tables_with_stale_triggers_get_drops() {
        let s = AuditState {
            untriggered: vec!["new".into(), "tampered".into()],
            stale: vec!["tampered".into()],
            ..full()
        };
        let actions = plan(&s, None);
        assert_eq!(
            actions,
            [
                AuditAction::TriggerTable {
                    table: "new".into(),
                    replace: false
                },
                AuditAction::TriggerTable {
                    table: "tampered".into(),
                    replace: true
                }
            ]
        );
        let new = render(&actions[0], &n("acme")).unwrap();
        assert_eq!(new.len(), 4);
        assert!(new.iter().all(|s| s.starts_with("CREATE TRIGGER")), "{new:?}");
        let tampered = render(&actions[1], &n("acme")).unwrap();
        assert_eq!(
            tampered
                .iter()
                .filter(|s| s.starts_with("DROP TRIGGER IF EXISTS"))
                .count(),
            5,
            "{tampered:?}"
        );
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
                let hash = Sha256::new()
                    .chain_update(&prev)
                    .chain_update(&content)
                    .finalize()
                    .to_vec();
                let r = ChainRow {
                    id,
                    operation: "INSERT".into(),
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                    content,
                    row_pk: None,
                };
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

    fn ring(active: u32) -> Keyring {
        let keys = (1..=active).map(|v| (format!("v{v}"), vec![v as u8 * 7; 32])).collect();
        Keyring::new(keys, &format!("v{active}")).unwrap()
    }

    #[test]
    fn the_anchor_encoding_is_unambiguous_and_covers_every_field() {
        let base = anchor_message("uid-1", 3, 42, &[7; 32], 1_700_000_000_000_000, 1, Some(&[9; 32]));
        assert!(base.starts_with(ANCHOR_DOMAIN));
        let variants = [
            anchor_message("uid-2", 3, 42, &[7; 32], 1_700_000_000_000_000, 1, Some(&[9; 32])),
            anchor_message("uid-1", 4, 42, &[7; 32], 1_700_000_000_000_000, 1, Some(&[9; 32])),
            anchor_message("uid-1", 3, 43, &[7; 32], 1_700_000_000_000_000, 1, Some(&[9; 32])),
            anchor_message("uid-1", 3, 42, &[8; 32], 1_700_000_000_000_000, 1, Some(&[9; 32])),
            anchor_message("uid-1", 3, 42, &[7; 32], 1_700_000_000_000_001, 1, Some(&[9; 32])),
            anchor_message("uid-1", 3, 42, &[7; 32], 1_700_000_000_000_000, 2, Some(&[9; 32])),
            anchor_message("uid-1", 3, 42, &[7; 32], 1_700_000_000_000_000, 1, None),
            anchor_message("uid-1", 3, 42, &[7; 32], 1_700_000_000_000_000, 1, Some(&[])),
        ];
        for v in &variants {
            assert_ne!(v, &base);
        }
        // Length prefixes: moving a byte from the uid into the hash changes the encoding.
        assert_ne!(
            anchor_message("ab", 1, 1, b"c", 0, 1, None),
            anchor_message("a", 1, 1, b"bc", 0, 1, None)
        );
        // The layout, field by field.
        let m = anchor_message("u", 1, 2, &[0xaa], 3, 4, None);
        let mut expected = ANCHOR_DOMAIN.to_vec();
        expected.extend([0, 0, 0, 1, b'u']);
        expected.extend(1i64.to_be_bytes());
        expected.extend(2i64.to_be_bytes());
        expected.extend([0, 0, 0, 1, 0xaa]);
        expected.extend(3i64.to_be_bytes());
        expected.extend(4u32.to_be_bytes());
        expected.push(0);
        assert_eq!(m, expected);
    }

    fn anchors(ring: &Keyring, salt: &TenantSalt, points: &[(i64, &[u8])]) -> Vec<AnchorRow> {
        let mut out: Vec<AnchorRow> = Vec::new();
        for (id, hash) in points {
            let prev = out.last().map(|a| (a.seq, a.mac.clone()));
            out.push(
                make_anchor(
                    ring,
                    salt,
                    "uid-1",
                    prev.as_ref().map(|p| (p.0, p.1.as_slice())),
                    *id,
                    hash,
                    Utc::now(),
                )
                .unwrap(),
            );
        }
        out
    }

    #[test]
    fn anchors_verify_under_their_key_only_and_in_order() {
        let (r, salt) = (ring(1), TenantSalt::generate());
        let rows = chain(5);
        let a = anchors(&r, &salt, &[(2, &rows[1].hash), (5, &rows[4].hash)]);
        let (points, unknown, bad) = check_anchors(&r, &salt, "uid-1", &a);
        assert_eq!((points.len(), unknown, bad), (2, 0, None));
        // Another tenant's key (salt or uid), an edited field, a forged MAC.
        assert!(check_anchors(&r, &TenantSalt::generate(), "uid-1", &a).2.is_some());
        assert!(check_anchors(&r, &salt, "uid-2", &a).2.is_some());
        let mut edited = a.clone();
        edited[0].last_id = 3;
        assert!(check_anchors(&r, &salt, "uid-1", &edited)
            .2
            .unwrap()
            .what
            .contains("does not verify"));
        // A removed anchor breaks the link of the next.
        let three = anchors(&r, &salt, &[(1, &rows[0].hash), (2, &rows[1].hash), (3, &rows[2].hash)]);
        let gap = [three[0].clone(), three[2].clone()];
        assert!(check_anchors(&r, &salt, "uid-1", &gap)
            .2
            .unwrap()
            .what
            .contains("does not follow"));
        // An anchor under a root key that was retired is skipped, not failed;
        // after a rotation the next anchors are under the new key.
        let rotated = ring(2);
        let mut mixed = a.clone();
        let prev = (mixed[1].seq, mixed[1].mac.clone());
        mixed.push(
            make_anchor(
                &rotated,
                &salt,
                "uid-1",
                Some((prev.0, &prev.1)),
                5,
                &rows[4].hash,
                Utc::now(),
            )
            .unwrap(),
        );
        assert_eq!(mixed[2].key_version, 2);
        let (points, unknown, bad) = check_anchors(&ring(1), &salt, "uid-1", &mixed);
        assert_eq!((points.len(), unknown, bad), (2, 1, None));
        assert_eq!(check_anchors(&rotated, &salt, "uid-1", &mixed).0.len(), 3);
    }

    fn point(id: i64, hash: &[u8], anchor: bool) -> Checkpoint {
        Checkpoint {
            id,
            hash: hash.to_vec(),
            what: format!("point {id}"),
            is_anchor: anchor,
        }
    }

    fn walk_anchored(rows: &[ChainRow], anchored: Anchored) -> VerifyReport {
        let head = rows
            .last()
            .map(|r| (r.id, r.hash.clone()))
            .or(Some((0, GENESIS.to_vec())));
        let mut w = Walker::with_anchors(head, anchored);
        rows.iter().for_each(|r| w.push(r));
        w.finish()
    }

    #[test]
    fn the_walk_checks_every_checkpoint_the_operator_recorded() {
        let rows = chain(6);
        let points = vec![
            point(6, &rows[5].hash, false),
            point(3, &rows[2].hash, true),
            point(0, &GENESIS, true),
        ];
        let ok = walk_anchored(
            &rows,
            Anchored {
                checkpoints: points.clone(),
                ..Default::default()
            },
        );
        assert_eq!(ok.first_break, None);
        assert_eq!(ok.anchors_checked, 2);
        // A consistent rewrite: every hash recomputed after an edit of row 2.
        let mut rewritten = rows.clone();
        rewritten[1].content = b"row 2 edited".to_vec();
        let mut prev = rewritten[0].hash.clone();
        for r in rewritten.iter_mut().skip(1) {
            r.prev_hash = prev.clone();
            r.hash = Sha256::new()
                .chain_update(&prev)
                .chain_update(&r.content)
                .finalize()
                .to_vec();
            prev = r.hash.clone();
        }
        assert_eq!(
            walk(&rewritten, Some((6, prev.clone()))).first_break,
            None,
            "without anchors the rewrite passes"
        );
        let b = walk_anchored(
            &rewritten,
            Anchored {
                checkpoints: points.clone(),
                ..Default::default()
            },
        )
        .first_break
        .unwrap();
        assert_eq!(b.id, 3);
        assert!(b.what.contains("point 3"), "{}", b.what);
        // The tail cut and the in-schema head set back to match.
        let b = walk_anchored(
            &rows[..4],
            Anchored {
                checkpoints: points.clone(),
                ..Default::default()
            },
        )
        .first_break
        .unwrap();
        assert_eq!(b.id, 6);
        assert!(b.what.contains("rows at the end"), "{}", b.what);
        // A missing row in the middle, at a checkpoint.
        let holed: Vec<ChainRow> = rows.iter().filter(|r| r.id != 3).cloned().collect();
        assert!(walk_anchored(
            &holed,
            Anchored {
                checkpoints: points.clone(),
                ..Default::default()
            }
        )
        .first_break
        .is_some());
        // Rows beyond the anchored head read after the snapshot.
        let b = walk_anchored(
            &rows,
            Anchored {
                checkpoints: vec![point(4, &rows[3].hash, false)],
                head_after: Some(4),
                ..Default::default()
            },
        )
        .first_break
        .unwrap();
        assert_eq!(b.id, 5);
        assert!(b.what.contains("anchored head"), "{}", b.what);
        // The empty chain.
        assert_eq!(
            walk_anchored(
                &[],
                Anchored {
                    checkpoints: vec![point(0, &GENESIS, false)],
                    ..Default::default()
                }
            )
            .first_break,
            None
        );
        assert!(walk_anchored(
            &[],
            Anchored {
                checkpoints: vec![point(0, &[1; 32], false)],
                ..Default::default()
            }
        )
        .first_break
        .is_some());
    }

    /// A chain pruned at row `cut`: an ANCHOR row there, the rows after it,
    /// a PRUNE row confirming it.
    fn pruned(rows: &[ChainRow], cut: usize) -> Vec<ChainRow> {
        let c = &rows[cut - 1];
        let mut out = vec![ChainRow {
            id: c.id,
            operation: "ANCHOR".into(),
            prev_hash: c.hash.clone(),
            hash: c.hash.clone(),
            content: vec![],
            row_pk: None,
        }];
        out.extend(rows[cut..].iter().cloned());
        let prev = out.last().map(|r| r.hash.clone()).unwrap();
        let content = b"prune".to_vec();
        let hash = Sha256::new()
            .chain_update(&prev)
            .chain_update(&content)
            .finalize()
            .to_vec();
        let id = out.last().map(|r| r.id + 1).unwrap();
        let pk = serde_json::json!({"through_id": c.id, "cut_hash": hex::encode(&c.hash)});
        out.push(ChainRow {
            id,
            operation: "PRUNE".into(),
            prev_hash: prev,
            hash,
            content,
            row_pk: Some(pk),
        });
        out
    }

    #[test]
    fn an_anchor_row_must_be_at_or_before_the_recorded_cut() {
        let rows = chain(6);
        let chain3 = pruned(&rows, 3);
        let cut = |id: i64| Some((id, rows[id as usize - 1].hash.clone()));
        let before = vec![point(2, &rows[1].hash, true), point(5, &rows[4].hash, true)];
        let ok = walk_anchored(
            &chain3,
            Anchored {
                checkpoints: before.clone(),
                cut: cut(3),
                ..Default::default()
            },
        );
        assert_eq!(ok.first_break, None);
        assert_eq!(
            (ok.anchors_checked, ok.anchors_skipped),
            (1, 1),
            "the anchor before the cut cannot be checked"
        );
        // No cut recorded: the owner pruned by itself.
        let b = walk_anchored(
            &chain3,
            Anchored {
                checkpoints: before.clone(),
                ..Default::default()
            },
        )
        .first_break
        .unwrap();
        assert!(b.what.contains("no retention cut"), "{}", b.what);
        // A cut further than the operator's.
        let b = walk_anchored(
            &chain3,
            Anchored {
                checkpoints: before.clone(),
                cut: cut(2),
                ..Default::default()
            },
        )
        .first_break
        .unwrap();
        assert!(b.what.contains("after the operator's last retention cut"), "{}", b.what);
        // The operator recorded a later cut but crashed before deleting: the
        // older ANCHOR row is fine, the recorded cut's row must be passed.
        let mut points = before.clone();
        points.push(point(4, &rows[3].hash, false));
        assert_eq!(
            walk_anchored(
                &chain3,
                Anchored {
                    checkpoints: points,
                    cut: cut(4),
                    ..Default::default()
                }
            )
            .first_break,
            None
        );
    }
}
