//! Plan: from a Tenant's spec and what was observed, the actions that
//! converge it. Pure and synchronous, so every decision is unit-tested
//! without a cluster or a database.

use std::collections::BTreeMap;

use crate::api::{Tenant, TenantSpec, TenantState};
use crate::names::TenantName;
use crate::pg::scram;
use crate::pg::tenant::{ownership_marker, CatalogState, DbAction, Role, RoleState};

/// Where tenants' applications reach Postgres (may differ from the admin
/// connection, e.g. a Service name inside the cluster).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub database: String,
}

/// The spec values, checked and in the form Postgres stores them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredDb {
    pub login: bool,
    pub connection_limit: i32,
    /// Managed role settings, name to value, in the form `ALTER ROLE SET` stores.
    pub settings: BTreeMap<&'static str, String>,
    /// `spec.audit.retentionDays`: audit rows older than this are pruned.
    pub audit_retention_days: Option<u32>,
    /// `spec.audit.excludeTables`: tables left without audit triggers.
    pub audit_exclude: std::collections::BTreeSet<String>,
    /// The gateway login ([`crate::pg::gateway`]) that is a member of the
    /// app role while the tenant is Active; None: no gateway (any member
    /// other than the admin is revoked). Set by the controller, not the spec.
    pub gateway: Option<String>,
}

/// Why a Tenant cannot be converged until a person changes something.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    InvalidName(#[from] crate::names::NameError),
    #[error("spec.database.{field}: {message}")]
    InvalidSpec { field: &'static str, message: String },
    #[error("spec.audit.retentionDays: {0} is not between 1 and 3650")]
    InvalidRetention(u32),
    #[error("{what} already exists and was not created by this operator for this tenant ({found}); refusing to adopt it: \
             a left-over of a deleted tenant or another database's tenant of the same name must be removed by hand first")]
    Conflict { what: String, found: String },
}

impl PlanError {
    /// The condition reason: one of a fixed set of words.
    pub fn reason(&self) -> &'static str {
        match self {
            PlanError::InvalidName(_) => "InvalidName",
            PlanError::InvalidSpec { .. } | PlanError::InvalidRetention(_) => "InvalidSpec",
            PlanError::Conflict { .. } => "OwnershipConflict",
        }
    }
}

/// Milliseconds of a Postgres duration in the CRD's format (`0`, `250ms`,
/// `30s`, `5min`, `2h`, `1d`), bounded by `statement_timeout`'s INT_MAX ms.
pub fn parse_duration_ms(s: &str) -> Result<i64, String> {
    if s == "0" {
        return Ok(0);
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit (ms, s, min, h, d)"))?;
    let (num, unit) = s.split_at(split);
    let n: i64 = num.parse().map_err(|_| format!("{s:?} does not start with a number"))?;
    let factor = match unit {
        "ms" => 1,
        "s" => 1_000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?} has an unknown unit {unit:?}; use ms, s, min, h or d")),
    };
    let ms = n.checked_mul(factor).ok_or_else(|| format!("{s:?} is too large"))?;
    if n == 0 || ms > i32::MAX as i64 {
        return Err(format!("{s:?} must be 0 or between 1ms and 24 days"));
    }
    Ok(ms)
}

/// Kilobytes of a size (`64kB`, `16MB`, `1GB`, `1TB`), at most `max_kb`.
fn parse_size_kb(s: &str, max_kb: i64) -> Result<i64, String> {
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit (kB, MB, GB)"))?;
    let (num, unit) = s.split_at(split);
    let n: i64 = num.parse().map_err(|_| format!("{s:?} does not start with a number"))?;
    let factor: i64 = match unit {
        "kB" => 1,
        "MB" => 1 << 10,
        "GB" => 1 << 20,
        "TB" => 1 << 30,
        _ => return Err(format!("{s:?} has an unknown unit {unit:?}; use kB, MB, GB or TB")),
    };
    let kb = n.checked_mul(factor).ok_or_else(|| format!("{s:?} is too large"))?;
    if n == 0 || kb > max_kb {
        return Err(format!("{s:?} must be between 1kB and {}GB", max_kb >> 20));
    }
    Ok(kb)
}

/// Kilobytes of a `work_mem` size (`64kB`, `16MB`, `1GB`), 64kB to 2GB.
pub fn parse_memory_kb(s: &str) -> Result<i64, String> {
    let kb = parse_size_kb(s, 2 * 1024 * 1024)?;
    if kb < 64 {
        return Err(format!("{s:?} must be between 64kB and 2GB"));
    }
    Ok(kb)
}

