//! Reading the audit objects: the tenant schema's audit tables, functions
//! and triggers ([`observe`], and inside a migration's transaction
//! [`observe_in_tx`]: raw catalog rows, [`CatalogFact`]s, judged by the pure
//! [`audit_state`]), the tenant's anchoring ([`observe_anchor`]) and
//! pgaudit ([`observe_pgaudit`]).
//!
//! Takes a connection and a validated [`TenantName`]; gives the states
//! [`super::plan`] plans from. Side effects: reads only (catalogs and
//! `tenancy.*`); [`observe_in_tx`] sets `search_path` and
//! `plan_cache_mode` for the rest of the caller's transaction.

use std::collections::BTreeMap;

use sqlx::{PgConnection, Row};

use super::consts::{
    AuditFns, ANCHOR_ROLE_PREFIX, ANCHOR_SCHEMA, AUDIT_TABLE, FN_SEARCH_PATH, GUARD_TRIGGER, HEAD_TABLE,
    LEGACY_FUNCTIONS, LEGACY_TABLE_TRIGGERS, PENDING_TABLE, PENDING_XID_INDEX, TABLE_TRIGGERS, TAIL_TRIGGER,
};
use super::functions::{anchor_function_body, function_bodies};
use super::plan::{AnchorState, AuditState, PgauditState};
use crate::names::TenantName;
use crate::pg::{query_err, PgError};

/// The fixed oid of the type `xid8` (`pg_type.dat`), as `2615`, `1259` and
/// `1255` below are those of `pg_namespace`, `pg_class` and `pg_proc`.
const XID8_OID: u32 = 5069;

/// The columns [`audit_state`] looks for on the audit log's own tables:
/// the pending table's transaction id and the head's seal floor.
const OWN_COLUMNS: [&str; 2] = ["xid", "seal_floor"];

/// [`observe`]'s query: raw catalog rows, judged by the pure
/// [`audit_state`]. Cheap to plan: during a provisioning burst every
/// statement is planned again at nearly every call (each new schema
/// resets every cached plan), and the query this replaced, which judged
/// in SQL, cost 4.8 ms a call to plan against about 1 ms for this one
/// (docs/scale.md). Every object of the schema is found through its
/// dependency on the schema (`pg_depend`'s reference index, once, in the
/// CTE); the audit log's own relations also by name (`pg_class`'s index
/// on name and namespace: an index records no dependency on its schema);
/// each branch reads one catalog by an indexed column, no view, no
/// function but `to_regnamespace`/`to_regrole`/`convert_to`, every
/// relation and type schema-qualified (a temporary object never stands in
/// for a catalog, as inside a migration's transaction the session's
/// temporary schema is searched first). `2615`, `1259` and `1255` are the
/// fixed oids of `pg_namespace`, `pg_class` and `pg_proc`.
///
/// `$1` is a validated schema name ([`TenantName::schema`]: lower-case
/// letters, digits and `_`), which `to_regnamespace` reads as it is.
///
/// Rows (`what`): 0 the schema; 1 a relation of the schema (any kind), or
/// one named like the audit log's own (`$5`); 2 a trigger named like one
/// of the operator's (`$2`) on a relation of the schema, with its
/// arguments; 3 a function of the schema named like an audit function
/// (`$3`: the tenant's and those of earlier versions), `owned` when its
/// owner is `$4`, with its argument types (`argtypes`); 4 a column named `$6` of one of
/// the audit log's own relations, `ref` its type; 5 a column of a
/// relation's primary key, `ref` the key's index, `n` its position, `args`
/// its name in the database's encoding (as a trigger's arguments hold it).
pub(super) const FACTS_SQL: &str = "WITH d AS (SELECT d.classid, d.objid FROM pg_catalog.pg_depend d
              WHERE d.refclassid = '2615' AND d.refobjid = pg_catalog.to_regnamespace($1))
