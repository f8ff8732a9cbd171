//! The `Tenant` custom resource: one customer of the SaaS.
//!
//! Takes nothing, gives the Rust types that `crdgen` turns into the CRD and the
//! controller reads and writes. The `///` comments on fields are user
//! documentation: they become the descriptions `kubectl explain` prints.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, Text};

/// The regular expression of a tenant name: a DNS-1123 label.
pub const NAME_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// The longest tenant name; it keeps every derived Postgres identifier under
/// Postgres's 63-byte limit (`tenant_` + 40 + `_owner` = 53).
pub const NAME_MAX_LEN: usize = 40;

/// A customer of the SaaS, with an isolated Postgres schema, its own roles,
/// resource caps and credentials. The object's name is the tenant id: a
/// DNS-1123 label of at most 40 characters.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tenancy.dev",
    version = "v1alpha1",
    kind = "Tenant",
    plural = "tenants",
    singular = "tenant",
    shortname = "tn",
    status = "TenantStatus",
    derive = "PartialEq",
    category = "tenancy",
    doc = "A customer of the SaaS: an isolated Postgres schema with its own roles, caps and credentials.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Schema", type_ = "string", json_path = ".status.schema"),
    printcolumn(name = "Shard", type_ = "string", json_path = ".status.shard", priority = 1),
    printcolumn(name = "Version", type_ = "integer", json_path = ".status.schemaVersion"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Size", type_ = "integer", json_path = ".status.usage.bytes", priority = 1),
    printcolumn(name = "Conns", type_ = "integer", json_path = ".status.usage.sessions", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 40 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be a DNS-1123 label of at most 40 characters (lower-case letters, digits and '-', starting and ending with a letter or digit)")
)]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// Human-readable name of the customer, for people; not used in any identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    pub display_name: Option<String>,

    /// `Active` (the default) or `Suspended`. A suspended tenant's app role
    /// cannot log in and its open sessions are terminated; its data is kept.
    #[serde(default)]
    pub state: TenantState,

    /// When true, deleting the Tenant drops nothing: the delete waits, with a
    /// `DeletionBlocked` condition, until this is set back to false.
    #[serde(default)]
    pub deletion_protection: bool,

    /// Postgres settings of the tenant's schema and app role.
    #[serde(default)]
    pub database: DatabaseSpec,

    /// Request rate limits of the tenant, enforced by envoyproxy/ratelimit
    /// from the ConfigMap the operator renders (one descriptor per tenant and
    /// surface, keyed by the tenant id). A suspended tenant gets 0.
    #[serde(default)]
    pub rate_limits: RateLimitsSpec,

    /// Secret material of the tenant (ERP credentials, SSO secrets, API
    /// keys): each entry's plaintext is read from a Kubernetes Secret and
    /// sealed (AES-256-GCM) under the tenant's own key into the Secret
    /// `tenant-<name>-sealed` in the operator namespace, one data key per
    /// entry `name`. The plaintext is never stored anywhere else. A source
    /// Secret is used only when it is in a namespace the operator is
    /// configured to read (`--secret-source-namespaces`) or carries the
    /// label `tenancy.dev/seal-for=<this tenant>` (or lists it in that
    /// annotation) and is readable by the operator; never one of the
    /// operator's own namespace. Otherwise `SecretsSealed` is False with
    /// reason `SourceNotAllowed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub secrets: Vec<TenantSecret>,

    /// The tenant's audit log: every insert, update, delete and truncate on
    /// its tables, with the actor and request id the application sets,
    /// hash-chained in the table `_tenancy_audit` of its schema (see
    /// docs/audit.md).
    #[serde(default, skip_serializing_if = "AuditSpec::is_default")]
    pub audit: AuditSpec,

    /// Scheduled backups of the tenant's schema: a CronJob
    /// `tenant-<name>-backup` in the operator namespace runs
    /// `tenant-operator backup`, which dumps this schema only, encrypts it
    /// under the tenant's backup key and stores it (see docs/backups.md).
    /// Unset: no scheduled backups (the CronJob is deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<Box<BackupSpec>>,

    /// Which Postgres server (Shard) the tenant lives on: `{shard: name}` or
    /// `{shardSelector: {...}}`; unset: any Open shard. A new tenant goes to
    /// the matching Open shard with the fewest tenants (ties by name) and
    /// stays there (`status.shard`); see docs/shards.md.
    #[serde(default, skip_serializing_if = "super::shard::PlacementSpec::is_default")]
    pub placement: super::shard::PlacementSpec,
}

