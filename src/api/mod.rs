//! The custom resources of `tenancy.dev/v1alpha1` and their shared types.
//!
//! Takes nothing, gives the types and `all_crds()` (what `crdgen` prints).

pub mod tenant;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde::{Deserialize, Serialize};

pub use tenant::{DatabaseSpec, Tenant, TenantPhase, TenantSpec, TenantState, TenantStatus};

/// API group of every resource of the operator.
pub const GROUP: &str = "tenancy.dev";
/// The finalizer that holds a Tenant until its data is destroyed.
pub const FINALIZER: &str = "tenancy.dev/cleanup";

/// A status condition, as the Kubernetes API conventions define it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The condition's type, such as `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase word saying why, for machines.
    pub reason: String,
    /// What happened and what a person can do, for people.
    #[serde(default)]
    pub message: String,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
}

/// Every CRD the operator serves, in a stable order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![Tenant::crd()]
}

/// The CRDs as one multi-document YAML stream, as committed under `crds/`.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in all_crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
