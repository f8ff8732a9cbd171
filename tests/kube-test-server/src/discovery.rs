//! Discovery documents (plain JSON, no aggregated discovery) and OpenAPI v3.

use crate::resources::ResourceType;
use crate::store::Store;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

pub fn version() -> Value {
    // Reported as 1.32: the kubectl installed here is a dispatcher that runs
    // the client matching the server's minor version, and the suites are
    // meant to exercise kubectl 1.32 (kube-rs does not look at it).
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.4",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.23.8",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

pub fn api_versions(addr: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr}]
    })
}

/// group -> served versions, in first-seen order (built-ins first).
fn groups(st: &Store) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = vec![];
    let mut types: Vec<&ResourceType> = st.types.values().collect();
    types.sort_by_key(|t| (!t.builtin, t.group.clone()));
    for t in types {
        if t.group.is_empty() {
            continue;
        }
        let vs: Vec<String> = t.versions.iter().filter(|v| v.served).map(|v| v.name.clone()).collect();
        match out.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, have)) => {
                for v in vs {
                    if !have.contains(&v) {
                        have.push(v);
                    }
                }
            }
            None => out.push((t.group.clone(), vs)),
        }
    }
    out
}

fn group_json(g: &str, vs: &[String]) -> Value {
    let versions: Vec<Value> = vs
        .iter()
        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    let preferred = versions.first().cloned().unwrap_or(json!({}));
    json!({"name": g, "versions": versions, "preferredVersion": preferred})
}

pub fn group_list(st: &Store) -> Value {
    let gs: Vec<Value> = groups(st)
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(g, v)| group_json(g, v))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": gs})
}

pub fn group(st: &Store, g: &str) -> Option<Value> {
    groups(st).iter().find(|(n, v)| n == g && !v.is_empty()).map(|(n, v)| {
        let mut j = group_json(n, v);
        j["kind"] = json!("APIGroup");
        j["apiVersion"] = json!("v1");
        j
    })
}

fn hash8(s: &str) -> String {
    let d = Sha256::digest(s.as_bytes());
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(&d[..8])
}

