//! The kinds the server knows: a table of built-ins plus those registered by CRDs.

use serde_json::{json, Value};

/// How `metadata.name` is validated for a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRule {
    Dns1123Subdomain,
    Dns1123Label,
    Dns1035Label,
    /// RBAC objects: any name that is a valid path segment.
    PathSegment,
}

#[derive(Debug, Clone)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

#[derive(Debug, Clone)]
pub struct VersionInfo {
    pub name: String,
    pub served: bool,
    pub storage: bool,
    /// openAPIV3Schema for CRDs; `None` for built-ins.
    pub schema: Option<Value>,
    pub printer_columns: Vec<PrinterColumn>,
    pub status_subresource: bool,
    pub deprecated: bool,
}

#[derive(Debug, Clone)]
pub struct ResourceType {
    pub group: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub namespaced: bool,
    pub versions: Vec<VersionInfo>,
    pub builtin: bool,
    pub tracks_generation: bool,
    pub name_rule: NameRule,
    /// OpenAPI component name prefix for built-ins, e.g. `io.k8s.api.core.v1`.
    pub openapi_prefix: String,
}

impl ResourceType {
    pub fn version(&self, v: &str) -> Option<&VersionInfo> {
        self.versions.iter().find(|x| x.name == v && x.served)
    }
    pub fn storage_version(&self) -> &str {
        self.versions
            .iter()
            .find(|v| v.storage)
            .or_else(|| self.versions.first())
            .map(|v| v.name.as_str())
            .unwrap_or("v1")
    }
    pub fn api_version(&self, v: &str) -> String {
        if self.group.is_empty() {
            v.to_string()
        } else {
            format!("{}/{}", self.group, v)
        }
    }
    pub fn has_status(&self, v: &str) -> bool {
        self.versions.iter().any(|x| x.name == v && x.status_subresource)
    }
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    short: &[&str],
    status: bool,
    generation: bool,
    name_rule: NameRule,
    prefix: &str,
) -> ResourceType {
    let singular = kind.to_lowercase();
    ResourceType {
        group: group.to_string(),
        plural: plural.to_string(),
        singular,
        kind: kind.to_string(),
        list_kind: format!("{kind}List"),
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: vec![],
        namespaced,
        versions: vec![VersionInfo {
            name: version.to_string(),
            served: true,
            storage: true,
            schema: None,
            printer_columns: vec![],
            status_subresource: status,
            deprecated: false,
        }],
        builtin: true,
        tracks_generation: generation,
        name_rule,
        openapi_prefix: prefix.to_string(),
    }
}

/// Built-in kinds served from the start.
pub fn builtins() -> Vec<ResourceType> {
    use NameRule::*;
    let mut v = vec![
        builtin(
            "",
            "v1",
            "namespaces",
            "Namespace",
            false,
            &["ns"],
            true,
            false,
            Dns1123Label,
            "io.k8s.api.core.v1",
        ),
        builtin(
            "",
            "v1",
            "secrets",
            "Secret",
            true,
            &[],
            false,
            false,
            Dns1123Subdomain,
            "io.k8s.api.core.v1",
        ),
        builtin(
            "",
            "v1",
            "configmaps",
            "ConfigMap",
            true,
            &["cm"],
            false,
            false,
            Dns1123Subdomain,
            "io.k8s.api.core.v1",
        ),
        builtin(
            "",
            "v1",
            "serviceaccounts",
            "ServiceAccount",
            true,
            &["sa"],
            false,
            false,
            Dns1123Subdomain,
            "io.k8s.api.core.v1",
        ),
        builtin(
            "",
            "v1",
            "services",
            "Service",
            true,
            &["svc"],
            true,
            false,
            Dns1035Label,
            "io.k8s.api.core.v1",
        ),
        builtin(
            "",
            "v1",
            "events",
            "Event",
            true,
            &["ev"],
            false,
            false,
            Dns1123Subdomain,
            "io.k8s.api.core.v1",
        ),
        builtin(
            "events.k8s.io",
            "v1",
            "events",
            "Event",
            true,
            &["ev"],
            false,
            false,
            Dns1123Subdomain,
            "io.k8s.api.events.v1",
        ),
        builtin(
            "batch",
            "v1",
            "jobs",
            "Job",
            true,
            &[],
            true,
            true,
            Dns1123Subdomain,
            "io.k8s.api.batch.v1",
        ),
        builtin(
            "batch",
            "v1",
            "cronjobs",
            "CronJob",
            true,
            &["cj"],
            true,
            true,
            Dns1123Subdomain,
            "io.k8s.api.batch.v1",
        ),
        builtin(
            "coordination.k8s.io",
            "v1",
            "leases",
            "Lease",
            true,
            &[],
            false,
            false,
            Dns1123Subdomain,
            "io.k8s.api.coordination.v1",
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "roles",
            "Role",
            true,
            &[],
            false,
            false,
            PathSegment,
            "io.k8s.api.rbac.v1",
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
            &[],
            false,
            false,
            PathSegment,
            "io.k8s.api.rbac.v1",
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
            &[],
            false,
            false,
            PathSegment,
            "io.k8s.api.rbac.v1",
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            &[],
            false,
            false,
            PathSegment,
            "io.k8s.api.rbac.v1",
        ),
        builtin(
            "apps",
            "v1",
            "deployments",
            "Deployment",
            true,
            &["deploy"],
            true,
            true,
            Dns1123Subdomain,
            "io.k8s.api.apps.v1",
        ),
        builtin(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            true,
            &["pdb"],
            true,
            true,
            Dns1123Subdomain,
            "io.k8s.api.policy.v1",
        ),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            true,
            true,
            Dns1123Subdomain,
            "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1",
        ),
    ];
    for r in v.iter_mut() {
        if matches!(
            r.plural.as_str(),
            "services" | "jobs" | "cronjobs" | "deployments" | "configmaps" | "secrets" | "serviceaccounts"
        ) {
            // `kubectl get all` uses the `all` category.
            if matches!(r.plural.as_str(), "services" | "jobs" | "cronjobs" | "deployments") {
                r.categories = vec!["all".to_string()];
            }
        }
        if r.plural == "customresourcedefinitions" {
            r.categories = vec!["api-extensions".to_string()];
        }
    }
    v
}

