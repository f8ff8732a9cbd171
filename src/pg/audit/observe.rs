//! Reading the audit objects: the tenant schema's audit tables, functions
//! and triggers ([`observe`]; inside a migration's transaction the light
//! check first, [`observe_in_tx`], judged by the pure
//! [`converged_untriggered`] over [`CatalogFact`]s), the tenant's anchoring
//! ([`observe_anchor`]) and pgaudit ([`observe_pgaudit`]).
//!
//! Takes a connection and a validated [`TenantName`]; gives the states
//! [`super::plan`] plans from. Side effects: reads only (catalogs and
//! `tenancy.*`); [`observe_in_tx`] sets `search_path` and
//! `plan_cache_mode` for the rest of the caller's transaction.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use sqlx::{PgConnection, Row};

use super::consts::{
    AuditFns, ANCHOR_ROLE_PREFIX, ANCHOR_SCHEMA, AUDIT_TABLE, FN_SEARCH_PATH, GUARD_TRIGGER, HEAD_TABLE,
    LEGACY_FUNCTIONS, LEGACY_TABLE_TRIGGERS, PENDING_TABLE, PENDING_XID_INDEX, TABLE_TRIGGERS, TAIL_TRIGGER,
};
use super::functions::{anchor_function_body, function_bodies};
use super::plan::{AnchorState, AuditState, PgauditState};
use crate::names::TenantName;
use crate::pg::{query_err, PgError};