pub fn resource_list(st: &Store, g: &str, v: &str) -> Option<Value> {
    let mut res = vec![];
    for t in st.types.values().filter(|t| t.group == g && t.version(v).is_some()) {
        let mut r = json!({
            "name": t.plural,
            "singularName": t.singular,
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": VERBS,
            "storageVersionHash": hash8(&format!("{}/{}/{}", t.group, t.storage_version(), t.kind)),
        });
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        if !t.categories.is_empty() {
            r["categories"] = json!(t.categories);
        }
        res.push(r);
        if t.has_status(v) {
            res.push(json!({
                "name": format!("{}/status", t.plural),
                "singularName": "",
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if res.is_empty() {
        return None;
    }
    let gv = if g.is_empty() {
        v.to_string()
    } else {
        format!("{g}/{v}")
    };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": res}))
}

// ---------------------------------------------------------------------------------------------
// OpenAPI v3

fn gv_paths(st: &Store) -> Vec<(String, String, String)> {
    // (path key, group, version)
    let mut out = vec![("api/v1".to_string(), String::new(), "v1".to_string())];
    for (g, vs) in groups(st) {
        for v in vs {
            out.push((format!("apis/{g}/{v}"), g.clone(), v));
        }
    }
    out
}

pub fn openapi_root(st: &Store) -> Value {
    let mut paths = Map::new();
    for (key, g, v) in gv_paths(st) {
        if let Some(doc) = openapi_gv(st, &g, &v) {
            let hash: String = Sha256::digest(doc.to_string().as_bytes())
                .iter()
                .map(|b| format!("{b:02X}"))
                .collect();
            paths.insert(
                key.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash={hash}")}),
            );
        }
    }
    json!({"paths": paths})
}

fn reversed_group(g: &str) -> String {
    let mut parts: Vec<&str> = g.split('.').collect();
    parts.reverse();
    parts.join(".")
}

fn schema_name(t: &ResourceType, v: &str, kind: &str) -> String {
    if t.builtin {
        format!("{}.{}", t.openapi_prefix, kind)
    } else {
        format!("{}.{}.{}", reversed_group(&t.group), v, kind)
    }
}

const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";
const LIST_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta";

fn object_meta_schema() -> Value {
    json!({
        "description": "ObjectMeta is metadata that all persisted resources must have, which includes all objects users must create.",
        "type": "object",
        "properties": {
            "annotations": {"type": "object", "additionalProperties": {"type": "string", "default": ""}},
            "creationTimestamp": {"type": "string", "format": "date-time"},
            "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
            "deletionTimestamp": {"type": "string", "format": "date-time"},
            "finalizers": {"type": "array", "items": {"type": "string", "default": ""}, "x-kubernetes-list-type": "set", "x-kubernetes-patch-strategy": "merge"},
            "generateName": {"type": "string"},
            "generation": {"type": "integer", "format": "int64"},
            "labels": {"type": "object", "additionalProperties": {"type": "string", "default": ""}},
            "managedFields": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}, "x-kubernetes-list-type": "atomic"},
            "name": {"type": "string"},
            "namespace": {"type": "string"},
            "ownerReferences": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}, "x-kubernetes-patch-merge-key": "uid", "x-kubernetes-patch-strategy": "merge", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["uid"]},
            "resourceVersion": {"type": "string"},
            "selfLink": {"type": "string"},
            "uid": {"type": "string"}
        }
    })
}

fn param(name: &str, ty: &str) -> Value {
    json!({"name": name, "in": "query", "description": name, "schema": {"type": ty, "uniqueItems": true}})
}

fn content(schema_ref: &str, types: &[&str]) -> Value {
    let mut m = Map::new();
    for t in types {
        m.insert(
            t.to_string(),
            json!({"schema": {"$ref": format!("#/components/schemas/{schema_ref}")}}),
        );
    }
    Value::Object(m)
}

fn op(action: &str, id: &str, gvk: &Value, schema_ref: &str, params: Vec<Value>, body: Option<&[&str]>) -> Value {
    let mut o = json!({
        "operationId": id,
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": content(schema_ref, &["application/json", "application/yaml"])}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk,
    });
    if let Some(types) = body {
        o["requestBody"] = json!({"content": content(schema_ref, types), "required": true});
    }
    o
}

/// The OpenAPI v3 document of one group-version. PATCH operations declare the `fieldValidation`
/// query parameter, which is how kubectl decides to use server-side field validation. They do
/// not offer strategic-merge-patch, so kubectl computes built-in patches from its compiled-in
/// types and uses JSON merge patch for custom resources, as it does against a real server.
pub fn openapi_gv(st: &Store, g: &str, v: &str) -> Option<Value> {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    schemas.insert(OBJECT_META.into(), object_meta_schema());
    schemas.insert(LIST_META.into(), json!({"type": "object", "properties": {"continue": {"type": "string"}, "remainingItemCount": {"type": "integer", "format": "int64"}, "resourceVersion": {"type": "string"}, "selfLink": {"type": "string"}}}));
    let mut any = false;
    for t in st.types.values().filter(|t| t.group == g && t.version(v).is_some()) {
        any = true;
        let gvk = json!({"group": t.group, "version": v, "kind": t.kind});
        let name = schema_name(t, v, &t.kind);
        let list_name = schema_name(t, v, &t.list_kind);
        let mut s = match t.version(v).and_then(|x| x.schema.clone()) {
            Some(s) => s,
            None => json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        };
        if let Some(o) = s.as_object_mut() {
            let props = o.entry("properties").or_insert_with(|| json!({}));
            props["apiVersion"] = json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."});
            props["kind"] = json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."});
            props["metadata"] =
                json!({"allOf": [{"$ref": format!("#/components/schemas/{OBJECT_META}")}], "default": {}});
            o.insert("x-kubernetes-group-version-kind".into(), json!([gvk.clone()]));
        }
        schemas.insert(name.clone(), s);
        schemas.insert(
            list_name.clone(),
            json!({
                "type": "object",
                "required": ["items"],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "items": {"type": "array", "items": {"allOf": [{"$ref": format!("#/components/schemas/{name}")}], "default": {}}},
                    "metadata": {"allOf": [{"$ref": format!("#/components/schemas/{LIST_META}")}], "default": {}}
                },
                "x-kubernetes-group-version-kind": [{"group": t.group, "version": v, "kind": t.list_kind}]
            }),
        );
        let base = if g.is_empty() {
            format!("/api/{v}")
        } else {
            format!("/apis/{g}/{v}")
        };
        let mut prefixes = vec![];
        if t.namespaced {
            prefixes.push(format!("{base}/namespaces/{{namespace}}/{}", t.plural));
        } else {
            prefixes.push(format!("{base}/{}", t.plural));
        }
        let id = format!("{}{}", t.kind, if t.namespaced { "Namespaced" } else { "" });
        let write_params = || {
            vec![
                param("dryRun", "string"),
                param("fieldManager", "string"),
                param("fieldValidation", "string"),
            ]
        };
        let mut patch_params = write_params();
        patch_params.push(param("force", "boolean"));
        let patch_types: &[&str] = &[
            "application/apply-patch+yaml",
            "application/json-patch+json",
            "application/merge-patch+json",
        ];
        for coll in prefixes {
            paths.insert(
                coll.clone(),
                json!({
                    "get": op("list", &format!("list{id}"), &gvk, &list_name, vec![param("labelSelector", "string"), param("fieldSelector", "string"), param("limit", "integer"), param("continue", "string"), param("watch", "boolean")], None),
                    "post": op("post", &format!("create{id}"), &gvk, &name, write_params(), Some(&["application/json", "application/yaml"])),
                    "delete": op("deletecollection", &format!("deletecollection{id}"), &gvk, &name, vec![], None),
                }),
            );
            paths.insert(
                format!("{coll}/{{name}}"),
                json!({
                    "get": op("get", &format!("read{id}"), &gvk, &name, vec![], None),
                    "put": op("put", &format!("replace{id}"), &gvk, &name, write_params(), Some(&["application/json", "application/yaml"])),
                    "patch": op("patch", &format!("patch{id}"), &gvk, &name, patch_params.clone(), Some(patch_types)),
                    "delete": op("delete", &format!("delete{id}"), &gvk, &name, vec![param("dryRun", "string"), param("propagationPolicy", "string")], None),
                }),
            );
            if t.has_status(v) {
                paths.insert(
                    format!("{coll}/{{name}}/status"),
                    json!({
                        "get": op("get", &format!("read{id}Status"), &gvk, &name, vec![], None),
                        "put": op("put", &format!("replace{id}Status"), &gvk, &name, write_params(), Some(&["application/json", "application/yaml"])),
                        "patch": op("patch", &format!("patch{id}Status"), &gvk, &name, patch_params.clone(), Some(patch_types)),
                    }),
                );
            }
        }
    }
    if !any {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.4"},
        "paths": paths,
        "components": {"schemas": schemas}
    }))
}
