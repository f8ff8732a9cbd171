//! Patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902), a simplified strategic
//! merge patch, and the field-ownership bookkeeping behind a simplified server-side apply.

use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Some(t) = target.as_object_mut() {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn unescape(tok: &str) -> String {
    tok.replace("~1", "/").replace("~0", "~")
}

fn tokens(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(vec![]);
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    Ok(rest.split('/').map(unescape).collect())
}

fn get_ptr<'a>(doc: &'a Value, toks: &[String]) -> Option<&'a Value> {
    let mut cur = doc;
    for t in toks {
        cur = match cur {
            Value::Object(o) => o.get(t)?,
            Value::Array(a) => a.get(t.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn get_ptr_mut<'a>(doc: &'a mut Value, toks: &[String]) -> Option<&'a mut Value> {
    let mut cur = doc;
    for t in toks {
        cur = match cur {
            Value::Object(o) => o.get_mut(t)?,
            Value::Array(a) => a.get_mut(t.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let toks = tokens(path)?;
    let Some((last, parent)) = toks.split_last() else {
        *doc = value;
        return Ok(());
    };
    let p = get_ptr_mut(doc, parent)
        .ok_or_else(|| format!("add operation does not apply: doc is missing path: {path:?}"))?;
    match p {
        Value::Object(o) => {
            o.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
                return Ok(());
            }
            let i: usize = last
                .parse()
                .map_err(|_| format!("add operation does not apply: invalid index {last:?}"))?;
            if i > a.len() {
                return Err(format!("add operation does not apply: index out of bounds: {path:?}"));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("add operation does not apply: doc is missing path: {path:?}")),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let toks = tokens(path)?;
    let Some((last, parent)) = toks.split_last() else {
        return Err("cannot remove the document root".into());
    };
    let p = get_ptr_mut(doc, parent)
        .ok_or_else(|| format!("remove operation does not apply: doc is missing path: {path:?}"))?;
    match p {
        Value::Object(o) => o
            .remove(last)
            .ok_or_else(|| format!("remove operation does not apply: doc is missing key: {path:?}")),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| format!("invalid index {last:?}"))?;
            if i >= a.len() {
                return Err(format!(
                    "remove operation does not apply: doc is missing index: {path:?}"
                ));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!(
            "remove operation does not apply: doc is missing path: {path:?}"
        )),
    }
}

/// RFC 6902 JSON patch. As on the real server, `test` with value `null` passes for a missing path.
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), String> {
    let ops = patch.as_array().ok_or("json patch must be an array of operations")?;
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).ok_or("missing op")?;
        let path = op.get("path").and_then(Value::as_str).ok_or("missing path")?;
        let value = op.get("value").cloned();
        match kind {
            "add" => add(doc, path, value.ok_or("add operation missing value")?)?,
            "remove" => {
                remove(doc, path)?;
            }
            "replace" => {
                let toks = tokens(path)?;
                let v = value.ok_or("replace operation missing value")?;
                match get_ptr_mut(doc, &toks) {
                    Some(t) => *t = v,
                    None => return Err(format!("replace operation does not apply: doc is missing key: {path}")),
                }
            }
            "move" => {
                let from = op.get("from").and_then(Value::as_str).ok_or("move missing from")?;
                let v = remove(doc, from)?;
                add(doc, path, v)?;
            }
            "copy" => {
                let from = op.get("from").and_then(Value::as_str).ok_or("copy missing from")?;
                let v = get_ptr(doc, &tokens(from)?)
                    .cloned()
                    .ok_or_else(|| format!("copy from missing path {from}"))?;
                add(doc, path, v)?;
            }
            "test" => {
                let want = value.unwrap_or(Value::Null);
                let got = get_ptr(doc, &tokens(path)?);
                let ok = match got {
                    None => want.is_null(),
                    Some(g) => *g == want,
                };
                if !ok {
                    return Err(format!("testing value {path} failed: test failed"));
                }
            }
            other => return Err(format!("Unexpected kind: {other}")),
        }
    }
    Ok(())
}

/// The merge key for a list field under strategic merge patch (a subset of the built-in types').
fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => Some("name"),
        "volumeMounts" | "volumeDevices" => Some("mountPath"),
        "hostAliases" => Some("ip"),
        "ownerReferences" => Some("uid"),
        "conditions" => Some("type"),
        "topologySpreadConstraints" => Some("topologyKey"),
        "ports" => {
            if items.iter().any(|i| i.get("containerPort").is_some()) {
                Some("containerPort")
            } else {
                Some("port")
            }
        }
        _ => None,
    }
}

