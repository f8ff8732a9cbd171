//! Optional RBAC for chosen identities: a request whose bearer token is one
//! of `Config::rbac_tokens` is authorized as that token's user against the
//! Roles, ClusterRoles, RoleBindings and ClusterRoleBindings stored in the
//! server, as the real RBAC authorizer does; every other request is allowed
//! (it acts as cluster admin). Non-resource requests (discovery, /version,
//! OpenAPI, health) are allowed for everyone, like the `system:discovery`
//! and `system:public-info-viewer` roles.
//!
//! Covered: rules' apiGroups, resources (`*`, `resource/subresource`,
//! `*/subresource`), verbs and resourceNames; ClusterRoleBindings; RoleBindings
//! to a Role or a ClusterRole; subjects of kind ServiceAccount, User and
//! Group (`system:authenticated`, `system:serviceaccounts`,
//! `system:serviceaccounts:<ns>`). Not covered: aggregated ClusterRoles
//! (`aggregationRule`), nonResourceURLs rules, impersonation, escalation
//! checks on RBAC writes.

use crate::store::Store;
use serde_json::Value;

/// What one resource request asks to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// The attributes of a request to `path` (already split into segments), or
/// None for a non-resource request.
pub fn attributes(method: &str, segs: &[&str], watch: bool) -> Option<Attributes> {
    let (group, rest) = match segs {
        ["api", _v, rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", g, _v, rest @ ..] if !rest.is_empty() => (*g, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name, subresource) = match rest {
        [r] => (r.to_string(), None, None),
        [r, n] => (r.to_string(), Some(n.to_string()), None),
        [r, n, s, ..] => (r.to_string(), Some(n.to_string()), Some(s.to_string())),
        [] => return None,
    };
    // A namespace addressed as an object is cluster-scoped.
    let (namespace, name) = if group.is_empty() && resource == "namespaces" {
        (None, name)
    } else {
        (namespace, name)
    };
    let verb = match method {
        "GET" | "HEAD" if watch => "watch",
        "GET" | "HEAD" if name.is_some() => "get",
        "GET" | "HEAD" => "list",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" if name.is_some() => "delete",
        "DELETE" => "deletecollection",
        other => {
            return Some(Attributes {
                verb: other.to_lowercase(),
                group: group.into(),
                resource,
                subresource,
                namespace,
                name,
            })
        }
    };
    Some(Attributes {
        verb: verb.into(),
        group: group.into(),
        resource,
        subresource,
        namespace,
        name,
    })
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn subject_matches(subject: &Value, user: &str) -> bool {
    let kind = subject["kind"].as_str().unwrap_or("");
    let name = subject["name"].as_str().unwrap_or("");
    let sa = user
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'));
    match kind {
        "ServiceAccount" => sa == Some((subject["namespace"].as_str().unwrap_or(""), name)),
        "User" => name == user,
        "Group" => {
            name == "system:authenticated"
                || (sa.is_some() && name == "system:serviceaccounts")
                || sa.is_some_and(|(ns, _)| name.strip_prefix("system:serviceaccounts:") == Some(ns))
        }
        _ => false,
    }
}

fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let any = |list: &[&str], x: &str| list.iter().any(|i| *i == "*" || *i == x);
    if !any(&strs(&rule["verbs"]), &a.verb) || !any(&strs(&rule["apiGroups"]), &a.group) {
        return false;
    }
    let resources = strs(&rule["resources"]);
    let resource_ok = match &a.subresource {
        None => any(&resources, &a.resource),
        Some(sub) => resources
            .iter()
            .any(|r| *r == "*" || *r == format!("{}/{sub}", a.resource) || *r == format!("*/{sub}")),
    };
    if !resource_ok {
        return false;
    }
    let names = strs(&rule["resourceNames"]);
    names.is_empty() || a.name.as_deref().is_some_and(|n| names.contains(&n))
}

fn objects<'a>(store: &'a Store, plural: &str) -> impl Iterator<Item = &'a Value> {
    store
        .objects
        .get(&("rbac.authorization.k8s.io".to_string(), plural.to_string()))
        .into_iter()
        .flat_map(|m| m.values())
}

