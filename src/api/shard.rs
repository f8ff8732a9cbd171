//! The `Shard` custom resource: one Postgres database tenants can be placed
//! on.
//!
//! Takes nothing, gives the Rust types `crdgen` turns into the CRD; the
//! Shard controller (`controller::shards`) connects to each, prepares its
//! control schema and reports on it; the Tenant controller places tenants
//! (docs/shards.md).

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Condition;

/// The name of the shard of the operator's own `DATABASE_URL`. It needs no
/// object; a Shard of that name (without `adminSecretRef`) sets its state,
/// capacity and tenant host.
pub const DEFAULT_SHARD: &str = "default";

/// One Postgres database tenants can be placed on: the admin URL in a
/// Secret, what applications use to reach it, how many tenants it takes and
/// whether it takes new ones.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tenancy.dev",
    version = "v1alpha1",
    kind = "Shard",
    plural = "shards",
    singular = "shard",
    shortname = "shd",
    status = "ShardStatus",
    derive = "PartialEq",
    category = "tenancy",
    doc = "One Postgres database tenants can be placed on.",
    printcolumn(name = "State", type_ = "string", json_path = ".spec.state"),
    printcolumn(name = "Tenants", type_ = "integer", json_path = ".status.tenants"),
    printcolumn(name = "Max", type_ = "integer", json_path = ".spec.maxTenants"),
    printcolumn(name = "Reachable", type_ = "boolean", json_path = ".status.reachable"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.postgresVersion", priority = 1),
    printcolumn(name = "Bytes", type_ = "integer", json_path = ".status.bytes", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 40 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be a DNS-1123 label of at most 40 characters"),
    validation = Rule::new("self.metadata.name == 'default' ? !has(self.spec.adminSecretRef) : has(self.spec.adminSecretRef)").message("spec.adminSecretRef is required, except on the Shard 'default' (the operator's DATABASE_URL), where it is not allowed")
)]
#[serde(rename_all = "camelCase")]
pub struct ShardSpec {
    /// The Secret (in the operator's namespace) and its key holding the
    /// admin URL of the shard's database
    /// (`postgresql://admin:password@host:5432/db?sslmode=...`). The admin
    /// needs the same rights as the operator's own: CREATEROLE and
    /// membership in `pg_signal_backend`, not SUPERUSER.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_secret_ref: Option<SecretKeyRef>,
    /// The host applications use to reach the shard (written into the
    /// tenants' Secrets). Default: the admin URL's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub tenant_host: Option<String>,
    /// The port applications use. Default: the admin URL's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub tenant_port: Option<u16>,
    /// At most this many tenants are placed on the shard (unset: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_tenants: Option<u32>,
    /// `Open` (the default: takes new tenants), `Draining` (moves its
    /// tenants away) or `Closed` (keeps its tenants, takes no new ones).
    #[serde(default)]
    pub state: ShardState,
    /// While Draining: at most this many tenants move out at once (default
    /// 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub max_concurrent_moves: Option<u32>,
}

/// A key of a Secret in the operator's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Whether a shard takes new tenants.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum ShardState {
    #[default]
    Open,
    Draining,
    Closed,
}

/// What the operator last saw of the shard.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// Whether the operator could connect and prepare the control schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable: Option<bool>,
    /// `server_version` of the shard's Postgres.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_version: Option<String>,
    /// Tenants placed on the shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<i64>,
    /// Size of the shard's database in bytes (`pg_database_size`), rounded
    /// to MiB so that it is not rewritten on every small change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: connected, the admin has the rights it needs, the control
    /// schema is current.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Where a tenant goes: a named shard, or any Open shard whose labels match
/// a selector. Unset: any Open shard.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.shard) && has(self.shardSelector))").message("spec.placement takes shard or shardSelector, not both"))]
pub struct PlacementSpec {
    /// The shard's name (`default`: the operator's DATABASE_URL). Changing it
    /// on a placed tenant asks for a move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 40), regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub shard: Option<String>,
    /// Shards whose labels match (`matchLabels`, `matchExpressions`, as any
    /// Kubernetes label selector). Used to place a new tenant only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_selector: Option<Box<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>>,
}

impl PlacementSpec {
    pub fn is_default(&self) -> bool {
        self == &PlacementSpec::default()
    }
}

/// A move of a tenant between shards, while it runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MoveStatus {
    pub from: String,
    pub to: String,
    /// `Copying` (the data being copied: with strategy `Copy` writes are
    /// stopped on the source; with `Logical` the tenant serves from the
    /// source while its tables are copied and then streamed),
    /// `CuttingOver` (`Logical`: writes stopped, the target catching up to
    /// the source's last change), `CleaningUp` (the target serves; the
    /// source's copy is being dropped) or `RollingBack` (the move failed;
    /// the source serves, the target's copy is being dropped).
    pub phase: MovePhase,
    /// `Logical` (logical replication while the tenant serves; writes stop
    /// only for the cutover) or `Copy` (writes stopped for the copy: a
    /// backup of the source restored on the target).
    pub strategy: String,
    /// Why that strategy.
    #[serde(default)]
    pub strategy_reason: String,
    /// When the move started (RFC 3339).
    pub started_at: String,
    /// `Logical`: bytes of the tenant's tables on the target so far, of
    /// `bytesTotal` on the source (updated every few seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_copied: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<i64>,
    /// `Logical`: bytes of WAL the target has still to confirm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<i64>,
    /// `Logical`: tables whose initial copy is not done yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables_pending: Option<i64>,
}

/// Where a move is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MovePhase {
    Copying,
    CuttingOver,
    CleaningUp,
    RollingBack,
}

/// How a tenant's last move ended.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastMove {
    pub from: String,
    pub to: String,
    pub strategy: String,
    /// `Succeeded` or `Failed`.
    pub result: String,
    pub started_at: String,
    pub finished_at: String,
    /// How long the tenant could not write: from its login turned off on the
    /// source to its login turned on at the target, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_unavailable_ms: Option<i64>,
    /// `Copy`: size of the copied (encrypted) dump; `Logical`: size of the
    /// tenant's tables on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
    /// What happened, for people.
    #[serde(default)]
    pub message: String,
    /// The Tenant's `metadata.generation` the move was for: a failed move is
    /// retried when the spec changes, or after ten minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}
