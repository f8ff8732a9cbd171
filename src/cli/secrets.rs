//! `tenant-operator secrets open`: one of a tenant's sealed secrets, opened
//! with the root keys, to stdout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;

use crate::keys::KeySource;
use crate::names::TenantName;
use crate::pg;

/// Opens the sealed secret `name` of `tenant`: from `envelope_file`, or
/// from the tenant's sealed Secret in `namespace`; the salt comes from the
/// registry, the root keys from `keys`.
pub async fn open(
    tenant: &str,
    name: &str,
    envelope_file: Option<PathBuf>,
    database_url: &str,
    namespace: &str,
    keys: &KeySource,
) -> anyhow::Result<()> {
    let tenant = TenantName::parse(tenant)?;
    let (pool, _) = pg::connect(database_url, 1).await.context("connecting to Postgres")?;
    let uid = pg::registry::uid_of(&pool, tenant.as_str())
        .await?
        .ok_or_else(|| anyhow::anyhow!("tenant {tenant} is not in the registry"))?;
    let salt = pg::registry::existing_key_salt(&pool, &uid).await?.ok_or_else(|| {
        anyhow::anyhow!("tenant {tenant} has no key salt (deleted tenants' secrets cannot be opened)")
    })?;
    let client = kube::Client::try_default()
        .await
        .context("building the Kubernetes client")?;
    let ring = crate::keys::load(&client, keys).await?;
    let envelope = match envelope_file {
        Some(path) => std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        None => {
            let api: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client, namespace);
            let sealed = api
                .get(&tenant.sealed_secret())
                .await
                .with_context(|| format!("reading Secret {namespace}/{}", tenant.sealed_secret()))?;
            sealed
                .data
                .and_then(|mut d| d.remove(name))
                .map(|b| b.0)
                .ok_or_else(|| anyhow::anyhow!("{} has no secret {name:?}", tenant.sealed_secret()))?
        }
    };
    let plain = crate::crypto::open(&ring, &salt, &uid, crate::crypto::Purpose::Secrets, name, &envelope)
        .with_context(|| format!("opening secret {name:?} of tenant {tenant}"))?;
    std::io::stdout().write_all(&plain)?;
    Ok(())
}
