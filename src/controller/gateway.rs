//! The gateway login's Kubernetes half: its credentials in the Secret
//! `tenant-gateway-db` (operator namespace, the same keys as a tenant's
//! `tenant-<name>-db`), and the periodic converge of the role itself
//! ([`crate::pg::gateway`]).
//!
//! Takes the controllers' [`Context`]; side effects: the role (through
//! `pg::gateway::converge`) and the Secret, each written only when it
//! differs. Runs once before the Tenant controller starts (so tenants are
//! granted to an existing gateway) and then every resync period.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::Api;

use super::kit::{self, labels};
use super::Context;
use crate::pg::gateway::{GatewayError, GatewayName};

/// The Secret holding the gateway's credentials.
pub const SECRET: &str = "tenant-gateway-db";

/// Why one gateway converge failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading Secret {SECRET}: {0}")]
    ReadSecret(#[source] kube::Error),
    #[error("writing Secret {SECRET}: {0}")]
    WriteSecret(#[source] kube::Error),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

/// Converges the gateway role and its Secret; returns whether anything was
/// written. On success the gateway is published to the tenant reconciles
/// (`Context::gateway`).
pub async fn converge(ctx: &Context, gateway: &GatewayName) -> Result<bool, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let existing = api.get_opt(SECRET).await.map_err(Error::ReadSecret)?;
    let secret_password = existing
        .as_ref()
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get("password"))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|p| !p.is_empty());
    let (password, is_new) = match secret_password {
        Some(p) => (p, false),
        None => (crate::pg::scram::generate_password(), true),
    };
    let data: BTreeMap<String, ByteString> =
        super::tenant::plan::login_secret_data(gateway.as_str(), &ctx.settings.endpoint, &password)
            .into_iter()
            .map(|(k, v)| (k, ByteString(v.into_bytes())))
            .collect();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(SECRET.into()),
            namespace: Some(ctx.settings.namespace.clone()),
            labels: Some(labels::managed(&[])),
            ..ObjectMeta::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    // The Secret first: a new password is on the role only once it can be
    // read (a failed write leaves the role's old password working).
    let same = existing.as_ref().is_some_and(|s| {
        s.data == secret.data
            && labels::carries(
                s.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
                &labels::managed(&[]),
            )
    });
    let mut wrote = false;
    if !same {
        kit::apply(&api, &secret).await.map_err(Error::WriteSecret)?;
        tracing::info!(secret = SECRET, "gateway credentials written");
        wrote = true;
    }
    let outcome = crate::pg::gateway::converge(&ctx.pool, gateway, &password, is_new).await?;
    if !outcome.actions.is_empty() {
        let steps: Vec<&str> = outcome.actions.iter().map(|a| a.label()).collect();
        tracing::info!(gateway = %gateway, steps = ?steps, "gateway role converged");
    }
    let _ = ctx.gateway.set(gateway.to_string());
    Ok(wrote || !outcome.actions.is_empty())
}

/// Converges the gateway every resync period (and after a failure, with
/// backoff); never returns.
pub async fn run(ctx: Arc<Context>, gateway: GatewayName) {
    loop {
        let wait = match converge(&ctx, &gateway).await {
            Ok(_) => {
                ctx.reset_backoff(SECRET);
                ctx.settings.resync
            }
            Err(e) => {
                let wait = ctx.backoff(SECRET);
                tracing::error!(error = %e, retry_in = ?wait, "converging the gateway role failed");
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}