/// Simplified strategic merge patch: maps merge, known keyed lists merge by key,
/// `finalizers` merge as a set, other lists replace; `$patch` replace/delete and
/// `$deleteFromPrimitiveList` are honoured, `$retainKeys` keeps only the listed keys,
/// `$setElementOrder` is ignored.
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut np = p.clone();
            np.remove("$patch");
            *target = Value::Object(np);
            return;
        }
        Some("delete") => {
            *target = Value::Null;
            return;
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(t) = target.as_object_mut() else {
        return;
    };
    if let Some(retain) = p.get("$retainKeys").and_then(Value::as_array) {
        let keep: BTreeSet<&str> = retain.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(k.as_str()));
    }
    for (k, v) in p {
        if k.starts_with("$setElementOrder/") || k == "$retainKeys" || k == "$patch" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(cur)), Some(del)) = (t.get_mut(field), v.as_array()) {
                cur.retain(|x| !del.contains(x));
            }
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match v {
            Value::Array(items) => {
                let cur = t.get(k).and_then(Value::as_array).cloned();
                let key = merge_key(k, items);
                match (cur, key) {
                    (Some(mut cur), Some(key)) if items.iter().all(Value::is_object) => {
                        for item in items {
                            let id = item.get(key).cloned();
                            let pos = cur.iter().position(|c| id.is_some() && c.get(key) == id.as_ref());
                            let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                            match (pos, delete) {
                                (Some(i), true) => {
                                    cur.remove(i);
                                }
                                (None, true) => {}
                                (Some(i), false) => strategic_merge(&mut cur[i], item),
                                (None, false) => {
                                    let mut n = Value::Null;
                                    strategic_merge(&mut n, item);
                                    cur.push(n);
                                }
                            }
                        }
                        t.insert(k.clone(), Value::Array(cur));
                    }
                    (Some(mut cur), None) if k == "finalizers" => {
                        for item in items {
                            if !cur.contains(item) {
                                cur.push(item.clone());
                            }
                        }
                        t.insert(k.clone(), Value::Array(cur));
                    }
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
            Value::Object(_) => {
                let slot = t.entry(k.clone()).or_insert(Value::Null);
                strategic_merge(slot, v);
                if slot.is_null() {
                    t.remove(k);
                }
            }
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server-side apply: field sets and managedFields.
//
// A field path is a list of segments: a map key, `k:{"key":"value"}` for an item of an
// associative list (`x-kubernetes-list-type: map`), or `v:<json>` for a member of a set; the
// same spelling as the real FieldsV1 format. Other lists are atomic leaves.

pub type FieldPath = Vec<String>;
pub type FieldSet = BTreeSet<FieldPath>;

/// How a list is merged and owned.
#[derive(Debug, Clone, PartialEq)]
pub enum ListKind {
    Atomic,
    Map(Vec<String>),
    Set,
}

/// Resolves the kind of the list at a field path (given its items).
pub type Lists<'a> = &'a dyn Fn(&[String], &[Value]) -> ListKind;

/// List kinds of the built-in types this server knows (by field name, as their
/// `patchMergeKey`s say), and of metadata for every kind.
pub fn builtin_lists(path: &[String], items: &[Value]) -> ListKind {
    let Some(last) = path.last() else {
        return ListKind::Atomic;
    };
    match last.as_str() {
        "finalizers" if path.len() == 2 => ListKind::Set,
        f => match merge_key(f, items) {
            Some(k) => ListKind::Map(vec![k.to_string()]),
            None => ListKind::Atomic,
        },
    }
}

fn is_item(seg: &str) -> bool {
    seg.starts_with("k:") || seg.starts_with("v:")
}

fn item_key(item: &Value, keys: &[String]) -> Option<String> {
    let mut m = Map::new();
    for k in keys {
        m.insert(k.clone(), item.get(k)?.clone());
    }
    Some(format!("k:{}", Value::Object(m)))
}

fn list_kind_for(lists: Lists, path: &[String], items: &[Value]) -> ListKind {
    match lists(path, items) {
        ListKind::Map(keys) if items.iter().all(|i| item_key(i, &keys).is_some()) => ListKind::Map(keys),
        ListKind::Set if items.iter().all(|i| !i.is_object() && !i.is_array()) => ListKind::Set,
        _ => ListKind::Atomic,
    }
}

/// Leaf paths of a value, plus the paths of associative-list items. `apiVersion`, `kind` and
/// server-owned metadata are skipped.
pub fn leaves(v: &Value, lists: Lists) -> FieldSet {
    let mut out = FieldSet::new();
    if let Some(o) = v.as_object() {
        for (k, val) in o {
            match k.as_str() {
                "apiVersion" | "kind" => {}
                "metadata" => {
                    if let Some(m) = val.as_object() {
                        for mk in ["labels", "annotations", "finalizers", "ownerReferences"] {
                            if let Some(x) = m.get(mk) {
                                collect(x, &mut vec!["metadata".into(), mk.into()], &mut out, lists);
                            }
                        }
                    }
                }
                _ => collect(val, &mut vec![k.clone()], &mut out, lists),
            }
        }
    }
    out
}

fn collect(v: &Value, path: &mut Vec<String>, out: &mut FieldSet, lists: Lists) {
    match v {
        Value::Object(o) if !o.is_empty() => {
            for (k, val) in o {
                path.push(k.clone());
                collect(val, path, out, lists);
                path.pop();
            }
        }
        Value::Array(items) if !items.is_empty() => match list_kind_for(lists, path, items) {
            ListKind::Map(keys) => {
                for item in items {
                    let Some(seg) = item_key(item, &keys) else {
                        continue;
                    };
                    path.push(seg);
                    out.insert(path.clone());
                    collect(item, path, out, lists);
                    path.pop();
                }
            }
            ListKind::Set => {
                for item in items {
                    path.push(format!("v:{item}"));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            ListKind::Atomic => {
                out.insert(path.clone());
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

fn find_item(items: &[Value], seg: &str) -> Option<usize> {
    if let Some(k) = seg.strip_prefix("k:") {
        let want: Value = serde_json::from_str(k).ok()?;
        let want = want.as_object()?;
        return items
            .iter()
            .position(|i| want.iter().all(|(kk, vv)| i.get(kk) == Some(vv)));
    }
    let want: Value = serde_json::from_str(seg.strip_prefix("v:")?).ok()?;
    items.iter().position(|i| *i == want)
}

pub fn value_at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for p in path {
        cur = if is_item(p) {
            let items = cur.as_array()?;
            &items[find_item(items, p)?]
        } else {
            cur.get(p)?
        };
    }
    Some(cur)
}

pub fn remove_at(v: &mut Value, path: &[String]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for p in parent {
        let next = if is_item(p) {
            match cur.as_array_mut() {
                Some(items) => match find_item(items, p) {
                    Some(i) => &mut items[i],
                    None => return,
                },
                None => return,
            }
        } else {
            match cur.get_mut(p) {
                Some(n) => n,
                None => return,
            }
        };
        cur = next;
    }
    if is_item(last) {
        if let Some(items) = cur.as_array_mut() {
            if let Some(i) = find_item(items, last) {
                items.remove(i);
            }
        }
    } else if let Some(o) = cur.as_object_mut() {
        o.remove(last);
    }
}

/// Deep merge for apply: maps merge recursively, associative lists merge by key, sets union,
/// everything else replaces.
pub fn apply_merge(target: &mut Value, applied: &Value, path: &mut Vec<String>, lists: Lists) {
    match (target, applied) {
        (Value::Object(t), Value::Object(a)) => {
            for (k, v) in a {
                path.push(k.clone());
                match t.get_mut(k) {
                    Some(slot) if (slot.is_object() && v.is_object()) || (slot.is_array() && v.is_array()) => {
                        apply_merge(slot, v, path, lists)
                    }
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
                path.pop();
            }
        }
        (Value::Array(t), Value::Array(a)) => {
            let all: Vec<Value> = t.iter().chain(a.iter()).cloned().collect();
            match list_kind_for(lists, path, &all) {
                ListKind::Map(keys) => {
                    for item in a {
                        let Some(seg) = item_key(item, &keys) else {
                            continue;
                        };
                        match find_item(t, &seg) {
                            Some(i) => {
                                path.push(seg);
                                apply_merge(&mut t[i], item, path, lists);
                                path.pop();
                            }
                            None => t.push(item.clone()),
                        }
                    }
                }
                ListKind::Set => {
                    for item in a {
                        if !t.contains(item) {
                            t.push(item.clone());
                        }
                    }
                }
                ListKind::Atomic => *t = a.clone(),
            }
        }
        (t, a) => *t = a.clone(),
    }
}

pub fn encode_fields(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut cur = &mut root;
        for p in path {
            let key = if is_item(p) { p.clone() } else { format!("f:{p}") };
            let e = cur.entry(key).or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(m) = e else { break };
            cur = m;
        }
    }
    // An owned list item that also has owned fields gets the "." marker, as in FieldsV1.
    fn mark(node: &mut Map<String, Value>, path: &mut Vec<String>, set: &FieldSet) {
        for (k, v) in node.iter_mut() {
            let seg = k.strip_prefix("f:").unwrap_or(k).to_string();
            path.push(seg);
            if let Value::Object(child) = v {
                if !child.is_empty() && set.contains(path.as_slice()) {
                    child.insert(".".into(), json!({}));
                }
                mark(child, path, set);
            }
            path.pop();
        }
    }
    mark(&mut root, &mut vec![], set);
    Value::Object(root)
}

pub fn decode_fields(v: &Value) -> FieldSet {
    fn walk(v: &Value, path: &mut Vec<String>, out: &mut FieldSet) {
        let Some(o) = v.as_object() else { return };
        if (o.is_empty() || o.contains_key(".")) && !path.is_empty() {
            out.insert(path.clone());
        }
        for (k, val) in o {
            let seg = if let Some(f) = k.strip_prefix("f:") {
                f.to_string()
            } else if is_item(k) {
                k.clone()
            } else {
                continue;
            };
            path.push(seg);
            walk(val, path, out);
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    walk(v, &mut vec![], &mut out);
    out
}

/// One managedFields entry, decoded.
#[derive(Debug, Clone)]
pub struct Managed {
    pub manager: String,
    pub operation: String,
    pub subresource: String,
    pub api_version: String,
    pub time: String,
    pub fields: FieldSet,
}

pub fn read_managed(obj: &Value) -> Vec<Managed> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|e| Managed {
                    manager: e.get("manager").and_then(Value::as_str).unwrap_or("").to_string(),
                    operation: e
                        .get("operation")
                        .and_then(Value::as_str)
                        .unwrap_or("Update")
                        .to_string(),
                    subresource: e.get("subresource").and_then(Value::as_str).unwrap_or("").to_string(),
                    api_version: e.get("apiVersion").and_then(Value::as_str).unwrap_or("").to_string(),
                    time: e.get("time").and_then(Value::as_str).unwrap_or("").to_string(),
                    fields: e.get("fieldsV1").map(decode_fields).unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn write_managed(obj: &mut Value, entries: &[Managed]) {
    let arr: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": encode_fields(&e.fields),
            });
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if let Some(md) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if arr.is_empty() {
            md.remove("managedFields");
        } else {
            md.insert("managedFields".into(), Value::Array(arr));
        }
    }
}

/// Who writes, for managedFields.
pub struct Writer<'a> {
    pub manager: &'a str,
    pub api_version: &'a str,
    pub subresource: &'a str,
    pub time: &'a str,
}

/// Records an Update operation: fields it changed become the writer's and leave other managers.
pub fn track_update(old: Option<&Value>, new: &mut Value, w: &Writer, lists: Lists) {
    let mut entries = old.map(read_managed).unwrap_or_default();
    let new_leaves = leaves(new, lists);
    let old_leaves = old.map(|o| leaves(o, lists)).unwrap_or_default();
    let changed: FieldSet = new_leaves
        .iter()
        .filter(|p| !p.last().is_some_and(|s| is_item(s)) || old.and_then(|o| value_at(o, p)).is_none())
        .filter(|p| old.and_then(|o| value_at(o, p)) != value_at(new, p))
        .cloned()
        .collect();
    let removed: FieldSet = old_leaves.difference(&new_leaves).cloned().collect();
    for e in entries.iter_mut() {
        e.fields
            .retain(|p| !changed.contains(p) && !removed.contains(p) && new_leaves.contains(p));
    }
    if !changed.is_empty() {
        let mine = |e: &Managed| e.manager == w.manager && e.operation == "Update" && e.subresource == w.subresource;
        match entries.iter_mut().find(|e| mine(e)) {
            Some(e) => {
                e.fields.extend(changed);
                e.time = w.time.to_string();
                e.api_version = w.api_version.to_string();
            }
            None => entries.push(Managed {
                manager: w.manager.to_string(),
                operation: "Update".into(),
                subresource: w.subresource.to_string(),
                api_version: w.api_version.to_string(),
                time: w.time.to_string(),
                fields: changed,
            }),
        }
    }
    write_managed(new, &entries);
}

pub struct Conflict {
    pub manager: String,
    pub api_version: String,
    pub path: String,
}

/// A field path as the real server prints it in conflicts: `.spec.conditions[type="Ready"].status`.
pub fn dotted(p: &FieldPath) -> String {
    p.iter()
        .map(|s| {
            if let Some(k) = s.strip_prefix("k:") {
                let m: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
                let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("[{}]", parts.join(","))
            } else if let Some(v) = s.strip_prefix("v:") {
                format!("[={v}]")
            } else {
                format!(".{s}")
            }
        })
        .collect()
}

/// Whether `current` holds everything `applied` says: equal scalars, and for maps and lists
/// every applied entry matched, so that server-filled defaults inside an atomic list do not
/// count as a different value.
fn covers(current: &Value, applied: &Value) -> bool {
    match (current, applied) {
        (Value::Object(c), Value::Object(a)) => a.iter().all(|(k, av)| c.get(k).is_some_and(|cv| covers(cv, av))),
        (Value::Array(c), Value::Array(a)) => c.len() == a.len() && c.iter().zip(a).all(|(cv, av)| covers(cv, av)),
        _ => current == applied,
    }
}

/// Applies `applied` (already stripped of what this endpoint may not write) on top of `current`
/// for the writer. Returns the new object or the conflicts.
pub fn server_side_apply(
    current: &Value,
    applied: &Value,
    w: &Writer,
    force: bool,
    scope: &dyn Fn(&FieldPath) -> bool,
    lists: Lists,
) -> Result<Value, Vec<Conflict>> {
    let mut entries = read_managed(current);
    let applied_set: FieldSet = leaves(applied, lists).into_iter().filter(|p| scope(p)).collect();
    let mine = |e: &Managed| e.manager == w.manager && e.operation == "Apply" && e.subresource == w.subresource;
    let mut conflicts = vec![];
    let mut conflicted: BTreeMap<usize, FieldSet> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        if mine(e) {
            continue;
        }
        for p in applied_set.intersection(&e.fields) {
            if p.last().is_some_and(|s| is_item(s)) {
                // owning a list item is shared; its fields are checked one by one
                continue;
            }
            let same = match (value_at(current, p), value_at(applied, p)) {
                (Some(c), Some(a)) => covers(c, a),
                (c, a) => c == a,
            };
            if !same {
                conflicts.push(Conflict {
                    manager: e.manager.clone(),
                    api_version: e.api_version.clone(),
                    path: dotted(p),
                });
                conflicted.entry(i).or_default().insert(p.clone());
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    for (i, set) in conflicted {
        if let Some(e) = entries.get_mut(i) {
            e.fields.retain(|p| !set.contains(p));
        }
    }
    let previously_mine: FieldSet = entries
        .iter()
        .filter(|e| mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let others: FieldSet = entries
        .iter()
        .filter(|e| !mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let mut out = current.clone();
    // Fields this manager stops applying go, unless someone else owns them (or, for a list
    // item, anything inside it). Shallowest first: a removed item takes its fields along.
    let mut dropped: Vec<&FieldPath> = previously_mine.difference(&applied_set).collect();
    dropped.sort_by_key(|p| p.len());
    let mut removed: Vec<&FieldPath> = vec![];
    for p in dropped {
        if removed.iter().any(|r| p.starts_with(r)) || others.iter().any(|o| o.starts_with(p)) {
            continue;
        }
        remove_at(&mut out, p);
        removed.push(p);
    }
    // A map left empty by those removals goes too, as the apiserver drops a
    // field whose every owned child went (unless it is still applied or
    // another manager owns something under it).
    for p in &removed {
        let mut parent: Vec<String> = p.to_vec();
        while parent.len() > 1 {
            parent.pop();
            if parent.last().is_some_and(|s| is_item(s))
                || applied_set.iter().any(|a| a.starts_with(&parent))
                || others.iter().any(|o| o.starts_with(&parent))
            {
                break;
            }
            match value_at(&out, &parent) {
                Some(Value::Object(m)) if m.is_empty() => remove_at(&mut out, &parent),
                _ => break,
            }
        }
    }
    apply_merge(&mut out, applied, &mut vec![], lists);
    match entries.iter_mut().find(|e| mine(e)) {
        Some(e) => {
            e.fields = applied_set;
            e.time = w.time.to_string();
            e.api_version = w.api_version.to_string();
        }
        None => entries.push(Managed {
            manager: w.manager.to_string(),
            operation: "Apply".into(),
            subresource: w.subresource.to_string(),
            api_version: w.api_version.to_string(),
            time: w.time.to_string(),
            fields: applied_set,
        }),
    }
    write_managed(&mut out, &entries);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_patch_test_null_on_missing() {
        let mut d = json!({"metadata": {}});
        json_patch(&mut d, &json!([{"op": "test", "path": "/metadata/finalizers", "value": null}, {"op": "add", "path": "/metadata/finalizers", "value": ["a"]}])).unwrap();
        assert_eq!(d["metadata"]["finalizers"], json!(["a"]));
        json_patch(&mut d, &json!([{"op": "test", "path": "/metadata/finalizers/0", "value": "a"}, {"op": "remove", "path": "/metadata/finalizers/0"}])).unwrap();
        assert_eq!(d["metadata"]["finalizers"], json!([]));
        assert!(json_patch(
            &mut d,
            &json!([{"op": "test", "path": "/metadata/finalizers", "value": null}])
        )
        .is_err());
    }

    #[test]
    fn smp_merges_by_name() {
        let mut t = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}});
        strategic_merge(
            &mut t,
            &json!({"spec": {"containers": [{"name": "b", "image": "z"}, {"name": "a", "$patch": "delete"}]}}),
        );
        assert_eq!(t, json!({"spec": {"containers": [{"name": "b", "image": "z"}]}}));
    }

    fn w<'a>(m: &'a str) -> Writer<'a> {
        Writer {
            manager: m,
            api_version: "v1",
            subresource: "",
            time: "t",
        }
    }

    #[test]
    fn ssa_conflicts_and_force() {
        let mut cur = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "a"}, "spec": {"a": 1, "b": 2}});
        track_update(None, &mut cur, &w("other"), &builtin_lists);
        let all = |_: &FieldPath| true;
        let applied = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "a"}, "spec": {"a": 5}});
        let err = server_side_apply(&cur, &applied, &w("me"), false, &all, &builtin_lists)
            .err()
            .unwrap();
        assert_eq!(err[0].path, ".spec.a");
        let out = server_side_apply(&cur, &applied, &w("me"), true, &all, &builtin_lists)
            .ok()
            .unwrap();
        assert_eq!(out["spec"], json!({"a": 5, "b": 2}));
        // same value: shared ownership, no conflict
        let same = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "a"}, "spec": {"b": 2}});
        assert!(server_side_apply(&cur, &same, &w("me"), false, &all, &builtin_lists).is_ok());
    }

    #[test]
    fn ssa_a_nested_object_a_manager_stops_applying_goes_whole() {
        let all = |_: &FieldPath| true;
        let obj = |status: Value| json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "a"}, "status": status});
        let cur = obj(json!({}));
        let cur = server_side_apply(
            &cur,
            &obj(json!({"phase": "Active", "schema": "s"})),
            &w("main"),
            false,
            &all,
            &builtin_lists,
        )
        .ok()
        .unwrap();
        let moving = json!({"shard": "a", "moving": {"from": "a", "to": "b", "phase": "Copying"}});
        let cur = server_side_apply(&cur, &obj(moving), &w("place"), false, &all, &builtin_lists)
            .ok()
            .unwrap();
        let cur = server_side_apply(
            &cur,
            &obj(json!({"phase": "Active", "schema": "s"})),
            &w("main"),
            true,
            &all,
            &builtin_lists,
        )
        .ok()
        .unwrap();
        let done = json!({"shard": "b", "lastMove": {"result": "Succeeded"}});
        let out = server_side_apply(&cur, &obj(done), &w("place"), true, &all, &builtin_lists)
            .ok()
            .unwrap();
        assert_eq!(
            out["status"],
            json!({"phase": "Active", "schema": "s", "shard": "b", "lastMove": {"result": "Succeeded"}})
        );
    }

    #[test]
    fn ssa_associative_lists_are_shared_per_item() {
        let all = |_: &FieldPath| true;
        let cur = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "a"}, "status": {}});
        let a = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "a"}, "status": {"conditions": [{"type": "A", "status": "True"}]}});
        let b = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "a"}, "status": {"conditions": [{"type": "B", "status": "False"}]}});
        let cur = server_side_apply(&cur, &a, &w("ma"), false, &all, &builtin_lists)
            .ok()
            .unwrap();
        let cur = server_side_apply(&cur, &b, &w("mb"), false, &all, &builtin_lists)
            .ok()
            .unwrap();
        assert_eq!(cur["status"]["conditions"].as_array().unwrap().len(), 2);
        let mf = &cur["metadata"]["managedFields"][0]["fieldsV1"]["f:status"]["f:conditions"];
        assert!(mf.get("k:{\"type\":\"A\"}").is_some(), "{mf}");
        // mb changing A's status conflicts on that field only
        let b2 = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "a"}, "status": {"conditions": [{"type": "A", "status": "False"}, {"type": "B", "status": "False"}]}});
        let err = server_side_apply(&cur, &b2, &w("mb"), false, &all, &builtin_lists)
            .err()
            .unwrap();
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].path, ".status.conditions[type=\"A\"].status");
        // ma stops applying A: the item goes
        let none = json!({"apiVersion": "v1", "kind": "X", "metadata": {"name": "a"}});
        let cur = server_side_apply(&cur, &none, &w("ma"), false, &all, &builtin_lists)
            .ok()
            .unwrap();
        assert_eq!(cur["status"]["conditions"], json!([{"type": "B", "status": "False"}]));
        // the managedFields round-trip
        let decoded = decode_fields(&encode_fields(&leaves(&b2, &builtin_lists)));
        assert_eq!(decoded, leaves(&b2, &builtin_lists));
    }
}
