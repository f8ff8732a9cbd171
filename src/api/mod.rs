//! The custom resources of `tenancy.dev/v1alpha1` and their shared types.
//!
//! Takes nothing, gives the types and `all_crds()` (what `crdgen` prints).

pub mod migration_set;
pub mod shard;
pub mod tenant;
pub mod tenant_restore;
pub mod text;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;
use serde::{Deserialize, Serialize};

pub use migration_set::{
    FailedTenant, Migration, MigrationSet, MigrationSetPhase, MigrationSetSpec, MigrationSetStatus, OnFailure,
    RolloutSpec, ShardProgress, VersionCount,
};
pub use shard::{PlacementSpec, SecretKeyRef, Shard, ShardSpec, ShardState, ShardStatus, DEFAULT_SHARD};
pub use tenant::{
    DatabaseSpec, RateLimit, RateLimitUnit, RateLimitsSpec, Tenant, TenantPhase, TenantSpec, TenantState, TenantStatus,
    TenantUsage,
};
pub use tenant_restore::{RestorePhase, TenantRestore, TenantRestoreSpec, TenantRestoreStatus};
pub use text::Text;

/// API group of every resource of the operator.
pub const GROUP: &str = "tenancy.dev";
/// The finalizer that holds a Tenant until its data is destroyed.
pub const FINALIZER: &str = "tenancy.dev/cleanup";

// Its strings are `Text`s: the operator holds seven per Tenant in its cache,
// and their values repeat across tenants.
/// A status condition, as the Kubernetes API conventions define it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The condition's type, such as `Ready`.
    #[serde(rename = "type")]
    pub type_: Text,
    /// `True`, `False` or `Unknown`.
    pub status: Text,
    /// A CamelCase word saying why, for machines.
    pub reason: Text,
    /// What happened and what a person can do, for people.
    #[serde(default)]
    pub message: Text,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: Text,
}

/// Every CRD the operator serves, in a stable order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![
        Tenant::crd(),
        MigrationSet::crd(),
        tenant_restore::TenantRestore::crd(),
        Shard::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream, as committed under `crds/`.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for mut crd in all_crds() {
        for v in &mut crd.spec.versions {
            if let Some(s) = v.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) {
                sort_defaults(s);
            }
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// Sorts the keys of every object `default` in a schema, so the YAML is the
/// same whether or not serde_json's `preserve_order` feature is on (a
/// workspace build turns it on for the API test server, which would
/// otherwise reorder `default: {api: {requestsPerUnit, unit, shadowMode}}`).
fn sort_defaults(p: &mut JSONSchemaProps) {
    fn sort(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.sort_keys();
                m.values_mut().for_each(sort);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(sort),
            _ => {}
        }
    }
    if let Some(d) = p.default.as_mut() {
        sort(&mut d.0);
    }
    let nested = p.properties.iter_mut().flat_map(|m| m.values_mut());
    let nested = nested.chain(p.pattern_properties.iter_mut().flat_map(|m| m.values_mut()));
    let nested = nested.chain(p.definitions.iter_mut().flat_map(|m| m.values_mut()));
    let nested = nested
        .chain(p.all_of.iter_mut().flatten())
        .chain(p.any_of.iter_mut().flatten())
        .chain(p.one_of.iter_mut().flatten());
    let nested = nested.chain(p.not.as_deref_mut());
    let nested = nested.chain(match p.items.as_mut() {
        Some(JSONSchemaPropsOrArray::Schema(s)) => vec![s.as_mut()],
        Some(JSONSchemaPropsOrArray::Schemas(v)) => v.iter_mut().collect(),
        None => vec![],
    });
    let nested = nested.chain(match p.additional_properties.as_mut() {
        Some(JSONSchemaPropsOrBool::Schema(s)) => Some(s.as_mut()),
        _ => None,
    });
    nested.for_each(sort_defaults);
}