/// When the tenant is backed up and how many backups are kept.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// When backups run, as a Kubernetes CronJob's schedule takes it (in
    /// the time zone of the kube-controller-manager): five fields (minute
    /// hour day-of-month month day-of-week), for example `0 3 * * *`, or a
    /// macro: `@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`,
    /// `@midnight`, `@hourly`. `TZ=` and `CRON_TZ=` are refused, as
    /// Kubernetes refuses them. A schedule it refuses shows as
    /// `BackupScheduled=False`, reason `InvalidSchedule`.
    #[schemars(length(min = 6, max = 100))]
    pub schedule: String,
    /// Which backups are kept after each backup; the newest is always kept.
    #[serde(default)]
    pub retention: BackupRetention,
    /// True: the CronJob is suspended (no new backups); existing ones are kept.
    #[serde(default)]
    pub suspend: bool,
}

/// Pruning of old backups: a backup is kept when it is among the newest
/// `count` and younger than `maxAge` (each only when set).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupRetention {
    /// How many of the newest backups to keep, 1 to 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub count: Option<u32>,
    /// Delete backups older than this: a number and a unit `m`, `h`, `d` or
    /// `w` (`14d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[1-9][0-9]{0,5}(m|h|d|w)$"))]
    pub max_age: Option<String>,
}

/// How long the tenant's audit log is kept.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditSpec {
    /// Days to keep audit rows, 1 to 3650. Older rows are pruned at most
    /// once a day; an `ANCHOR` row at the cut keeps the rest of the chain
    /// verifiable. Unset: rows are kept forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3650))]
    pub retention_days: Option<u32>,
    /// Tables of the tenant's schema whose writes are not audited: a
    /// high-churn table (a queue, a cache, a session store) whose audit
    /// entries cost more than they tell. Their INSERT, UPDATE, DELETE and
    /// TRUNCATE leave no entry, so neither the log nor `audit verify` says
    /// anything about them while they are listed (earlier entries stay and
    /// verify). Each change of the list is recorded in `tenancy.audit_log`
    /// (`AuditExclusionChanged`, with who made it). Exact table names, up
    /// to 64.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63)), extend("x-kubernetes-list-type" = "set"))]
    pub exclude_tables: Vec<String>,
}

impl AuditSpec {
    fn is_default(&self) -> bool {
        self == &Self::default()
    }
}

/// One secret to seal for the tenant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantSecret {
    /// The name of the sealed value: its data key in `tenant-<name>-sealed`
    /// and part of what the envelope is bound to.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub name: String,
    /// Where the plaintext comes from.
    pub secret_ref: SecretKeyRef,
}

/// A key of a Kubernetes Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Namespace of the source Secret (not the operator's own).
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: String,
    /// Name of the source Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Data key in the source Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// The tenant's rate limit on each surface.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitsSpec {
    /// Limit on the public API (rate-limit domain `tenant-api` by default).
    /// Default: 100 requests per second.
    #[serde(default = "default_api_limit")]
    pub api: RateLimit,

    /// Limit on inbound webhooks (rate-limit domain `tenant-webhook` by
    /// default). Default: 20 requests per second.
    #[serde(default = "default_webhook_limit")]
    pub webhook: RateLimit,
}

