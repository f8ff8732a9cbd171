//! Per-tenant SQL: read a tenant's catalog state, render and run the
//! statements that converge it, drop it, and prove nothing is left.
//!
//! Takes a validated [`TenantName`] (identifiers come only from it) and plain
//! values; gives observed state as plain structs. Side effects: DDL on the
//! tenant's schema and roles, rows in `tenancy.tenants` and
//! `tenancy.audit_log`, and terminated sessions.

use std::collections::BTreeMap;

use sqlx::{PgPool, Postgres, Row, Transaction};

// The marker lives in the leaf `locks`, which restores share; it is part of
// this module's interface too.
pub use super::locks::ownership_marker;
use super::registry::record_event;
use super::{execute_all, query_err, quote_ident, quote_literal, PgError};
use crate::names::TenantName;
use crate::sensitive::SecretString;

/// Sessions the ops login may hold at once: a migration, a backup, a
/// restore and an audit read of the same tenant.
pub const OPS_CONNECTION_LIMIT: i32 = 4;

/// The role settings the operator manages on the app role; any other setting
/// found there is left alone.
pub const MANAGED_SETTINGS: [&str; 5] = [
    "search_path",
    "statement_timeout",
    "idle_in_transaction_session_timeout",
    "work_mem",
    "temp_file_limit",
];

/// A role as the catalog shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleState {
    pub can_login: bool,
    pub connection_limit: i32,
    /// Role-wide settings (`ALTER ROLE ... SET`), name to value.
    pub settings: BTreeMap<String, String>,
    /// `COMMENT ON ROLE`: the operator's ownership marker.
    pub comment: Option<String>,
    /// Any of SUPERUSER, CREATEDB, CREATEROLE, REPLICATION, BYPASSRLS.
    pub elevated: bool,
    /// Whether the role inherits its memberships' privileges (`INHERIT`).
    pub inherit: bool,
    pub admin_is_member: bool,
    /// Roles, other than the operator's admin, that are members of this role.
    pub other_members: Vec<String>,
    /// Roles this role is a member of.
    pub member_of: Vec<String>,
}

/// The tenant's schema as the catalog shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchemaState {
    pub owner: String,
    pub comment: Option<String>,
    /// Grantees of any privilege on the schema other than its owner and the
    /// tenant's app role (`PUBLIC` for the pseudo-role).
    pub other_grantees: Vec<String>,
}

/// The app role's privileges, read only when both schema and role exist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppPrivileges {
    pub schema_usage: bool,
    pub schema_create: bool,
    /// Both the app role and the ops login may connect to the database.
    pub database_connect: bool,
    /// Tables, views and sequences in the schema lacking the app's DML rights
    /// (except the migrations' version table, which the app may only read).
    pub objects_missing_dml: i64,
    /// Whether the owner's default privileges give the app DML on new tables
    /// and sequences.
    pub default_privileges: bool,
    /// The operator's own objects in the schema (`_tenancy_*`: migration
    /// versions, audit log and head) that the app role could change: tables
    /// (and views) it could write, sequences it could advance or set
    /// (`nextval`, `setval`), functions it could call; must be 0.
    pub internal_writable: i64,
}

/// The registry row of a tenant, looked up by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryRow {
    pub uid: String,
    pub name: String,
    pub schema: String,
    pub state: String,
    /// The tables left unaudited (`spec.audit.excludeTables`), sorted.
    pub audit_exclude: Vec<String>,
}

/// Everything the plan needs to know about one tenant in Postgres.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogState {
    pub schema: Option<SchemaState>,
    pub owner_role: Option<RoleState>,
    pub app_role: Option<RoleState>,
    /// The ops login (`tenant_<x>_ops`): the only session user that runs
    /// what the tenant's owner controls.
    pub ops_role: Option<RoleState>,
    pub privileges: Option<AppPrivileges>,
    pub registry: Option<RegistryRow>,
    /// Open sessions of the app role.
    pub app_sessions: i64,
    /// Whether the admin may set `temp_file_limit` (a superuser-only setting
    /// unless granted with `GRANT SET ON PARAMETER`, Postgres 15+).
    pub can_set_temp_file_limit: bool,
}