/// Checks the spec and turns it into the values Postgres should hold. The
/// CRD schema refuses most bad input first; this is the second line, for
/// objects that reached the operator anyway (an older CRD, a direct write).
pub fn desired_db(name: &TenantName, spec: &TenantSpec) -> Result<DesiredDb, PlanError> {
    // Destructured without `..`: a new spec field must be planned here or the
    // build fails.
    // Rate limits are planned by the rate-limit writer (`crate::ratelimit_config`).
    let TenantSpec {
        display_name: _,
        state,
        deletion_protection: _,
        database,
        rate_limits: _,
        secrets: _,
        audit,
        backup: _,
        placement: _,
    } = spec;
    // spec.backup becomes the CronJob (`super::backup_jobs::desired_cronjob`).
    // The audit log's objects and triggers are converged by `crate::pg::audit`
    // (every tenant has one); only its retention comes from the spec.
    let crate::api::tenant::AuditSpec {
        retention_days,
        exclude_tables,
    } = audit;
    if let Some(days) = retention_days.filter(|d| !(1..=3650).contains(d)) {
        return Err(PlanError::InvalidRetention(days));
    }
    // The MigrationSet is followed by the migrations step of the reconcile
    // (`super::migrations`) and rolled out by the MigrationSet controller.
    let crate::api::DatabaseSpec {
        migration_set: _,
        connection_limit,
        statement_timeout,
        idle_in_transaction_timeout,
        work_mem,
        temp_file_limit,
    } = database;
    if !(1..=1000).contains(connection_limit) {
        return Err(PlanError::InvalidSpec {
            field: "connectionLimit",
            message: format!("{connection_limit} is not between 1 and 1000"),
        });
    }
    let st = parse_duration_ms(statement_timeout).map_err(|m| PlanError::InvalidSpec {
        field: "statementTimeout",
        message: m,
    })?;
    let it = parse_duration_ms(idle_in_transaction_timeout).map_err(|m| PlanError::InvalidSpec {
        field: "idleInTransactionTimeout",
        message: m,
    })?;
    let wm = parse_memory_kb(work_mem).map_err(|m| PlanError::InvalidSpec {
        field: "workMem",
        message: m,
    })?;
    let mut settings = BTreeMap::from([
        ("search_path", name.schema()),
        ("statement_timeout", format!("{st}ms")),
        ("idle_in_transaction_session_timeout", format!("{it}ms")),
        ("work_mem", format!("{wm}kB")),
    ]);
    if let Some(limit) = temp_file_limit {
        let kb = parse_size_kb(limit, i32::MAX as i64).map_err(|m| PlanError::InvalidSpec {
            field: "tempFileLimit",
            message: m,
        })?;
        settings.insert("temp_file_limit", format!("{kb}kB"));
    }
    Ok(DesiredDb {
        login: *state == TenantState::Active,
        connection_limit: *connection_limit,
        settings,
        audit_retention_days: *retention_days,
        audit_exclude: exclude_tables.iter().cloned().collect(),
        gateway: None,
    })
}

/// What one reconcile must do to the database, and the credentials to hold.
/// `Debug` never shows the password (the controller zeroizes it once the
/// tenant's Secret is built).
#[derive(Clone, PartialEq, Eq)]
pub struct DbPlan {
    pub actions: Vec<DbAction>,
    /// The app role's password: the one in the Secret, or a new one when the
    /// Secret has none (then `actions` sets it on the role).
    pub password: String,
    /// End the app role's sessions after the actions commit: whenever the
    /// app role may not log in (a suspended tenant), whatever sessions the
    /// catalog read saw.
    pub terminate_sessions: bool,
    /// Caps the spec asks for that the admin role may not set, in words.
    pub caps_not_applied: Option<String>,
}

impl std::fmt::Debug for DbPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbPlan")
            .field("actions", &self.actions)
            .field("password", &"<redacted>")
            .field("terminate_sessions", &self.terminate_sessions)
            .field("caps_not_applied", &self.caps_not_applied)
            .finish()
    }
}

fn check_marker(what: String, comment: &Option<String>, marker: &str) -> Result<(), PlanError> {
    match comment {
        Some(c) if c == marker => Ok(()),
        Some(c) => Err(PlanError::Conflict {
            what,
            found: format!("marked {c:?}"),
        }),
        None => Err(PlanError::Conflict {
            what,
            found: "no ownership marker".into(),
        }),
    }
}