/// One rate limit: at most `requestsPerUnit` requests per `unit`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Requests allowed per unit of time, 0 to 1000000. 0 refuses every
    /// request.
    #[schemars(range(min = 0, max = 1_000_000))]
    pub requests_per_unit: u32,

    /// The unit of time: `second` (the default), `minute`, `hour` or `day`.
    #[serde(default)]
    pub unit: RateLimitUnit,

    /// When true, requests over the limit are counted and reported by the
    /// rate-limit service but not refused (to try a limit out first).
    /// Ignored while the tenant is suspended.
    #[serde(default)]
    pub shadow_mode: bool,
}

/// The unit of time of a rate limit, as envoyproxy/ratelimit names it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitUnit {
    /// Per second.
    #[default]
    Second,
    /// Per minute.
    Minute,
    /// Per hour.
    Hour,
    /// Per day.
    Day,
}

impl RateLimitUnit {
    /// The word envoyproxy/ratelimit's config expects.
    pub fn as_str(self) -> &'static str {
        match self {
            RateLimitUnit::Second => "second",
            RateLimitUnit::Minute => "minute",
            RateLimitUnit::Hour => "hour",
            RateLimitUnit::Day => "day",
        }
    }
}

fn default_api_limit() -> RateLimit {
    RateLimit {
        requests_per_unit: 100,
        unit: RateLimitUnit::Second,
        shadow_mode: false,
    }
}
fn default_webhook_limit() -> RateLimit {
    RateLimit {
        requests_per_unit: 20,
        unit: RateLimitUnit::Second,
        shadow_mode: false,
    }
}

impl Default for RateLimitsSpec {
    fn default() -> Self {
        Self {
            api: default_api_limit(),
            webhook: default_webhook_limit(),
        }
    }
}

/// The lifecycle state a person asks for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TenantState {
    /// The tenant's app role can log in.
    #[default]
    Active,
    /// The app role cannot log in; its sessions are terminated; data is kept.
    Suspended,
}

/// Resource caps applied on the tenant's app role.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// The MigrationSet (cluster-scoped, by name) whose migrations this
    /// tenant's schema follows. Default `default`. While it does not exist
    /// the tenant waits with `MigrationsApplied=False`, reason
    /// `MigrationSetNotFound`.
    #[serde(default = "default_migration_set")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$"))]
    pub migration_set: Text,

    /// Most concurrent connections of the app role (`CONNECTION LIMIT`), 1 to 1000.
    #[serde(default = "default_connection_limit")]
    #[schemars(range(min = 1, max = 1000))]
    pub connection_limit: i32,

    /// Longest a statement of the app role may run (`statement_timeout`),
    /// as a Postgres duration: a positive integer and a unit (`ms`, `s`,
    /// `min`, `h`, `d`), for example `30s`; `0` disables it. At most 24 days.
    #[serde(default = "default_statement_timeout")]
    #[schemars(regex(pattern = r"^(0|[1-9][0-9]{0,9}(ms|s|min|h|d))$"))]
    pub statement_timeout: Text,

    /// Longest a session of the app role may sit idle inside a transaction
    /// (`idle_in_transaction_session_timeout`), same format as
    /// `statementTimeout`.
    #[serde(default = "default_idle_timeout")]
    #[schemars(regex(pattern = r"^(0|[1-9][0-9]{0,9}(ms|s|min|h|d))$"))]
    pub idle_in_transaction_timeout: Text,

    /// Memory per sort or hash operation of the app role (`work_mem`): a
    /// positive integer and a unit (`kB`, `MB`, `GB`), 64kB to 2GB.
    #[serde(default = "default_work_mem")]
    #[schemars(regex(pattern = r"^[1-9][0-9]{0,9}(kB|MB|GB)$"))]
    pub work_mem: Text,

    /// Most temporary-file space one session of the app role may use
    /// (`temp_file_limit`): a positive integer and a unit (`kB`, `MB`, `GB`,
    /// `TB`). Unset: no limit. A superuser-only setting: the operator's admin
    /// role needs `GRANT SET ON PARAMETER temp_file_limit` (Postgres 15+),
    /// otherwise the condition `CapsApplied` says it was not applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[1-9][0-9]{0,9}(kB|MB|GB|TB)$"))]
    pub temp_file_limit: Option<Text>,
}