SELECT 0 AS what, n.oid, n.nspname AS name, NULL::pg_catalog.\"char\" AS kind, NULL::pg_catalog.bool AS partition,
       NULL::pg_catalog.oid AS ref, NULL::pg_catalog.\"char\" AS enabled, NULL::pg_catalog.bool AS deferred,
       NULL::pg_catalog.bool AS definer, NULL::pg_catalog.bool AS owned, NULL::pg_catalog.text[] AS config, NULL::pg_catalog.text AS source,
       NULL::pg_catalog.bytea AS args, NULL::pg_catalog.int8 AS n, NULL::pg_catalog.text AS argtypes
  FROM pg_catalog.pg_namespace n
 WHERE n.oid = pg_catalog.to_regnamespace($1)
UNION ALL
SELECT 1, c.oid, c.relname, c.relkind, c.relispartition, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
  FROM pg_catalog.pg_class c
 WHERE c.oid = ANY (ARRAY(SELECT d.objid FROM d WHERE d.classid = '1259'))
UNION ALL
SELECT 1, c.oid, c.relname, c.relkind, c.relispartition, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
  FROM pg_catalog.pg_class c
 WHERE c.relname = ANY ($5) AND c.relnamespace = pg_catalog.to_regnamespace($1)
UNION ALL
SELECT 2, t.tgrelid, t.tgname, NULL, NULL, t.tgfoid, t.tgenabled, t.tgdeferrable AND t.tginitdeferred, NULL, NULL, NULL, NULL, t.tgargs, NULL, NULL
  FROM pg_catalog.pg_trigger t
 WHERE t.tgrelid = ANY (ARRAY(SELECT d.objid FROM d WHERE d.classid = '1259')) AND t.tgname = ANY ($2)
UNION ALL
SELECT 3, p.oid, p.proname, NULL, NULL, NULL, NULL, NULL, p.prosecdef, p.proowner = pg_catalog.to_regrole($4), p.proconfig, p.prosrc,
       NULL, NULL, p.proargtypes::pg_catalog.text
  FROM pg_catalog.pg_proc p
 WHERE p.oid = ANY (ARRAY(SELECT d.objid FROM d WHERE d.classid = '1255')) AND p.proname = ANY ($3)
UNION ALL
SELECT 4, a.attrelid, a.attname, NULL, NULL, a.atttypid, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
  FROM pg_catalog.pg_attribute a
 WHERE a.attrelid = ANY (ARRAY(SELECT c.oid FROM pg_catalog.pg_class c WHERE c.relname = ANY ($5) AND c.relnamespace = pg_catalog.to_regnamespace($1)))
   AND a.attname = ANY ($6) AND NOT a.attisdropped
UNION ALL
SELECT 5, i.indrelid, a.attname, NULL, NULL, i.indexrelid, NULL, NULL, NULL, NULL, NULL, NULL,
       pg_catalog.convert_to(a.attname::pg_catalog.text, pg_catalog.getdatabaseencoding()), k.n, NULL
  FROM pg_catalog.pg_index i
 CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY AS k(attnum, n)
  JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
 WHERE i.indrelid = ANY (ARRAY(SELECT d.objid FROM d WHERE d.classid = '1259')) AND i.indisprimary";

/// The argument types of the one earlier-version function observed with
/// arguments ([`LEGACY_FUNCTIONS`]`[0]`: text, text, jsonb[], text[]), as
/// `DropLegacyFunctions` drops it; the others take none.
const LEGACY_WRITE_ARGS: &str = "25 25 3807 1009";

