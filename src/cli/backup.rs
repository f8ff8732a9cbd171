//! The `backup` and `restore` subcommands: flags, and the glue between
//! Kubernetes (root keys, the Tenant's retention, Events), Postgres and the
//! store.
//!
//! Two ways to run:
//!
//! - **Job** (`--job`): what the backup CronJob and the restore
//!   Job run. Everything comes from the environment the operator gives it
//!   (the per-tenant Secret, [`crate::backup::TenantAccess::from_env`]): the
//!   tenant's ops login and its backup key(s), nothing else; no Kubernetes
//!   API, no admin, no root keys. A backup writes only the store; a restore
//!   only runs `pg_restore` into the schema the operator prepared
//!   (`--backup <id>`). The operator records, reports and finalizes.
//! - **By hand** (`DATABASE_URL` = the admin DSN, root keys from the
//!   cluster's Secret or `--root-keys-file`): disaster recovery by a
//!   person. The whole backup (recorded in `tenancy.backups`) or restore
//!   (prepare, pg_restore as the ops login, finalize), an Event on the
//!   Tenant and, after a backup, the annotation `tenancy.dev/last-backup`
//!   (the Tenant controller, the only writer of the status, picks it up at
//!   once). With `--root-keys-file` the cluster is optional: when none is
//!   configured or answers, only those Kubernetes side effects (and the
//!   Tenant's retention) are skipped, with a warning saying so.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Resource};

use crate::api::Tenant;
use crate::backup::{parse_age, Retention, Selector, StoreConfig, Tools};
use crate::crypto::Keyring;
use crate::keys::KeySource;
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
    /// Run as a backup or restore Job: the tenant's ops login and backup
    /// key from the environment (PGHOST, PGPORT, PGDATABASE, PGUSER,
    /// PGPASSWORD, TENANT_UID, TENANT_BACKUP_KEY_V<n>); DATABASE_URL and the
    /// root keys are ignored, Kubernetes is not called.
    #[arg(long)]
    pub job: bool,
    /// Admin DSN, for a person's backup or disaster recovery (with the root
    /// keys); not used with --job.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// The operator namespace (root-keys Secret).
    #[arg(long, env = "OPERATOR_NAMESPACE", default_value = "tenant-system")]
    pub namespace: String,
    /// pg_dump / pg_restore binaries.
    #[arg(long, env = "PG_DUMP", default_value = "pg_dump")]
    pub pg_dump: String,
    #[arg(long, env = "PG_RESTORE", default_value = "pg_restore")]
    pub pg_restore: String,
    /// Read the root keys from this file instead of the cluster (disaster
    /// recovery): the root-keys Secret's manifest as `kubectl get secret -o
    /// yaml` (or `-o json`) prints it, or just its keys (`v1: <base64>`,
    /// `active: v1`); with --root-keys-kms, a copy of the KMS-wrapped
    /// Secret. No cluster is then needed: without one, the Tenant's
    /// retention, Events and the last-backup annotation are skipped.
    #[arg(long, env = "ROOT_KEYS_FILE")]
    pub root_keys_file: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
}

impl CommonArgs {
    fn tools(&self) -> Tools {
        Tools {
            pg_dump: self.pg_dump.clone(),
            pg_restore: self.pg_restore.clone(),
        }
    }
}

/// Who the audit log names for a restore run by hand.
const COMMAND_ACTOR: &str = "tenant-operator restore (command)";

