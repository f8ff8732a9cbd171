//! Observe: read the tenant's Secret and Postgres catalog. No writes.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::Error;
use crate::controller::Context;
use crate::names::TenantName;
use crate::pg::tenant::CatalogState;

/// What one reconcile starts from.
pub struct Observed {
    pub secret: Option<Secret>,
    pub catalog: CatalogState,
}

impl Observed {
    /// The password in the tenant's Secret, when there is one.
    pub fn secret_password(&self) -> Option<String> {
        let data = self.secret.as_ref()?.data.as_ref()?;
        let raw = data.get("password")?;
        String::from_utf8(raw.0.clone()).ok().filter(|p| !p.is_empty())
    }
}

pub async fn observe(ctx: &Context, name: &TenantName) -> Result<Observed, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let secret = secrets.get_opt(&name.db_secret()).await.map_err(Error::ReadSecret)?;
    let catalog = crate::pg::tenant::observe(&ctx.pool, name).await?;
    Ok(Observed { secret, catalog })
}
