//! The `backup` and `restore` subcommands: flags, and the glue between
//! Kubernetes (root keys, the Tenant's retention, Events), Postgres and the
//! store. Used by the CronJob and the TenantRestore Job, and by hand for
//! disaster recovery.
//!
//! Side effects: those of [`super::backup`]/[`super::restore`], an Event on
//! the Tenant, and an annotation `tenancy.dev/last-backup` on it after a
//! backup (so the Tenant controller reports `status.lastBackup` at once; the
//! controller stays the only writer of the status).

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Resource};

use super::{Retention, Selector, StoreConfig, Tools};
use crate::api::Tenant;
use crate::names::TenantName;

/// Annotation the backup command sets on the Tenant: the id of its newest
/// backup.
pub const LAST_BACKUP_ANNOTATION: &str = "tenancy.dev/last-backup";

/// Where backups are kept.
#[derive(clap::Args, Clone, Debug)]
pub struct StoreArgs {
    /// The backup store: `file:///var/backups/tenants` (a mounted volume) or
    /// `s3://bucket/prefix` (credentials from AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY and optionally AWS_SESSION_TOKEN).
    #[arg(long, env = "BACKUP_STORE")]
    pub backup_store: String,
    /// S3 endpoint URL for S3-compatible stores (MinIO, Ceph, ...); an
    /// `http://` endpoint is allowed.
    #[arg(long, env = "BACKUP_S3_ENDPOINT")]
    pub backup_s3_endpoint: Option<String>,
    /// Path-style S3 requests (`endpoint/bucket/key`), which most
    /// S3-compatible stores need.
    #[arg(long, env = "BACKUP_S3_PATH_STYLE")]
    pub backup_s3_path_style: bool,
    /// The bucket's region (default: AWS_REGION, else us-east-1).
    #[arg(long, env = "BACKUP_S3_REGION")]
    pub backup_s3_region: Option<String>,
}

impl StoreArgs {
    pub fn config(&self) -> StoreConfig {
        StoreConfig {
            url: self.backup_store.clone(),
            s3_endpoint: self.backup_s3_endpoint.clone(),
            s3_path_style: self.backup_s3_path_style,
            s3_region: self.backup_s3_region.clone(),
        }
    }
}

/// Flags of `tenant-operator backup`.
#[derive(clap::Args, Clone, Debug)]
pub struct BackupArgs {
    /// The tenant's name.
    #[arg(long)]
    pub tenant: String,
    /// Keep this many newest backups (default: the Tenant's
    /// spec.backup.retention.count).
    #[arg(long)]
    pub keep_count: Option<u32>,
    /// Delete backups older than this (`30m`, `36h`, `14d`, `2w`; default:
    /// the Tenant's spec.backup.retention.maxAge).
    #[arg(long, value_parser = parse_age)]
    pub keep_max_age: Option<Duration>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Flags of `tenant-operator restore`.
#[derive(clap::Args, Clone, Debug)]
pub struct RestoreArgs {
    /// The tenant's name.
    #[arg(long)]
    pub tenant: String,
    /// The backup id (`YYYYMMDDTHHMMSS.mmmZ`, see the manifests under
    /// tenants/<uid>/) or `latest`.
    #[arg(long, default_value = "latest")]
    pub backup: String,
    /// Restore the newest backup taken at or before this time (RFC 3339);
    /// only with `--backup latest`.
    #[arg(long)]
    pub point_in_time: Option<chrono::DateTime<chrono::Utc>>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Flags both commands share (besides the root keys, flattened by main).
#[derive(clap::Args, Clone, Debug)]
pub struct CommonArgs {
    /// Admin DSN (the operator's).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// The operator namespace (root-keys Secret).
    #[arg(long, env = "OPERATOR_NAMESPACE", default_value = "tenant-system")]
    pub namespace: String,
    /// pg_dump / pg_restore binaries.
    #[arg(long, env = "PG_DUMP", default_value = "pg_dump")]
    pub pg_dump: String,
    #[arg(long, env = "PG_RESTORE", default_value = "pg_restore")]
    pub pg_restore: String,
    #[command(flatten)]
    pub store: StoreArgs,
}

impl CommonArgs {
    fn tools(&self) -> Tools {
        Tools { database_url: self.database_url.clone(), pg_dump: self.pg_dump.clone(), pg_restore: self.pg_restore.clone() }
    }
}

/// `30m`, `36h`, `14d`, `2w`, `90s`.
pub fn parse_age(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or("a unit is needed: s, m, h, d or w")?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} does not start with a number"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return Err(format!("unknown unit {unit:?}: use s, m, h, d or w")),
    };
    if n == 0 {
        return Err("must be more than 0".into());
    }
    n.checked_mul(secs).map(Duration::from_secs).ok_or_else(|| "too long".into())
}

