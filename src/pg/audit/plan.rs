//! The audit objects' desired state as data: the observed states
//! ([`AuditState`], [`AnchorState`], [`PgauditState`]), the steps that
//! converge them ([`AuditAction`], [`plan`], [`plan_anchor`]), the
//! `ReadAuditing` outcome, and each step's SQL ([`render`], [`statements`]).
//!
//! Takes observed states and a validated [`TenantName`] (identifiers are
//! quoted, function bodies dollar-quoted); gives actions and statements.
//! Pure: nothing here touches a database.

use chrono::{DateTime, Utc};

use super::consts::{
    AuditFns, AUDIT_TABLE, GUARD_FN, GUARD_TRIGGER, HEAD_TABLE, LEGACY_TABLE_TRIGGERS, PENDING_TABLE,
    PENDING_XID_INDEX, PGAUDIT_CLASSES, TABLE_TRIGGERS, TAIL_FN, TAIL_TRIGGER, TRIGGER_FN, WRITE_FN,
};
use super::functions::{anchor_fn, anchor_function_body, function_bodies};
use crate::names::TenantName;
use crate::pg::{quote_ident, quote_literal, PgError};

/// The audit objects of one tenant schema, as the catalog shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditState {
    pub schema_exists: bool,
    pub table: bool,
    pub head: bool,
    /// The pending table (entries not yet sealed into the chain) exists,
    /// with its `xid` column and (xid, pid) index, and the head has its
    /// last seal's floor (`seal_floor`; added 2026-12-05).
    pub pending: bool,
    /// The five functions exist, under the tenant's names ([`AuditFns`]),
    /// with the expected body, owner, SECURITY DEFINER flag and search_path.
    pub functions_current: bool,
    /// Functions of an earlier version, named alike in every schema
    /// ([`LEGACY_FUNCTIONS`](super::consts::LEGACY_FUNCTIONS)), are still
    /// in the schema: dropped once the triggers call the tenant's own.
    pub legacy_functions: bool,
    /// The append-only guard trigger on the audit and pending tables and
    /// the deferred tail trigger on the pending table (on no other table)
    /// exist, enabled, calling the tenant's functions.
    pub guard: bool,
    /// Tenant tables lacking one of [`TABLE_TRIGGERS`] (or with one disabled
    /// or pointing elsewhere).
    pub untriggered: Vec<String>,
    /// Those of `untriggered` that already carry a trigger of one of those
    /// names (to be replaced); the others, typically a migration's new
    /// tables, only get them created.
    pub stale: Vec<String>,
    /// The trigger arguments of each of `untriggered`: its primary key's
    /// index oid, then the key's column names in the index's order (none
    /// without a key), as the catalog had them when observed
    /// ([`super::observe::audit_state`]). A table missing here gets triggers without
    /// arguments, which still record the right key (by a catalog query per
    /// statement) until a reconcile makes them again.
    pub keys: std::collections::BTreeMap<String, Vec<String>>,
    /// Tables listed in `spec.audit.excludeTables` that still carry one of
    /// the audit triggers (of [`TABLE_TRIGGERS`] or an earlier version's):
    /// their triggers are dropped.
    pub excluded_triggered: Vec<String>,
    /// `_tenancy_audit`, `_tenancy_audit_head` or `_tenancy_audit_pending` exists as something else
    /// than a table (a view, say): put there by the tenant's owner. The
    /// reconcile reports it and leaves it alone.
    pub misshapen: Vec<String>,
}

impl AuditState {
    /// A schema whose audit objects (tables, functions, guard) are all in
    /// place, with `untriggered` tables still lacking their triggers.
    pub fn objects_present(untriggered: Vec<String>) -> Self {
        AuditState {
            schema_exists: true,
            table: true,
            head: true,
            pending: true,
            functions_current: true,
            guard: true,
            untriggered,
            ..AuditState::default()
        }
    }
}