fn str_list(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// The resource type a CRD object defines (None when the CRD is malformed).
pub fn from_crd(crd: &Value) -> Option<ResourceType> {
    let spec = crd.get("spec")?;
    let group = spec.get("group")?.as_str()?.to_string();
    let names = spec.get("names")?;
    let plural = names.get("plural")?.as_str()?.to_string();
    let kind = names.get("kind")?.as_str()?.to_string();
    let singular = names
        .get("singular")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| kind.to_lowercase());
    let list_kind = names
        .get("listKind")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("{kind}List"));
    let namespaced = spec.get("scope").and_then(Value::as_str) != Some("Cluster");
    let mut versions = vec![];
    for ver in spec.get("versions")?.as_array()? {
        let name = ver.get("name")?.as_str()?.to_string();
        let mut cols = vec![];
        if let Some(pcs) = ver.get("additionalPrinterColumns").and_then(Value::as_array) {
            for c in pcs {
                cols.push(PrinterColumn {
                    name: c.get("name").and_then(Value::as_str).unwrap_or("").to_string(),
                    type_: c.get("type").and_then(Value::as_str).unwrap_or("string").to_string(),
                    format: c.get("format").and_then(Value::as_str).unwrap_or("").to_string(),
                    description: c.get("description").and_then(Value::as_str).unwrap_or("").to_string(),
                    priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                    json_path: c.get("jsonPath").and_then(Value::as_str).unwrap_or("").to_string(),
                });
            }
        } else {
            cols.push(PrinterColumn {
                name: "Age".into(),
                type_: "date".into(),
                format: String::new(),
                description: String::new(),
                priority: 0,
                json_path: ".metadata.creationTimestamp".into(),
            });
        }
        versions.push(VersionInfo {
            name,
            served: ver.get("served").and_then(Value::as_bool).unwrap_or(true),
            storage: ver.get("storage").and_then(Value::as_bool).unwrap_or(false),
            schema: ver.pointer("/schema/openAPIV3Schema").cloned(),
            printer_columns: cols,
            status_subresource: ver.pointer("/subresources/status").is_some(),
            deprecated: ver.get("deprecated").and_then(Value::as_bool).unwrap_or(false),
        });
    }
    Some(ResourceType {
        group,
        plural,
        singular,
        kind,
        list_kind,
        short_names: str_list(names.get("shortNames").unwrap_or(&Value::Null)),
        categories: str_list(names.get("categories").unwrap_or(&Value::Null)),
        namespaced,
        versions,
        builtin: false,
        tracks_generation: true,
        name_rule: NameRule::Dns1123Subdomain,
        openapi_prefix: String::new(),
    })
}

/// The status the real apiextensions controllers set on an accepted CRD.
pub fn crd_status(crd: &Value, now: &str) -> Value {
    let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    let mut accepted = names.clone();
    if accepted.get("singular").is_none() {
        if let Some(k) = names.get("kind").and_then(Value::as_str) {
            accepted["singular"] = json!(k.to_lowercase());
        }
    }
    if accepted.get("listKind").is_none() {
        if let Some(k) = names.get("kind").and_then(Value::as_str) {
            accepted["listKind"] = json!(format!("{k}List"));
        }
    }
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter(|v| v.get("storage") == Some(&json!(true)))
                .filter_map(|v| v.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    json!({
        "acceptedNames": accepted,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "lastTransitionTime": now, "reason": "NoConflicts", "message": "no conflicts found"},
            {"type": "Established", "status": "True", "lastTransitionTime": now, "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"}
        ],
        "storedVersions": stored,
    })
}