/// Plans the Postgres side of an Active or Suspended tenant.
pub fn plan_db(
    name: &TenantName,
    uid: &str,
    desired: &DesiredDb,
    observed: &CatalogState,
    secret_password: Option<&str>,
) -> Result<DbPlan, PlanError> {
    let marker = ownership_marker(uid);
    if let Some(row) = &observed.registry {
        if row.uid != uid {
            return Err(PlanError::Conflict {
                what: format!("registry row for {name}"),
                found: format!("tenant uid {}", row.uid),
            });
        }
    }
    if let Some(s) = &observed.schema {
        check_marker(format!("schema {}", name.schema()), &s.comment, &marker)?;
    }
    if let Some(r) = &observed.owner_role {
        check_marker(format!("role {}", name.owner_role()), &r.comment, &marker)?;
    }
    if let Some(r) = &observed.app_role {
        check_marker(format!("role {}", name.app_role()), &r.comment, &marker)?;
    }
    if let Some(r) = &observed.ops_role {
        check_marker(format!("role {}", name.ops_role()), &r.comment, &marker)?;
    }

    let mut actions = Vec::new();
    let (password, password_is_new) = match secret_password {
        Some(p) if !p.is_empty() => (p.to_owned(), false),
        _ => (scram::generate_password(), true),
    };
    // A password the operator just drew (190 random bits) gets the verifier
    // of a machine-made secret: key stretching adds nothing against such a
    // search, and Postgres pays it on every role creation (CREATE ROLE checks
    // the verifier against the empty password) and every SCRAM login, on
    // both ends. A password read from the Secret may have been put there by
    // a person: it keeps Postgres's default stretching.
    let app_verifier = |password: &str| {
        if password_is_new {
            scram::verifier_for_random_secret(password)
        } else {
            scram::verifier(password)
        }
    };

    let ops = name.ops_role();
    match &observed.owner_role {
        None => actions.push(DbAction::CreateOwnerRole),
        Some(r) => {
            // The ops login is the owner's one expected member; any other
            // is revoked.
            let mut r = r.clone();
            r.other_members.retain(|m| *m != ops);
            role_hygiene(&mut actions, Role::Owner, &r)
        }
    }
    // The gateway is the app role's one expected member while the tenant is Active; otherwise it is revoked like any other.
    let gateway = desired.gateway.as_ref().filter(|_| desired.login);
    match &observed.app_role {
        None => {
            actions.extend([DbAction::CreateAppRole {
                verifier: app_verifier(&password).into(),
                login: desired.login,
                connection_limit: desired.connection_limit,
            }]);
            actions.extend(gateway.map(|g| DbAction::GrantAppToGateway { gateway: g.clone() }));
        }
        Some(r) => {
            let mut r = r.clone();
            if let Some(g) = gateway {
                let before = r.other_members.len();
                r.other_members.retain(|m| m != g);
                if r.other_members.len() == before {
                    actions.push(DbAction::GrantAppToGateway { gateway: g.clone() });
                }
            }
            let r = &r;
            role_hygiene(&mut actions, Role::App, r);
            for role in &r.member_of {
                actions.push(DbAction::RevokeAppMembershipIn { role: role.clone() });
            }
            if r.can_login != desired.login {
                actions.push(DbAction::SetLogin(desired.login));
            }
            if r.connection_limit != desired.connection_limit {
                actions.push(DbAction::SetConnectionLimit(desired.connection_limit));
            }
            if password_is_new {
                actions.push(DbAction::SetPassword {
                    verifier: app_verifier(&password).into(),
                });
            }
        }
    }
    plan_ops_role(&mut actions, name, observed.ops_role.as_ref());
    let schema_is_new = observed.schema.is_none();
    if let Some(s) = &observed.schema {
        for grantee in &s.other_grantees {
            actions.push(DbAction::RevokeSchemaFrom {
                grantee: grantee.clone(),
            });
        }
    } else {
        actions.push(DbAction::CreateSchema);
    }
    let fresh = schema_is_new || observed.app_role.is_none();
    match &observed.privileges {
        Some(p) if !fresh => {
            if !p.schema_usage {
                actions.push(DbAction::GrantSchemaUsage);
            }
            if p.schema_create {
                actions.push(DbAction::RevokeSchemaFrom {
                    grantee: name.app_role(),
                });
                actions.push(DbAction::GrantSchemaUsage);
            }
            if p.objects_missing_dml > 0 {
                actions.push(DbAction::GrantExistingObjects);
            }
            if !p.default_privileges {
                actions.push(DbAction::SetDefaultPrivileges);
            }
            if p.internal_writable > 0 && p.objects_missing_dml == 0 {
                actions.push(DbAction::RevokeInternalWrites);
            }
            if !p.database_connect {
                actions.push(DbAction::GrantConnect);
            }
        }
        _ => actions.extend([
            DbAction::GrantSchemaUsage,
            DbAction::GrantExistingObjects,
            DbAction::SetDefaultPrivileges,
            DbAction::GrantConnect,
        ]),
    }
    let current = observed.app_role.as_ref().map(|r| &r.settings);
    let mut caps_not_applied = None;
    for (setting, value) in &desired.settings {
        if current.and_then(|s| s.get(*setting)) != Some(value) {
            // temp_file_limit is superuser-only unless granted: degrade to a
            // condition rather than fail the tenant.
            if *setting == "temp_file_limit" && !observed.can_set_temp_file_limit {
                caps_not_applied = Some(format!(
                    "tempFileLimit {value} not applied: the admin role may not set temp_file_limit;                      as a superuser run GRANT SET ON PARAMETER temp_file_limit TO <admin role>"
                ));
                continue;
            }
            actions.push(DbAction::SetSetting {
                name: setting,
                value: value.clone(),
            });
        }
    }
    // A managed setting the spec no longer asks for goes back to the default.
    for setting in crate::pg::tenant::MANAGED_SETTINGS {
        if !desired.settings.contains_key(setting) && current.is_some_and(|s| s.contains_key(setting)) {
            if setting == "temp_file_limit" && !observed.can_set_temp_file_limit {
                continue;
            }
            actions.push(DbAction::ResetSetting { name: setting });
        }
    }
    // Not only when sessions were seen: one may open between this read and
    // the commit that turns login off. A suspend also ends the gateway's
    // sessions still working in the tenant's schema
    // (`crate::pg::tenant::terminate_sessions`).
    let terminate_sessions = !desired.login;
    borrow_owner(&mut actions, observed);
    Ok(DbPlan {
        actions,
        password,
        terminate_sessions,
        caps_not_applied,
    })
}