/// Reads the audit objects of the tenant schema: 1 query (constant text,
/// so one prepared statement for every tenant), no writes, judged by
/// [`audit_state`]. Every relation and type it names is schema-qualified:
/// inside a migration's transaction ([`observe_in_tx`]) the session's
/// temporary schema, searched before `pg_catalog` for relations and
/// types, could hold the owner's stand-ins.
pub async fn observe(conn: &mut PgConnection, name: &TenantName, exclude: &[String]) -> Result<AuditState, PgError> {
    let bodies = function_bodies(name)?;
    let trigger_names: Vec<&str> = TABLE_TRIGGERS
        .iter()
        .chain(&LEGACY_TABLE_TRIGGERS)
        .copied()
        .chain([GUARD_TRIGGER, TAIL_TRIGGER])
        .collect();
    let function_names: Vec<&str> = bodies.keys().map(String::as_str).chain(LEGACY_FUNCTIONS).collect();
    let rows = sqlx::query(FACTS_SQL)
        .bind(name.schema())
        .bind(trigger_names)
        .bind(function_names)
        .bind(name.owner_role())
        .bind([AUDIT_TABLE, HEAD_TABLE, PENDING_TABLE, PENDING_XID_INDEX])
        .bind(OWN_COLUMNS)
        .fetch_all(&mut *conn)
        .await
        .map_err(query_err("reading the tenant's audit objects"))?;
    let facts = rows
        .iter()
        .map(catalog_fact)
        .collect::<Result<Vec<_>, _>>()
        .map_err(query_err("decoding the tenant's audit objects"))?;
    Ok(audit_state(&facts, &AuditFns::of(name), &bodies, exclude))
}

/// Reads the tenant's anchoring (admin: catalogs and `tenancy.audit_heads`
/// only): 1 query, no writes. Roles by `to_regrole`, the schema by
/// `to_regnamespace`, the comment from `pg_description` (`1255` is
/// `pg_proc`'s fixed oid), not through the `pg_roles` view, a join or
/// `obj_description`: like the audit observation it is planned again at
/// nearly every call during a burst (each new schema resets every cached
/// plan), and that form cost twice as much to plan (0.38 against 0.18 ms,
/// docs/scale.md, stop 44).
pub async fn observe_anchor(conn: &mut PgConnection, name: &TenantName, uid: &str) -> Result<AnchorState, PgError> {
    let row = sqlx::query(
        "SELECT $5 || d.oid::pg_catalog.text AS role,
                coalesce((SELECT p.prosrc = $3 AND p.prosecdef AND p.proowner = pg_catalog.to_regrole($5 || d.oid::pg_catalog.text)
                                 AND p.proconfig = ARRAY[$4]
                                 AND (SELECT c.description FROM pg_catalog.pg_description c
                                       WHERE c.objoid = p.oid AND c.classoid = '1255' AND c.objsubid = 0) = $6
                                 AND EXISTS (SELECT 1 FROM pg_catalog.aclexplode(p.proacl) a
                                              WHERE a.grantee = pg_catalog.to_regrole($8) AND a.privilege_type = 'EXECUTE')
                                 AND NOT EXISTS (SELECT 1 FROM pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) a
                                                  WHERE a.grantee NOT IN (p.proowner, pg_catalog.to_regrole($8)))
                                 AND pg_catalog.has_schema_privilege(pg_catalog.to_regrole($8), p.pronamespace, 'USAGE')
                            FROM pg_catalog.pg_proc p
                           WHERE p.proname = $1 AND p.proargtypes = '20 17' AND p.pronamespace = pg_catalog.to_regnamespace($7)), false)
                  AS function_current,
                h.tenant_uid IS NOT NULL AS seeded,
                h.pruned_at
           FROM pg_catalog.pg_database d
           LEFT JOIN tenancy.audit_heads h ON h.tenant_uid = $2
          WHERE d.datname = pg_catalog.current_database()",
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

/// One row of [`FACTS_SQL`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CatalogFact {
    /// The tenant schema exists.
    Schema,
    /// A relation of the tenant schema, of any kind (`pg_class.relkind`).
    Relation {
        oid: u32,
        name: String,
        kind: char,
        partition: bool,
    },
    /// A trigger named like one of the operator's, on a relation of the
    /// schema: its function, whether it is enabled (`tgenabled = 'O'`),
    /// whether it is deferrable and initially deferred, and its arguments
    /// as `pg_trigger.tgargs` holds them (each followed by a NUL).
    Trigger {
        relation: u32,
        name: String,
        function: u32,
        enabled: char,
        deferred: bool,
        args: Vec<u8>,
    },
    /// A function of the schema named like one of the audit functions,
    /// with its argument types (`pg_proc.proargtypes` as text: `25 1009`).
    Function {
        oid: u32,
        name: String,
        definer: bool,
        owned: bool,
        config: Option<Vec<String>>,
        source: String,
        argtypes: String,
    },
    /// A column of one of the audit log's own relations ([`OWN_COLUMNS`]),
    /// not dropped, and its type's oid.
    Column { relation: u32, name: String, type_oid: u32 },
    /// The column at `position` (from 1) of the primary key `index` of
    /// `relation`, and its name in the database's encoding.
    KeyColumn {
        relation: u32,
        index: u32,
        position: i64,
        name: String,
        encoded: Vec<u8>,
    },
}