/// [`observe`]'s query; `KEY_ARGS` stands for the rows of a table's audit
/// trigger arguments ([`super::plan::key_args_rows`] of `c.oid`): a
/// table's triggers are current when their arguments are those bytes
/// (each argument followed by a NUL, as `pg_trigger.tgargs` holds them);
/// `keys` gives them for the tables whose triggers are to be made.
const OBSERVE_SQL: &str = "SELECT n.oid IS NOT NULL AS schema_exists,
                EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.relnamespace = n.oid AND c.relname = $2 AND c.relkind = 'r') AS audit,
                EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.relnamespace = n.oid AND c.relname = $3 AND c.relkind = 'r') AS head,
                EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
                         WHERE c.relnamespace = n.oid AND c.relname = $17 AND c.relkind = 'r'
                           AND a.attname = 'xid' AND a.atttypid = 'pg_catalog.xid8'::pg_catalog.regtype AND NOT a.attisdropped)
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.relnamespace = n.oid AND c.relname = $18 AND c.relkind = 'i')
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
                         WHERE c.relnamespace = n.oid AND c.relname = $3 AND a.attname = 'seal_floor' AND NOT a.attisdropped) AS pending,
                (SELECT count(*) FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
                  WHERE c.relnamespace = n.oid AND c.relname IN ($2, $17) AND t.tgname = $4 AND t.tgenabled = 'O'
                    AND p.pronamespace = n.oid AND p.proname = $5) = 2
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
                         WHERE c.relnamespace = n.oid AND c.relname = $17 AND t.tgname = $11 AND t.tgenabled = 'O'
                           AND t.tgdeferrable AND t.tginitdeferred AND p.pronamespace = n.oid AND p.proname = $14)
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
                         WHERE c.relnamespace = n.oid AND c.relname IN ($2, $3) AND t.tgname = $11) AS guard,
                ARRAY(SELECT c.relname::pg_catalog.text FROM pg_catalog.pg_class c WHERE c.relnamespace = n.oid AND c.relname IN ($2, $3, $17) AND c.relkind <> 'r' ORDER BY 1) AS misshapen,
                coalesce(u.untriggered, '{}') AS untriggered,
                coalesce(u.stale, '{}') AS stale,
                u.keys,
                u.excluded_triggered,
                (SELECT count(*) FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_proc p ON p.oid = d.objid
                  WHERE d.refclassid = 'pg_catalog.pg_namespace'::pg_catalog.regclass AND d.refobjid = n.oid AND d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                    AND p.pronamespace = n.oid
                    AND encode(sha256(convert_to(p.proname || ':' || p.prosrc, 'UTF8')), 'hex') = ANY ($8)
                    AND p.prosecdef = (p.proname <> $5)
                    AND p.proowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $9)
                    AND p.proconfig = ARRAY[$10]) = cardinality($8) AS functions_current,
                EXISTS (SELECT 1 FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_proc p ON p.oid = d.objid
                  WHERE d.refclassid = 'pg_catalog.pg_namespace'::pg_catalog.regclass AND d.refobjid = n.oid AND d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                    AND p.pronamespace = n.oid AND p.proname = ANY ($15)
                    -- The signatures DropLegacyFunctions drops (text, jsonb[], text[]: 25, 3807, 1009).
                    AND CASE WHEN p.proname = $16 THEN p.proargtypes = '25 25 3807 1009'::pg_catalog.oidvector ELSE p.pronargs = 0 END) AS legacy_functions
           FROM (SELECT $1::pg_catalog.text AS name) x LEFT JOIN pg_catalog.pg_namespace n ON n.nspname = x.name
           LEFT JOIN LATERAL (
                SELECT array_agg(c.relname::pg_catalog.text ORDER BY c.relname) FILTER (WHERE NOT ex.excluded AND tg.good <> 4) AS untriggered,
                       array_agg(c.relname::pg_catalog.text ORDER BY c.relname) FILTER (WHERE NOT ex.excluded AND tg.good <> 4 AND tg.ours > 0) AS stale,
                       array_agg(c.relname::pg_catalog.text ORDER BY c.relname) FILTER (WHERE ex.excluded AND tg.ours > 0) AS excluded_triggered,
                       pg_catalog.jsonb_object_agg(c.relname, kl.list) FILTER (WHERE NOT ex.excluded AND tg.good <> 4) AS keys
                  FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_class c ON c.oid = d.objid
                 CROSS JOIN LATERAL (SELECT c.relname::pg_catalog.text = ANY ($13) AS excluded) ex
                 CROSS JOIN LATERAL (SELECT coalesce(pg_catalog.array_agg(k.v ORDER BY k.o), '{}') AS list FROM (KEY_ARGS) k) kl
                 CROSS JOIN LATERAL (SELECT coalesce((SELECT pg_catalog.string_agg(pg_catalog.convert_to(a.v, pg_catalog.getdatabaseencoding()) || '\\x00'::pg_catalog.bytea, ''::pg_catalog.bytea ORDER BY a.o)
                                                       FROM pg_catalog.unnest(kl.list) WITH ORDINALITY AS a(v, o)), ''::pg_catalog.bytea) AS args) ka
                 CROSS JOIN LATERAL (SELECT count(*) FILTER (WHERE t.tgname = ANY ($6) AND t.tgenabled = 'O' AND p.pronamespace = n.oid AND p.proname = $7
                                                               AND t.tgargs = ka.args) AS good,
                                            count(*) AS ours
                                       FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
                                      WHERE t.tgrelid = c.oid AND t.tgname = ANY ($12)) tg
                 WHERE d.refclassid = 'pg_catalog.pg_namespace'::pg_catalog.regclass AND d.refobjid = n.oid AND d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                   AND c.relnamespace = n.oid AND c.relkind IN ('r', 'p') AND NOT c.relispartition
                   AND c.relname NOT LIKE '\\_tenancy\\_%') u ON true";

