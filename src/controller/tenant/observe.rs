//! Observe: read the tenant's Secret and Postgres catalog. No writes.

use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::Api;

use super::Error;
use crate::controller::Context;
use crate::names::TenantName;
use crate::pg::tenant::CatalogState;

/// What one reconcile starts from. The tenant Secret's data (its password
/// and URI) is wiped from memory when this is dropped.
pub struct Observed {
    pub secret: Option<Secret>,
    pub catalog: CatalogState,
}

impl Observed {
    /// The password in the tenant's Secret, when there is one (a copy that
    /// is zeroized when dropped).
    pub fn secret_password(&self) -> Option<zeroize::Zeroizing<String>> {
        let data = self.secret.as_ref()?.data.as_ref()?;
        let raw = data.get("password")?;
        let password = zeroize::Zeroizing::new(String::from_utf8(raw.0.clone()).ok()?);
        (!password.is_empty()).then_some(password)
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(s) = self.secret.as_mut() {
            wipe_secret(s);
        }
    }
}

/// Zeroizes a Secret's data and string data in place (before it is
/// dropped: neither `Secret` nor `ByteString` does it by itself).
pub fn wipe_secret(s: &mut Secret) {
    use zeroize::Zeroize;
    for v in s.data.iter_mut().flat_map(|d| d.values_mut()) {
        v.0.zeroize();
    }
    for v in s.string_data.iter_mut().flat_map(|d| d.values_mut()) {
        v.zeroize();
    }
}

pub async fn observe(ctx: &Context, pool: &sqlx::PgPool, name: &TenantName) -> Result<Observed, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let secret = secrets.get_opt(&name.db_secret()).await.map_err(Error::ReadSecret)?;
    let catalog = crate::pg::tenant::observe(pool, name).await?;
    Ok(Observed { secret, catalog })
}

/// Reads the plaintext source of each of the tenant's `spec.secrets`, as
/// far as [`sealing::decide`](super::sealing::decide) allows: nothing at all
/// in the operator's namespace; the Secret in a source namespace; elsewhere
/// its metadata first, and its data only when it opts in for `tenant`.
/// Forbidden (403) and not found (404) lead to the same answer.
pub async fn read_sources(
    ctx: &Context,
    tenant: &str,
    spec: &[crate::api::tenant::TenantSecret],
) -> Result<std::collections::BTreeMap<String, super::sealing::Source>, Error> {
    let mut out = std::collections::BTreeMap::new();
    for s in spec {
        out.insert(s.name.clone(), read_source(ctx, tenant, &s.secret_ref).await?);
    }
    Ok(out)
}

/// 404 and 403 alike: None.
fn absent<T>(r: Result<Option<T>, kube::Error>) -> Result<Option<T>, Error> {
    match r {
        Ok(v) => Ok(v),
        Err(kube::Error::Api(s)) if s.code == 403 || s.code == 404 => Ok(None),
        Err(e) => Err(Error::ReadSecret(e)),
    }
}

async fn read_source(
    ctx: &Context,
    tenant: &str,
    r: &crate::api::tenant::SecretKeyRef,
) -> Result<super::sealing::Source, Error> {
    use super::sealing::{decide, Decision, Source};
    let policy = &ctx.settings.secret_sources;
    if policy.refuses_namespace(&r.namespace) {
        return Ok(Source::NotAllowed);
    }
    if !policy.is_source_namespace(&r.namespace) {
        // Outside the source namespaces the operator may only get Secrets
        // whose owner let it (a Role naming them); their metadata says
        // whether they agree to this tenant.
        let meta: Api<PartialObjectMeta<Secret>> = Api::namespaced(ctx.client.clone(), &r.namespace);
        let found = absent(meta.get_metadata_opt(&r.name).await)?;
        if decide(policy, tenant, &r.namespace, found.as_ref().map(|m| &m.metadata)) != Decision::Read {
            return Ok(Source::NotAllowed);
        }
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &r.namespace);
    let secret = match api.get_opt(&r.name).await {
        // The chart grants reads in each source namespace; without them the
        // source cannot be used (and is not "missing").
        Err(kube::Error::Api(s)) if s.code == 403 => return Ok(Source::NotAllowed),
        other => absent(other)?,
    };
    // Decided again on the object read: its labels may have changed since.
    Ok(
        match decide(policy, tenant, &r.namespace, secret.as_ref().map(|s| &s.metadata)) {
            Decision::Read => Source::take_key(secret.and_then(|s| s.data), &r.key),
            Decision::Missing => Source::SecretMissing,
            Decision::NotAllowed => {
                let _ = Source::take_key(secret.and_then(|s| s.data), "");
                Source::NotAllowed
            }
        },
    )
}

/// The tenant's sealed Secret, if it exists.
pub async fn sealed_secret(ctx: &Context, name: &TenantName) -> Result<Option<Secret>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    api.get_opt(&name.sealed_secret()).await.map_err(Error::ReadSecret)
}
