//! The gateway login: one role per database through which applications
//! reach every Active tenant over one shared pool (docs/data-path.md).
//!
//! Takes the gateway's role name (validated by [`GatewayName::parse`]) and
//! plain values; gives the observed gateway, the actions that converge it
//! (pure [`plan`]), [`converge`] which runs them, and [`begin_sql`], the one
//! message that opens a tenant transaction as the gateway. Side effects of
//! [`converge`]: the role (LOGIN, NOINHERIT, empty `search_path`, ownership
//! marker), its password verifier, CONNECT on the database, and revokes of
//! any membership or privilege it should not have.
//!
//! The gateway holds no privilege of its own: the only thing it can do is
//! `SET ROLE` to the app role of a tenant that is Active (each tenant's own
//! converge grants that membership and revokes it on suspend and delete,
//! [`super::tenant::DbAction::GrantAppToGateway`]).

use sqlx::{PgPool, Row};

use super::{execute_all, query_err, quote_ident, quote_literal, PgError};
use crate::names::TenantName;

/// The default gateway role name (`--gateway-role`, `GATEWAY_ROLE`).
pub const DEFAULT_ROLE: &str = "tenancy_gateway";

/// The role settings a tenant transaction copies from the tenant's app role
/// (`ALTER ROLE ... SET` values apply only at login, and the gateway never
/// logs in as the app role). `temp_file_limit` and `pgaudit.log` are
/// superuser-set parameters the gateway may not set: see docs/data-path.md.
pub const COPIED_SETTINGS: [&str; 3] = ["statement_timeout", "idle_in_transaction_session_timeout", "work_mem"];

/// Longest `actor` or `request_id` a tenant transaction accepts.
pub const MAX_AUDIT_VALUE_LEN: usize = 200;

/// A validated gateway role name: a lower-case SQL identifier of at most 63
/// bytes that cannot be a tenant's role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayName(String);

impl GatewayName {
    pub fn parse(name: &str) -> Result<Self, String> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !ok {
            return Err(format!(
                "gateway role {name:?} must be a lower-case identifier (a-z, 0-9, _) of at most 63 characters"
            ));
        }
        if name.starts_with("tenant_") || name.starts_with("pg_") {
            return Err(format!(
                "gateway role {name:?} may not start with tenant_ or pg_ (reserved for tenants' and Postgres's roles)"
            ));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for GatewayName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The comment the operator writes on the gateway it created, naming the
/// database (roles are cluster-wide; each database has its own gateway).
pub fn gateway_marker(database: &str) -> String {
    format!("managed by tenancy.dev as the gateway of database {database}")
}

/// The gateway as the catalog shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayState {
    pub comment: Option<String>,
    pub can_login: bool,
    pub inherit: bool,
    /// CREATEDB or CREATEROLE (the admin may take them away).
    pub elevated: bool,
    /// SUPERUSER, REPLICATION or BYPASSRLS (only a superuser may take them
    /// away: the converge fails saying so).
    pub superpowers: bool,
    /// The role-wide `search_path` setting, as stored (`""` when empty).
    pub search_path: Option<String>,
    /// Roles the gateway is a member of that are not the app role of an
    /// Active tenant of this database's registry.
    pub foreign_memberships: Vec<String>,
    /// Roles, other than the admin, that are members of the gateway (each
    /// would get every tenant).
    pub members: Vec<String>,
    pub admin_is_member: bool,
    /// Objects of this database (or shared ones) whose ACL names the
    /// gateway, other than CONNECT on this database.
    pub foreign_privileges: i64,
    pub database_connect: bool,
    pub database: String,
}

/// One converging step of the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayAction {
    Create {
        verifier: String,
    },
    StripElevated {
        superpowers: bool,
    },
    SetNoInherit,
    SetLogin,
    SetEmptySearchPath,
    SetPassword {
        verifier: String,
    },
    RevokeMembershipIn {
        role: String,
    },
    RevokeMember {
        member: String,
    },
    /// Revokes every privilege granted to the gateway in this database
    /// (`DROP OWNED BY`, after making the admin a member so it may), then
    /// gives back CONNECT.
    RevokePrivileges {
        admin_is_member: bool,
    },
    GrantConnect,
}