/// The tenant's anchoring, as the catalog and `tenancy.audit_heads` show
/// it (read by the admin: catalogs and the control schema only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnchorState {
    /// The anchor role of this database ([`ANCHOR_ROLE_PREFIX`](super::consts::ANCHOR_ROLE_PREFIX) + oid).
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
        /// The triggers' arguments ([`AuditState::keys`]).
        args: Vec<String>,
    },
    /// The audit triggers of a table excluded from auditing, dropped.
    UntriggerTable {
        table: String,
    },
    /// An earlier version's functions, named alike in every schema, dropped
    /// (after the triggers were moved to the tenant's own).
    DropLegacyFunctions,
    SetPgauditLog,
    /// The tenant's anchor function in [`ANCHOR_SCHEMA`](super::consts::ANCHOR_SCHEMA) (admin), owned by
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
            AuditAction::DropLegacyFunctions => "DropLegacyAuditFunctions",
            AuditAction::SetPgauditLog => "SetPgauditLog",
            AuditAction::AnchorFunction { .. } => "AnchorFunction",
            AuditAction::SeedHead => "SeedAuditHead",
        }
    }

    /// Runs as the tenant's owner role, on a confined session (everything
    /// but the role setting and the anchor function).
    pub(super) fn as_owner(&self) -> bool {
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
    if !state.table || !state.head || !state.pending {
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
        args: state.keys.get(t).cloned().unwrap_or_default(),
    }));
    actions.extend(
        state
            .excluded_triggered
            .iter()
            .map(|t| AuditAction::UntriggerTable { table: t.clone() }),
    );
    if state.legacy_functions {
        actions.push(AuditAction::DropLegacyFunctions);
    }
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

/// An audit entry's columns, in the chain and in the pending table (all
/// but the ids and hashes).
const ENTRY_COLUMNS: &str = "
                    \"time\" timestamptz NOT NULL,
                    actor text NOT NULL,
                    actor_given boolean NOT NULL,
                    request_id text,
                    operation text NOT NULL,
                    table_name text,
                    row_pk jsonb,
                    changed_columns text[]";

/// `row_pk` of `table` compressed with lz4, where the server has it.
fn lz4(schema: &str, table: &str) -> String {
    format!(
        "DO $tenancy_lz4$ BEGIN ALTER TABLE {schema}.{table} ALTER COLUMN row_pk SET COMPRESSION lz4; EXCEPTION WHEN feature_not_supported THEN NULL; END $tenancy_lz4$"
    )
}

/// Around the operator's own `CREATE FUNCTION`s: PL/pgSQL bodies are not
/// compiled when created (`check_function_bodies` off, as `pg_dump`'s
/// scripts do), then the setting is what it was (a migration's transaction
/// goes on after them). The bodies are the operator's constant templates,
/// each run by the tests; compiling them at creation was about 1 ms of
/// server time per tenant for the five audit functions (2.03 against 1.05
/// ms, `cargo bench --bench audit_objects`, docs/scale.md), a second of
/// every thousand new tenants. Transaction-local: kept in a setting of the
/// transaction.
pub(super) const BODY_CHECKS_OFF: &str = "SELECT pg_catalog.set_config('tenancy.check_function_bodies', pg_catalog.current_setting('check_function_bodies'), true), pg_catalog.set_config('check_function_bodies', 'off', true)";
/// What [`BODY_CHECKS_OFF`] changed, back.
pub(super) const BODY_CHECKS_BACK: &str = "SELECT pg_catalog.set_config('check_function_bodies', pg_catalog.current_setting('tenancy.check_function_bodies'), true)";

/// The write function's parameters, and its signature.
const WRITE_ARGS: &str = "p_op text, p_table text, p_pks jsonb[], p_changed text[]";
const WRITE_SIG: &str = "text, text, jsonb[], text[]";