fn default_migration_set() -> Text {
    "default".into()
}
fn default_connection_limit() -> i32 {
    20
}
fn default_statement_timeout() -> Text {
    "30s".into()
}
fn default_idle_timeout() -> Text {
    "60s".into()
}
fn default_work_mem() -> Text {
    "16MB".into()
}

impl Default for DatabaseSpec {
    fn default() -> Self {
        Self {
            migration_set: default_migration_set(),
            connection_limit: default_connection_limit(),
            statement_timeout: default_statement_timeout(),
            idle_in_transaction_timeout: default_idle_timeout(),
            work_mem: default_work_mem(),
            temp_file_limit: None,
        }
    }
}

/// What the operator observed and did, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// Where the tenant is in its lifecycle: Pending, Provisioning, Active,
    /// Suspended, Deleting or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TenantPhase>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The tenant's Postgres schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// The shard the tenant lives on (written when it is placed, before
    /// anything of it is created, and when a move commits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Text>,
    /// A move to another shard under way (docs/shards.md, "Moving a
    /// tenant").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving: Option<Box<super::shard::MoveStatus>>,
    /// How the last move ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_move: Option<Box<super::shard::LastMove>>,
    /// The root key version the tenant's sealed secrets are under (`v2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<String>,
    /// Non-secret fingerprint of that root key, to tell keys apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_fingerprint: Option<String>,
    /// The highest migration version applied to the tenant's schema (0:
    /// none), read from its `_tenancy_migrations` table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<i64>,
    /// The newest backup of the tenant (spec.backup, or one taken by hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<Box<LastBackup>>,
    /// Conditions: `Ready`, `DatabaseReady`, `RateLimitsApplied`,
    /// `MigrationsApplied`, `ReadAuditing` (pgaudit on the app role), and
    /// `DeletionBlocked` while a delete waits on `deletionProtection`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// What the tenant uses, sampled by the operator (README, "Performance
    /// isolation"); rewritten when a figure moves by more than 10%.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<TenantUsage>,
}

impl TenantStatus {
    /// Its `Ready` condition is True.
    pub fn is_ready(&self) -> bool {
        self.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
    }
}

/// A tenant's usage as `status.usage` shows it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantUsage {
    /// Sessions running a statement (app login, and gateway sessions in a
    /// transaction of the tenant).
    pub sessions_active: i64,
    /// Other sessions (idle, idle in a transaction).
    pub sessions_idle: i64,
    /// All sessions (the CONNS column).
    pub sessions: i64,
    /// Bytes of the schema's tables, indexes and toast.
    pub bytes: i64,
    /// Rows inserted, updated and deleted per second.
    pub rows_written_per_second: f64,
    /// Seconds of statement time per minute (from pg_stat_statements, or
    /// sampled running statements without it).
    pub statement_seconds_per_minute: f64,
    /// Bytes of temporary files written (pg_stat_statements only; absent
    /// without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp_bytes: Option<i64>,
    /// Statements cancelled and sessions ended by the caps watchdog since
    /// the leading operator started.
    pub cancellations: i64,
    /// When these figures were sampled (RFC 3339).
    pub sampled_at: Text,
}

/// A backup as `status.lastBackup` shows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastBackup {
    /// The backup id (its start time), what `TenantRestore.spec.backup` takes.
    pub id: String,
    /// When it was taken (RFC 3339).
    pub time: String,
    /// Size of the encrypted dump in bytes.
    pub bytes: i64,
}

/// The lifecycle phase shown in `kubectl get tenants`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TenantPhase {
    /// Seen, nothing done yet.
    Pending,
    /// Being converged, or waiting on a transient failure.
    Provisioning,
    /// Converged; the app role can log in.
    Active,
    /// Converged while suspended; the app role cannot log in.
    Suspended,
    /// Deleted; waiting for cleanup to finish.
    Deleting,
    /// Blocked on something a person must change (see the conditions).
    Failed,
}