impl GatewayAction {
    /// A fixed, password-free label for logs and audit rows.
    pub fn label(&self) -> &'static str {
        match self {
            GatewayAction::Create { .. } => "CreateGateway",
            GatewayAction::StripElevated { .. } => "StripElevatedAttributes",
            GatewayAction::SetNoInherit => "SetNoInherit",
            GatewayAction::SetLogin => "SetLogin",
            GatewayAction::SetEmptySearchPath => "SetEmptySearchPath",
            GatewayAction::SetPassword { .. } => "SetPassword",
            GatewayAction::RevokeMembershipIn { .. } => "RevokeForeignMembership",
            GatewayAction::RevokeMember { .. } => "RevokeGatewayMember",
            GatewayAction::RevokePrivileges { .. } => "RevokeForeignPrivileges",
            GatewayAction::GrantConnect => "GrantConnect",
        }
    }
}

/// Why the gateway cannot be converged.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("role {role} already exists and was not created by this operator as the gateway of database {database} ({found}); \
             refusing to adopt it: pick another --gateway-role or remove it by hand")]
    Conflict {
        role: String,
        database: String,
        found: String,
    },
    #[error(transparent)]
    Db(#[from] PgError),
}

/// Reads the gateway's catalog state (one query); None when there is no
/// such role. The database's ACL is read entry by entry (`unnest`, then
/// `aclexplode` of one entry): `aclexplode` of the whole ACL reads
/// (detoasts) it again for every row it returns, quadratic in its entries,
/// two per tenant: 2.5 s a call at 10,000 tenants against 15 ms
/// (docs/scale.md).
pub async fn observe(pool: &PgPool, gateway: &GatewayName) -> Result<(String, Option<GatewayState>), PgError> {
    let row = sqlx::query(
        "SELECT current_database()::text AS db, r.oid IS NOT NULL AS found,
                shobj_description(r.oid, 'pg_authid') AS comment,
                coalesce(r.rolcanlogin, false) AS login, coalesce(r.rolinherit, false) AS inherit,
                coalesce(r.rolcreatedb OR r.rolcreaterole, false) AS elevated,
                coalesce(r.rolsuper OR r.rolreplication OR r.rolbypassrls, false) AS superpowers,
                (SELECT substr(kv, 13) FROM pg_db_role_setting s, unnest(s.setconfig) kv
                  WHERE s.setrole = r.oid AND s.setdatabase = 0 AND kv LIKE 'search\\_path=%') AS search_path,
                coalesce((SELECT array_agg(g.rolname::text ORDER BY g.rolname) FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                           WHERE m.member = r.oid AND NOT EXISTS (
                             SELECT 1 FROM tenancy.tenants t
                              WHERE t.state = 'Active' AND g.rolname = 'tenant_' || replace(t.name, '-', '_') || '_app'
                                AND shobj_description(g.oid, 'pg_authid') = 'managed by tenancy.dev for tenant uid ' || t.uid)), '{}') AS foreign_memberships,
                coalesce((SELECT array_agg(pg_get_userbyid(m.member)::text ORDER BY 1) FROM pg_auth_members m
                           WHERE m.roleid = r.oid AND pg_get_userbyid(m.member) <> current_user), '{}') AS members,
                EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.roleid = r.oid AND m.member = (SELECT oid FROM pg_roles WHERE rolname = current_user)) AS admin_is_member,
                (SELECT count(*) FROM pg_shdepend d
                  WHERE d.refclassid = 'pg_authid'::regclass AND d.refobjid = r.oid AND d.deptype IN ('a', 'o')
                    AND d.dbid IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
                    AND NOT (d.classid = 'pg_database'::regclass AND d.deptype = 'a'
                             AND d.objid = (SELECT oid FROM pg_database WHERE datname = current_database())
                             AND NOT EXISTS (SELECT 1 FROM pg_database db, unnest(db.datacl) i, aclexplode(ARRAY[i]) a
                                              WHERE db.datname = current_database() AND a.grantee = r.oid AND a.privilege_type <> 'CONNECT'))) AS foreign_privileges,
                coalesce(has_database_privilege(r.oid, current_database(), 'CONNECT'), false) AS connect
           FROM (SELECT 1) one LEFT JOIN pg_roles r ON r.rolname = $1",
    )
    .bind(gateway.as_str())
    .fetch_one(pool)
    .await
    .map_err(query_err("reading the gateway role"))?;
    let decode = || -> Result<(String, Option<GatewayState>), sqlx::Error> {
        let database: String = row.try_get("db")?;
        if !row.try_get::<bool, _>("found")? {
            return Ok((database, None));
        }
        Ok((
            database.clone(),
            Some(GatewayState {
                comment: row.try_get("comment")?,
                can_login: row.try_get("login")?,
                inherit: row.try_get("inherit")?,
                elevated: row.try_get("elevated")?,
                superpowers: row.try_get("superpowers")?,
                search_path: row.try_get("search_path")?,
                foreign_memberships: row.try_get("foreign_memberships")?,
                members: row.try_get("members")?,
                admin_is_member: row.try_get("admin_is_member")?,
                foreign_privileges: row.try_get("foreign_privileges")?,
                database_connect: row.try_get("connect")?,
                database,
            }),
        ))
    };
    decode().map_err(query_err("decoding the gateway role"))
}

