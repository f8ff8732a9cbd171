//! tenant-operator: parses the arguments and dispatches to the library
//! (`tenant_operator::cli`). Subcommands: `run` (the operator), `crdgen`,
//! `keys`, `secrets`, `audit`, `backup`, `restore`, `top`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tenant_operator::cli;
use tenant_operator::controller::tenant::plan::Endpoint;
use tenant_operator::controller::{Context, Settings};

#[derive(Parser)]
#[command(
    name = "tenant-operator",
    version,
    about = "Kubernetes operator for schema-per-tenant Postgres"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers (Kubernetes client from kubeconfig or in-cluster).
    Run(RunArgs),
    /// Print every CRD as multi-document YAML (the content of crds/).
    Crdgen,
    /// Root keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Tenants' sealed secrets.
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Back up one tenant's schema, encrypted, to the backup store
    /// (docs/backups.md).
    Backup {
        #[command(flatten)]
        args: cli::backup::BackupArgs,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Restore one tenant's schema from one of its backups; other tenants
    /// are not touched (docs/backups.md).
    Restore {
        #[command(flatten)]
        args: cli::backup::RestoreArgs,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Tenants' audit logs (docs/audit.md).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The tenants by statement time, sessions or bytes, like `kubectl top`
    /// (README, "Performance isolation").
    Top(cli::top::TopArgs),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Anchor the tenant's chain head, then walk its hash chain against the
    /// head and every anchor; print the first break (row id, what
    /// mismatched) and exit non-zero if there is one.
    Verify {
        #[arg(long)]
        tenant: String,
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[command(flatten)]
        keys: AuditKeyArgs,
    },
    /// Write the tenant's audit rows since a time as JSON lines to stdout.
    Export {
        #[arg(long)]
        tenant: String,
        /// RFC 3339 time, e.g. 2026-11-01T00:00:00Z.
        #[arg(long, value_parser = rfc3339)]
        since: chrono::DateTime<chrono::Utc>,
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[command(flatten)]
        keys: AuditKeyArgs,
    },
    /// Prune the tenant's audit rows older than N days now (the reconcile
    /// does it daily when spec.audit.retentionDays is set), leaving an
    /// ANCHOR row so the chain stays verifiable.
    Prune {
        #[arg(long)]
        tenant: String,
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3650))]
        retention_days: u32,
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[command(flatten)]
        keys: AuditKeyArgs,
    },
}

/// The root keys of the audit commands: they act on the tenant's schema
/// through its ops login, whose password, like the tenant's audit key,
/// derives from the root keys.
#[derive(clap::Args, Clone)]
struct AuditKeyArgs {
    /// The operator namespace (root-keys Secret).
    #[arg(long, env = "OPERATOR_NAMESPACE", default_value = "tenant-system")]
    namespace: String,
    /// Read the root keys from this file instead of the cluster (as for
    /// `backup`): the root-keys Secret's manifest, or just its keys.
    #[arg(long, env = "ROOT_KEYS_FILE")]
    root_keys_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    keys: KeyArgs,
}

impl AuditKeyArgs {
    async fn load(&self) -> anyhow::Result<tenant_operator::crypto::Keyring> {
        let src = self.keys.source(&self.namespace);
        cli::load_root_keys(&src, self.root_keys_file.as_deref())
            .await
            .context("loading the root keys")
    }
}