/// Judges [`FACTS_SQL`]'s rows: the audit state of the schema. Pure.
///
/// - The schema exists when its row is there; without it, nothing does.
/// - The audit, head and pending tables exist as tables (`relkind` `r`);
///   one of those names taken by anything else is `misshapen`.
/// - `pending` also needs the pending table's `xid` column (`xid8`), its
///   transaction-id index and the head's `seal_floor`.
/// - The functions are current when each of the tenant's (`bodies`) is
///   there with its source, SECURITY DEFINER flag (all but the guard), owner
///   and search_path, and no other function of those names matches too;
///   `legacy_functions` when an earlier version's (named alike in every
///   schema, [`LEGACY_FUNCTIONS`]) is there with the signature its drop names.
/// - `guard`: the guard trigger on the audit and pending tables and the
///   deferred tail trigger on the pending table (none on the audit table or
///   head), enabled, calling the schema's guard and tail functions.
/// - Each tenant table (a table or partitioned table of the schema, not a
///   partition, not `_tenancy_*`) needs every one of [`TABLE_TRIGGERS`],
///   enabled, calling the schema's trigger function, with its primary key
///   as arguments (the key's index oid, then its columns in order); one
///   lacking any is `untriggered` (with its key in `keys`), and `stale` if
///   it carries one of those names (or an earlier version's). An excluded
///   table is never untriggered; if it carries one it is
///   `excluded_triggered`. Each list sorted by name (bytes, as `name`
///   sorts in Postgres).
pub fn audit_state(
    facts: &[CatalogFact],
    fns: &AuditFns,
    bodies: &BTreeMap<String, String>,
    exclude: &[String],
) -> AuditState {
    if !facts.iter().any(|f| matches!(f, CatalogFact::Schema)) {
        return AuditState::default();
    }
    let relation = |wanted: &str| {
        facts.iter().find_map(|f| match f {
            CatalogFact::Relation { oid, name, kind, .. } if name == wanted => Some((*oid, *kind)),
            _ => None,
        })
    };
    let is_table = |wanted: &str| matches!(relation(wanted), Some((_, 'r')));
    let has_column = |rel: &str, column: &str, of_type: Option<u32>| {
        relation(rel).is_some_and(|(oid, _)| {
            facts.iter().any(|f| {
                matches!(f, CatalogFact::Column { relation, name, type_oid }
                    if *relation == oid && name == column && of_type.is_none_or(|t| t == *type_oid))
            })
        })
    };
    let mut misshapen: Vec<String> = [AUDIT_TABLE, HEAD_TABLE, PENDING_TABLE]
        .into_iter()
        .filter(|n| matches!(relation(n), Some((_, kind)) if kind != 'r'))
        .map(str::to_owned)
        .collect();
    misshapen.sort();

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
    let legacy_functions = facts.iter().any(|f| {
        matches!(f, CatalogFact::Function { name, argtypes, .. }
            if (name == LEGACY_FUNCTIONS[0] && argtypes == LEGACY_WRITE_ARGS)
                || (LEGACY_FUNCTIONS[1..].contains(&name.as_str()) && argtypes.is_empty()))
    });

    let calls = |function: &u32, f: &str| functions.get(function) == Some(&f);
    // Triggers and key columns grouped by relation once, so that judging
    // every table reads each fact once (not once per table).
    type TriggerFact<'a> = (&'a str, &'a u32, bool, bool, &'a [u8]);
    let mut triggers_of: BTreeMap<u32, Vec<TriggerFact>> = BTreeMap::new();
    let mut keys_of: BTreeMap<u32, Vec<KeyFact>> = BTreeMap::new();
    for f in facts {
        match f {
            CatalogFact::Trigger {
                relation,
                name,
                function,
                enabled,
                deferred,
                args,
            } => triggers_of.entry(*relation).or_default().push((
                name.as_str(),
                function,
                *enabled == 'O',
                *deferred,
                args.as_slice(),
            )),
            CatalogFact::KeyColumn {
                relation,
                index,
                position,
                name,
                encoded,
            } => keys_of
                .entry(*relation)
                .or_default()
                .push((*position, *index, name.as_str(), encoded.as_slice())),
            _ => {}
        }
    }
    let triggers = |rel: Option<u32>| rel.and_then(|r| triggers_of.get(&r)).into_iter().flatten().copied();
    let oid_of = |wanted: &str| relation(wanted).map(|(oid, _)| oid);
    let guarded = |rel: &str| {
        triggers(oid_of(rel))
            .any(|(name, function, enabled, ..)| name == GUARD_TRIGGER && enabled && calls(function, &fns.guard))
    };
    // The tail is on the pending table (once per transaction), not on the
    // audit table (once per entry, as before 2026-12) nor on the head (as
    // until 2026-12-03).
    let tail = triggers(oid_of(PENDING_TABLE)).any(|(name, function, enabled, deferred, _)| {
        name == TAIL_TRIGGER && enabled && deferred && calls(function, &fns.tail)
    }) && ![AUDIT_TABLE, HEAD_TABLE]
        .iter()
        .any(|rel| triggers(oid_of(rel)).any(|(name, ..)| name == TAIL_TRIGGER));

    let mut state = AuditState {
        schema_exists: true,
        table: is_table(AUDIT_TABLE),
        head: is_table(HEAD_TABLE),
        pending: is_table(PENDING_TABLE)
            && has_column(PENDING_TABLE, "xid", Some(XID8_OID))
            && matches!(relation(PENDING_XID_INDEX), Some((_, 'i')))
            && has_column(HEAD_TABLE, "seal_floor", None),
        functions_current: current == bodies.len(),
        legacy_functions,
        guard: guarded(AUDIT_TABLE) && guarded(PENDING_TABLE) && tail,
        misshapen,
        ..AuditState::default()
    };

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
    tables.dedup();
    for (name, oid) in tables {
        let ours: Vec<_> = triggers(Some(oid))
            .filter(|(t, ..)| TABLE_TRIGGERS.contains(t) || LEGACY_TABLE_TRIGGERS.contains(t))
            .collect();
        if exclude.iter().any(|e| e == name) {
            if !ours.is_empty() {
                state.excluded_triggered.push(name.to_owned());
            }
            continue;
        }
        let (key, key_args) = primary_key(keys_of.remove(&oid).unwrap_or_default());
        let good = ours
            .iter()
            .filter(|(t, function, enabled, _, args)| {
                TABLE_TRIGGERS.contains(t) && *enabled && calls(function, &fns.trigger) && *args == key_args.as_slice()
            })
            .count();
        if good != TABLE_TRIGGERS.len() {
            state.untriggered.push(name.to_owned());
            if !ours.is_empty() {
                state.stale.push(name.to_owned());
            }
            state.keys.insert(name.to_owned(), key);
        }
    }
    state
}