/// The actions that converge the gateway. `new_verifier` is the verifier of
/// a password the Secret does not hold yet (a new gateway, or a Secret
/// deleted by hand): it is set on the role.
pub fn plan(
    gateway: &GatewayName,
    database: &str,
    observed: Option<&GatewayState>,
    new_verifier: Option<String>,
) -> Result<Vec<GatewayAction>, GatewayError> {
    let Some(g) = observed else {
        let verifier = new_verifier.unwrap_or_default();
        return Ok(vec![GatewayAction::Create { verifier }, GatewayAction::GrantConnect]);
    };
    let marker = gateway_marker(database);
    if g.comment.as_deref() != Some(marker.as_str()) {
        let found = g
            .comment
            .as_ref()
            .map(|c| format!("marked {c:?}"))
            .unwrap_or_else(|| "no ownership marker".into());
        return Err(GatewayError::Conflict {
            role: gateway.to_string(),
            database: database.to_owned(),
            found,
        });
    }
    let mut actions = Vec::new();
    if g.elevated || g.superpowers {
        actions.push(GatewayAction::StripElevated {
            superpowers: g.superpowers,
        });
    }
    if g.inherit {
        actions.push(GatewayAction::SetNoInherit);
    }
    if !g.can_login {
        actions.push(GatewayAction::SetLogin);
    }
    if g.search_path.as_deref() != Some("\"\"") {
        actions.push(GatewayAction::SetEmptySearchPath);
    }
    if let Some(verifier) = new_verifier {
        actions.push(GatewayAction::SetPassword { verifier });
    }
    for role in &g.foreign_memberships {
        actions.push(GatewayAction::RevokeMembershipIn { role: role.clone() });
    }
    for member in &g.members {
        actions.push(GatewayAction::RevokeMember { member: member.clone() });
    }
    if g.foreign_privileges > 0 {
        actions.push(GatewayAction::RevokePrivileges {
            admin_is_member: g.admin_is_member,
        });
    }
    if !g.database_connect && g.foreign_privileges == 0 {
        actions.push(GatewayAction::GrantConnect);
    }
    Ok(actions)
}

/// The SQL of one gateway action; identifiers quoted.
pub fn render(action: &GatewayAction, gateway: &GatewayName, database: &str) -> Result<Vec<String>, PgError> {
    let gw = quote_ident(gateway.as_str())?;
    let db = quote_ident(database)?;
    Ok(match action {
        GatewayAction::Create { verifier } => vec![
            format!("CREATE ROLE {gw} LOGIN NOINHERIT PASSWORD {}", quote_literal(verifier)?),
            format!("COMMENT ON ROLE {gw} IS {}", quote_literal(&gateway_marker(database))?),
            format!("ALTER ROLE {gw} SET search_path TO ''"),
        ],
        // A CREATEROLE admin may not even name the superuser-only attributes.
        GatewayAction::StripElevated { superpowers: false } => vec![format!("ALTER ROLE {gw} NOCREATEDB NOCREATEROLE")],
        GatewayAction::StripElevated { superpowers: true } => vec![format!(
            "ALTER ROLE {gw} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
        )],
        GatewayAction::SetNoInherit => vec![format!("ALTER ROLE {gw} NOINHERIT")],
        GatewayAction::SetLogin => vec![format!("ALTER ROLE {gw} LOGIN")],
        GatewayAction::SetEmptySearchPath => vec![format!("ALTER ROLE {gw} SET search_path TO ''")],
        GatewayAction::SetPassword { verifier } => {
            vec![format!("ALTER ROLE {gw} PASSWORD {}", quote_literal(verifier)?)]
        }
        GatewayAction::RevokeMembershipIn { role } => vec![format!("REVOKE {} FROM {gw}", quote_ident(role)?)],
        GatewayAction::RevokeMember { member } => vec![format!("REVOKE {gw} FROM {}", quote_ident(member)?)],
        GatewayAction::RevokePrivileges { admin_is_member } => {
            let mut v = Vec::new();
            if !admin_is_member {
                v.push(format!("GRANT {gw} TO CURRENT_USER"));
            }
            v.push(format!("DROP OWNED BY {gw}"));
            v.push(format!("GRANT CONNECT ON DATABASE {db} TO {gw}"));
            v
        }
        GatewayAction::GrantConnect => vec![format!("GRANT CONNECT ON DATABASE {db} TO {gw}")],
    })
}

