//! The `MigrationSet` custom resource: the ordered, immutable SQL migrations
//! every tenant schema converges to, and how a new version rolls out across
//! tenants.
//!
//! Takes nothing, gives the Rust types that `crdgen` turns into the CRD and
//! the MigrationSet controller reads and writes. The `///` comments on fields
//! are user documentation (`kubectl explain migrationset.spec`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Condition;

/// The ordered SQL migrations of the application's tenant schema, and how a
/// new version rolls out across the tenants that follow this set
/// (`spec.database.migrationSet` of a Tenant, `default` by default).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tenancy.dev",
    version = "v1alpha1",
    kind = "MigrationSet",
    plural = "migrationsets",
    singular = "migrationset",
    shortname = "ms",
    status = "MigrationSetStatus",
    derive = "PartialEq",
    category = "tenancy",
    doc = "The ordered SQL migrations every tenant schema converges to, and how a new version rolls out across tenants.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Latest", type_ = "integer", json_path = ".status.latestVersion"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct MigrationSetSpec {
    /// The migrations, in order: `version` strictly increasing. A migration
    /// that some tenant has applied must never change (its SQL checksum is
    /// recorded in the tenant schema; an edit is refused with reason
    /// `ChecksumMismatch` and never re-run): to change the schema, append a
    /// new version.
    #[schemars(length(max = 10000))]
    pub migrations: Vec<Migration>,

    /// How a new version is rolled out across the tenants.
    #[serde(default)]
    pub rollout: RolloutSpec,
}

/// One migration: SQL run in the tenant's schema as the tenant's owner role.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Migration {
    /// The schema version this migration brings a tenant to: a positive
    /// integer, strictly greater than the previous migration's.
    #[schemars(range(min = 1))]
    pub version: i64,

    /// A short name for people (shown in statuses and recorded in the
    /// tenant's `_tenancy_migrations` table).
    #[schemars(length(min = 1, max = 200))]
    pub name: String,

    /// The SQL, run with `search_path` set to the tenant's schema and the
    /// role set to its owner role, so the tables it creates belong to the
    /// owner and the app role gets DML on them through the owner's default
    /// privileges. Several statements may be given, separated by `;`.
    #[schemars(length(min = 1, max = 262144))]
    pub sql: String,

    /// True (the default): the SQL and its version row commit in one
    /// transaction, so a failure leaves the schema at the previous version.
    /// False: for statements that cannot run inside a transaction (such as
    /// `CREATE INDEX CONCURRENTLY`); then give exactly one statement, make
    /// it idempotent (`IF NOT EXISTS`), and know that a failure may leave
    /// part of it behind (an INVALID index) while the version is not recorded.
    #[serde(default = "default_true")]
    pub transactional: bool,
}

fn default_true() -> bool {
    true
}

/// How a new version reaches the tenants.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Most tenant schemas migrated at once (each holds one admin
    /// connection while it runs), 1 to 64. Default 4.
    #[serde(default = "default_max_concurrent")]
    #[schemars(range(min = 1, max = 64))]
    pub max_concurrent: u32,

    /// How many tenants get a new version first: the first `canary` tenants
    /// following this set, sorted by name. The others start only when every
    /// canary is at the latest version; a canary failure stops the rollout
    /// whatever `onFailure` says. 0 disables the canary step. Default 1.
    #[serde(default = "default_canary")]
    #[schemars(range(min = 0, max = 10000))]
    pub canary: u32,

    /// What a failure on a (non-canary) tenant does: `Pause` (the default)
    /// starts no further tenant (those in flight finish); `Continue` goes on
    /// with the others. The failed tenant stays at its previous version and
    /// is retried when this spec changes (a new `metadata.generation`).
    #[serde(default)]
    pub on_failure: OnFailure,
}

fn default_max_concurrent() -> u32 {
    4
}
fn default_canary() -> u32 {
    1
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_concurrent: default_max_concurrent(),
            canary: default_canary(),
            on_failure: OnFailure::default(),
        }
    }
}

/// What a failed tenant does to the rest of the rollout.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OnFailure {
    /// Start no further tenant until the spec changes.
    #[default]
    Pause,
    /// Go on with the other tenants.
    Continue,
}

/// Where the rollout stands, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationSetStatus {
    /// `Progressing` (tenants are behind and being migrated), `Paused` (a
    /// failure, a checksum mismatch or an invalid spec stopped the rollout;
    /// see the conditions) or `Complete` (every tenant is at the latest
    /// version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationSetPhase>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The highest version in the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_version: Option<i64>,
    /// Tenants at the latest version / tenants following this set, e.g. `12/200`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// How many provisioned tenants are at each version (0: none applied yet),
    /// lowest version first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<VersionCount>,
    /// How many tenants have a failed migration or a checksum mismatch.
    #[serde(default)]
    pub failed_count: i64,
    /// The failed tenants (at most 20, sorted by name) with the Postgres error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<FailedTenant>,
    /// Progress on each shard, when followers live on more than the
    /// default shard.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardProgress>,
    /// Conditions: `Ready` (every tenant at the latest version) and `Paused`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A set's progress on one shard.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardProgress {
    /// The shard's name.
    pub shard: String,
    /// Tenants of the shard at the latest version / following the set.
    pub progress: String,
    /// Of those, how many have a failed migration or a checksum mismatch.
    pub failed_count: i64,
}

/// How many tenants are at one version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionCount {
    /// The schema version (0: no migration applied).
    pub version: i64,
    /// Tenants at that version.
    pub tenants: i64,
}

/// A tenant whose migration failed or was refused.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailedTenant {
    /// The tenant's name.
    pub tenant: String,
    /// The version that failed or whose checksum does not match.
    pub version: i64,
    /// `MigrationFailed` or `ChecksumMismatch`.
    pub reason: String,
    /// The Postgres error (or what does not match), at most 500 characters.
    pub error: String,
}

/// The rollout phase shown in `kubectl get migrationsets`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MigrationSetPhase {
    /// Tenants are behind the latest version and being migrated.
    Progressing,
    /// Stopped by a failure, a checksum mismatch or an invalid spec.
    Paused,
    /// Every tenant following the set is at the latest version.
    Complete,
}