async fn publish(client: &kube::Client, tenant: Option<&Tenant>, warning: bool, reason: &str, note: String) {
    let Some(t) = tenant else { return };
    let reporter = Reporter { controller: "tenant-operator".into(), instance: std::env::var("POD_NAME").ok() };
    let ev = crate::controller::event_of(warning, reason, note);
    if let Err(e) = Recorder::new(client.clone(), reporter).publish(&ev, &t.object_ref(&())).await {
        tracing::warn!(error = %e, "publishing an event failed");
    }
}

/// `tenant-operator backup`.
pub async fn run_backup(args: BackupArgs, keys: crate::keys::KeySource) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let name = TenantName::parse(&args.tenant)?;
    let (pool, _) = crate::pg::connect(&args.common.database_url, 2).await.context("connecting to Postgres")?;
    crate::pg::migrate_control_schema(&pool).await.context("preparing the control schema")?;
    let client = kube::Client::try_default().await.context("building the Kubernetes client")?;
    let ring = crate::keys::load(&client, &keys).await.context("loading the root keys")?;
    let tenants: Api<Tenant> = Api::all(client.clone());
    let tenant = tenants.get_opt(name.as_str()).await.ok().flatten();
    let spec_retention = tenant.as_ref().and_then(|t| t.spec.backup.as_ref()).map(|b| b.retention.clone()).unwrap_or_default();
    let retention = Retention {
        count: args.keep_count.or(spec_retention.count),
        max_age: args.keep_max_age.or_else(|| spec_retention.max_age.as_deref().and_then(|a| parse_age(a).ok())),
    };
    let store = super::Store::open(&args.common.store.config())?;
    match super::backup(&pool, &args.common.tools(), &name, &ring, &store, retention).await {
        Ok(out) => {
            let m = &out.manifest;
            publish(&client, tenant.as_ref(), false, "BackupSucceeded", format!("backup {} ({} bytes, key v{}) in {}; pruned {}", m.id, m.bytes, m.key_version, store.url(), out.pruned.len())).await;
            if tenant.is_some() {
                let patch = serde_json::json!({ "metadata": { "annotations": { LAST_BACKUP_ANNOTATION: m.id } } });
                if let Err(e) = tenants.patch(name.as_str(), &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await {
                    tracing::warn!(error = %e, "annotating the Tenant failed");
                }
            }
            println!("{}", serde_json::to_string(&serde_json::json!({ "manifest": m, "pruned": out.pruned }))?);
            Ok(())
        }
        Err(e) => {
            publish(&client, tenant.as_ref(), true, "BackupFailed", e.to_string()).await;
            Err(e.into())
        }
    }
}

/// `tenant-operator restore`.
pub async fn run_restore(args: RestoreArgs, keys: crate::keys::KeySource) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let name = TenantName::parse(&args.tenant)?;
    let selector = match (args.backup.as_str(), args.point_in_time) {
        ("latest", Some(t)) => Selector::PointInTime(t),
        ("latest", None) => Selector::Latest,
        (_, Some(_)) => anyhow::bail!("--point-in-time goes with --backup latest"),
        (id, None) => {
            super::check_id(id)?;
            Selector::Id(id.to_owned())
        }
    };
    let (pool, _) = crate::pg::connect(&args.common.database_url, 3).await.context("connecting to Postgres")?;
    crate::pg::migrate_control_schema(&pool).await.context("preparing the control schema")?;
    let client = kube::Client::try_default().await.context("building the Kubernetes client")?;
    let ring = Arc::new(crate::keys::load(&client, &keys).await.context("loading the root keys")?);
    let tenants: Api<Tenant> = Api::all(client.clone());
    let tenant = tenants.get_opt(name.as_str()).await.ok().flatten();
    let store = super::Store::open(&args.common.store.config())?;
    match super::restore(&pool, &args.common.tools(), &name, ring, &store, &selector).await {
        Ok(out) => {
            let m = &out.manifest;
            publish(&client, tenant.as_ref(), false, "Restored", format!("schema {} restored from backup {} ({} bytes)", m.schema, m.id, m.bytes)).await;
            println!("{}", serde_json::to_string(&serde_json::json!({ "restored": m }))?);
            Ok(())
        }
        Err(e) => {
            publish(&client, tenant.as_ref(), true, "RestoreFailed", e.to_string()).await;
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse() {
        assert_eq!(parse_age("14d").unwrap(), Duration::from_secs(14 * 86400));
        assert_eq!(parse_age("36h").unwrap(), Duration::from_secs(36 * 3600));
        assert!(parse_age("14").is_err());
        assert!(parse_age("0d").is_err());
        assert!(parse_age("3y").is_err());
    }
}