/// Reads the tenant's catalog state: 3 to 4 queries, no writes.
pub async fn observe(pool: &PgPool, name: &TenantName) -> Result<CatalogState, PgError> {
    let schema = name.schema();
    let (owner, app, ops) = (name.owner_role(), name.app_role(), name.ops_role());
    let mut conn = pool
        .acquire()
        .await
        .map_err(query_err("connecting to read the catalog"))?;

    let schema_state = sqlx::query(
        "SELECT pg_get_userbyid(n.nspowner)::text AS owner,
                obj_description(n.oid, 'pg_namespace') AS comment,
                coalesce((SELECT array_agg(g ORDER BY g) FROM (
                            SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END AS g
                              FROM aclexplode(n.nspacl) a
                             WHERE a.grantee <> n.nspowner
                               AND a.grantee IS DISTINCT FROM (SELECT oid FROM pg_roles WHERE rolname = $2)) x), '{}') AS others
           FROM pg_namespace n WHERE n.nspname = $1",
    )
    .bind(&schema)
    .bind(&app)
    .fetch_optional(&mut *conn)
    .await
    .map_err(query_err("reading the tenant schema"))?
    .map(|r| -> Result<SchemaState, sqlx::Error> {
        Ok(SchemaState { owner: r.try_get("owner")?, comment: r.try_get("comment")?, other_grantees: r.try_get("others")? })
    })
    .transpose()
    .map_err(query_err("decoding the tenant schema"))?;

    let rows = sqlx::query(
        "SELECT r.rolname::text AS name, r.rolcanlogin, r.rolconnlimit, r.rolinherit,
                (r.rolsuper OR r.rolcreatedb OR r.rolcreaterole OR r.rolreplication OR r.rolbypassrls) AS elevated,
                shobj_description(r.oid, 'pg_authid') AS comment,
                coalesce((SELECT s.setconfig FROM pg_db_role_setting s WHERE s.setrole = r.oid AND s.setdatabase = 0), '{}') AS settings,
                coalesce((SELECT true FROM pg_auth_members m WHERE m.roleid = r.oid AND m.member = (SELECT oid FROM pg_roles WHERE rolname = current_user) LIMIT 1), false) AS admin_is_member,
                coalesce((SELECT array_agg(pg_get_userbyid(m.member)::text ORDER BY 1) FROM pg_auth_members m
                           WHERE m.roleid = r.oid AND pg_get_userbyid(m.member) <> current_user), '{}') AS other_members,
                coalesce((SELECT array_agg(pg_get_userbyid(m.roleid)::text ORDER BY 1) FROM pg_auth_members m
                           WHERE m.member = r.oid), '{}') AS member_of
           FROM pg_roles r WHERE r.rolname = ANY($1)",
    )
    .bind(vec![owner.clone(), app.clone(), ops.clone()])
    .fetch_all(&mut *conn)
    .await
    .map_err(query_err("reading the tenant roles"))?;
    let mut owner_role = None;
    let mut app_role = None;
    let mut ops_role = None;
    for r in rows {
        let decode = || -> Result<(String, RoleState), sqlx::Error> {
            let settings: Vec<String> = r.try_get("settings")?;
            let settings = settings
                .into_iter()
                .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
                .collect();
            Ok((
                r.try_get("name")?,
                RoleState {
                    can_login: r.try_get("rolcanlogin")?,
                    connection_limit: r.try_get("rolconnlimit")?,
                    settings,
                    comment: r.try_get("comment")?,
                    elevated: r.try_get("elevated")?,
                    inherit: r.try_get("rolinherit")?,
                    admin_is_member: r.try_get("admin_is_member")?,
                    other_members: r.try_get("other_members")?,
                    member_of: r.try_get("member_of")?,
                },
            ))
        };
        let (rolname, state) = decode().map_err(query_err("decoding the tenant roles"))?;
        if rolname == owner {
            owner_role = Some(state);
        } else if rolname == ops {
            ops_role = Some(state);
        } else {
            app_role = Some(state);
        }
    }

    let privileges = if schema_state.is_some() && app_role.is_some() {
        let r = sqlx::query(
            // The schema's relations and functions are found through their
            // dependency on the schema (pg_depend's reference index) and
            // read by oid, and only they get the privilege functions: a
            // scan of pg_class or pg_proc would grow with every tenant of
            // the database (45 ms a call at 300 tenants, docs/scale.md).
            // Indexes and TOAST tables have no such dependency; neither is
            // granted anything.
            "WITH ns AS MATERIALIZED (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = $1),
                  objs AS MATERIALIZED (SELECT d.classid, d.objid FROM pg_catalog.pg_depend d
                      WHERE d.refclassid = 'pg_catalog.pg_namespace'::pg_catalog.regclass
                        AND d.refobjid = (SELECT oid FROM ns) AND d.refobjsubid = 0),
                  rels AS MATERIALIZED (SELECT c.oid, c.relname, c.relkind FROM pg_catalog.pg_class c
                      WHERE c.oid = ANY (ARRAY(SELECT objid FROM objs WHERE classid = 'pg_catalog.pg_class'::pg_catalog.regclass))
                        AND c.relnamespace = (SELECT oid FROM ns)),
                  procs AS MATERIALIZED (SELECT p.oid FROM pg_catalog.pg_proc p
                      WHERE p.oid = ANY (ARRAY(SELECT objid FROM objs WHERE classid = 'pg_catalog.pg_proc'::pg_catalog.regclass))
                        AND p.pronamespace = (SELECT oid FROM ns) AND p.proname::pg_catalog.text LIKE '\\_tenancy\\_%')
             SELECT has_schema_privilege($2, $1, 'USAGE') AS usage,
                    has_schema_privilege($2, $1, 'CREATE') AS create,
                    has_database_privilege($2, current_database(), 'CONNECT')
                    AND coalesce((SELECT has_database_privilege(r.oid, current_database(), 'CONNECT') FROM pg_roles r WHERE r.rolname = $4), false) AS connect,
                    (SELECT count(*) FROM rels c
                      WHERE c.relname NOT LIKE '\\_tenancy\\_%' AND (
                        (c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT (
                            has_table_privilege($2, c.oid, 'SELECT') AND has_table_privilege($2, c.oid, 'INSERT')
                        AND has_table_privilege($2, c.oid, 'UPDATE') AND has_table_privilege($2, c.oid, 'DELETE')))
                     OR (c.relkind = 'S' AND NOT (
                            has_sequence_privilege($2, c.oid, 'USAGE') AND has_sequence_privilege($2, c.oid, 'SELECT')
                        AND has_sequence_privilege($2, c.oid, 'UPDATE'))))) AS missing,
                    (SELECT count(*) FROM pg_default_acl d, aclexplode(d.defaclacl) a
                      WHERE d.defaclrole = (SELECT oid FROM pg_roles WHERE rolname = $3)
                        AND d.defaclnamespace = (SELECT oid FROM ns)
                        AND a.grantee = (SELECT oid FROM pg_roles WHERE rolname = $2)
                        AND ((d.defaclobjtype = 'r' AND a.privilege_type IN ('SELECT', 'INSERT', 'UPDATE', 'DELETE'))
                          OR (d.defaclobjtype = 'S' AND a.privilege_type IN ('USAGE', 'SELECT', 'UPDATE')))) = 7 AS defaults,
                    (SELECT count(*) FROM rels c
                      WHERE c.relname LIKE '\\_tenancy\\_%' AND (
                        (c.relkind IN ('r', 'p', 'v', 'f')
                         AND (has_table_privilege($2, c.oid, 'INSERT') OR has_table_privilege($2, c.oid, 'UPDATE')
                           OR has_table_privilege($2, c.oid, 'DELETE') OR has_table_privilege($2, c.oid, 'TRUNCATE')))
                     OR (c.relkind = 'S' AND (has_sequence_privilege($2, c.oid, 'USAGE') OR has_sequence_privilege($2, c.oid, 'UPDATE')))))
                  + (SELECT count(*) FROM procs p WHERE has_function_privilege($2, p.oid, 'EXECUTE')) AS internal_writable",
        )
        .bind(&schema)
        .bind(&app)
        .bind(&owner)
        .bind(&ops)
        .fetch_one(&mut *conn)
        .await
        .map_err(query_err("reading the app role's privileges"))?;
        let decode = || -> Result<AppPrivileges, sqlx::Error> {
            Ok(AppPrivileges {
                schema_usage: r.try_get("usage")?,
                schema_create: r.try_get("create")?,
                database_connect: r.try_get("connect")?,
                objects_missing_dml: r.try_get("missing")?,
                default_privileges: r.try_get("defaults")?,
                internal_writable: r.try_get("internal_writable")?,
            })
        };
        Some(decode().map_err(query_err("decoding the app role's privileges"))?)
    } else {
        None
    };

    let registry = sqlx::query_as::<_, (String, String, String, String, Vec<String>)>(
        "SELECT uid, name, schema_name, state, audit_exclude FROM tenancy.tenants WHERE name = $1",
    )
    .bind(name.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(query_err("reading the tenant registry"))?
    .map(|(uid, name, schema, state, audit_exclude)| RegistryRow {
        uid,
        name,
        schema,
        state,
        audit_exclude,
    });

    let (app_sessions, can_set_temp_file_limit): (i64, bool) = sqlx::query_as(
        // The backends' user ids, not pg_stat_activity: that checks for
        // each backend whether the admin has the privileges of
        // pg_read_all_stats or of the backend's role, which computes the
        // admin's whole role membership (two roles per tenant) again after
        // every membership change anywhere: ~10 ms a call during a
        // provisioning burst of 1,000 tenants.
        "SELECT (SELECT count(*) FROM pg_stat_get_backend_idset() id
                  WHERE pg_stat_get_backend_userid(id) = (SELECT oid FROM pg_roles WHERE rolname = $1)),
                (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) OR has_parameter_privilege('temp_file_limit', 'SET')",
    )
    .bind(&app)
    .fetch_one(&mut *conn)
    .await
    .map_err(query_err("counting the app role's sessions"))?;

    Ok(CatalogState {
        schema: schema_state,
        owner_role,
        app_role,
        ops_role,
        privileges,
        registry,
        app_sessions,
        can_set_temp_file_limit,
    })
}

