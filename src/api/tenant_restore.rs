//! The `TenantRestore` custom resource: a request to restore one tenant's
//! schema from one of its backups.
//!
//! Takes nothing, gives the Rust types `crdgen` turns into the CRD; the
//! TenantRestore controller runs a Job for each and reports its outcome.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A request to restore one tenant's schema from one of its backups. The
/// operator runs a Job `tenant-operator restore`: it downloads the backup,
/// verifies its SHA-256 and every chunk's tag, moves the live schema aside,
/// restores, and drops the old schema (or, on any failure, puts it back
/// untouched). While it runs the tenant's app role cannot log in. Other
/// tenants are never touched. One request runs once; create another to
/// restore again.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tenancy.dev",
    version = "v1alpha1",
    kind = "TenantRestore",
    plural = "tenantrestores",
    singular = "tenantrestore",
    shortname = "tnr",
    status = "TenantRestoreStatus",
    derive = "PartialEq",
    category = "tenancy",
    doc = "A request to restore one tenant's schema from one of its backups.",
    printcolumn(name = "Tenant", type_ = "string", json_path = ".spec.tenant"),
    printcolumn(name = "Backup", type_ = "string", json_path = ".spec.backup"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 40").message("metadata.name must have at most 40 characters (the Job is named after it)")
)]
#[serde(rename_all = "camelCase")]
pub struct TenantRestoreSpec {
    /// The Tenant to restore (its name).
    #[schemars(length(min = 1, max = 40), regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.tenant is immutable"))]
    pub tenant: String,
    /// The backup: an id as `status.lastBackup.id` of the Tenant shows it
    /// (`20261126T030000.123Z`), or `latest`.
    #[serde(default = "latest")]
    #[schemars(regex(pattern = r"^(latest|[0-9]{8}T[0-9]{6}\.[0-9]{3}Z)$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.backup is immutable"))]
    pub backup: String,
    /// With `backup: latest`: the newest backup taken at or before this time
    /// (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point_in_time: Option<String>,
}

fn latest() -> String {
    "latest".into()
}

/// What happened to the request.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantRestoreStatus {
    /// Pending, Running, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestorePhase>,
    /// The restore Job (operator namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// When the Job started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// When it finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish: Option<String>,
    /// The restored backup's id, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// Size of the restored (encrypted) backup in bytes, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The phase of a TenantRestore.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RestorePhase {
    /// Waiting for its Job to start.
    Pending,
    /// The Job runs.
    Running,
    /// The tenant's schema was restored.
    Succeeded,
    /// Nothing was changed (or the original was put back); see `error`.
    Failed,
}
