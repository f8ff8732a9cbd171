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

/// Reads the plaintext source of each of the tenant's `spec.secrets`.
pub async fn read_sources(
    ctx: &Context,
    spec: &[crate::api::tenant::TenantSecret],
) -> Result<std::collections::BTreeMap<String, super::sealing::Source>, Error> {
    use super::sealing::Source;
    let mut out = std::collections::BTreeMap::new();
    for s in spec {
        let r = &s.secret_ref;
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &r.namespace);
        let source = match api.get_opt(&r.name).await.map_err(Error::ReadSecret)? {
            None => Source::SecretMissing,
            Some(secret) => match secret.data.and_then(|mut d| d.remove(&r.key)) {
                Some(v) => Source::Value(v.0),
                None => Source::KeyMissing,
            },
        };
        out.insert(s.name.clone(), source);
    }
    Ok(out)
}

/// The tenant's sealed Secret, if it exists.
pub async fn sealed_secret(ctx: &Context, name: &TenantName) -> Result<Option<Secret>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    api.get_opt(&name.sealed_secret()).await.map_err(Error::ReadSecret)
}