/// One converging step. The plan builds a list of these; [`render`] turns
/// each into SQL text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DbAction {
    CreateOwnerRole,
    /// Membership lets the admin create the schema for the owner, set its
    /// default privileges and grant on its objects; Postgres 15 does not give
    /// it to CREATEROLE creators by itself. Granted for one transaction only:
    /// the plan ends it with [`DbAction::RevokeOwnerFromAdmin`].
    GrantOwnerToAdmin,
    RevokeOwnerFromAdmin,
    /// A standing membership in the app role (earlier versions made one).
    RevokeAppFromAdmin,
    /// The gateway login ([`super::gateway`]) may `SET ROLE` to the app role
    /// of an Active tenant; revoked (as a foreign member) when it is not.
    GrantAppToGateway {
        gateway: String,
    },
    CreateAppRole {
        verifier: SecretString,
        login: bool,
        connection_limit: i32,
    },
    CreateSchema,
    GrantSchemaUsage,
    RevokeSchemaFrom {
        grantee: String,
    },
    RevokeMembership {
        role: Role,
        member: String,
    },
    RevokeAppMembershipIn {
        role: String,
    },
    GrantExistingObjects,
    /// The app role may read but never write the operator's own tables in
    /// its schema (`_tenancy_*`), whatever a schema-wide grant gave it.
    RevokeInternalWrites,
    SetDefaultPrivileges,
    GrantConnect,
    SetLogin(bool),
    SetConnectionLimit(i32),
    SetSetting {
        name: &'static str,
        value: String,
    },
    ResetSetting {
        name: &'static str,
    },
    SetPassword {
        verifier: SecretString,
    },
    StripElevatedAttributes(Role),
    /// The ops login. With the verifier of its derived password when the
    /// reconcile knows it (a tenant registered in the same transaction, whose
    /// key salt it made): its first confined connection logs straight in.
    /// Without one (the registry row was there already), the first confined
    /// connection is refused and sets the password ([`super::confined`]).
    CreateOpsRole {
        verifier: Option<SecretString>,
    },
    /// The ops login's one membership: the owner role (no ADMIN option).
    GrantOwnerToOps,
    /// The ops login must not inherit: after a `RESET ROLE` in user SQL it
    /// holds no privilege at all.
    SetOpsNoInherit,
    SetOpsLogin,
    RevokeOpsMembershipIn {
        role: String,
    },
}

/// Which of the tenant's two roles an action is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Owner,
    App,
    Ops,
}

impl DbAction {
    /// Whether the admin must be a member of the owner role to run it: DDL
    /// and grants on the schema the owner owns, or naming the owner.
    pub fn needs_owner_membership(&self) -> bool {
        matches!(
            self,
            DbAction::CreateSchema
                | DbAction::GrantSchemaUsage
                | DbAction::RevokeSchemaFrom { .. }
                | DbAction::GrantExistingObjects
                | DbAction::RevokeInternalWrites
                | DbAction::SetDefaultPrivileges
        )
    }

    /// A fixed, password-free label for logs, audit rows and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            DbAction::CreateOwnerRole => "CreateOwnerRole",
            DbAction::GrantOwnerToAdmin => "GrantOwnerToAdmin",
            DbAction::RevokeOwnerFromAdmin => "RevokeOwnerFromAdmin",
            DbAction::RevokeAppFromAdmin => "RevokeAppFromAdmin",
            DbAction::GrantAppToGateway { .. } => "GrantAppToGateway",
            DbAction::CreateAppRole { .. } => "CreateAppRole",
            DbAction::CreateSchema => "CreateSchema",
            DbAction::GrantSchemaUsage => "GrantSchemaUsage",
            DbAction::RevokeSchemaFrom { .. } => "RevokeForeignSchemaGrant",
            DbAction::RevokeMembership { .. } => "RevokeForeignMembership",
            DbAction::RevokeAppMembershipIn { .. } => "RevokeAppMembership",
            DbAction::GrantExistingObjects => "GrantExistingObjects",
            DbAction::RevokeInternalWrites => "RevokeInternalWrites",
            DbAction::SetDefaultPrivileges => "SetDefaultPrivileges",
            DbAction::GrantConnect => "GrantConnect",
            DbAction::SetLogin(true) => "EnableLogin",
            DbAction::SetLogin(false) => "DisableLogin",
            DbAction::SetConnectionLimit(_) => "SetConnectionLimit",
            DbAction::SetSetting { .. } => "SetRoleSetting",
            DbAction::ResetSetting { .. } => "ResetRoleSetting",
            DbAction::SetPassword { .. } => "SetPassword",
            DbAction::StripElevatedAttributes(_) => "StripElevatedAttributes",
            DbAction::CreateOpsRole { .. } => "CreateOpsRole",
            DbAction::GrantOwnerToOps => "GrantOwnerToOps",
            DbAction::SetOpsNoInherit => "SetOpsNoInherit",
            DbAction::SetOpsLogin => "SetOpsLogin",
            DbAction::RevokeOpsMembershipIn { .. } => "RevokeOpsMembership",
        }
    }
}

