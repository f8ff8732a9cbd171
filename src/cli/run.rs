//! `tenant-operator run`: the operator itself. `main.rs` turns the flags
//! into [`crate::controller::Settings`]; this module does the rest: the
//! start-up checks of Postgres and of the root keys, then the metrics
//! server, the leader election, the controllers, and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;

use crate::controller::{self, Context};
use crate::crypto::{KeyVersion, Keyring};
use crate::keys::KeySource;
use crate::pg::{self, AdminFacts, Target};

/// Logs of the operator: JSON lines on stdout.
pub fn logging() {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(super::default_filter())
        .init();
}

/// Connects as the admin, checks what the admin may do, brings the control
/// schema up to date and hardens the database (what cannot be hardened is
/// logged). The DSN (it holds the admin's password) is wiped once the pool
/// has it.
pub async fn open_database(
    database_url: zeroize::Zeroizing<String>,
    max_connections: u32,
) -> anyhow::Result<(sqlx::PgPool, Target, AdminFacts)> {
    let opened = pg::open_admin(database_url, max_connections).await;
    let (pool, target, facts, warnings) =
        opened.context("preparing Postgres (connect, admin rights, control schema)")?;
    for warning in warnings {
        tracing::warn!(%warning, "database hardening skipped");
    }
    Ok((pool, target, facts))
}

/// Loads the root keys and refuses to start when they lack a version that
/// tenants' sealed data still uses.
pub async fn load_root_keys(client: &kube::Client, pool: &sqlx::PgPool, source: &KeySource) -> anyhow::Result<Keyring> {
    let ring = crate::keys::load(client, source)
        .await
        .context("loading the root keys")?;
    let in_use = pg::registry::key_versions_in_use(pool).await?;
    let missing = missing_versions(&ring, &in_use);
    if !missing.is_empty() {
        anyhow::bail!(
            "the root keys lack version(s) {} that tenants' sealed data still uses: put them back into Secret {}/{}",
            missing.join(", "),
            source.namespace,
            source.secret
        );
    }
    tracing::info!(active = %ring.active_version(), fingerprint = %ring.active_fingerprint(), "root keys loaded");
    Ok(ring)
}

/// The versions in `in_use` (as the registry holds them) that `ring` lacks.
/// Pure.
fn missing_versions(ring: &Keyring, in_use: &[u32]) -> Vec<String> {
    in_use
        .iter()
        .filter_map(|v| KeyVersion::new(*v).ok())
        .filter(|v| !ring.contains(*v))
        .map(|v| v.to_string())
        .collect()
}

/// Serves the metrics, waits for the leader Lease `lease` (None: no
/// election), runs the controllers until a shutdown signal, a lost Lease
/// or a dead controller task (the last two fail, so the pod restarts).
pub async fn operate(ctx: Arc<Context>, metrics_addr: SocketAddr, lease: Option<&str>) -> anyhow::Result<()> {
    let served = crate::telemetry::Served {
        pool: ctx.pool.clone(),
        metrics: ctx.metrics.clone(),
        health: ctx.health.clone(),
    };
    crate::telemetry::serve(metrics_addr, served)
        .await
        .with_context(|| format!("starting the metrics server on {metrics_addr}"))?;
    let mut elector = lease.map(|lease| {
        let identity = crate::leader::default_identity();
        crate::leader::Elector::new(
            ctx.client.clone(),
            &ctx.settings.namespace,
            lease,
            &identity,
            Default::default(),
        )
    });
    if let Some(e) = elector.as_mut() {
        // A standby is ready: it is healthy and can take over at any time.
        ctx.health.set_started();
        tokio::select! {
            _ = e.acquire() => {}
            _ = shutdown_signal() => {
                tracing::info!("tenant-operator stopped while standing by");
                return Ok(());
            }
        }
    }
    ctx.metrics.set_leader(true);
    ctx.health.set_started();
    let lost = match elector.as_mut() {
        Some(e) => tokio::select! {
            _ = controller::run(ctx.clone()) => None,
            why = e.hold() => Some(why),
        },
        None => {
            controller::run(ctx.clone()).await;
            None
        }
    };
    ctx.metrics.set_leader(false);
    if let Some(why) = lost {
        // Exit non-zero: Kubernetes restarts the container, which comes back
        // as a standby.
        anyhow::bail!("lost the leader lease ({why}): stopping the controllers");
    }
    if let Some(e) = elector.as_mut() {
        e.release().await;
    }
    if let Err(dead) = ctx.health.live() {
        anyhow::bail!("a controller task ended ({dead}): stopping so that the operator is restarted");
    }
    tracing::info!("tenant-operator stopped");
    Ok(())
}

/// SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_names_the_key_versions_in_use_that_the_ring_lacks() {
        let v2 = KeyVersion::new(2).unwrap();
        let ring = Keyring::from_keys([(v2, zeroize::Zeroizing::new([7u8; 32]))], v2).unwrap();
        assert!(missing_versions(&ring, &[2]).is_empty());
        assert_eq!(missing_versions(&ring, &[1, 2, 3]), ["v1", "v3"]);
    }
}