/// What [`converge`] did.
#[derive(Debug)]
pub struct GatewayOutcome {
    pub actions: Vec<GatewayAction>,
    pub statements: usize,
}

/// Observes the gateway and converges it in one transaction (an audit row
/// when something changed); writes nothing when it is converged.
/// `password` is the one the Secret holds; `password_is_new` when the
/// Secret did not hold it before (then it is set on the role).
pub async fn converge(
    pool: &PgPool,
    gateway: &GatewayName,
    password: &str,
    password_is_new: bool,
) -> Result<GatewayOutcome, GatewayError> {
    let (database, observed) = observe(pool, gateway).await?;
    let verifier = (password_is_new || observed.is_none()).then(|| super::scram::verifier(password));
    let actions = plan(gateway, &database, observed.as_ref(), verifier)?;
    if actions.is_empty() {
        return Ok(GatewayOutcome { actions, statements: 0 });
    }
    let mut tx = pool
        .begin()
        .await
        .map_err(query_err("starting the gateway transaction"))?;
    let mut statements = 0;
    let mut lent = Vec::new();
    for action in &actions {
        if matches!(action, GatewayAction::RevokePrivileges { .. }) {
            // A privilege is revoked by its grantor: on a tenant's objects,
            // that tenant's owner, of which the admin is a member for this
            // transaction only (crate::pg::membership).
            for owner in grantors(&mut tx, gateway).await? {
                lent.push(super::membership::borrow(&mut tx, &owner).await?);
            }
        }
        statements += execute_all(&mut tx, action.label(), render(action, gateway, &database)?).await?;
    }
    for l in lent {
        l.give_back(&mut tx).await?;
    }
    let labels: Vec<&str> = actions.iter().map(GatewayAction::label).collect();
    super::registry::record_event(
        &mut *tx,
        "gateway",
        None,
        "GatewayConverged",
        "tenant-operator",
        serde_json::json!({ "role": gateway.as_str(), "steps": labels }),
    )
    .await?;
    tx.commit()
        .await
        .map_err(query_err("committing the gateway's changes"))?;
    Ok(GatewayOutcome { actions, statements })
}

/// The owners (other than the admin, and not superusers) of the objects of
/// this database on which the gateway holds a privilege.
async fn grantors(conn: &mut sqlx::PgConnection, gateway: &GatewayName) -> Result<Vec<String>, PgError> {
    sqlx::query_scalar(
        "SELECT DISTINCT r.rolname::text FROM pg_catalog.pg_shdepend d
           CROSS JOIN LATERAL (
             SELECT relowner FROM pg_catalog.pg_class WHERE d.classid = 'pg_class'::regclass AND oid = d.objid
             UNION ALL SELECT nspowner FROM pg_catalog.pg_namespace WHERE d.classid = 'pg_namespace'::regclass AND oid = d.objid
             UNION ALL SELECT proowner FROM pg_catalog.pg_proc WHERE d.classid = 'pg_proc'::regclass AND oid = d.objid
             UNION ALL SELECT typowner FROM pg_catalog.pg_type WHERE d.classid = 'pg_type'::regclass AND oid = d.objid
             UNION ALL SELECT defaclrole FROM pg_catalog.pg_default_acl WHERE d.classid = 'pg_default_acl'::regclass AND oid = d.objid
           ) o(owner)
           JOIN pg_catalog.pg_roles r ON r.oid = o.owner
          WHERE d.refclassid = 'pg_authid'::regclass AND d.refobjid = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $1)
            AND d.deptype = 'a' AND d.dbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
            AND r.rolname <> current_user AND NOT r.rolsuper
          ORDER BY 1",
    )
    .bind(gateway.as_str())
    .fetch_all(&mut *conn)
    .await
    .map_err(query_err("reading who granted the gateway its privileges"))
}