/// The SQL for one action. Identifiers come from the validated name and are
/// quoted; the few literals utility statements need are quoted too.
pub fn render(action: &DbAction, name: &TenantName, uid: &str) -> Result<Vec<String>, PgError> {
    let schema = quote_ident(&name.schema())?;
    let owner = quote_ident(&name.owner_role())?;
    let app = quote_ident(&name.app_role())?;
    let ops = quote_ident(&name.ops_role())?;
    let marker = quote_literal(&ownership_marker(uid))?;
    let role = |r: Role| match r {
        Role::Owner => owner.clone(),
        Role::App => app.clone(),
        Role::Ops => ops.clone(),
    };
    Ok(match action {
        DbAction::CreateOwnerRole => vec![
            format!("CREATE ROLE {owner} NOLOGIN NOINHERIT"),
            format!("COMMENT ON ROLE {owner} IS {marker}"),
        ],
        DbAction::GrantOwnerToAdmin => vec![format!("GRANT {owner} TO CURRENT_USER")],
        DbAction::RevokeOwnerFromAdmin => vec![format!("REVOKE {owner} FROM CURRENT_USER")],
        DbAction::RevokeAppFromAdmin => vec![format!("REVOKE {app} FROM CURRENT_USER")],
        DbAction::GrantAppToGateway { gateway } => vec![format!("GRANT {app} TO {}", quote_ident(gateway)?)],
        DbAction::CreateAppRole { verifier, login, connection_limit } => vec![
            format!(
                "CREATE ROLE {app} {} NOINHERIT CONNECTION LIMIT {connection_limit} PASSWORD {}",
                if *login { "LOGIN" } else { "NOLOGIN" },
                quote_literal(verifier.expose())?
            ),
            format!("COMMENT ON ROLE {app} IS {marker}"),
        ],
        DbAction::CreateSchema => vec![
            format!("CREATE SCHEMA {schema} AUTHORIZATION {owner}"),
            format!("COMMENT ON SCHEMA {schema} IS {marker}"),
        ],
        DbAction::GrantSchemaUsage => vec![format!("GRANT USAGE ON SCHEMA {schema} TO {app}")],
        DbAction::RevokeSchemaFrom { grantee } => {
            let who = if grantee == "PUBLIC" { "PUBLIC".to_string() } else { quote_ident(grantee)? };
            vec![format!("REVOKE ALL ON SCHEMA {schema} FROM {who}")]
        }
        DbAction::RevokeMembership { role: r, member } => vec![format!("REVOKE {} FROM {}", role(*r), quote_ident(member)?)],
        DbAction::RevokeAppMembershipIn { role: r } => vec![format!("REVOKE {} FROM {app}", quote_ident(r)?)],
        DbAction::GrantExistingObjects => vec![grant_existing_objects(name)?, revoke_internal_writes(name)?],
        DbAction::RevokeInternalWrites => vec![revoke_internal_writes(name)?],
        DbAction::SetDefaultPrivileges => vec![
            format!("ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {app}"),
            format!("ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {app}"),
        ],
        // Not a statement of the tenant's transaction: [`apply`] hands it to
        // `connect_grants`, which grants the logins that lack CONNECT in one
        // GRANT with the other tenants' being provisioned at the same time,
        // under the database-ACL lock (`LOCK_DATABASE_ACL`).
        DbAction::GrantConnect => vec![],
        DbAction::SetLogin(login) => vec![format!("ALTER ROLE {app} {}", if *login { "LOGIN" } else { "NOLOGIN" })],
        DbAction::SetConnectionLimit(n) => vec![format!("ALTER ROLE {app} CONNECTION LIMIT {n}")],
        // `setting` is one of MANAGED_SETTINGS, a compile-time constant.
        DbAction::ResetSetting { name: setting } => vec![format!("ALTER ROLE {app} RESET {setting}")],
        DbAction::SetSetting { name: setting, value } => {
            // `setting` is one of MANAGED_SETTINGS, a compile-time constant.
            let value = if *setting == "search_path" { quote_ident(value)? } else { quote_literal(value)? };
            vec![format!("ALTER ROLE {app} SET {setting} TO {value}")]
        }
        DbAction::SetPassword { verifier } => vec![format!("ALTER ROLE {app} PASSWORD {}", quote_literal(verifier.expose())?)],
        DbAction::StripElevatedAttributes(r) => {
            vec![format!("ALTER ROLE {} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS", role(*r))]
        }
        DbAction::CreateOpsRole { verifier } => vec![
            match verifier {
                Some(v) => format!(
                    "CREATE ROLE {ops} LOGIN NOINHERIT CONNECTION LIMIT {OPS_CONNECTION_LIMIT} PASSWORD {}",
                    quote_literal(v.expose())?
                ),
                None => format!("CREATE ROLE {ops} LOGIN NOINHERIT CONNECTION LIMIT {OPS_CONNECTION_LIMIT}"),
            },
            format!("COMMENT ON ROLE {ops} IS {marker}"),
        ],
        DbAction::GrantOwnerToOps => vec![format!("GRANT {owner} TO {ops}")],
        DbAction::SetOpsNoInherit => vec![format!("ALTER ROLE {ops} NOINHERIT")],
        DbAction::SetOpsLogin => vec![format!("ALTER ROLE {ops} LOGIN CONNECTION LIMIT {OPS_CONNECTION_LIMIT}")],
        DbAction::RevokeOpsMembershipIn { role: r } => vec![format!("REVOKE {} FROM {ops}", quote_ident(r)?)],
    })
}