fn rfc3339(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("not an RFC 3339 time: {e}"))
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new root-keys Secret manifest (one random key `v1`, active):
    /// `tenant-operator keys new-secret | kubectl apply -f -`.
    NewSecret {
        #[arg(long, env = "OPERATOR_NAMESPACE", default_value = "tenant-system")]
        namespace: String,
        #[arg(long, env = "ROOT_KEYS_SECRET", default_value = "tenant-operator-root-keys")]
        name: String,
        /// Wrap the new key with this AWS KMS key (id, ARN or alias): the
        /// Secret then holds only the KMS ciphertext (run the operator with
        /// --root-keys-kms).
        #[arg(long, env = "KMS_KEY_ID")]
        kms_key_id: Option<String>,
        /// KMS endpoint URL (default: AWS's endpoint for the region).
        #[arg(long, env = "KMS_ENDPOINT")]
        kms_endpoint: Option<String>,
        /// AWS region of the KMS key.
        #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
        kms_region: String,
    },
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Print the plaintext of one of a tenant's sealed secrets (for operators
    /// of the system). Refuses, with an authentication error, an envelope
    /// that is not this tenant's.
    Open {
        /// The tenant's name.
        #[arg(long)]
        tenant: String,
        /// The secret's name (its entry in spec.secrets).
        #[arg(long)]
        name: String,
        /// Open the envelope in this file instead of the one in
        /// tenant-<tenant>-sealed.
        #[arg(long)]
        envelope_file: Option<std::path::PathBuf>,
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[arg(long, env = "OPERATOR_NAMESPACE", default_value = "tenant-system")]
        namespace: String,
        #[command(flatten)]
        keys: KeyArgs,
    },
}

/// Where the root keys are and how they are protected.
#[derive(clap::Args, Clone)]
struct KeyArgs {
    /// Secret (in the operator namespace) with the root keys `v1`, `v2`, ...
    /// and `active` naming the active one.
    #[arg(long, env = "ROOT_KEYS_SECRET", default_value = "tenant-operator-root-keys")]
    root_keys_secret: String,
    /// The Secret's keys are wrapped by AWS KMS: unwrap them at start.
    #[arg(long, env = "ROOT_KEYS_KMS")]
    root_keys_kms: bool,
    /// KMS endpoint URL (default: AWS's endpoint for the region).
    #[arg(long, env = "KMS_ENDPOINT")]
    kms_endpoint: Option<String>,
    /// AWS region of the KMS key.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    kms_region: String,
    /// The KMS key (id, ARN or alias) that wrapped the root keys; Decrypt is
    /// then restricted to it.
    #[arg(long, env = "KMS_KEY_ID")]
    kms_key_id: Option<String>,
}

