//! A tenant as the Postgres suites drive it: the Postgres half of a Tenant
//! reconcile (`converge_db`), with the password kept as the Secret would.
//! The spec comes from the CRD's defaults (serde), so new spec fields do not
//! break the suites.

use futures::StreamExt;
use sqlx::{Connection, PgConnection};
use tenant_operator::api::TenantSpec;
use tenant_operator::controller::tenant::plan::{self, Endpoint};
use tenant_operator::controller::tenant::{converge_db, ConvergeError, DbOutcome};
use tenant_operator::names::TenantName;
use tenant_operator::pg;

use super::TestDb;

pub struct Tenant {
    pub name: TenantName,
    pub uid: String,
    pub spec: TenantSpec,
    pub password: Option<String>,
    /// The gateway login made a member of the app role while Active
    /// (tests/pg_gateway.rs); None: no gateway.
    pub gateway: Option<String>,
}

/// The spec a `spec: {}` manifest gets.
pub fn default_spec() -> TenantSpec {
    serde_json::from_value(serde_json::json!({})).expect("an empty spec takes every default")
}

impl Tenant {
    pub fn new(name: &str) -> Self {
        Tenant {
            name: TenantName::parse(name).expect("valid name"),
            uid: format!("uid-{name}"),
            spec: default_spec(),
            password: None,
            gateway: None,
        }
    }

    /// One reconcile's Postgres half; keeps the password as the Secret would.
    pub async fn converge(&mut self, db: &TestDb) -> Result<DbOutcome, ConvergeError> {
        let mut desired = plan::desired_db(&self.name, &self.spec)?;
        desired.gateway = self.gateway.clone();
        let catalog = pg::tenant::observe(&db.admin, &self.name).await?;
        let out = converge_db(
            &db.admin,
            &super::test_ring(),
            &self.name,
            &self.uid,
            &desired,
            &catalog,
            self.password.as_deref(),
            "test",
        )
        .await?;
        self.password = Some(out.plan.password.clone());
        Ok(out)
    }

    /// A session as the tenant's app role, with the Secret's URI.
    pub async fn app(&self, db: &TestDb) -> Result<PgConnection, sqlx::Error> {
        let e = Endpoint {
            host: "127.0.0.1".into(),
            port: db.port(),
            database: db.name.clone(),
        };
        let data = plan::secret_data(&self.name, &e, self.password.as_deref().expect("converged"));
        PgConnection::connect(&data["uri"]).await
    }
}

/// Provisions `names` through the operator's own code, `parallel` at once.
pub async fn provision_many(db: &TestDb, names: &[String], parallel: usize) -> Vec<Tenant> {
    futures::stream::iter(names.iter().map(|n| Tenant::new(n)))
        .map(|mut t| async move {
            // Concurrent GRANT CONNECT ON DATABASE race on the database's
            // catalog row ("tuple concurrently updated"): transient, retried
            // as the controller's backoff would.
            for attempt in 1.. {
                match t.converge(db).await {
                    Ok(_) => break,
                    Err(ConvergeError::Db(e)) if e.is_transient() && attempt < 10 => {
                        tokio::time::sleep(std::time::Duration::from_millis(20 * attempt)).await
                    }
                    Err(e) => panic!("provisioning {}: {e}", t.name),
                }
            }
            t
        })
        .buffer_unordered(parallel)
        .collect()
        .await
}