/// How long a command waits for the API server when the keys come from a
/// file (the cluster may be gone: do not hang on it).
const KUBE_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The cluster as a command sees it: the client and the Tenant (None when
/// it does not exist there).
struct Cluster {
    client: kube::Client,
    tenant: Option<Tenant>,
}

/// Loads the root keys and reaches the cluster. Keys from the Secret need
/// the cluster (an error without one); keys from a file make it optional:
/// no cluster is a warning naming what is skipped (`skipped`).
async fn keys_and_cluster(
    name: &TenantName,
    common: &CommonArgs,
    keys: &KeySource,
    skipped: &str,
) -> anyhow::Result<(Keyring, Option<Cluster>)> {
    let Some(path) = &common.root_keys_file else {
        let client = kube::Client::try_default()
            .await
            .context("building the Kubernetes client (kubeconfig or in-cluster; without a cluster, pass the keys with --root-keys-file)")?;
        let ring = crate::keys::load(&client, keys)
            .await
            .context("loading the root keys")?;
        let tenant = match Api::<Tenant>::all(client.clone()).get_opt(name.as_str()).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "reading the Tenant failed: {skipped} are skipped");
                None
            }
        };
        return Ok((ring, Some(Cluster { client, tenant })));
    };
    let ring = crate::keys::load_file(path, keys.kms.as_ref())
        .await
        .context("loading the root keys")?;
    tracing::info!(file = %path.display(), active = %ring.active_version(), fingerprint = %ring.active_fingerprint(), "root keys loaded from a file");
    let why = match kube::Client::try_default().await {
        Err(e) => format!("no Kubernetes cluster is configured ({e})"),
        Ok(client) => match tokio::time::timeout(
            KUBE_PROBE_TIMEOUT,
            Api::<Tenant>::all(client.clone()).get_opt(name.as_str()),
        )
        .await
        {
            Ok(Ok(tenant)) => return Ok((ring, Some(Cluster { client, tenant }))),
            Ok(Err(e)) => format!("the Tenant cannot be read from Kubernetes ({e})"),
            Err(_) => format!(
                "the Kubernetes API did not answer within {} s",
                KUBE_PROBE_TIMEOUT.as_secs()
            ),
        },
    };
    tracing::warn!(reason = %why, "running without Kubernetes (root keys from a file): {skipped} are skipped");
    Ok((ring, None))
}

async fn publish(cluster: Option<&Cluster>, warning: bool, reason: &str, note: String) {
    let Some(Cluster {
        client,
        tenant: Some(t),
    }) = cluster
    else {
        return;
    };
    let reporter = Reporter {
        controller: "tenant-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ev = crate::controller::kit::events::event_of(warning, reason, note);
    if let Err(e) = Recorder::new(client.clone(), reporter)
        .publish(&ev, &t.object_ref(&()))
        .await
    {
        tracing::warn!(error = %e, "publishing an event failed");
    }
}

/// `tenant-operator backup`.
pub async fn run_backup(args: BackupArgs, keys: KeySource) -> anyhow::Result<()> {
    let name = TenantName::parse(&args.tenant)?;
    if args.common.job {
        return run_backup_job(args, name).await;
    }
    let url = args
        .common
        .database_url
        .clone()
        .context("DATABASE_URL (the admin DSN) is needed without --job")?;
    let skipped = "the Tenant's spec.backup.retention (only --keep-count/--keep-max-age apply), Events and the tenancy.dev/last-backup annotation";
    let (ring, cluster) = keys_and_cluster(&name, &args.common, &keys, skipped).await?;
    let (pool, target) = crate::pg::connect(&url, 2).await.context("connecting to Postgres")?;
    crate::pg::migrate_control_schema(&pool)
        .await
        .context("preparing the control schema")?;
    let tenant = cluster.as_ref().and_then(|c| c.tenant.as_ref());
    let spec_retention = tenant
        .and_then(|t| t.spec.backup.as_ref())
        .map(|b| b.retention.clone())
        .unwrap_or_default();
    let retention = Retention {
        count: args.keep_count.or(spec_retention.count),
        max_age: args
            .keep_max_age
            .or_else(|| spec_retention.max_age.as_deref().and_then(|a| parse_age(a).ok())),
    };
    let store = crate::backup::Store::open(&args.common.store.config())?;
    let done = async {
        let access = crate::backup::TenantAccess::derive(&pool, &target, &name, &ring).await?;
        let out = crate::backup::backup(&access, &args.common.tools(), &store, retention).await?;
        crate::backup::record(&pool, &out).await?;
        Ok::<_, crate::backup::BackupError>(out)
    }
    .await;
    match done {
        Ok(out) => {
            let m = &out.manifest;
            let note = format!(
                "backup {} ({} bytes, key v{}) in {}; pruned {}",
                m.id,
                m.bytes,
                m.key_version,
                store.url(),
                out.pruned.len()
            );
            publish(cluster.as_ref(), false, "BackupSucceeded", note).await;
            match &cluster {
                Some(Cluster {
                    client,
                    tenant: Some(_),
                }) => {
                    let patch = serde_json::json!({ "metadata": { "annotations": { LAST_BACKUP_ANNOTATION: m.id } } });
                    let tenants: Api<Tenant> = Api::all(client.clone());
                    if let Err(e) = tenants
                        .patch(
                            name.as_str(),
                            &kube::api::PatchParams::default(),
                            &kube::api::Patch::Merge(&patch),
                        )
                        .await
                    {
                        tracing::warn!(error = %e, "annotating the Tenant failed");
                    }
                }
                Some(_) => {}
                None => {
                    tracing::warn!(backup = %m.id, "the Tenant was not annotated (no Kubernetes): the controller reports status.lastBackup from tenancy.backups at its next reconcile")
                }
            }
            print_backup(&out)
        }
        Err(e) => {
            publish(cluster.as_ref(), true, "BackupFailed", e.to_string()).await;
            Err(e.into())
        }
    }
}

fn print_backup(out: &crate::backup::BackupOutcome) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string(
            &serde_json::json!({ "manifest": out.manifest, "pruned": out.pruned, "orphansPruned": out.orphans_pruned })
        )?
    );
    Ok(())
}