impl KeyArgs {
    fn source(&self, namespace: &str) -> tenant_operator::keys::KeySource {
        tenant_operator::keys::KeySource {
            namespace: namespace.to_owned(),
            secret: self.root_keys_secret.clone(),
            kms: self.root_keys_kms.then(|| tenant_operator::keys::kms::KmsConfig {
                endpoint: self.kms_endpoint.clone(),
                region: self.kms_region.clone(),
                key_id: self.kms_key_id.clone(),
            }),
        }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Admin DSN: a role with CREATEROLE and membership in pg_signal_backend
    /// (superuser not needed), owning the database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Namespace of the per-tenant Secrets and other namespaced objects.
    #[arg(long, env = "OPERATOR_NAMESPACE", default_value = "tenant-system")]
    namespace: String,
    /// Most Tenant reconciles at once.
    #[arg(long, env = "TENANT_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    concurrency: u16,
    /// Most Tenants let into the controller's queue at once; the others wait
    /// in the operator's front queue, by name (docs/scale.md).
    #[arg(long, env = "TENANT_QUEUE_BOUND", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    queue_bound: u16,
    /// Most admin connections to Postgres.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10)]
    max_connections: u32,
    /// Seconds between reconciles of an unchanged Tenant (catches changes
    /// made inside Postgres, such as a role dropped by hand).
    #[arg(long, env = "RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// Host that tenants' applications use to reach Postgres (default: the
    /// admin DSN's host).
    #[arg(long, env = "TENANT_DB_HOST")]
    tenant_db_host: Option<String>,
    /// Port that tenants' applications use (default: the admin DSN's port).
    #[arg(long, env = "TENANT_DB_PORT")]
    tenant_db_port: Option<u16>,
    /// ConfigMap (in the operator namespace) holding the envoyproxy/ratelimit
    /// config of every tenant; further shards, when needed, are <name>-1,
    /// <name>-2, ...
    #[arg(long, env = "RATELIMIT_CONFIGMAP", default_value = "tenant-ratelimits", value_parser = configmap_name)]
    ratelimit_configmap: String,
    /// Rate-limit domain of the API surface.
    #[arg(long, env = "RATELIMIT_API_DOMAIN", default_value = "tenant-api", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    ratelimit_api_domain: String,
    /// Rate-limit domain of the webhook surface.
    #[arg(long, env = "RATELIMIT_WEBHOOK_DOMAIN", default_value = "tenant-webhook", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    ratelimit_webhook_domain: String,
    /// Descriptor key whose value is the tenant name (what Envoy's rate
    /// limit action sends).
    #[arg(long, env = "RATELIMIT_DESCRIPTOR_KEY", default_value = "tenant_id", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    ratelimit_descriptor_key: String,
    /// `lock_timeout` of each tenant migration: how long its statements may
    /// wait for a lock the application holds before the migration fails
    /// (a Postgres duration: 0, or <n> with ms, s, min, h or d).
    #[arg(long, env = "MIGRATION_LOCK_TIMEOUT", default_value = "10s", value_parser = pg_duration)]
    migration_lock_timeout: Duration,
    /// `statement_timeout` of each tenant migration (same format; 0: none).
    #[arg(long, env = "MIGRATION_STATEMENT_TIMEOUT", default_value = "15min", value_parser = pg_duration)]
    migration_statement_timeout: Duration,
    /// Run the controllers only while holding the leader Lease, so that of
    /// several replicas one reconciles and the others stand by
    /// (`--leader-election=false`: run them at once).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    leader_election: bool,
    /// The leader Lease (coordination.k8s.io/v1) in the operator namespace.
    #[arg(long, env = "LEASE_NAME", default_value = "tenant-operator-leader")]
    lease_name: String,
    /// Address of the metrics and health server (`/metrics`, `/healthz`,
    /// `/readyz`); port 0 picks a free port (logged at start).
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// The operator's own image, run by the backup CronJobs and restore Jobs.
    #[arg(long, env = "OPERATOR_IMAGE")]
    image: Option<String>,
    /// Secret (operator namespace) given to backup and restore Jobs as their
    /// environment: DATABASE_URL, BACKUP_STORE, BACKUP_S3_* and AWS_* keys.
    #[arg(long, env = "BACKUP_ENV_SECRET")]
    backup_env_secret: Option<String>,
    /// Service account of backup and restore Jobs (reads the root-keys
    /// Secret, creates Events, patches Tenants).
    #[arg(long, env = "BACKUP_SERVICE_ACCOUNT")]
    backup_service_account: Option<String>,
    /// The backup store (as for `tenant-operator backup`), so that deleting
    /// a Tenant deletes its backups; unset: backups are left in place.
    #[arg(long, env = "BACKUP_STORE")]
    backup_store: Option<String>,
    #[arg(long, env = "BACKUP_S3_ENDPOINT")]
    backup_s3_endpoint: Option<String>,
    #[arg(long, env = "BACKUP_S3_PATH_STYLE")]
    backup_s3_path_style: bool,
    #[arg(long, env = "BACKUP_S3_REGION")]
    backup_s3_region: Option<String>,
    /// Namespaces (comma-separated) every Secret of which a Tenant's
    /// spec.secrets may name as a source (the operator lists, watches and
    /// reads Secrets there). Elsewhere a Secret must opt in with the label
    /// tenancy.dev/seal-for=<tenant> (or that annotation listing tenants) and
    /// be readable by the operator. The operator's own namespace is never a
    /// source.
    #[arg(long, env = "SECRET_SOURCE_NAMESPACES", default_value = "")]
    secret_source_namespaces: String,
    /// Seconds between anchoring passes: each writes an HMAC'd anchor of
    /// every tenant audit chain head that moved since its last anchor
    /// (docs/audit.md). A tenant's owner can rewrite audit entries newer
    /// than its latest anchor without `audit verify` noticing.
    #[arg(long, env = "AUDIT_ANCHOR_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
    audit_anchor_seconds: u64,
    /// Seconds between sealing passes: each seals into its chain the audit
    /// entries no commit sealed (the last writes of a burst whose commit
    /// found another seal under way, REPEATABLE READ writes), for every
    /// tenant with such entries (one statistics query for all; docs/audit.md).
    /// Until sealed they are not in `_tenancy_audit`, and the tenant's owner
    /// could delete them unnoticed.
    #[arg(long, env = "AUDIT_SEAL_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    audit_seal_seconds: u64,
    /// The gateway login of this database: applications reach every
    /// Active tenant through it over one pool (docs/data-path.md); its
    /// credentials go in Secret tenant-gateway-db. Roles are cluster-wide:
    /// give each database on one server its own name. Empty: no gateway.
    #[arg(long, env = "GATEWAY_ROLE", default_value = tenant_operator::pg::gateway::DEFAULT_ROLE)]
    gateway_role: String,
    /// Milliseconds between passes of the caps watchdog (leader only): each
    /// cancels tenants' statements running past their statementTimeout and
    /// ends sessions idle in a transaction past idleInTransactionTimeout
    /// (plus the grace), whatever the session set for itself. 0: off.
    #[arg(long, env = "WATCHDOG_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    watchdog_interval_ms: u64,
    /// Milliseconds the watchdog adds to each cap before it signals (Postgres'
    /// own timeout, where the session kept it, acts first).
    #[arg(long, env = "WATCHDOG_GRACE_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    watchdog_grace_ms: u64,
    /// Seconds between usage samples (leader only): one query for all
    /// tenants gives each one's sessions, bytes, rows written, statement time
    /// and temp bytes, for status.usage and the tenant_operator_usage
    /// gauges. 0: off.
    #[arg(long, env = "USAGE_INTERVAL_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    usage_interval_seconds: u64,
    #[command(flatten)]
    keys: KeyArgs,
}

/// A Postgres duration as the Tenant spec takes it (`0`, `500ms`, `10s`,
/// `15min`, `2h`, `1d`).
fn pg_duration(s: &str) -> Result<Duration, String> {
    tenant_operator::controller::tenant::plan::parse_duration_ms(s).map(|ms| Duration::from_millis(ms as u64))
}

/// A ConfigMap name that also fits a label value (the shards are found by
/// a label carrying it): a DNS-1123 label of at most 60 characters.
fn configmap_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 60
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err("must be a DNS-1123 label of at most 60 characters".into())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen => {
            print!("{}", tenant_operator::api::crds_yaml()?);
            Ok(())
        }
        Command::Run(args) => run(args).await,
        Command::Keys(KeysCommand::NewSecret {
            namespace,
            name,
            kms_key_id: None,
            ..
        }) => {
            print!("{}", tenant_operator::keys::new_secret_yaml(&namespace, &name));
            Ok(())
        }
        Command::Keys(KeysCommand::NewSecret {
            namespace,
            name,
            kms_key_id: Some(key_id),
            kms_endpoint,
            kms_region,
        }) => {
            let cfg = tenant_operator::keys::kms::KmsConfig {
                endpoint: kms_endpoint,
                region: kms_region,
                key_id: Some(key_id.clone()),
            };
            print!(
                "{}",
                tenant_operator::keys::new_wrapped_secret_yaml(&namespace, &name, &cfg, &key_id).await?
            );
            Ok(())
        }
        Command::Secrets(SecretsCommand::Open {
            tenant,
            name,
            envelope_file,
            database_url,
            namespace,
            keys,
        }) => {
            cli::secrets::open(
                &tenant,
                &name,
                envelope_file,
                &database_url,
                &namespace,
                &keys.source(&namespace),
            )
            .await
        }
        Command::Audit(cmd) => audit(cmd).await,
        Command::Top(args) => cli::top::run(args).await,
        Command::Backup { args, keys } => {
            cli::logging();
            let src = keys.source(&args.common.namespace);
            cli::backup::run_backup(args, src).await
        }
        Command::Restore { args, keys } => {
            cli::logging();
            let src = keys.source(&args.common.namespace);
            cli::backup::run_restore(args, src).await
        }
    }
}