/// The ops login: LOGIN, NOINHERIT, member of the tenant's owner role and
/// of nothing else, no member of its own, no elevated attribute. The admin
/// is not made a member (it needs none until the delete).
fn plan_ops_role(actions: &mut Vec<DbAction>, name: &TenantName, ops: Option<&RoleState>) {
    let Some(r) = ops else {
        actions.extend([DbAction::CreateOpsRole { verifier: None }, DbAction::GrantOwnerToOps]);
        return;
    };
    if r.elevated {
        actions.push(DbAction::StripElevatedAttributes(Role::Ops));
    }
    if r.inherit {
        actions.push(DbAction::SetOpsNoInherit);
    }
    if !r.can_login || r.connection_limit != crate::pg::tenant::OPS_CONNECTION_LIMIT {
        actions.push(DbAction::SetOpsLogin);
    }
    for member in &r.other_members {
        actions.push(DbAction::RevokeMembership {
            role: Role::Ops,
            member: member.clone(),
        });
    }
    let owner = name.owner_role();
    for role in r.member_of.iter().filter(|m| **m != owner) {
        actions.push(DbAction::RevokeOpsMembershipIn { role: role.clone() });
    }
    if !r.member_of.contains(&owner) {
        actions.push(DbAction::GrantOwnerToOps);
    }
}

/// The admin is a member of the tenant's owner role only inside the
/// transaction that needs it (`GRANT ... TO CURRENT_USER` first, `REVOKE`
/// last, so the membership never commits): the DDL that names the owner
/// (`CREATE SCHEMA ... AUTHORIZATION`, `ALTER DEFAULT PRIVILEGES FOR ROLE`,
/// grants on its objects) requires it of a non-superuser, and a standing
/// membership in every tenant's roles makes every such statement, the
/// admin's and anyone's granting through it, walk all of them again after
/// each role change in the cluster (quadratic on PostgreSQL 15;
/// docs/scale.md). A standing membership left by an earlier version is
/// revoked once.
fn borrow_owner(actions: &mut Vec<DbAction>, observed: &CatalogState) {
    let standing = |r: &Option<RoleState>| r.as_ref().is_some_and(|r| r.admin_is_member);
    let needs = actions.iter().any(DbAction::needs_owner_membership);
    if needs && !standing(&observed.owner_role) {
        let at = actions
            .iter()
            .position(|a| *a == DbAction::CreateOwnerRole)
            .map_or(0, |i| i + 1);
        actions.insert(at, DbAction::GrantOwnerToAdmin);
    }
    if needs || standing(&observed.owner_role) {
        actions.push(DbAction::RevokeOwnerFromAdmin);
    }
    if standing(&observed.app_role) {
        actions.push(DbAction::RevokeAppFromAdmin);
    }
}

/// Drift on an existing role: elevated attributes and foreign members.
fn role_hygiene(actions: &mut Vec<DbAction>, role: Role, r: &RoleState) {
    if r.elevated {
        actions.push(DbAction::StripElevatedAttributes(role));
    }
    for member in &r.other_members {
        actions.push(DbAction::RevokeMembership {
            role,
            member: member.clone(),
        });
    }
}

/// The data of the `tenant-<name>-db` Secret.
pub fn secret_data(name: &TenantName, endpoint: &Endpoint, password: &str) -> BTreeMap<String, String> {
    login_secret_data(&name.app_role(), endpoint, password)
}

/// The data of a login's Secret (a tenant's, or the gateway's
/// `tenant-gateway-db`): host, port, dbname, user, password, uri.
pub fn login_secret_data(user: &str, endpoint: &Endpoint, password: &str) -> BTreeMap<String, String> {
    use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
    // RFC 3986 unreserved characters stay as they are.
    const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
    let user = user.to_owned();
    let host = if endpoint.host.contains(':') {
        format!("[{}]", endpoint.host)
    } else {
        endpoint.host.clone()
    };
    let uri = format!(
        "postgresql://{}:{}@{}:{}/{}",
        utf8_percent_encode(&user, COMPONENT),
        utf8_percent_encode(password, COMPONENT),
        host,
        endpoint.port,
        utf8_percent_encode(&endpoint.database, COMPONENT)
    );
    BTreeMap::from([
        ("host".to_string(), endpoint.host.clone()),
        ("port".to_string(), endpoint.port.to_string()),
        ("dbname".to_string(), endpoint.database.clone()),
        ("user".to_string(), user),
        ("password".to_string(), password.to_owned()),
        ("uri".to_string(), uri),
    ])
}