/// Why a tenant transaction cannot be opened, before anything is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BeginError {
    #[error("{field} is longer than {MAX_AUDIT_VALUE_LEN} bytes")]
    TooLong { field: &'static str },
    #[error("{field} contains a NUL byte")]
    Nul { field: &'static str },
}

/// A string literal that means the same whatever `standard_conforming_strings`
/// is (an `E''` literal with quotes and backslashes escaped): the value
/// cannot end the literal. Checked by [`begin_sql`]'s callers for NUL.
fn escape_literal(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

fn audit_value(field: &'static str, value: &str) -> Result<String, BeginError> {
    if value.len() > MAX_AUDIT_VALUE_LEN {
        return Err(BeginError::TooLong { field });
    }
    if value.contains('\0') {
        return Err(BeginError::Nul { field });
    }
    Ok(escape_literal(value))
}

/// Every tenant's copied settings in one query (the gateway may read
/// `pg_db_role_setting`): rows of (app role, setting, value) for the
/// [`COPIED_SETTINGS`] of every role named like a tenant's app role. An
/// application reads it once per cache period for all its tenants
/// ([`begin_sql`] takes the values as literals), not once per request.
pub fn caps_sql() -> String {
    let copied = COPIED_SETTINGS
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT r.rolname::text, pg_catalog.split_part(kv, '=', 1), pg_catalog.substr(kv, pg_catalog.strpos(kv, '=') + 1) \
           FROM pg_catalog.pg_db_role_setting s JOIN pg_catalog.pg_roles r ON r.oid = s.setrole \
          CROSS JOIN LATERAL pg_catalog.unnest(s.setconfig) AS kv \
          WHERE s.setdatabase = 0 AND r.rolname LIKE 'tenant\\_%\\_app' \
            AND pg_catalog.split_part(kv, '=', 1) IN ({copied})"
    )
}

/// The one simple-query message that opens a tenant transaction as the
/// gateway: `SET LOCAL ROLE` to the tenant's app role, `BEGIN`, then the
/// tenant's `search_path`, its caps (`caps`: the app role's settings as
/// [`caps_sql`] read them; any name not in [`COPIED_SETTINGS`] is ignored),
/// and the audit actor and request id, all `SET LOCAL`; and
/// `application_name = 'tenant:<name>'` LOCAL, so that `pg_stat_activity`
/// shows whose transaction the gateway session is in while it lasts (the
/// caps watchdog, [`super::watchdog`], enforces the tenant's caps on it).
///
/// The role comes first, before `BEGIN`: in a multi-statement message the
/// statements before a `BEGIN` run in an implicit transaction block that
/// the `BEGIN` turns into the explicit one (so the role holds in it), and
/// when the role is refused (22023: no such role; 42501: the gateway is not
/// its member, i.e. the tenant is not Active) Postgres skips the rest and
/// rolls the implicit block back: the connection is left idle, with no
/// aborted transaction for the pool to clean up.
///
/// Only utility statements (`SET LOCAL`), no `SELECT`: nothing to plan,
/// which is what keeps a tenant transaction's cost near a plain one's
/// (`cargo bench --bench data_path`).
pub fn begin_sql(
    tenant: &TenantName,
    actor: &str,
    request_id: &str,
    caps: &[(String, String)],
) -> Result<String, BeginError> {
    let actor = audit_value("actor", actor)?;
    let request_id = audit_value("request_id", request_id)?;
    // Identifiers from a validated TenantName: [a-z0-9_] only.
    let mut sql = format!(
        "SET LOCAL ROLE \"{}\"; BEGIN; SET LOCAL search_path = \"{}\"; SET LOCAL application_name = '{}{}'; SET LOCAL tenancy.actor = {actor}; SET LOCAL tenancy.request_id = {request_id};",
        tenant.app_role(),
        tenant.schema(),
        super::watchdog::APPLICATION_NAME_PREFIX,
        tenant.as_str()
    );
    for (name, value) in caps {
        let Some(name) = COPIED_SETTINGS.iter().find(|s| **s == name.as_str()) else {
            continue;
        };
        if value.contains('\0') {
            return Err(BeginError::Nul { field: "setting" });
        }
        sql.push_str(&format!(" SET LOCAL {name} = {};", escape_literal(value)));
    }
    Ok(sql)
}

/// What a failed [`begin_sql`] means, from its SQLSTATE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 22023: no such app role (never provisioned, or deleted).
    UnknownTenant,
    /// 42501: the gateway is not a member (suspended, being deleted, not yet
    /// provisioned, or the gateway not granted yet).
    NotActive,
}