fn role_rules<'a>(store: &'a Store, role_ref: &Value, binding_ns: Option<&str>) -> Vec<&'a Value> {
    let name = role_ref["name"].as_str().unwrap_or("");
    let role = match role_ref["kind"].as_str() {
        Some("ClusterRole") => objects(store, "clusterroles").find(|r| r["metadata"]["name"] == name),
        Some("Role") => objects(store, "roles")
            .find(|r| r["metadata"]["name"] == name && r["metadata"]["namespace"].as_str() == binding_ns),
        _ => None,
    };
    role.and_then(|r| r["rules"].as_array())
        .map(|rules| rules.iter().collect())
        .unwrap_or_default()
}

/// Whether `user` may do `a`, from the RBAC objects in `store`.
pub fn allowed(store: &Store, user: &str, a: &Attributes) -> bool {
    let binds = |b: &Value| {
        b["subjects"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| subject_matches(s, user)))
    };
    for b in objects(store, "clusterrolebindings").filter(|b| binds(b)) {
        if role_rules(store, &b["roleRef"], None)
            .into_iter()
            .any(|r| rule_allows(r, a))
        {
            return true;
        }
    }
    let Some(ns) = a.namespace.as_deref() else { return false };
    for b in objects(store, "rolebindings").filter(|b| b["metadata"]["namespace"] == ns && binds(b)) {
        if role_rules(store, &b["roleRef"], Some(ns))
            .into_iter()
            .any(|r| rule_allows(r, a))
        {
            return true;
        }
    }
    false
}

/// The real API server's message for a denied request.
pub fn denied_message(user: &str, a: &Attributes) -> String {
    let resource = match &a.subresource {
        Some(s) => format!("{}/{s}", a.resource),
        None => a.resource.clone(),
    };
    let qualified = if a.group.is_empty() {
        a.resource.clone()
    } else {
        format!("{}.{}", a.resource, a.group)
    };
    let what = match &a.name {
        Some(n) => format!("{qualified} \"{n}\" is forbidden"),
        None => format!("{qualified} is forbidden"),
    };
    let scope = match &a.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    format!(
        "{what}: User \"{user}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
        a.verb, a.group
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_of_common_paths() {
        let a = attributes("GET", &["api", "v1", "namespaces", "ns", "secrets"], true).unwrap();
        assert_eq!(
            (a.verb.as_str(), a.resource.as_str(), a.namespace.as_deref()),
            ("watch", "secrets", Some("ns"))
        );
        let a = attributes(
            "PATCH",
            &["apis", "tenancy.dev", "v1alpha1", "tenants", "acme", "status"],
            false,
        )
        .unwrap();
        assert_eq!(
            (a.verb.as_str(), a.group.as_str(), a.subresource.as_deref(), a.namespace),
            ("patch", "tenancy.dev", Some("status"), None)
        );
        let a = attributes("DELETE", &["api", "v1", "namespaces", "gone"], false).unwrap();
        assert_eq!(
            (a.verb.as_str(), a.resource.as_str(), a.namespace, a.name.as_deref()),
            ("delete", "namespaces", None, Some("gone"))
        );
        assert!(attributes("GET", &["apis", "tenancy.dev", "v1alpha1"], false).is_none());
    }

    #[test]
    fn messages_match_the_real_server() {
        let a = attributes("GET", &["api", "v1", "secrets"], false).unwrap();
        assert_eq!(
            denied_message("system:serviceaccount:s:op", &a),
            "secrets is forbidden: User \"system:serviceaccount:s:op\" cannot list resource \"secrets\" in API group \"\" at the cluster scope"
        );
    }
}