/// The manager that last changed the Tenant's spec, from managedFields: the
/// actor recorded in the audit log.
pub fn last_spec_manager(tenant: &Tenant) -> String {
    spec_manager_entry(tenant)
        .and_then(|m| m.manager.clone())
        .unwrap_or_else(|| "unknown".into())
}

/// The managedFields entry [`last_spec_manager`] reads: the latest write of
/// the spec itself (not of a subresource). The Tenant cache keeps only this
/// one (`controller::tenant_watch::slim`).
pub fn spec_manager_entry(
    tenant: &Tenant,
) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry> {
    tenant
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref().unwrap_or("").is_empty())
        // An entry without a field set is the one `slim` kept (the API
        // server records one in every entry).
        .filter(|m| m.fields_v1.as_ref().is_none_or(|f| f.0.get("f:spec").is_some()))
        .max_by_key(|m| m.time.as_ref().map(|t| t.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::tenant::{AppPrivileges, RegistryRow, SchemaState};

    fn name() -> TenantName {
        TenantName::parse("acme").unwrap()
    }

    fn spec() -> TenantSpec {
        // Every default, as a `spec: {}` manifest gets them.
        serde_json::from_value(serde_json::json!({})).expect("an empty spec takes every default")
    }

    /// The catalog state of a fully converged tenant.
    fn converged(uid: &str, desired: &DesiredDb) -> CatalogState {
        let marker = ownership_marker(uid);
        let role = |login: bool, settings: BTreeMap<String, String>| RoleState {
            can_login: login,
            connection_limit: if login { desired.connection_limit } else { -1 },
            settings,
            comment: Some(marker.clone()),
            elevated: false,
            inherit: false,
            admin_is_member: false,
            other_members: vec![],
            member_of: vec![],
        };
        let settings = desired
            .settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        CatalogState {
            schema: Some(SchemaState {
                owner: name().owner_role(),
                comment: Some(marker.clone()),
                other_grantees: vec![],
            }),
            owner_role: Some(RoleState {
                other_members: vec![name().ops_role()],
                ..role(false, BTreeMap::new())
            }),
            app_role: Some(role(desired.login, settings)),
            ops_role: Some(RoleState {
                can_login: true,
                connection_limit: crate::pg::tenant::OPS_CONNECTION_LIMIT,
                admin_is_member: false,
                member_of: vec![name().owner_role()],
                ..role(false, BTreeMap::new())
            }),
            privileges: Some(AppPrivileges {
                schema_usage: true,
                schema_create: false,
                database_connect: true,
                objects_missing_dml: 0,
                default_privileges: true,
                internal_writable: 0,
            }),
            registry: Some(RegistryRow {
                uid: uid.into(),
                name: "acme".into(),
                schema: name().schema(),
                state: "Active".into(),
                audit_exclude: vec![],
            }),
            app_sessions: 2,
            can_set_temp_file_limit: false,
        }
    }

    #[test]
    fn a_new_tenant_gets_roles_schema_grants_and_settings() {
        let d = desired_db(&name(), &spec()).unwrap();
        let p = plan_db(&name(), "u1", &d, &CatalogState::default(), None).unwrap();
        let labels: Vec<_> = p.actions.iter().map(|a| a.label()).collect();
        assert_eq!(
            labels,
            [
                "CreateOwnerRole",
                "GrantOwnerToAdmin",
                "CreateAppRole",
                "CreateOpsRole",
                "GrantOwnerToOps",
                "CreateSchema",
                "GrantSchemaUsage",
                "GrantExistingObjects",
                "SetDefaultPrivileges",
                "GrantConnect",
                "SetRoleSetting",
                "SetRoleSetting",
                "SetRoleSetting",
                "SetRoleSetting",
                "RevokeOwnerFromAdmin"
            ]
        );
        assert_eq!(p.password.len(), 32);
        assert!(!p.terminate_sessions);
    }

    #[test]
    fn a_converged_tenant_plans_nothing() {
        let d = desired_db(&name(), &spec()).unwrap();
        let obs = converged("u1", &d);
        let p = plan_db(&name(), "u1", &d, &obs, Some("pw")).unwrap();
        assert!(p.actions.is_empty(), "converged tenant planned {:?}", p.actions);
        assert_eq!(p.password, "pw");
    }

    #[test]
    fn the_admin_is_a_member_of_the_owner_only_inside_the_transaction_that_needs_it() {
        let d = desired_db(&name(), &spec()).unwrap();
        let labels = |obs: &CatalogState| -> Vec<&'static str> {
            let p = plan_db(&name(), "u1", &d, obs, Some("pw")).unwrap();
            p.actions.iter().map(DbAction::label).collect()
        };
        // Work on the owner's schema: borrowed first, returned last.
        let mut obs = converged("u1", &d);
        obs.privileges.as_mut().unwrap().default_privileges = false;
        assert_eq!(
            labels(&obs),
            ["GrantOwnerToAdmin", "SetDefaultPrivileges", "RevokeOwnerFromAdmin"]
        );
        // A change of the roles alone needs no membership.
        let mut obs = converged("u1", &d);
        obs.app_role.as_mut().unwrap().connection_limit += 1;
        assert_eq!(labels(&obs), ["SetConnectionLimit"]);
        // A standing membership (earlier versions) is revoked once; nothing
        // is planned after it.
        let mut obs = converged("u1", &d);
        obs.owner_role.as_mut().unwrap().admin_is_member = true;
        obs.app_role.as_mut().unwrap().admin_is_member = true;
        assert_eq!(labels(&obs), ["RevokeOwnerFromAdmin", "RevokeAppFromAdmin"]);
        // ... and not granted again when the same reconcile needs it.
        obs.privileges.as_mut().unwrap().objects_missing_dml = 1;
        assert_eq!(
            labels(&obs),
            ["GrantExistingObjects", "RevokeOwnerFromAdmin", "RevokeAppFromAdmin"]
        );
    }
    #[test]
    fn the_ops_login_is_kept_confined_to_its_owner() {
        let d = desired_db(&name(), &spec()).unwrap();
        let mut obs = converged("u1", &d);
        {
            let ops = obs.ops_role.as_mut().unwrap();
            ops.inherit = true;
            ops.elevated = true;
            ops.member_of = vec!["tenant_other_owner".into()];
            ops.other_members = vec!["mallory".into()];
        }
        obs.owner_role
            .as_mut()
            .unwrap()
            .other_members
            .push("tenant_other_ops".into());
        let p = plan_db(&name(), "u1", &d, &obs, Some("pw")).unwrap();
        for a in [
            DbAction::RevokeMembership {
                role: Role::Owner,
                member: "tenant_other_ops".into(),
            },
            DbAction::StripElevatedAttributes(Role::Ops),
            DbAction::SetOpsNoInherit,
            DbAction::RevokeMembership {
                role: Role::Ops,
                member: "mallory".into(),
            },
            DbAction::RevokeOpsMembershipIn {
                role: "tenant_other_owner".into(),
            },
            DbAction::GrantOwnerToOps,
        ] {
            assert!(p.actions.contains(&a), "{a:?} missing from {:?}", p.actions);
        }
        assert!(!p
            .actions
            .iter()
            .any(|a| matches!(a, DbAction::RevokeMembership { member, .. } if *member == name().ops_role())));
        // An ops role the operator did not create is never adopted.
        obs.ops_role.as_mut().unwrap().comment = None;
        assert!(matches!(
            plan_db(&name(), "u1", &d, &obs, Some("pw")),
            Err(PlanError::Conflict { .. })
        ));
    }

    #[test]
    fn the_gateway_is_a_member_of_the_app_role_only_while_active() {
        let mut d = desired_db(&name(), &spec()).unwrap();
        d.gateway = Some("tenancy_gateway".into());
        // Provisioning grants it in the same transaction.
        let p = plan_db(&name(), "u1", &d, &CatalogState::default(), None).unwrap();
        assert!(
            p.actions.contains(&DbAction::GrantAppToGateway {
                gateway: "tenancy_gateway".into()
            }),
            "{:?}",
            p.actions
        );
        // Converged with it: nothing to do; the drift repair keeps it.
        let mut obs = converged("u1", &d);
        obs.app_role.as_mut().unwrap().other_members = vec!["tenancy_gateway".into()];
        let p = plan_db(&name(), "u1", &d, &obs, Some("pw")).unwrap();
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        // Revoked by hand: granted again; another member is still revoked.
        obs.app_role.as_mut().unwrap().other_members = vec!["mallory".into()];
        let p = plan_db(&name(), "u1", &d, &obs, Some("pw")).unwrap();
        assert!(p.actions.contains(&DbAction::GrantAppToGateway {
            gateway: "tenancy_gateway".into()
        }));
        assert!(p.actions.contains(&DbAction::RevokeMembership {
            role: Role::App,
            member: "mallory".into()
        }));
        // Suspended: revoked with the login, and its sessions ended.
        obs.app_role.as_mut().unwrap().other_members = vec!["tenancy_gateway".into()];
        obs.app_sessions = 0;
        d.login = false;
        let p = plan_db(&name(), "u1", &d, &obs, Some("pw")).unwrap();
        assert_eq!(
            p.actions,
            vec![
                DbAction::RevokeMembership {
                    role: Role::App,
                    member: "tenancy_gateway".into()
                },
                DbAction::SetLogin(false)
            ]
        );
        assert!(p.terminate_sessions);
    }

    #[test]
    fn only_a_password_the_operator_drew_gets_the_machine_secrets_verifier() {
        fn verifiers(p: &DbPlan) -> Vec<String> {
            p.actions
                .iter()
                .filter_map(|a| match a {
                    DbAction::CreateAppRole { verifier, .. } | DbAction::SetPassword { verifier } => {
                        Some(verifier.expose().split(':').next().unwrap_or_default().to_owned())
                    }
                    _ => None,
                })
                .collect()
        }
        let d = desired_db(&name(), &spec()).unwrap();
        let cheap = format!("SCRAM-SHA-256${}", scram::RANDOM_SECRET_ITERATIONS);
        let stretched = format!("SCRAM-SHA-256${}", scram::ITERATIONS);
        // Drawn now: a new tenant, a Secret without a password.
        let fresh = plan_db(&name(), "u1", &d, &CatalogState::default(), None).unwrap();
        assert_eq!(verifiers(&fresh), vec![cheap.clone()]);
        let rotated = plan_db(&name(), "u1", &d, &converged("u1", &d), None).unwrap();
        assert_eq!(verifiers(&rotated), vec![cheap]);
        // Read from the Secret (anyone who can write it may have chosen
        // it): the role made again with it keeps Postgres's stretching.
        let mut dropped = converged("u1", &d);
        dropped.app_role = None;
        let again = plan_db(&name(), "u1", &d, &dropped, Some("chosen-by-a-person")).unwrap();
        assert_eq!(verifiers(&again), vec![stretched]);
    }

    #[test]
    fn a_missing_secret_password_rotates_the_role_password() {
        let d = desired_db(&name(), &spec()).unwrap();
        let p = plan_db(&name(), "u1", &d, &converged("u1", &d), None).unwrap();
        assert!(
            matches!(p.actions.as_slice(), [DbAction::SetPassword { .. }]),
            "{:?}",
            p.actions
        );
    }

    #[test]
    fn suspending_disables_login_and_terminates_sessions() {
        let mut s = spec();
        let d_active = desired_db(&name(), &s).unwrap();
        s.state = TenantState::Suspended;
        let d = desired_db(&name(), &s).unwrap();
        let p = plan_db(&name(), "u1", &d, &converged("u1", &d_active), Some("pw")).unwrap();
        assert_eq!(p.actions, vec![DbAction::SetLogin(false)]);
        assert!(p.terminate_sessions);
    }

    #[test]
    fn a_suspended_tenant_ends_sessions_even_when_none_were_seen() {
        // A session may open between the catalog read and the commit of
        // NOLOGIN: the plan ends sessions whenever login is off.
        let mut s = spec();
        s.state = TenantState::Suspended;
        let d = desired_db(&name(), &s).unwrap();
        let mut obs = converged("u1", &d);
        obs.app_sessions = 0;
        let p = plan_db(&name(), "u1", &d, &obs, Some("pw")).unwrap();
        assert!(p.terminate_sessions, "{:?}", p.actions);
        let active = desired_db(&name(), &spec()).unwrap();
        assert!(
            !plan_db(&name(), "u1", &active, &converged("u1", &active), Some("pw"))
                .unwrap()
                .terminate_sessions
        );
    }

    #[test]
    fn the_password_never_shows_in_debug() {
        let d = desired_db(&name(), &spec()).unwrap();
        let fresh = plan_db(&name(), "u1", &d, &CatalogState::default(), None).unwrap();
        let kept = plan_db(&name(), "u1", &d, &converged("u1", &d), Some("hunter2-password")).unwrap();
        for (p, pw) in [
            (&fresh, fresh.password.clone()),
            (&kept, "hunter2-password".to_string()),
        ] {
            let shown = format!("{p:?}");
            assert!(!shown.contains(&pw), "{shown}");
            assert!(!shown.contains("SCRAM-SHA-256"), "{shown}");
        }
        let data = secret_data(
            &name(),
            &Endpoint {
                host: "db".into(),
                port: 5432,
                database: "saas".into(),
            },
            "hunter2-password",
        );
        assert!(data["uri"].contains("hunter2-password"));
    }

    #[test]
    fn changed_caps_converge_only_what_changed() {
        let d0 = desired_db(&name(), &spec()).unwrap();
        let mut s = spec();
        s.database.connection_limit = 5;
        s.database.work_mem = "64MB".into();
        let d = desired_db(&name(), &s).unwrap();
        let p = plan_db(&name(), "u1", &d, &converged("u1", &d0), Some("pw")).unwrap();
        assert_eq!(
            p.actions,
            vec![
                DbAction::SetConnectionLimit(5),
                DbAction::SetSetting {
                    name: "work_mem",
                    value: "65536kB".into()
                }
            ]
        );
    }

    #[test]
    fn foreign_grants_and_memberships_are_revoked() {
        let d = desired_db(&name(), &spec()).unwrap();
        let mut obs = converged("u1", &d);
        obs.schema.as_mut().unwrap().other_grantees = vec!["PUBLIC".into(), "tenant_evil_app".into()];
        obs.owner_role.as_mut().unwrap().other_members = vec!["tenant_evil_app".into()];
        obs.app_role.as_mut().unwrap().member_of = vec!["tenant_other_owner".into()];
        obs.privileges.as_mut().unwrap().schema_create = true;
        let p = plan_db(&name(), "u1", &d, &obs, Some("pw")).unwrap();
        assert!(p.actions.contains(&DbAction::RevokeSchemaFrom {
            grantee: "PUBLIC".into()
        }));
        assert!(p.actions.contains(&DbAction::RevokeSchemaFrom {
            grantee: "tenant_evil_app".into()
        }));
        assert!(p.actions.contains(&DbAction::RevokeSchemaFrom {
            grantee: "tenant_acme_app".into()
        }));
        assert!(p.actions.contains(&DbAction::RevokeMembership {
            role: Role::Owner,
            member: "tenant_evil_app".into()
        }));
        assert!(p.actions.contains(&DbAction::RevokeAppMembershipIn {
            role: "tenant_other_owner".into()
        }));
    }

    #[test]
    fn objects_of_another_tenant_or_unmarked_are_never_adopted() {
        let d = desired_db(&name(), &spec()).unwrap();
        let obs = converged("old-uid", &d);
        let err = plan_db(&name(), "new-uid", &d, &obs, None).unwrap_err();
        assert_eq!(err.reason(), "OwnershipConflict");
        let obs = CatalogState {
            app_role: Some(RoleState {
                comment: None,
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = plan_db(&name(), "u1", &d, &obs, None).unwrap_err();
        assert!(err.to_string().contains("tenant_acme_app"), "{err}");
    }

    #[test]
    fn out_of_range_spec_values_are_refused_with_the_field() {
        for (mutate, field) in [
            (
                Box::new(|s: &mut TenantSpec| s.database.connection_limit = 0) as Box<dyn Fn(&mut TenantSpec)>,
                "connectionLimit",
            ),
            (
                Box::new(|s: &mut TenantSpec| s.database.connection_limit = 5000),
                "connectionLimit",
            ),
            (
                Box::new(|s: &mut TenantSpec| s.database.statement_timeout = "30 seconds".into()),
                "statementTimeout",
            ),
            (
                Box::new(|s: &mut TenantSpec| s.database.statement_timeout = "9999d".into()),
                "statementTimeout",
            ),
            (
                Box::new(|s: &mut TenantSpec| s.database.idle_in_transaction_timeout = "-1s".into()),
                "idleInTransactionTimeout",
            ),
            (
                Box::new(|s: &mut TenantSpec| s.database.work_mem = "1kB".into()),
                "workMem",
            ),
            (
                Box::new(|s: &mut TenantSpec| s.database.work_mem = "16MB'; DROP ROLE x; --".into()),
                "workMem",
            ),
        ] {
            let mut s = spec();
            mutate(&mut s);
            match desired_db(&name(), &s) {
                Err(PlanError::InvalidSpec { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected InvalidSpec on {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn temp_file_limit_degrades_without_the_privilege_and_resets_when_removed() {
        let mut s = spec();
        let d0 = desired_db(&name(), &s).unwrap();
        s.database.temp_file_limit = Some("1GB".into());
        let d = desired_db(&name(), &s).unwrap();
        let mut obs = converged("u1", &d0);
        let p = plan_db(&name(), "u1", &d, &obs, Some("pw")).unwrap();
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert!(p
            .caps_not_applied
            .as_deref()
            .is_some_and(|m| m.contains("GRANT SET ON PARAMETER temp_file_limit")));
        obs.can_set_temp_file_limit = true;
        let p = plan_db(&name(), "u1", &d, &obs, Some("pw")).unwrap();
        assert_eq!(
            p.actions,
            vec![DbAction::SetSetting {
                name: "temp_file_limit",
                value: "1048576kB".into()
            }]
        );
        assert!(p.caps_not_applied.is_none());
        // Applied, then removed from the spec: back to the server default.
        obs.app_role
            .as_mut()
            .unwrap()
            .settings
            .insert("temp_file_limit".into(), "1048576kB".into());
        let p = plan_db(&name(), "u1", &d0, &obs, Some("pw")).unwrap();
        assert_eq!(
            p.actions,
            vec![DbAction::ResetSetting {
                name: "temp_file_limit"
            }]
        );
    }

    #[test]
    fn durations_and_sizes_parse_to_postgres_units() {
        assert_eq!(parse_duration_ms("0"), Ok(0));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("5min"), Ok(300_000));
        assert_eq!(parse_duration_ms("24d"), Ok(2_073_600_000));
        assert!(parse_duration_ms("25d").is_err());
        assert_eq!(parse_memory_kb("64kB"), Ok(64));
        assert_eq!(parse_memory_kb("2GB"), Ok(2 * 1024 * 1024));
        assert!(parse_memory_kb("3GB").is_err());
    }

    #[test]
    fn secret_carries_a_working_uri() {
        let e = Endpoint {
            host: "db.example".into(),
            port: 5433,
            database: "saas".into(),
        };
        let d = secret_data(&name(), &e, "AbC123");
        assert_eq!(d["uri"], "postgresql://tenant_acme_app:AbC123@db.example:5433/saas");
        assert_eq!(d["user"], "tenant_acme_app");
        assert_eq!(d.len(), 6);
    }
}