pub fn refusal(code: &str) -> Option<Refusal> {
    match code {
        "22023" => Some(Refusal::UnknownTenant),
        "42501" => Some(Refusal::NotActive),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw() -> GatewayName {
        GatewayName::parse("tenancy_gateway").unwrap()
    }

    fn converged() -> GatewayState {
        GatewayState {
            comment: Some(gateway_marker("saas")),
            can_login: true,
            inherit: false,
            elevated: false,
            superpowers: false,
            search_path: Some("\"\"".into()),
            foreign_memberships: vec![],
            members: vec![],
            admin_is_member: false,
            foreign_privileges: 0,
            database_connect: true,
            database: "saas".into(),
        }
    }

    #[test]
    fn names_are_identifiers_and_never_a_tenants() {
        assert!(GatewayName::parse("tenancy_gateway").is_ok());
        for bad in [
            "",
            "Gateway",
            "gw\"; DROP ROLE x",
            "tenant_a_app",
            "pg_read_all_data",
            "1gw",
            &"g".repeat(64),
        ] {
            assert!(GatewayName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_converged_gateway_plans_nothing_and_a_new_one_is_created() {
        assert!(plan(&gw(), "saas", Some(&converged()), None).unwrap().is_empty());
        let a = plan(&gw(), "saas", None, Some("v".into())).unwrap();
        assert_eq!(
            a,
            vec![
                GatewayAction::Create { verifier: "v".into() },
                GatewayAction::GrantConnect
            ]
        );
        let sql = render(&a[0], &gw(), "saas").unwrap();
        assert!(
            sql[0].starts_with("CREATE ROLE \"tenancy_gateway\" LOGIN NOINHERIT PASSWORD 'v'"),
            "{sql:?}"
        );
    }

    #[test]
    fn drift_is_repaired_and_foreign_roles_refused() {
        let mut g = converged();
        g.inherit = true;
        g.elevated = true;
        g.can_login = false;
        g.search_path = None;
        g.foreign_memberships = vec!["pg_read_all_data".into()];
        g.members = vec!["mallory".into()];
        g.foreign_privileges = 2;
        let a = plan(&gw(), "saas", Some(&g), None).unwrap();
        assert_eq!(
            a,
            vec![
                GatewayAction::StripElevated { superpowers: false },
                GatewayAction::SetNoInherit,
                GatewayAction::SetLogin,
                GatewayAction::SetEmptySearchPath,
                GatewayAction::RevokeMembershipIn {
                    role: "pg_read_all_data".into()
                },
                GatewayAction::RevokeMember {
                    member: "mallory".into()
                },
                GatewayAction::RevokePrivileges { admin_is_member: false },
            ]
        );
        g.comment = Some(gateway_marker("other_db"));
        assert!(matches!(
            plan(&gw(), "saas", Some(&g), None),
            Err(GatewayError::Conflict { .. })
        ));
    }

    #[test]
    fn begin_is_one_message_with_every_value_escaped() {
        let t = TenantName::parse("acme-eu").unwrap();
        let caps = vec![
            ("statement_timeout".to_string(), "1500ms".to_string()),
            ("work_mem".to_string(), "8MB'; RESET ROLE; --".to_string()),
            ("search_path".to_string(), "public".to_string()),
        ];
        let sql = begin_sql(&t, "o'brien\\'; RESET ROLE; --", "req-1", &caps).unwrap();
        assert!(
            sql.starts_with("SET LOCAL ROLE \"tenant_acme_eu_app\"; BEGIN; SET LOCAL search_path = \"tenant_acme_eu\"; SET LOCAL application_name = 'tenant:acme-eu'; "),
            "{sql}"
        );
        assert!(
            sql.contains("SET LOCAL tenancy.actor = E'o''brien\\\\''; RESET ROLE; --';"),
            "{sql}"
        );
        assert!(sql.contains("SET LOCAL statement_timeout = E'1500ms';"), "{sql}");
        assert!(sql.contains("SET LOCAL work_mem = E'8MB''; RESET ROLE; --';"), "{sql}");
        assert!(
            !sql.contains("public"),
            "a setting outside COPIED_SETTINGS is ignored: {sql}"
        );
        assert!(!sql.contains("SELECT"), "nothing to plan: {sql}");
        assert_eq!(begin_sql(&t, "a\0", "r", &[]), Err(BeginError::Nul { field: "actor" }));
        assert_eq!(
            begin_sql(&t, "a", &"r".repeat(201), &[]),
            Err(BeginError::TooLong { field: "request_id" })
        );
        assert!(caps_sql().contains("IN ('statement_timeout', 'idle_in_transaction_session_timeout', 'work_mem')"));
    }
}
