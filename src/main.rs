//! tenant-operator: read config, start telemetry and the controllers, wait
//! for shutdown. Subcommands: `run` (the controller) and `crdgen`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tenant_operator::controller::tenant::plan::Endpoint;
use tenant_operator::controller::{self, Context, Settings};
use tenant_operator::pg;

#[derive(Parser)]
#[command(name = "tenant-operator", version, about = "Kubernetes operator for schema-per-tenant Postgres")]
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
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn,sqlx=warn".into()))
        .init();
    let (pool, target) = pg::connect(&args.database_url, args.max_connections).await.context("connecting to Postgres")?;
    let facts = pg::admin_facts(&pool).await?;
    facts.require()?;
    pg::migrate_control_schema(&pool).await.context("preparing the control schema")?;
    for warning in pg::harden_database(&pool, &facts).await? {
        tracing::warn!(%warning, "database hardening skipped");
    }
    let client = kube::Client::try_default().await.context("building the Kubernetes client (kubeconfig or in-cluster)")?;
    let settings = Settings {
        namespace: args.namespace,
        endpoint: Endpoint {
            host: args.tenant_db_host.unwrap_or(target.host),
            port: args.tenant_db_port.unwrap_or(target.port),
            database: target.database,
        },
        concurrency: args.concurrency,
        resync: Duration::from_secs(args.resync_seconds.max(1)),
    };
    tracing::info!(namespace = %settings.namespace, concurrency = settings.concurrency, admin = %facts.role, superuser = facts.superuser, "tenant-operator starting");
    controller::run(Arc::new(Context::new(client, pool, settings))).await;
    tracing::info!("tenant-operator stopped");
    Ok(())
}