/// A block that takes from the app role every right to change the schema's
/// `_tenancy_*` objects: writes on tables and views, USAGE and UPDATE on
/// sequences (`nextval`, `setval`; reading stays), EXECUTE on functions
/// (from PUBLIC too). Identifiers are quoted by `format('%I')` and
/// `regprocedure` inside. The objects are found through their dependency on
/// the schema (pg_depend's reference index), and the name test is made on
/// `text` so that no plan can take the name index instead: a prefix scan of
/// that index reads every tenant's `_tenancy_*` objects (30 ms a call at
/// 700 tenants, a cost quadratic in a provisioning burst; docs/scale.md).
/// The condition that picks the objects of catalog `class` (`pg_class`,
/// `pg_proc`) in schema `schema` (a quoted literal), as `alias.oid`: through
/// `pg_depend`'s index on the namespace, so its cost is the schema's objects,
/// not the database's. (`GRANT ... ON ALL TABLES IN SCHEMA` reads the whole
/// of `pg_class`: ~100 ms a statement at 2,000 tenants, growing with every
/// tenant.)
fn in_schema(alias: &str, class: &str, schema: &str) -> String {
    let column = if class == "pg_class" {
        "relnamespace"
    } else {
        "pronamespace"
    };
    format!(
        "{alias}.oid = ANY (ARRAY(SELECT d.objid FROM pg_catalog.pg_depend d
                 WHERE d.refclassid = 'pg_catalog.pg_namespace'::pg_catalog.regclass AND d.refobjsubid = 0
                   AND d.refobjid = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = {schema})
                   AND d.classid = 'pg_catalog.{class}'::pg_catalog.regclass))
           AND {alias}.{column} = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = {schema})"
    )
}

/// The app role's DML on every table, view and sequence of the schema (what
/// `GRANT ... ON ALL TABLES / SEQUENCES IN SCHEMA` grants), each kind in
/// one `GRANT` naming them, found through [`in_schema`].
fn grant_existing_objects(name: &TenantName) -> Result<String, PgError> {
    let schema = quote_literal(&name.schema())?;
    let app = quote_literal(&name.app_role())?;
    let rels = in_schema("c", "pg_class", &schema);
    Ok(format!(
        "DO $tenancy$ DECLARE v text; BEGIN
           SELECT pg_catalog.string_agg(pg_catalog.format('%I.%I', {schema}, c.relname), ', ' ORDER BY c.relname) INTO v
             FROM pg_catalog.pg_class c WHERE {rels} AND c.relkind IN ('r', 'p', 'v', 'm', 'f');
           IF v IS NOT NULL THEN
             EXECUTE pg_catalog.format('GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE %s TO %I', v, {app});
           END IF;
           SELECT pg_catalog.string_agg(pg_catalog.format('%I.%I', {schema}, c.relname), ', ' ORDER BY c.relname) INTO v
             FROM pg_catalog.pg_class c WHERE {rels} AND c.relkind = 'S';
           IF v IS NOT NULL THEN
             EXECUTE pg_catalog.format('GRANT USAGE, SELECT, UPDATE ON SEQUENCE %s TO %I', v, {app});
           END IF; END $tenancy$"
    ))
}

fn revoke_internal_writes(name: &TenantName) -> Result<String, PgError> {
    let schema = quote_literal(&name.schema())?;
    let app = quote_literal(&name.app_role())?;
    let rels = in_schema("c", "pg_class", &schema);
    let procs = in_schema("p", "pg_proc", &schema);
    Ok(format!(
        "DO $tenancy$ DECLARE t record; BEGIN
           FOR t IN SELECT c.relname, c.relkind FROM pg_catalog.pg_class c
                     WHERE {rels}
                       AND c.relname::pg_catalog.text LIKE '\\_tenancy\\_%' AND c.relkind IN ('r', 'p', 'v', 'f', 'S') LOOP
             IF t.relkind = 'S' THEN
               EXECUTE format('REVOKE USAGE, UPDATE ON SEQUENCE %I.%I FROM %I', {schema}, t.relname, {app});
             ELSE
               EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON TABLE %I.%I FROM %I', {schema}, t.relname, {app});
             END IF;
           END LOOP;
           FOR t IN SELECT p.oid::pg_catalog.regprocedure AS sig FROM pg_catalog.pg_proc p
                     WHERE {procs}
                       AND p.proname::pg_catalog.text LIKE '\\_tenancy\\_%' LOOP
             EXECUTE format('REVOKE EXECUTE ON ROUTINE %s FROM PUBLIC, %I', t.sig, {app});
           END LOOP; END $tenancy$"
    ))
}

/// What one reconcile writes to the registry and audit log with its DDL.
#[derive(Clone, Debug)]
pub struct RegistryWrite {
    pub uid: String,
    pub state: &'static str,
    pub audit_action: &'static str,
    pub actor: String,
    /// The HKDF salt a new registry row gets (an existing row keeps its own).
    pub key_salt: crate::crypto::TenantSalt,
}

/// Runs the actions and the registry write in one transaction (a crash or a
/// lost connection part-way leaves the tenant as it was before), then the
/// database's CONNECT grant, when planned, in a short one of its own.
/// Returns the number of statements executed.
pub async fn apply(
    pool: &PgPool,
    name: &TenantName,
    uid: &str,
    actions: &[DbAction],
    registry: Option<&RegistryWrite>,
) -> Result<usize, PgError> {
    if actions.is_empty() && registry.is_none() {
        return Ok(0);
    }
    let mut tx = pool.begin().await.map_err(query_err("starting a transaction"))?;
    // Letting the app role log in must not race a restore that just locked
    // it out: the shared restore lock, held to commit, orders the two.
    let enables_login = actions.iter().any(|a| {
        matches!(
            a,
            DbAction::SetLogin(true) | DbAction::CreateAppRole { login: true, .. }
        )
    });
    if enables_login && !super::locks::guard_against_restore(&mut tx, name, uid).await? {
        return Err(PgError::RestoreRunning(name.to_string()));
    }
    let db: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut *tx)
        .await
        .map_err(query_err("reading the database name"))?;
    let mut count = 0;
    // The database ACL change comes after the rest committed, combined with
    // the other tenants' being provisioned at the same time
    // (`connect_grants`): the lock it takes is held to commit and every
    // provisioning of the database waits on it. A crash between the two
    // leaves roles without CONNECT (a login is refused, nothing is
    // reachable); the next reconcile observes it and grants it.
    let (acl, rest): (Vec<&DbAction>, Vec<&DbAction>) =
        actions.iter().partition(|a| matches!(a, DbAction::GrantConnect));
    for action in rest {
        count += execute_all(&mut tx, action.label(), render(action, name, uid)?).await?;
    }
    if let Some(w) = registry {
        write_registry(&mut tx, name, w, actions).await?;
        count += 1;
    }
    tx.commit()
        .await
        .map_err(query_err("committing the tenant's changes"))?;
    if !acl.is_empty() {
        count += super::connect_grants::grant_connect(pool, &db, vec![name.app_role(), name.ops_role()]).await?;
    }
    Ok(count)
}