/// The backup CronJob's run: the tenant's ops login and backup key from the
/// environment, the store; retention from the flags (the operator writes
/// the Tenant's into the CronJob). No Kubernetes, no admin.
async fn run_backup_job(args: BackupArgs, name: TenantName) -> anyhow::Result<()> {
    let access = crate::backup::TenantAccess::from_env(&name)?;
    let store = crate::backup::Store::open(&args.common.store.config())?;
    let retention = Retention {
        count: args.keep_count,
        max_age: args.keep_max_age,
    };
    let out = crate::backup::backup(&access, &args.common.tools(), &store, retention).await?;
    tracing::info!(backup = %out.manifest.id, bytes = out.manifest.bytes, pruned = out.pruned.len(), "backup written; the operator records it");
    print_backup(&out)
}

/// `tenant-operator restore`.
pub async fn run_restore(args: RestoreArgs, keys: KeySource) -> anyhow::Result<()> {
    let name = TenantName::parse(&args.tenant)?;
    let selector = match (args.backup.as_str(), args.point_in_time) {
        ("latest", Some(t)) => Selector::PointInTime(t),
        ("latest", None) => Selector::Latest,
        (_, Some(_)) => anyhow::bail!("--point-in-time goes with --backup latest"),
        (id, None) => {
            crate::backup::check_id(id)?;
            Selector::Id(id.to_owned())
        }
    };
    if args.common.job {
        // A restore Job: the operator chose the backup and prepared the schema.
        let Selector::Id(id) = selector else {
            anyhow::bail!(
                "with --job, --backup must name a backup id: the operator resolves latest and --point-in-time"
            )
        };
        let access = crate::backup::TenantAccess::from_env(&name)?;
        let store = crate::backup::Store::open(&args.common.store.config())?;
        let m = crate::backup::restore_prepared(&access, &args.common.tools(), &store, &id).await?;
        println!("{}", serde_json::to_string(&serde_json::json!({ "restored": m }))?);
        return Ok(());
    }
    let url = args
        .common
        .database_url
        .clone()
        .context("DATABASE_URL (the admin DSN) is needed without --job")?;
    let (ring, cluster) = keys_and_cluster(&name, &args.common, &keys, "Events").await?;
    let ring = Arc::new(ring);
    let (pool, target) = crate::pg::connect(&url, 3).await.context("connecting to Postgres")?;
    crate::pg::migrate_control_schema(&pool)
        .await
        .context("preparing the control schema")?;
    let store = crate::backup::Store::open(&args.common.store.config())?;
    let done = async {
        let access = crate::backup::TenantAccess::derive(&pool, &target, &name, &ring).await?;
        crate::backup::restore(
            &pool,
            &ring,
            &access,
            &args.common.tools(),
            &store,
            &selector,
            COMMAND_ACTOR,
        )
        .await
    }
    .await;
    match done {
        Ok(out) => {
            let m = &out.manifest;
            publish(
                cluster.as_ref(),
                false,
                "Restored",
                format!("schema {} restored from backup {} ({} bytes)", m.schema, m.id, m.bytes),
            )
            .await;
            println!("{}", serde_json::to_string(&serde_json::json!({ "restored": m }))?);
            Ok(())
        }
        Err(e) => {
            publish(cluster.as_ref(), true, "RestoreFailed", e.to_string()).await;
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
