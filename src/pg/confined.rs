//! Connections confined to one tenant: the session user is the tenant's ops
//! login (`tenant_<x>_ops`), which is NOINHERIT and a member of that
//! tenant's owner role only.
//!
//! Takes the admin [`Target`] (host, port, database, TLS options), a
//! validated [`TenantName`], its uid and the ops password (derived from the
//! root key by [`crate::crypto::login_password`], stored nowhere); gives a
//! [`Confined`] connection already `SET ROLE` to the tenant's owner with
//! `search_path` pinned to the tenant schema. Side effects: a new server
//! session (never pooled, closed when dropped) and, when the login fails
//! because the role's password is not the derived one (the active root key
//! changed, or someone set it by hand), one `ALTER ROLE ... PASSWORD` by the
//! admin with a client-computed SCRAM verifier, then one retry.
//!
//! Why: everything the owner controls (migration SQL, functions, triggers,
//! RLS policies and views in the tenant schema, a dump's objects) runs on
//! such a connection, never on the admin's. Whatever that code does —
//! `RESET ROLE`, `SET ROLE <another tenant's owner>`, `SET SESSION
//! AUTHORIZATION`, `COMMIT; RESET ROLE; ...` — the most it can be is this
//! tenant's owner, and after a `RESET ROLE` it holds no privilege at all.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use sqlx::{ConnectOptions, Connection, PgConnection};
use zeroize::Zeroizing;

use super::{quote_ident, PgError, Target};
use crate::crypto::{CryptoError, Keyring, TenantSalt};
use crate::names::TenantName;

/// How long opening a confined session may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The credentials of one tenant's ops login. `Debug` never shows the
/// password; the password is zeroized on drop.
#[derive(Clone)]
pub struct OpsLogin {
    target: Target,
    name: TenantName,
    uid: String,
    password: Zeroizing<String>,
    /// The tenant's tables left unaudited (`spec.audit.excludeTables`, as
    /// the registry holds it): a migration's audit check leaves them alone.
    audit_exclude: Vec<String>,
}

impl std::fmt::Debug for OpsLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpsLogin")
            .field("target", &self.target)
            .field("user", &self.name.ops_role())
            .field("password", &"<redacted>")
            .finish()
    }
}

impl OpsLogin {
    pub fn new(target: &Target, name: &TenantName, uid: &str, password: Zeroizing<String>) -> Self {
        Self {
            target: target.clone(),
            name: name.clone(),
            uid: uid.to_owned(),
            password,
            audit_exclude: Vec::new(),
        }
    }

    /// The login with the tenant's unaudited tables.
    pub fn with_audit_exclude(mut self, tables: Vec<String>) -> Self {
        self.audit_exclude = tables;
        self
    }

    pub fn audit_exclude(&self) -> &[String] {
        &self.audit_exclude
    }

    /// The login with the password derived under the active root key.
    pub fn derive(
        target: &Target,
        name: &TenantName,
        uid: &str,
        ring: &Keyring,
        salt: &TenantSalt,
    ) -> Result<Self, CryptoError> {
        let password = crate::crypto::login_password(ring, ring.active_version(), salt, uid)?;
        Ok(Self::new(target, name, uid, password))
    }

    pub fn tenant(&self) -> &TenantName {
        &self.name
    }

    pub fn uid(&self) -> &str {
        &self.uid
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The role to log in as.
    pub fn user(&self) -> String {
        self.name.ops_role()
    }

    /// The password, for handing to a child process (`PGPASSWORD`) or a
    /// Job's Secret.
    pub fn password(&self) -> &str {
        &self.password
    }

    fn options(&self) -> sqlx::postgres::PgConnectOptions {
        (*self.target.base)
            .clone()
            .username(&self.name.ops_role())
            .password(&self.password)
            .application_name("tenant-operator/ops")
            .options([("jit", "off"), ("client_min_messages", "warning")])
            .log_statements(tracing::log::LevelFilter::Trace)
    }
}

/// A session whose user is one tenant's ops login, acting as that tenant's
/// owner. Dereferences to the connection; closed (not pooled) when dropped.
pub struct Confined {
    conn: PgConnection,
}

impl std::fmt::Debug for Confined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Confined(..)")
    }
}

impl Deref for Confined {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl DerefMut for Confined {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

impl Confined {
    /// Ends the session politely (dropping it closes the socket too).
    pub async fn close(self) {
        let _ = self.conn.close().await;
    }