async fn write_registry(
    tx: &mut Transaction<'_, Postgres>,
    name: &TenantName,
    w: &RegistryWrite,
    actions: &[DbAction],
) -> Result<(), PgError> {
    // The tenant's migration lock row is made with its registry row, so a
    // migration run never inserts it: a run that did held it uncommitted,
    // and a second run on a new tenant (its reconcile's first migration and
    // a rollout pass) waited on that insert for the whole first run instead
    // of being told at once that the tenant is busy.
    sqlx::query(
        "WITH lock AS (INSERT INTO tenancy.locks (kind, key) VALUES ($6, $1) ON CONFLICT DO NOTHING)
         INSERT INTO tenancy.tenants (uid, name, schema_name, state, key_salt) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (uid) DO UPDATE SET state = EXCLUDED.state, updated_at = now()
           WHERE tenants.state IS DISTINCT FROM EXCLUDED.state",
    )
    .bind(&w.uid)
    .bind(name.as_str())
    .bind(name.schema())
    .bind(w.state)
    // The tenant's HKDF salt, made once with the row and destroyed with it.
    .bind(w.key_salt.to_vec())
    .bind(super::locks::MIGRATION_LOCK_KIND)
    .execute(&mut **tx)
    .await
    .map_err(query_err("writing the tenant registry"))?;
    let labels: Vec<&str> = actions.iter().map(DbAction::label).collect();
    record_event(
        &mut **tx,
        &w.uid,
        Some(name.as_str()),
        w.audit_action,
        &w.actor,
        serde_json::json!({ "steps": labels }),
    )
    .await
}

/// `ALTER ROLE <role> NOLOGIN` (`role` quoted).
async fn disable_login(pool: &PgPool, role: &str, action: &'static str) -> Result<(), PgError> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ALTER ROLE {role} NOLOGIN")))
        .execute(pool)
        .await
        .map_err(query_err(action))?;
    Ok(())
}

/// Ends every session of the app role, and every other session (the
/// gateway's, serving this tenant through a pooler) holding a lock on a
/// relation of the tenant's schema, except the ops login's and the
/// admin's; returns how many were signalled. Needs membership in
/// `pg_signal_backend`, not superuser.
pub async fn terminate_sessions(pool: &PgPool, name: &TenantName) -> Result<i64, PgError> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(a.pid)) FROM pg_stat_activity a
          WHERE a.pid <> pg_backend_pid()
            AND (a.usename = $1
              OR (a.usename NOT IN ($3, current_user) AND EXISTS (
                    SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE l.pid = a.pid AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND n.nspname = $2)))",
    )
    .bind(name.app_role())
    .bind(name.schema())
    .bind(name.ops_role())
    .fetch_one(pool)
    .await
    .map_err(query_err("terminating the app role's sessions"))?;
    Ok(n)
}

/// Fences the app role's writes on `pool`: every table of the schema
/// locked `EXCLUSIVE`, which waits (up to `wait`) for the writes under way
/// to commit and holds back new ones, then the app role's INSERT, UPDATE,
/// DELETE and TRUNCATE rights on them revoked (a session that took the role
/// before its login and gateway grant went, `SET ROLE` by the gateway, is
/// refused at its next write: one held back by the lock checks its rights
/// once it has the lock, and finds them gone). After it no write of the app
/// role commits there. A reconcile that converges the schema again grants
/// them back (`GrantExistingObjects`).
///
/// The locks come before the `REVOKE`: the `REVOKE` updates the tables'
/// `pg_class` rows, and a session holding a lock on one of the tables that
/// then waits for those rows (autovacuum's `ANALYZE` of a table just
/// filled, a `GRANT` on it) would deadlock with a fence that revoked first
/// and then waited for its lock. The tenant's own tables are locked before
/// the operator's (`_tenancy_*`), in the order its writes take them (a row
/// written, then the audit trigger's entries). A deadlock all the same (a
/// session taking them in another order) is tried again, up to three times.
pub async fn fence_writes(pool: &PgPool, name: &TenantName, wait: std::time::Duration) -> Result<(), PgError> {
    let mut attempt = 1;
    loop {
        match fence_writes_once(pool, name, wait).await {
            Err(e) if attempt < FENCE_ATTEMPTS && e.sqlstate().as_deref() == Some(DEADLOCK_DETECTED) => {
                tracing::info!(tenant = %name, attempt, error = %e, "fencing the tenant's writes met a deadlock; trying again");
                attempt += 1;
            }
            done => return done,
        }
    }
}

/// How many times [`fence_writes`] tries when it meets a deadlock.
const FENCE_ATTEMPTS: u32 = 3;

/// SQLSTATE `deadlock_detected`.
const DEADLOCK_DETECTED: &str = "40P01";

async fn fence_writes_once(pool: &PgPool, name: &TenantName, wait: std::time::Duration) -> Result<(), PgError> {
    let (schema, app) = (quote_ident(&name.schema())?, quote_ident(&name.app_role())?);
    // One transaction, in which the admin is a member of the owner (the
    // grants and the tables are the owner's; the lock needs write rights
    // on them): the REVOKE commits with the locks, or not at all.
    let mut tx = pool.begin().await.map_err(query_err("fencing the tenant's writes"))?;
    let lent = super::membership::borrow(&mut tx, &name.owner_role()).await?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')
          ORDER BY c.relname LIKE '\\_tenancy\\_%', c.relname",
    )
    .bind(name.schema())
    .fetch_all(&mut *tx)
    .await
    .map_err(query_err("listing the tenant's tables"))?;
    if !tables.is_empty() {
        super::execute_all(
            &mut tx,
            "waiting for the tenant's writes under way",
            vec![format!(
                "SET LOCAL lock_timeout = '{}ms'; LOCK TABLE {} IN EXCLUSIVE MODE",
                wait.as_millis(),
                tables.join(", ")
            )],
        )
        .await?;
    }
    super::execute_all(
        &mut tx,
        "revoking the app role's writes",
        vec![format!(
            "REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA {schema} FROM {app}"
        )],
    )
    .await?;
    lent.give_back(&mut tx).await?;
    tx.commit()
        .await
        .map_err(query_err("committing the tenant's write fence"))?;
    Ok(())
}

