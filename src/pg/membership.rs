//! The admin's membership in a tenant's owner role, for one transaction.
//!
//! A non-superuser admin (CREATEROLE) must be a member of the owner role
//! for the DDL and grants on the schema the owner owns. It is made one
//! inside the transaction that needs it and stops being one before that
//! transaction commits, so the membership never becomes visible to any
//! other session and never outlives the work. A standing membership in
//! every tenant's roles made each such statement (and each grant, which
//! picks its grantor through them) walk all of them again after every role
//! change in the cluster: at 4,000 tenants a plain `CREATE SCHEMA ...
//! AUTHORIZATION` took about 0.4 s (docs/scale.md).

use sqlx::PgConnection;

use super::{query_err, quote_ident, PgError};

/// A membership [`borrow`] granted, to be given back before the commit.
#[must_use = "give the membership back before the transaction commits"]
pub struct Borrowed(Option<String>);

/// Makes the session's user a member of `role` in the open transaction on
/// `conn`, when the role exists and it is not one already (a standing
/// membership an earlier version made is left to the Tenant reconcile,
/// which retires it).
pub async fn borrow(conn: &mut PgConnection, role: &str) -> Result<Borrowed, PgError> {
    let member: Option<bool> = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                         WHERE m.roleid = r.oid
                           AND m.member = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user))
           FROM pg_catalog.pg_roles r WHERE r.rolname = $1",
    )
    .bind(role)
    .fetch_optional(&mut *conn)
    .await
    .map_err(query_err("reading the admin's membership"))?;
    if member != Some(false) {
        return Ok(Borrowed(None));
    }
    let quoted = quote_ident(role)?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("GRANT {quoted} TO CURRENT_USER")))
        .execute(&mut *conn)
        .await
        .map_err(query_err(
            "making the admin a member of the owner role for this transaction",
        ))?;
    Ok(Borrowed(Some(quoted)))
}

impl Borrowed {
    /// Ends the membership [`borrow`] granted (nothing when it granted
    /// none). A transaction that rolls back needs no call.
    pub async fn give_back(self, conn: &mut PgConnection) -> Result<(), PgError> {
        if let Some(quoted) = self.0 {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("REVOKE {quoted} FROM CURRENT_USER")))
                .execute(&mut *conn)
                .await
                .map_err(query_err("ending the admin's membership in the owner role"))?;
        }
        Ok(())
    }
}