    /// Back to the state [`log_in`] gives (logged in, acting as nobody, the
    /// login's own `search_path`), for a session [`connect`] opened and
    /// whose transactions have ended: `RESET ROLE` and `RESET search_path`.
    /// None (the session closed) when that fails, or when a transaction is
    /// still open.
    pub async fn leave_owner(mut self) -> Option<Confined> {
        use sqlx::Connection;
        if self.conn.is_in_transaction() {
            self.close().await;
            return None;
        }
        match sqlx::raw_sql("RESET ROLE; RESET search_path")
            .execute(&mut self.conn)
            .await
        {
            Ok(_) => Some(self),
            Err(_) => {
                self.close().await;
                None
            }
        }
    }
}

/// Whether a connect error says the password was refused (or the role has
/// none): the cases a password reset repairs.
fn is_auth_failure(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("28P01") | Some("28000")))
}

async fn open(login: &OpsLogin) -> Result<PgConnection, sqlx::Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, login.options().connect()).await {
        Ok(r) => r,
        Err(_) => Err(sqlx::Error::PoolTimedOut),
    }
}

/// Opens a confined session for `login`'s tenant: logs in as its ops role
/// (setting the derived password through `admin` once if the server refuses
/// it), then `SET ROLE <owner>` and `search_path` = the tenant schema, in
/// one round trip.
pub async fn connect(admin: &sqlx::PgPool, login: &OpsLogin) -> Result<Confined, PgError> {
    let mut conn = log_in(admin, login).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(enter_sql(&login.name)?))
        .execute(&mut *conn)
        .await
        .map_err(super::query_err("acting as the tenant's owner"))?;
    Ok(conn)
}

/// Logs in as `login`'s ops role (setting the derived password through
/// `admin` once if the server refuses it) and acts as nobody yet: the
/// session holds no privilege until it runs [`enter_sql`] (or `SET [LOCAL]
/// ROLE` to the owner), which a caller folds into its first message.
/// Holds no admin connection while it logs in; a password reset borrows one
/// from `admin` for two statements.
pub async fn log_in(admin: &sqlx::PgPool, login: &OpsLogin) -> Result<Confined, PgError> {
    let target = describe_login(login);
    let conn = match open(login).await {
        Ok(c) => c,
        Err(e) if is_auth_failure(&e) => {
            let verifier = super::scram::verifier_for_random_secret(login.password());
            if !super::tenant::set_ops_password(admin, &login.name, &login.uid, &verifier).await? {
                return Err(PgError::NoOpsRole(login.name.to_string()));
            }
            open(login).await.map_err(|source| PgError::Connect {
                target: target.clone(),
                source,
            })?
        }
        Err(source) => return Err(PgError::Connect { target, source }),
    };
    Ok(Confined { conn })
}

/// `host:port/database as user` of the ops login, for errors.
fn describe_login(login: &OpsLogin) -> String {
    format!(
        "{}:{}/{} as {}",
        login.target.host,
        login.target.port,
        login.target.database,
        login.user()
    )
}

/// `SET ROLE <owner>; SET search_path TO <schema>` of `name`: quoted
/// validated names.
pub fn enter_sql(name: &TenantName) -> Result<String, PgError> {
    Ok(format!(
        "SET ROLE {}; SET search_path TO {}",
        quote_ident(&name.owner_role())?,
        quote_ident(&name.schema())?
    ))
}

/// [`connect`] for a process that holds the derived password but no admin
/// (a backup or restore Job, given the password by the operator): a refused
/// password is an error, not repaired.
pub async fn connect_without_admin(login: &OpsLogin) -> Result<Confined, PgError> {
    let target = describe_login(login);
    let conn = open(login)
        .await
        .map_err(|source| PgError::Connect { target, source })?;
    become_owner(Confined { conn }, login).await
}

async fn become_owner(mut conn: Confined, login: &OpsLogin) -> Result<Confined, PgError> {
    let sql = enter_sql(&login.name)?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await
        .map_err(super::query_err("acting as the tenant's owner"))?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let target = Target::from_url("postgresql://admin:adminpw@db.example:5432/saas").unwrap();
        let name = TenantName::parse("acme").unwrap();
        let login = OpsLogin::new(&target, &name, "u-1", Zeroizing::new("s3cr3t-derived".into()));
        let shown = format!("{login:?} {login:#?} {target:?}");
        assert!(!shown.contains("s3cr3t-derived"), "{shown}");
        assert!(!shown.contains("adminpw"), "{shown}");
        assert!(shown.contains("tenant_acme_ops"), "{shown}");
    }
}