async fn audit(cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Verify {
            tenant,
            database_url,
            keys,
        } => cli::audit::verify(&tenant, &database_url, &keys.load().await?).await,
        AuditCommand::Export {
            tenant,
            since,
            database_url,
            keys,
        } => cli::audit::export(&tenant, since, &database_url, &keys.load().await?).await,
        AuditCommand::Prune {
            tenant,
            retention_days,
            database_url,
            keys,
        } => cli::audit::prune(&tenant, retention_days, &database_url, &keys.load().await?).await,
    }
}

async fn run(mut args: RunArgs) -> anyhow::Result<()> {
    cli::run::logging();
    let database_url = zeroize::Zeroizing::new(std::mem::take(&mut args.database_url));
    let (pool, target, facts) = cli::run::open_database(database_url, args.max_connections).await?;
    let client = kube::Client::try_default()
        .await
        .context("building the Kubernetes client (kubeconfig or in-cluster)")?;
    let key_source = args.keys.source(&args.namespace);
    let ring = cli::run::load_root_keys(&client, &pool, &key_source).await?;
    let (secret_sources, listed_own) = tenant_operator::controller::tenant::sealing::SourcePolicy::new(
        &args.namespace,
        &args.secret_source_namespaces,
    );
    if listed_own {
        tracing::warn!(namespace = %args.namespace, "--secret-source-namespaces lists the operator's own namespace: ignored, its Secrets are never sources");
    }
    let gateway = match args.gateway_role.as_str() {
        "" => None,
        g => Some(
            tenant_operator::pg::gateway::GatewayName::parse(g).map_err(|e| anyhow::anyhow!("--gateway-role: {e}"))?,
        ),
    };
    let pg_ssl_mode = tenant_operator::backup::libpq_ssl_mode(&target).to_string();
    let settings = Settings {
        secret_sources,
        gateway,
        namespace: args.namespace,
        endpoint: Endpoint {
            host: args.tenant_db_host.unwrap_or(target.host),
            port: args.tenant_db_port.unwrap_or(target.port),
            database: target.database,
        },
        concurrency: args.concurrency,
        queue_bound: args.queue_bound,
        resync: Duration::from_secs(args.resync_seconds.max(1)),
        ratelimit: tenant_operator::ratelimit_config::RenderSettings {
            configmap: args.ratelimit_configmap,
            api_domain: args.ratelimit_api_domain,
            webhook_domain: args.ratelimit_webhook_domain,
            descriptor_key: args.ratelimit_descriptor_key,
            budget_bytes: tenant_operator::ratelimit_config::DEFAULT_BUDGET_BYTES,
        },
        migration_timeouts: tenant_operator::pg::migrations::Timeouts {
            lock: args.migration_lock_timeout,
            statement: args.migration_statement_timeout,
        },
        root_keys: key_source,
        audit_anchor_interval: Duration::from_secs(args.audit_anchor_seconds),
        audit_seal_interval: Duration::from_secs(args.audit_seal_seconds),
        watchdog: tenant_operator::controller::watchdog::WatchdogSettings {
            interval: (args.watchdog_interval_ms > 0).then(|| Duration::from_millis(args.watchdog_interval_ms)),
            grace: Duration::from_millis(args.watchdog_grace_ms),
        },
        shard_max_connections: args.max_connections,
        usage_interval: (args.usage_interval_seconds > 0).then(|| Duration::from_secs(args.usage_interval_seconds)),
        backup: tenant_operator::controller::tenant::backup_jobs::BackupSettings {
            image: args.image,
            env_secret: args.backup_env_secret,
            service_account: args.backup_service_account,
            pg_ssl_mode: Some(pg_ssl_mode),
            store: args
                .backup_store
                .filter(|url| !url.is_empty())
                .map(|url| tenant_operator::backup::StoreConfig {
                    url,
                    s3_endpoint: args.backup_s3_endpoint,
                    s3_path_style: args.backup_s3_path_style,
                    s3_region: args.backup_s3_region,
                }),
        },
    };
    tracing::info!(namespace = %settings.namespace, concurrency = settings.concurrency, admin = %facts.role, superuser = facts.superuser, "tenant-operator starting");
    let ctx = Arc::new(Context::new(client, pool, settings).with_keys(tenant_operator::keys::KeyHolder::new(ring)));
    let lease = args.leader_election.then_some(args.lease_name.as_str());
    cli::run::operate(ctx, args.metrics_addr, lease).await
}