/// [`OBSERVE_SQL`] with the key arguments' rows in place: one text, so one
/// prepared statement for every tenant.
static OBSERVE: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| OBSERVE_SQL.replace("KEY_ARGS", &super::plan::key_args_rows("c.oid")));

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
    let fns = AuditFns::of(name);
    let expected: Vec<String> = function_bodies(name)?
        .iter()
        .map(|(f, body)| hex::encode(Sha256::digest(format!("{f}:{body}").as_bytes())))
        .collect();
    let row = sqlx::query(sqlx::AssertSqlSafe(OBSERVE.as_str()))
        .bind(&schema)
        .bind(AUDIT_TABLE)
        .bind(HEAD_TABLE)
        .bind(GUARD_TRIGGER)
        .bind(&fns.guard)
        .bind(TABLE_TRIGGERS.to_vec())
        .bind(&fns.trigger)
        .bind(expected)
        .bind(name.owner_role())
        .bind(FN_SEARCH_PATH)
        .bind(TAIL_TRIGGER)
        .bind(
            TABLE_TRIGGERS
                .iter()
                .chain(&LEGACY_TABLE_TRIGGERS)
                .copied()
                .collect::<Vec<_>>(),
        )
        .bind(exclude)
        .bind(&fns.tail)
        .bind(LEGACY_FUNCTIONS.to_vec())
        .bind(LEGACY_FUNCTIONS[0])
        .bind(PENDING_TABLE)
        .bind(PENDING_XID_INDEX)
        .fetch_one(&mut *conn)
        .await
        .map_err(query_err("reading the tenant's audit objects"))?;
    let decode = || -> Result<AuditState, sqlx::Error> {
        Ok(AuditState {
            schema_exists: row.try_get("schema_exists")?,
            table: row.try_get("audit")?,
            head: row.try_get("head")?,
            pending: row.try_get("pending")?,
            guard: row.try_get("guard")?,
            untriggered: row.try_get("untriggered")?,
            stale: row.try_get("stale")?,
            keys: row
                .try_get::<Option<sqlx::types::Json<BTreeMap<String, Vec<String>>>>, _>("keys")?
                .map(|k| k.0)
                .unwrap_or_default(),
            excluded_triggered: row
                .try_get::<Option<Vec<String>>, _>("excluded_triggered")?
                .unwrap_or_default(),
            misshapen: row.try_get::<Option<Vec<String>>, _>("misshapen")?.unwrap_or_default(),
            functions_current: row.try_get::<Option<bool>, _>("functions_current")?.unwrap_or(false),
            legacy_functions: row.try_get::<Option<bool>, _>("legacy_functions")?.unwrap_or(false),
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
    .bind(crate::pg::locks::ownership_marker(uid))
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

/// Reads what pgaudit can do here and the app role's setting: 2
/// queries, no writes.
///
/// Whether pgaudit is loaded: its `pgaudit.log` setting exists and is not a
/// placeholder (a placeholder is flagged `NO_SHOW_ALL`). Read with
/// `pg_settings_get_flags` on PostgreSQL 15+, not from `pg_settings`: that
/// view checks, for every superuser-only setting, whether the admin has the
/// privileges of `pg_read_all_settings`, which computes the admin's whole
/// role membership (it is a member of two roles per tenant) again after
/// every membership change anywhere: milliseconds per call during a
/// provisioning burst, growing with the number of tenants.
pub async fn observe_pgaudit(conn: &mut PgConnection, name: &TenantName) -> Result<PgauditState, PgError> {
    let (admin, superuser, version, settings): (String, bool, i32, Vec<String>) = sqlx::query_as(
        "SELECT current_user::text,
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
    let (loaded, can_set) = if version >= 150000 {
        // Postgres 15 lets a superuser grant one parameter (GRANT SET ON PARAMETER).
        sqlx::query_as::<_, (bool, bool)>(
            "SELECT loaded, loaded AND ($1 OR has_parameter_privilege('pgaudit.log', 'SET'))
               FROM (SELECT coalesce(NOT 'NO_SHOW_ALL' = ANY (pg_catalog.pg_settings_get_flags('pgaudit.log')), false) AS loaded) x",
        )
        .bind(superuser)
        .fetch_one(&mut *conn)
        .await
        .map_err(query_err("reading pgaudit's availability"))?
    } else {
        let loaded: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_settings WHERE name = 'pgaudit.log')")
            .fetch_one(&mut *conn)
            .await
            .map_err(query_err("reading pgaudit's availability"))?;
        (loaded, loaded && superuser)
    };
    Ok(PgauditState {
        loaded,
        can_set,
        app_setting,
        admin,
    })
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
/// function (`$3`: the tenant's and those of earlier versions), `owned` when its owner is `$4`. Binds: the schema, the
/// trigger names, the function names, the owner role.
pub(super) const IN_TX_SQL: &str = "WITH d AS (SELECT d.classid, d.objid FROM pg_catalog.pg_depend d
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

/// The trigger arguments ([`super::plan::key_args_rows`]) of the tables
/// `$2` of schema `$1`, by name, inside a migration's transaction (every
/// name schema-qualified, as in [`IN_TX_SQL`]).
static KEYS_IN_TX: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT c.relname::pg_catalog.text, coalesce((SELECT pg_catalog.array_agg(k.v ORDER BY k.o) FROM ({}) k), '{{}}')
           FROM pg_catalog.pg_class c
          WHERE c.relnamespace = pg_catalog.to_regnamespace($1) AND c.relname = ANY ($2::pg_catalog.name[])",
        super::plan::key_args_rows("c.oid")
    )
});

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
/// log's own objects as [`observe`] requires them (the audit, head and
/// pending tables, as tables; every audit function with its expected source
/// (`bodies`), SECURITY DEFINER flag, owner and search_path, counted as
/// `observe` counts them; the guard trigger on the audit and pending tables
/// and the deferred tail trigger on the pending table (none on the audit or
/// head table), enabled, calling the schema's guard and tail functions),
/// gives what `observe` would say of the tenant tables: those lacking one
/// of [`TABLE_TRIGGERS`] (enabled, calling the schema's trigger function),
/// and those of them that carry one of those names, both sorted by name.
/// None otherwise: something of the audit log was dropped, disabled or
/// replaced, or an earlier version's functions (named alike in every
/// schema, [`LEGACY_FUNCTIONS`]) are still there, and the full observation
/// decides what to put back or drop.
pub fn converged_untriggered(
    facts: &[CatalogFact],
    fns: &AuditFns,
    bodies: &BTreeMap<String, String>,
    exclude: &[String],
) -> Option<Untriggered> {
    if facts
        .iter()
        .any(|f| matches!(f, CatalogFact::Function { name, .. } if LEGACY_FUNCTIONS.contains(&name.as_str())))
    {
        return None;
    }
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
                    && *definer == (*name != fns.guard)
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
    let (Some((audit, 'r')), Some((head, 'r')), Some((pending, 'r'))) =
        (table(AUDIT_TABLE), table(HEAD_TABLE), table(PENDING_TABLE))
    else {
        return None;
    };
    let guarded = |rel: u32| {
        triggers(rel)
            .any(|(name, function, enabled, _)| name == GUARD_TRIGGER && enabled && calls(function, &fns.guard))
    };
    let guard = guarded(audit) && guarded(pending);
    // The tail is on the pending table (once per transaction), not on the
    // audit table (once per entry, as before 2026-12) nor on the head (as
    // until 2026-12-03).
    let tail = triggers(pending).any(|(name, function, enabled, deferred)| {
        name == TAIL_TRIGGER && enabled && deferred && calls(function, &fns.tail)
    }) && ![audit, head]
        .iter()
        .any(|rel| triggers(*rel).any(|(name, ..)| name == TAIL_TRIGGER));
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
            .filter(|(t, function, enabled, _)| TABLE_TRIGGERS.contains(t) && *enabled && calls(function, &fns.trigger))
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
    let function_names: Vec<&str> = bodies.keys().map(String::as_str).chain(LEGACY_FUNCTIONS).collect();
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
    if let Some(u) = converged_untriggered(&facts, &AuditFns::of(name), &bodies, exclude) {
        // The keys of the tables to trigger (a migration's new tables), for
        // the triggers' arguments: one more round trip, only then.
        let keys = if u.untriggered.is_empty() {
            BTreeMap::new()
        } else {
            let rows: Vec<(String, Vec<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(KEYS_IN_TX.as_str()))
                .bind(name.schema())
                .bind(&u.untriggered)
                .fetch_all(&mut *conn)
                .await
                .map_err(query_err("reading the keys of the tenant's new tables"))?;
            rows.into_iter().collect()
        };
        let state = AuditState {
            stale: u.stale,
            excluded_triggered: u.excluded_triggered,
            keys,
            ..AuditState::objects_present(u.untriggered)
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