/// Ends the tenant's app sessions as [`terminate_sessions`] does and waits
/// (up to `limit`) until they are gone: a commit under way in one of them
/// is then in the WAL. Gives how many were signalled.
pub async fn end_sessions_and_wait(
    pool: &PgPool,
    name: &TenantName,
    limit: std::time::Duration,
) -> Result<i64, PgError> {
    let started = std::time::Instant::now();
    let mut signalled = 0;
    loop {
        let n = terminate_sessions(pool, name).await?;
        if n == 0 {
            return Ok(signalled);
        }
        signalled += n;
        if started.elapsed() > limit {
            return Err(PgError::Replication(format!(
                "{n} session(s) of tenant {name} did not end within {} s",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Ends every session of the tenant's ops login (a migration, backup or
/// restore of this tenant); returns how many were signalled.
pub async fn terminate_ops_sessions(pool: &PgPool, name: &TenantName) -> Result<i64, PgError> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1 AND pid <> pg_backend_pid()",
    )
    .bind(name.ops_role())
    .fetch_one(pool)
    .await
    .map_err(query_err("terminating the ops role's sessions"))?;
    Ok(n)
}

/// Sets the ops login's password verifier (computed by the caller from the
/// derived password), only on a role carrying this tenant's marker.
/// Returns false when there is no such role.
pub async fn set_ops_password(pool: &PgPool, name: &TenantName, uid: &str, verifier: &str) -> Result<bool, PgError> {
    let marker: Option<Option<String>> =
        sqlx::query_scalar("SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1")
            .bind(name.ops_role())
            .fetch_optional(pool)
            .await
            .map_err(query_err("reading the ops role"))?;
    if marker.flatten().as_deref() != Some(ownership_marker(uid).as_str()) {
        return Ok(false);
    }
    let sql = format!(
        "ALTER ROLE {} PASSWORD {}",
        quote_ident(&name.ops_role())?,
        quote_literal(verifier)?
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(pool)
        .await
        .map_err(query_err("setting the ops role's password"))?;
    Ok(true)
}

/// Drops everything of the tenant in one transaction: its schema with every
/// object in it, what its roles own or were granted, the roles, the registry
/// row; clears the tenant's name from the audit log and records the delete.
/// Refuses to drop objects that carry another tenant's marker. Idempotent.
pub async fn drop_tenant(pool: &PgPool, name: &TenantName, uid: &str, actor: &str) -> Result<usize, PgError> {
    let observed = observe(pool, name).await?;
    let marker = ownership_marker(uid);
    let ours = |c: &Option<String>| c.as_deref() == Some(marker.as_str());
    let mut stmts = Vec::new();
    let schema = quote_ident(&name.schema())?;
    let owner = quote_ident(&name.owner_role())?;
    let app = quote_ident(&name.app_role())?;
    let ops = quote_ident(&name.ops_role())?;
    let roles = [
        (&ops, &observed.ops_role),
        (&owner, &observed.owner_role),
        (&app, &observed.app_role),
    ];
    let ours_roles = || {
        roles
            .iter()
            .filter_map(|(role, state)| state.as_ref().filter(|r| ours(&r.comment)).map(|r| (*role, r)))
    };
    // The admin becomes a member of each role for this transaction only (the
    // roles and so the memberships go with it): dropping the owner's schema
    // and what the roles own requires it.
    for (role, r) in ours_roles() {
        if !r.admin_is_member {
            stmts.push(format!("GRANT {role} TO CURRENT_USER"));
        }
    }
    if let Some(s) = &observed.schema {
        if ours(&s.comment) {
            stmts.push(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        }
    }
    for (role, _) in ours_roles() {
        // Removes grants to the role and its default privileges in this
        // database; objects it owns here went with the schema.
        stmts.push(format!("DROP OWNED BY {role}"));
        stmts.push(format!("DROP ROLE IF EXISTS {role}"));
    }
    // Lock the app role out first, then end its sessions, so none holds a
    // lock the drop would wait on and none can start in between.
    if observed
        .app_role
        .as_ref()
        .is_some_and(|r| ours(&r.comment) && r.can_login)
    {
        disable_login(pool, &app, "disabling the app role's login").await?;
    }
    // Nobody may SET ROLE to the app role any more (the gateway): its
    // transactions already running end with the sessions below.
    if let Some(r) = observed.app_role.as_ref().filter(|r| ours(&r.comment)) {
        for member in &r.other_members {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "REVOKE {app} FROM {}",
                quote_ident(member)?
            )))
            .execute(pool)
            .await
            .map_err(query_err("revoking the app role from its members"))?;
        }
    }
    // The ops login too: a migration, backup or restore still running for
    // this tenant ends here (its work rolls back).
    if observed
        .ops_role
        .as_ref()
        .is_some_and(|r| ours(&r.comment) && r.can_login)
    {
        disable_login(pool, &ops, "disabling the ops role's login").await?;
    }
    if observed.app_role.is_some() || observed.ops_role.is_some() {
        terminate_sessions(pool, name).await?;
        terminate_ops_sessions(pool, name).await?;
    }
    let mut tx = pool
        .begin()
        .await
        .map_err(query_err("starting the delete transaction"))?;
    let mut acl_locked = false;
    for stmt in &stmts {
        // DROP OWNED revokes the app role's CONNECT: a change to the
        // database's ACL, serialized with the others.
        if stmt.starts_with("DROP OWNED") && !acl_locked {
            sqlx::raw_sql(super::LOCK_DATABASE_ACL)
                .execute(&mut *tx)
                .await
                .map_err(query_err("locking the database's ACL"))?;
            acl_locked = true;
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(stmt.clone()))
            .execute(&mut *tx)
            .await
            .map_err(query_err("dropping the tenant"))?;
    }
    let removed = sqlx::query("DELETE FROM tenancy.tenants WHERE uid = $1")
        .bind(uid)
        .execute(&mut *tx)
        .await
        .map_err(query_err("deleting the registry row"))?
        .rows_affected();
    // Its lock rows (the migration and restore locks, keyed by its uid).
    sqlx::query("DELETE FROM tenancy.locks WHERE key = $1 AND kind IN ($2, $3)")
        .bind(uid)
        .bind(super::locks::MIGRATION_LOCK_KIND)
        .bind(super::locks::LOCK_KIND)
        .execute(&mut *tx)
        .await
        .map_err(query_err("deleting the tenant's lock rows"))?;
    // The tenant's last migration failure (its Postgres error may quote data).
    clear_failure(&mut *tx, name.as_str()).await?;
    // Its audit anchoring: the anchor function, head and anchors.
    super::audit::forget_tenant(&mut tx, name, uid).await?;
    if !stmts.is_empty() || removed > 0 {
        sqlx::query("UPDATE tenancy.audit_log SET tenant_name = NULL WHERE tenant_uid = $1")
            .bind(uid)
            .execute(&mut *tx)
            .await
            .map_err(query_err("clearing the tenant's name from the audit log"))?;
        record_event(
            &mut *tx,
            uid,
            None,
            "Deleted",
            actor,
            serde_json::json!({ "statements": stmts.len() }),
        )
        .await?;
    }
    tx.commit().await.map_err(query_err("committing the delete"))?;
    Ok(stmts.len())
}

/// Removes a dropped tenant's migration failure record
/// (`tenancy.migration_failures`, which the migration runs write).
async fn clear_failure<'e, E: sqlx::PgExecutor<'e>>(exec: E, tenant: &str) -> Result<(), PgError> {
    sqlx::query("DELETE FROM tenancy.migration_failures WHERE tenant_name = $1")
        .bind(tenant)
        .execute(exec)
        .await
        .map_err(query_err("clearing the tenant's migration failure"))?;
    Ok(())
}

/// What of a deleted tenant is still in Postgres, in words; empty when
/// nothing is left.
pub async fn leftovers(pool: &PgPool, name: &TenantName, uid: &str) -> Result<Vec<String>, PgError> {
    let marker = ownership_marker(uid);
    let o = observe(pool, name).await?;
    let mut left = Vec::new();
    if o.schema.as_ref().is_some_and(|s| s.comment.as_deref() == Some(&marker)) {
        left.push(format!("schema {}", name.schema()));
    }
    if o.owner_role
        .as_ref()
        .is_some_and(|r| r.comment.as_deref() == Some(&marker))
    {
        left.push(format!("role {}", name.owner_role()));
    }
    if o.app_role
        .as_ref()
        .is_some_and(|r| r.comment.as_deref() == Some(&marker))
    {
        left.push(format!("role {}", name.app_role()));
    }
    if o.ops_role
        .as_ref()
        .is_some_and(|r| r.comment.as_deref() == Some(&marker))
    {
        left.push(format!("role {}", name.ops_role()));
    }
    let registry: i64 = sqlx::query_scalar("SELECT count(*) FROM tenancy.tenants WHERE uid = $1")
        .bind(uid)
        .fetch_one(pool)
        .await
        .map_err(query_err("reading the tenant registry"))?;
    if registry > 0 {
        left.push("registry row".into());
    }
    let locks: i64 = sqlx::query_scalar("SELECT count(*) FROM tenancy.locks WHERE key = $1 AND kind IN ($2, $3)")
        .bind(uid)
        .bind(super::locks::MIGRATION_LOCK_KIND)
        .bind(super::locks::LOCK_KIND)
        .fetch_one(pool)
        .await
        .map_err(query_err("reading the tenant's lock rows"))?;
    if locks > 0 {
        left.push(format!("{locks} lock rows"));
    }
    let named: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tenancy.audit_log WHERE tenant_uid = $1 AND tenant_name IS NOT NULL")
            .bind(uid)
            .fetch_one(pool)
            .await
            .map_err(query_err("reading the audit log"))?;
    if named > 0 {
        left.push(format!("{named} audit rows naming the tenant"));
    }
    left.extend(super::audit::leftovers(pool, name, uid).await?);
    Ok(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> TenantName {
        TenantName::parse(s).unwrap()
    }

    #[test]
    fn every_identifier_is_quoted() {
        let name = n("select");
        let sql = render(&DbAction::CreateSchema, &name, "u-1").unwrap();
        assert_eq!(
            sql[0],
            "CREATE SCHEMA \"tenant_select\" AUTHORIZATION \"tenant_select_owner\""
        );
        assert_eq!(
            sql[1],
            "COMMENT ON SCHEMA \"tenant_select\" IS 'managed by tenancy.dev for tenant uid u-1'"
        );
    }

    #[test]
    fn settings_values_are_literals_and_search_path_an_identifier() {
        let name = n("user");
        let sql = render(
            &DbAction::SetSetting {
                name: "statement_timeout",
                value: "30s'; DROP ROLE x; --".into(),
            },
            &name,
            "u",
        )
        .unwrap();
        assert_eq!(
            sql,
            vec!["ALTER ROLE \"tenant_user_app\" SET statement_timeout TO '30s''; DROP ROLE x; --'"]
        );
        let sql = render(
            &DbAction::SetSetting {
                name: "search_path",
                value: "tenant_user".into(),
            },
            &name,
            "u",
        )
        .unwrap();
        assert_eq!(
            sql,
            vec!["ALTER ROLE \"tenant_user_app\" SET search_path TO \"tenant_user\""]
        );
    }

    #[test]
    fn marker_in_a_uid_cannot_break_out_of_the_comment() {
        let sql = render(&DbAction::CreateOwnerRole, &n("a"), "x' ; DROP DATABASE d; --").unwrap();
        assert_eq!(
            sql[1],
            "COMMENT ON ROLE \"tenant_a_owner\" IS 'managed by tenancy.dev for tenant uid x'' ; DROP DATABASE d; --'"
        );
    }

    #[test]
    fn labels_never_carry_the_password_verifier() {
        let a = DbAction::SetPassword {
            verifier: "SCRAM-SHA-256$4096:secret".into(),
        };
        assert!(!a.label().contains("SCRAM"));
        assert!(!a.label().contains("secret"));
        let b = DbAction::CreateAppRole {
            verifier: "SCRAM-SHA-256$4096:secret".into(),
            login: true,
            connection_limit: 1,
        };
        for shown in [
            format!("{a:?}"),
            format!("{b:?}"),
            format!("{:?}", vec![a.clone(), b.clone()]),
        ] {
            assert!(!shown.contains("SCRAM") && !shown.contains("secret"), "{shown}");
        }
        // The statement itself carries it (that is its purpose).
        assert!(render(&a, &n("a"), "u").unwrap()[0].contains("SCRAM-SHA-256$4096:secret"));
    }
}
