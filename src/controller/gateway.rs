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

/// What the gateway's Secret should be, decided from what is there.
#[derive(Debug)]
pub struct SecretPlan {
    /// The gateway login's password: the Secret's, or a new one.
    pub password: String,
    /// Whether the password is new (the role gets it after the Secret).
    pub is_new: bool,
    /// The Secret the operator wants.
    pub secret: Secret,
    /// Whether it differs from what is there (data or the managed labels).
    pub write: bool,
}

/// Plans the gateway's Secret from the `existing` one: its password is kept
/// when it has one, else `new_password()` is used; the Secret is written
/// only when its data or managed labels differ. Pure.
pub fn plan_secret(
    existing: Option<&Secret>,
    gateway: &GatewayName,
    endpoint: &super::tenant::plan::Endpoint,
    namespace: &str,
    new_password: impl FnOnce() -> String,
) -> SecretPlan {
    let secret_password = existing
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get("password"))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|p| !p.is_empty());
    let (password, is_new) = match secret_password {
        Some(p) => (p, false),
        None => (new_password(), true),
    };
    let data: BTreeMap<String, ByteString> =
        super::tenant::plan::login_secret_data(gateway.as_str(), endpoint, &password)
            .into_iter()
            .map(|(k, v)| (k, ByteString(v.into_bytes())))
            .collect();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(SECRET.into()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels::managed(&[])),
            ..ObjectMeta::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    let same = existing.is_some_and(|s| {
        s.data == secret.data
            && labels::carries(
                s.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
                &labels::managed(&[]),
            )
    });
    SecretPlan {
        password,
        is_new,
        secret,
        write: !same,
    }
}

/// Converges the gateway role and its Secret; returns whether anything was
/// written. On success the gateway is published to the tenant reconciles
/// (`Context::gateway`).
pub async fn converge(ctx: &Context, gateway: &GatewayName) -> Result<bool, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let existing = api.get_opt(SECRET).await.map_err(Error::ReadSecret)?;
    let plan = plan_secret(
        existing.as_ref(),
        gateway,
        &ctx.settings.endpoint,
        &ctx.settings.namespace,
        crate::pg::scram::generate_password,
    );
    // The Secret first: a new password is on the role only once it can be
    // read (a failed write leaves the role's old password working).
    if plan.write {
        kit::apply(&api, &plan.secret).await.map_err(Error::WriteSecret)?;
        tracing::info!(secret = SECRET, "gateway credentials written");
    }
    // The same role and password on every open shard (the default first:
    // a failure there fails the converge; another shard's is logged and
    // retried at the next resync, its tenants' grants waiting for it).
    let mut changed = plan.write;
    for shard in ctx.shards.all() {
        match crate::pg::gateway::converge(&shard.pool, gateway, &plan.password, plan.is_new).await {
            Ok(outcome) => {
                if !outcome.actions.is_empty() {
                    let steps: Vec<&str> = outcome.actions.iter().map(|a| a.label()).collect();
                    tracing::info!(gateway = %gateway, shard = %shard.name, steps = ?steps, "gateway role converged");
                    changed = true;
                }
            }
            Err(e) if shard.name == crate::api::DEFAULT_SHARD => return Err(e.into()),
            Err(e) => {
                tracing::warn!(gateway = %gateway, shard = %shard.name, error = %e, "converging the gateway role on a shard failed")
            }
        }
    }
    let _ = ctx.gateway.set(gateway.to_string());
    Ok(changed)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::tenant::plan::Endpoint;

    fn endpoint() -> Endpoint {
        Endpoint {
            host: "pg.example".into(),
            port: 5432,
            database: "app".into(),
        }
    }

    fn gw() -> GatewayName {
        GatewayName::parse("app_gateway").unwrap()
    }

    fn new_pw() -> String {
        "fresh-password".into()
    }

    #[test]
    fn a_missing_secret_gets_a_new_password_and_is_written() {
        let p = plan_secret(None, &gw(), &endpoint(), "ops", new_pw);
        assert!(p.is_new);
        assert!(p.write);
        assert_eq!(p.password, "fresh-password");
        let data = p.secret.data.as_ref().unwrap();
        assert_eq!(data["password"].0, b"fresh-password");
        assert_eq!(data["user"].0, b"app_gateway");
        assert_eq!(p.secret.metadata.namespace.as_deref(), Some("ops"));
        assert_eq!(p.secret.metadata.name.as_deref(), Some(SECRET));
    }

    #[test]
    fn an_unchanged_secret_keeps_its_password_and_is_not_written() {
        let first = plan_secret(None, &gw(), &endpoint(), "ops", new_pw);
        let again = plan_secret(Some(&first.secret), &gw(), &endpoint(), "ops", || {
            panic!("no new password for a Secret that has one")
        });
        assert!(!again.is_new);
        assert!(!again.write);
        assert_eq!(again.password, "fresh-password");
    }

    #[test]
    fn a_moved_endpoint_or_lost_labels_rewrite_the_secret_with_the_same_password() {
        let first = plan_secret(None, &gw(), &endpoint(), "ops", new_pw);
        let mut moved = endpoint();
        moved.port = 6432;
        let p = plan_secret(Some(&first.secret), &gw(), &moved, "ops", || panic!("kept"));
        assert!(p.write && !p.is_new);
        assert_eq!(p.password, "fresh-password");
        let mut unlabelled = first.secret.clone();
        unlabelled.metadata.labels = None;
        let p = plan_secret(Some(&unlabelled), &gw(), &endpoint(), "ops", || panic!("kept"));
        assert!(p.write && !p.is_new);
    }

    #[test]
    fn an_empty_password_is_replaced() {
        let mut first = plan_secret(None, &gw(), &endpoint(), "ops", new_pw).secret;
        first
            .data
            .as_mut()
            .unwrap()
            .insert("password".into(), ByteString(Vec::new()));
        let p = plan_secret(Some(&first), &gw(), &endpoint(), "ops", || "other".into());
        assert!(p.is_new && p.write);
        assert_eq!(p.password, "other");
    }
}
