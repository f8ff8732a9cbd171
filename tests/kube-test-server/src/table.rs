//! `as=Table` responses: printer columns, simple JSONPath, human-readable ages.

use crate::resources::{PrinterColumn, ResourceType};
use serde_json::{json, Value};

/// Evaluates the simple JSONPath subset used by printer columns.
pub fn jsonpath(obj: &Value, path: &str) -> Vec<Value> {
    let p = path.trim();
    let p = p.strip_prefix('{').and_then(|x| x.strip_suffix('}')).unwrap_or(p);
    let p = p.strip_prefix('$').unwrap_or(p);
    let mut cur = vec![obj.clone()];
    let chars: Vec<char> = p.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '.' => {
                i += 1;
                let start = i;
                while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                    i += 1;
                }
                let key: String = chars[start..i].iter().collect();
                if key.is_empty() {
                    continue;
                }
                cur = cur.iter().filter_map(|v| v.get(&key).cloned()).collect();
            }
            '[' => {
                let start = i + 1;
                let mut depth = 0;
                while i < chars.len() {
                    if chars[i] == '[' {
                        depth += 1;
                    } else if chars[i] == ']' {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    i += 1;
                }
                let inner: String = chars[start..i.min(chars.len())].iter().collect();
                i += 1;
                cur = apply_bracket(&cur, inner.trim());
            }
            _ => {
                // bare leading key
                let start = i;
                while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                    i += 1;
                }
                let key: String = chars[start..i].iter().collect();
                cur = cur.iter().filter_map(|v| v.get(&key).cloned()).collect();
            }
        }
    }
    cur
}

fn apply_bracket(cur: &[Value], inner: &str) -> Vec<Value> {
    if inner == "*" {
        return cur
            .iter()
            .flat_map(|v| match v {
                Value::Array(a) => a.clone(),
                Value::Object(o) => o.values().cloned().collect(),
                _ => vec![],
            })
            .collect();
    }
    if let Some(filter) = inner.strip_prefix("?(").and_then(|x| x.strip_suffix(')')) {
        // @.field==value or @.field!=value
        let (lhs, eq, rhs) = if let Some((l, r)) = filter.split_once("!=") {
            (l, false, r)
        } else if let Some((l, r)) = filter.split_once("==") {
            (l, true, r)
        } else {
            return vec![];
        };
        let field = lhs.trim().trim_start_matches('@');
        let want = rhs.trim().trim_matches('"').trim_matches('\'');
        return cur
            .iter()
            .filter_map(Value::as_array)
            .flat_map(|a| a.iter())
            .filter(|item| {
                let got = jsonpath(item, field);
                let s = got.first().map(|g| match g {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                (s.as_deref() == Some(want)) == eq
            })
            .cloned()
            .collect();
    }
    if let Ok(idx) = inner.parse::<i64>() {
        return cur
            .iter()
            .filter_map(|v| {
                let a = v.as_array()?;
                let i = if idx < 0 { a.len() as i64 + idx } else { idx };
                a.get(usize::try_from(i).ok()?).cloned()
            })
            .collect();
    }
    let key = inner.trim_matches('\'').trim_matches('"');
    cur.iter().filter_map(|v| v.get(key).cloned()).collect()
}

/// Kubernetes' `duration.HumanDuration`.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 60 * 2 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{}h", hours / 24, h)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{}d", hours / 24 / 365, dy)
        };
    }
    format!("{}y", hours / 24 / 365)
}