/// One key column's fact: its position, the key's index, its name and its
/// name in the database's encoding.
type KeyFact<'a> = (i64, u32, &'a str, &'a [u8]);

/// The audit triggers' arguments for a table from its key columns' facts:
/// as text (its key index's oid, then its column names in order; none
/// without a key), and as `pg_trigger.tgargs` holds them (each argument in
/// the database's encoding, followed by a NUL).
fn primary_key(mut columns: Vec<KeyFact>) -> (Vec<String>, Vec<u8>) {
    columns.sort();
    let Some(&(_, index, ..)) = columns.first() else {
        return (Vec::new(), Vec::new());
    };
    let mut text = vec![index.to_string()];
    let mut bytes = index.to_string().into_bytes();
    bytes.push(0);
    for (_, _, name, encoded) in columns {
        text.push(name.to_owned());
        bytes.extend_from_slice(encoded);
        bytes.push(0);
    }
    (text, bytes)
}

/// The audit state inside a migration's transaction, after its SQL, on
/// the tenant's confined session: [`observe`], with the transaction's
/// `search_path` pinned to `pg_catalog` (so no operator or object of the
/// tenant's can stand in for a built-in) and `plan_cache_mode` at
/// `force_generic_plan` (one plan per session, which may run several
/// migrations) for the rest of the transaction. Every tenant's run is a
/// new backend, whose catalog caches are cold (docs/migrations.md has what
/// planning costs there). Round trips: 2.
pub async fn observe_in_tx(
    conn: &mut PgConnection,
    name: &TenantName,
    exclude: &[String],
) -> Result<AuditState, PgError> {
    sqlx::query("SELECT set_config('search_path', 'pg_catalog', true), set_config('plan_cache_mode', 'force_generic_plan', true)")
        .execute(&mut *conn)
        .await
        .map_err(query_err("pinning the audit check's search_path"))?;
    observe(conn, name, exclude).await
}