/// The SQL of one action. Identifiers are quoted; the functions' bodies are
/// dollar-quoted with a tag no identifier of a validated name can contain.
pub fn render(action: &AuditAction, name: &TenantName) -> Result<Vec<String>, PgError> {
    let schema = quote_ident(&name.schema())?;
    let app = quote_ident(&name.app_role())?;
    Ok(match action {
        AuditAction::CreateTables => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {schema}.{AUDIT_TABLE} (
                    id bigserial PRIMARY KEY,{ENTRY_COLUMNS},
                    prev_hash bytea NOT NULL,
                    hash bytea NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {schema}.{HEAD_TABLE} (
                    one boolean PRIMARY KEY DEFAULT true CHECK (one),
                    xid bigint,
                    last_id bigint NOT NULL DEFAULT 0,
                    hash bytea NOT NULL,
                    pruned_at timestamptz,
                    sealed_at timestamptz,
                    seal_floor xid8)"
            ),
            // A head made before sealing (2026-12-03) gets the seal's time.
            format!("ALTER TABLE {schema}.{HEAD_TABLE} ADD COLUMN IF NOT EXISTS sealed_at timestamptz"),
            // An INSERT or DELETE entry holds up to CHUNK_ROWS keys (~150 KB
            // of JSON): lz4 compresses it several times faster than the
            // default pglz. Servers built without lz4 keep pglz.
            lz4(&schema, AUDIT_TABLE),
            // Entries wait here, unchained, until the commit-time seal moves
            // them into the chain: the same columns but the hashes, a pending
            // id (their order), and `seal` (the first entry of a transaction,
            // which queues its seal). The key is the table's replica
            // identity: an online move replicates it logically, and a
            // table without one may not publish the seal's deletes (without
            // it the 16-client OLTP figure was ~10% higher, docs/audit.md).
            //
            // `xid` is the appending transaction's id: the seal reads the
            // entries at or above the last seal's floor (the head's
            // `seal_floor`: the oldest transaction id then running) through
            // the (xid, pid) index, not every dead row the seals left since
            // the last vacuum. A pending table made before 2026-12-05 gets
            // the column (its rows the id of the transaction that adds it),
            // the index, and the head its floor here (NULL: the next seal
            // reads everything).
            format!(
                "CREATE TABLE IF NOT EXISTS {schema}.{PENDING_TABLE} (
                    pid bigserial PRIMARY KEY,{ENTRY_COLUMNS},
                    seal boolean NOT NULL,
                    xid xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id())"
            ),
            lz4(&schema, PENDING_TABLE),
            format!(
                "ALTER TABLE {schema}.{PENDING_TABLE} ADD COLUMN IF NOT EXISTS xid xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id()"
            ),
            format!("CREATE INDEX IF NOT EXISTS {PENDING_XID_INDEX} ON {schema}.{PENDING_TABLE} (xid, pid)"),
            format!("ALTER TABLE {schema}.{HEAD_TABLE} ADD COLUMN IF NOT EXISTS seal_floor xid8"),
            format!("INSERT INTO {schema}.{HEAD_TABLE} (hash) VALUES (decode(repeat('00', 32), 'hex')) ON CONFLICT DO NOTHING"),
            // The owner's default privileges gave the app DML; it keeps only
            // SELECT on the log, nothing on the head or the id sequence.
            format!("REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON TABLE {schema}.{AUDIT_TABLE} FROM {app}"),
            format!("REVOKE ALL ON TABLE {schema}.{HEAD_TABLE} FROM {app}"),
            format!("REVOKE ALL ON SEQUENCE {schema}.{AUDIT_TABLE}_id_seq FROM {app}"),
            format!("REVOKE ALL ON TABLE {schema}.{PENDING_TABLE} FROM {app}"),
            format!("REVOKE ALL ON SEQUENCE {schema}.{PENDING_TABLE}_pid_seq FROM {app}"),
        ],
        AuditAction::ReplaceFunctions => {
            let bodies = function_bodies(name)?;
            let fns = AuditFns::of(name);
            let mut v = vec![BODY_CHECKS_OFF.to_string()];
            for (f, args, sig, ret, definer) in [
                (&fns.write, WRITE_ARGS, WRITE_SIG, "void", true),
                (&fns.trigger, "", "", "trigger", true),
                (&fns.guard, "", "", "trigger", false),
                (&fns.tail, "", "", "trigger", true),
                (&fns.seal, "p_wait boolean", "boolean", "bigint", true),
            ] {
                let security = if definer { "SECURITY DEFINER" } else { "SECURITY INVOKER" };
                let q = quote_ident(f)?;
                v.push(format!(
                    "CREATE OR REPLACE FUNCTION {schema}.{q}({args}) RETURNS {ret} LANGUAGE plpgsql {security} SET search_path = pg_catalog, pg_temp AS $tenancy_fn${}$tenancy_fn$",
                    bodies[f]
                ));
                v.push(format!("REVOKE ALL ON FUNCTION {schema}.{q}({sig}) FROM PUBLIC"));
            }
            v.push(BODY_CHECKS_BACK.to_string());
            v
        }
        AuditAction::DropLegacyFunctions => [
            (WRITE_FN, WRITE_SIG),
            (TRIGGER_FN, ""),
            (GUARD_FN, ""),
            (TAIL_FN, ""),
        ]
        .iter()
        .map(|(f, sig)| format!("DROP FUNCTION IF EXISTS {schema}.{f}({sig})"))
        .collect(),
        AuditAction::GuardTable => {
            let guard = quote_ident(&AuditFns::of(name).guard)?;
            let tail = quote_ident(&AuditFns::of(name).tail)?;
            let mut v = Vec::new();
            for t in [AUDIT_TABLE, PENDING_TABLE] {
                v.push(format!("DROP TRIGGER IF EXISTS {GUARD_TRIGGER} ON {schema}.{t}"));
                v.push(format!(
                    "CREATE TRIGGER {GUARD_TRIGGER} BEFORE UPDATE OR DELETE OR TRUNCATE ON {schema}.{t} FOR EACH STATEMENT EXECUTE FUNCTION {schema}.{guard}()"
                ));
            }
            // The tail seals at commit, once per transaction, queued by its
            // first pending entry. Before 2026-12 it was a trigger per entry
            // on the audit table; until 2026-12-03 one per transaction on the
            // head, queued by the first append's update of the head, whose
            // row lock serialized a tenant's writers until their commit.
            v.extend([
                format!("DROP TRIGGER IF EXISTS {TAIL_TRIGGER} ON {schema}.{AUDIT_TABLE}"),
                format!("DROP TRIGGER IF EXISTS {TAIL_TRIGGER} ON {schema}.{HEAD_TABLE}"),
                format!("DROP TRIGGER IF EXISTS {TAIL_TRIGGER} ON {schema}.{PENDING_TABLE}"),
                format!(
                    "CREATE CONSTRAINT TRIGGER {TAIL_TRIGGER} AFTER INSERT ON {schema}.{PENDING_TABLE} DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.seal) EXECUTE FUNCTION {schema}.{tail}()"
                ),
            ]);
            v
        }
        AuditAction::TriggerTable { table, replace, args } => {
            let t = format!("{schema}.{}", quote_ident(table)?);
            // The table's primary key as the catalog had it when observed
            // (its index's oid, then its column names; none without a key):
            // the trigger function takes them while they still hold, instead
            // of a catalog query per statement (sql/trigger.sql).
            let args = args.iter().map(|a| quote_literal(a)).collect::<Result<Vec<_>, _>>()?.join(", ");
            let f = format!("{schema}.{}({args})", quote_ident(&AuditFns::of(name).trigger)?);
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
            let marker = quote_literal(&crate::pg::locks::ownership_marker(uid))?;
            let body = anchor_function_body(name, uid)?;
            // Created by the admin (a member of the anchor role) and then
            // given to the anchor role, so it runs with the anchor role's
            // rights only; grants made before the owner change move with it.
            // Dropped first: a replaced function would keep grants made
            // by hand.
            vec![
                format!("DROP FUNCTION IF EXISTS {f}(bigint, bytea)"),
                BODY_CHECKS_OFF.to_string(),
                format!(
                    "CREATE FUNCTION {f}(p_last_id bigint, p_hash bytea) RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $tenancy_fn${body}$tenancy_fn$"
                ),
                BODY_CHECKS_BACK.to_string(),
                format!("REVOKE ALL ON FUNCTION {f}(bigint, bytea) FROM PUBLIC"),
                format!("GRANT EXECUTE ON FUNCTION {f}(bigint, bytea) TO {owner}"),
                format!("COMMENT ON FUNCTION {f}(bigint, bytea) IS {marker}"),
                format!("ALTER FUNCTION {f}(bigint, bytea) OWNER TO {role}"),
            ]
        }
        AuditAction::SeedHead => vec![format!("SELECT {}(h.last_id, h.hash) FROM {schema}.{HEAD_TABLE} h", anchor_fn(name)?)],
    })
}

/// The SQL of `actions`: admin steps first, then the owner's after a
/// `SET LOCAL ROLE` to the owner.
pub(super) fn statements(name: &TenantName, actions: &[AuditAction]) -> Result<Vec<String>, sqlx::Error> {
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