fn age(ts: &str) -> Value {
    match chrono::DateTime::parse_from_rfc3339(ts) {
        Ok(t) => json!(human_duration(
            (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds()
        )),
        Err(_) => json!("<unknown>"),
    }
}

fn cell(col: &PrinterColumn, obj: &Value) -> Value {
    let results = jsonpath(obj, &col.json_path);
    let Some(v) = results.into_iter().next() else {
        return Value::Null;
    };
    match col.type_.as_str() {
        "date" => match v.as_str() {
            Some(s) => age(s),
            None => Value::Null,
        },
        "integer" => v.as_i64().map(|i| json!(i)).unwrap_or(Value::Null),
        "number" => v.as_f64().map(|f| json!(f)).unwrap_or(Value::Null),
        "boolean" => v.as_bool().map(|b| json!(b)).unwrap_or(Value::Null),
        _ => match v {
            Value::String(s) => json!(s),
            Value::Null => Value::Null,
            other => json!(other.to_string()),
        },
    }
}

fn column_def(name: &str, type_: &str, format: &str, description: &str, priority: i64) -> Value {
    json!({"name": name, "type": type_, "format": format, "description": description, "priority": priority})
}

/// Column definitions and a cell function for a kind at a version.
fn columns(rt: &ResourceType, version: &str) -> (Vec<Value>, Vec<PrinterColumn>) {
    let name_col = column_def(
        "Name",
        "string",
        "name",
        "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
        0,
    );
    let age_pc = PrinterColumn {
        name: "Age".into(),
        type_: "date".into(),
        format: String::new(),
        description: "CreationTimestamp is a timestamp representing the server time when this object was created."
            .into(),
        priority: 0,
        json_path: ".metadata.creationTimestamp".into(),
    };
    let pcs: Vec<PrinterColumn> = if rt.builtin {
        let mut v = vec![];
        let pc = |n: &str, t: &str, p: &str| PrinterColumn {
            name: n.into(),
            type_: t.into(),
            format: String::new(),
            description: String::new(),
            priority: 0,
            json_path: p.into(),
        };
        match (rt.group.as_str(), rt.plural.as_str()) {
            ("", "secrets") => v.push(pc("Type", "string", ".type")),
            ("", "namespaces") => v.push(pc("Status", "string", ".status.phase")),
            ("", "services") => {
                v.push(pc("Type", "string", ".spec.type"));
                v.push(pc("Cluster-IP", "string", ".spec.clusterIP"));
            }
            ("batch", "cronjobs") => {
                v.push(pc("Schedule", "string", ".spec.schedule"));
                v.push(pc("Suspend", "boolean", ".spec.suspend"));
            }
            ("apiextensions.k8s.io", "customresourcedefinitions") => {
                return (
                    vec![name_col, column_def("Created At", "date", "", "", 0)],
                    vec![pc("Created At", "string", ".metadata.creationTimestamp")],
                );
            }
            _ => {}
        }
        v.push(age_pc);
        v
    } else {
        rt.version(version)
            .map(|v| v.printer_columns.clone())
            .unwrap_or_else(|| vec![age_pc])
    };
    let mut defs = vec![name_col];
    for c in &pcs {
        defs.push(column_def(&c.name, &c.type_, &c.format, &c.description, c.priority));
    }
    (defs, pcs)
}

fn row(obj: &Value, pcs: &[PrinterColumn], include: &str, secrets_data: bool) -> Value {
    let mut cells = vec![obj.pointer("/metadata/name").cloned().unwrap_or(Value::Null)];
    for c in pcs {
        cells.push(cell(c, obj));
    }
    if secrets_data {
        // Secrets' DATA column (count of keys), inserted before Age.
        let n = obj.get("data").and_then(Value::as_object).map(|m| m.len()).unwrap_or(0);
        let at = cells.len() - 1;
        cells.insert(at, json!(n));
    }
    let object = match include {
        "None" => Value::Null,
        "Object" => obj.clone(),
        _ => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
        }),
    };
    let mut r = json!({"cells": cells});
    if !object.is_null() {
        r["object"] = object;
    }
    r
}

/// Builds a `meta.k8s.io/v1` Table from objects.
pub fn table(rt: &ResourceType, version: &str, objs: &[Value], list_meta: Value, include: &str) -> Value {
    let (mut defs, pcs) = columns(rt, version);
    let secrets = rt.builtin && rt.group.is_empty() && rt.plural == "secrets";
    if secrets {
        let at = defs.len() - 1;
        defs.insert(at, column_def("Data", "string", "", "", 0));
    }
    let rows: Vec<Value> = objs.iter().map(|o| row(o, &pcs, include, secrets)).collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": defs,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let o = json!({"status": {"phase": "Active", "conditions": [{"type": "A", "status": "False"}, {"type": "Ready", "status": "True"}]}});
        assert_eq!(jsonpath(&o, ".status.phase"), vec![json!("Active")]);
        assert_eq!(
            jsonpath(&o, ".status.conditions[?(@.type==\"Ready\")].status"),
            vec![json!("True")]
        );
        assert_eq!(jsonpath(&o, ".status.conditions[0].type"), vec![json!("A")]);
        assert!(jsonpath(&o, ".status.nope").is_empty());
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(3600 * 5 + 60), "5h1m");
        assert_eq!(human_duration(86400 * 3), "3d");
    }
}