fn catalog_fact(row: &sqlx::postgres::PgRow) -> Result<CatalogFact, sqlx::Error> {
    use sqlx::postgres::types::Oid;
    let oid = || Ok::<u32, sqlx::Error>(row.try_get::<Oid, _>("oid")?.0);
    let name = || row.try_get::<String, _>("name");
    let reference = || Ok::<u32, sqlx::Error>(row.try_get::<Oid, _>("ref")?.0);
    let char_of = |c: i8| c as u8 as char;
    Ok(match row.try_get::<i32, _>("what")? {
        0 => CatalogFact::Schema,
        1 => CatalogFact::Relation {
            oid: oid()?,
            name: name()?,
            kind: char_of(row.try_get("kind")?),
            partition: row.try_get("partition")?,
        },
        2 => CatalogFact::Trigger {
            relation: oid()?,
            name: name()?,
            function: reference()?,
            enabled: char_of(row.try_get("enabled")?),
            deferred: row.try_get("deferred")?,
            args: row.try_get("args")?,
        },
        3 => CatalogFact::Function {
            oid: oid()?,
            name: name()?,
            definer: row.try_get("definer")?,
            owned: row.try_get::<Option<bool>, _>("owned")?.unwrap_or(false),
            config: row.try_get("config")?,
            source: row.try_get("source")?,
            argtypes: row.try_get("argtypes")?,
        },
        4 => CatalogFact::Column {
            relation: oid()?,
            name: name()?,
            type_oid: reference()?,
        },
        _ => CatalogFact::KeyColumn {
            relation: oid()?,
            index: reference()?,
            position: row.try_get("n")?,
            name: name()?,
            encoded: row.try_get("args")?,
        },
    })
}
