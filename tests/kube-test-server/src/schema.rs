//! Custom resource validation against a CRD's structural `openAPIV3Schema`:
//! pruning, defaulting, OpenAPI value validation and `x-kubernetes-validations` CEL rules.

use crate::status::Cause;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn truthy(schema: &Value, key: &str) -> bool {
    schema.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// Removes fields the schema does not declare (recording their paths), drops `null`s of
/// non-nullable fields, and applies `default`s. At the root, apiVersion/kind/metadata are kept.
pub fn prune_and_default(schema: &Value, value: &mut Value, path: &str, root: bool, unknown: &mut Vec<String>) {
    match value {
        Value::Object(obj) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let addl = schema.get("additionalProperties");
            let preserve = truthy(schema, "x-kubernetes-preserve-unknown-fields");
            let embedded = truthy(schema, "x-kubernetes-embedded-resource");
            let keys: Vec<String> = obj.keys().cloned().collect();
            for k in keys {
                if (root || embedded) && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let sub_schema = props.and_then(|p| p.get(&k)).or_else(|| addl.filter(|a| a.is_object()));
                match sub_schema {
                    Some(s) => {
                        if obj.get(&k).is_some_and(Value::is_null) && !truthy(s, "nullable") {
                            obj.remove(&k);
                            continue;
                        }
                        if let Some(v) = obj.get_mut(&k) {
                            prune_and_default(s, v, &child(path, &k), false, unknown);
                        }
                    }
                    None => {
                        if !(preserve || addl == Some(&Value::Bool(true))) {
                            obj.remove(&k);
                            unknown.push(child(path, &k));
                        }
                    }
                }
            }
            if let Some(props) = props {
                for (k, s) in props {
                    if obj.contains_key(k) || (root && k == "metadata") {
                        continue;
                    }
                    if let Some(d) = s.get("default") {
                        let mut d = d.clone();
                        let mut ignored = vec![];
                        prune_and_default(s, &mut d, &child(path, k), false, &mut ignored);
                        obj.insert(k.clone(), d);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = schema.get("items") {
                for (i, it) in items.iter_mut().enumerate() {
                    prune_and_default(is, it, &format!("{path}[{i}]"), false, unknown);
                }
            }
        }
        _ => {}
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) => {
            if n.is_i64() || n.is_u64() {
                "integer"
            } else {
                "number"
            }
        }
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_ok(want: &str, v: &Value) -> bool {
    match want {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "number" => v.is_number(),
        "integer" => v.as_f64().is_some_and(|f| f.fract() == 0.0),
        _ => true,
    }
}

fn num_str(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        Some(f) => format!("{f}"),
        None => v.to_string(),
    }
}

/// Validates `value` (already pruned and defaulted). `old` is the previous value at the same
/// path on updates, for transition rules.
pub fn validate(schema: &Value, value: &Value, old: Option<&Value>, path: &str, root: bool, causes: &mut Vec<Cause>) {
    if value.is_null() {
        if !truthy(schema, "nullable") && !root {
            causes.push(Cause::invalid(
                path,
                value,
                &format!(
                    "{path} in body must be of type {}: \"null\"",
                    schema.get("type").and_then(Value::as_str).unwrap_or("object")
                ),
            ));
        }
        return;
    }
    let int_or_string = truthy(schema, "x-kubernetes-int-or-string");
    if int_or_string {
        if !(value.is_string() || type_ok("integer", value)) {
            causes.push(Cause::type_invalid(
                path,
                &Value::String(type_name(value).into()),
                &format!("{path} in body must be of type integer,string: {:?}", type_name(value)),
            ));
            return;
        }
    } else if let Some(t) = schema.get("type").and_then(Value::as_str) {
        if !type_ok(t, value) {
            let tn = type_name(value);
            causes.push(Cause::type_invalid(
                path,
                &Value::String(tn.into()),
                &format!("{path} in body must be of type {t}: {tn:?}"),
            ));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            causes.push(Cause::not_supported(path, value, allowed));
        }
    }
    match value {
        Value::String(s) => {
            let n = s.chars().count() as u64;
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
                if n > max {
                    causes.push(Cause::too_long(path, max));
                }
            }
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
                if n < min {
                    causes.push(Cause::invalid(
                        path,
                        value,
                        &format!("{path} in body should be at least {min} chars long"),
                    ));
                }
            }
            if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
                match regex::Regex::new(p) {
                    Ok(re) if !re.is_match(s) => {
                        causes.push(Cause::invalid(
                            path,
                            value,
                            &format!("{path} in body should match '{p}'"),
                        ));
                    }
                    _ => {}
                }
            }
            if let Some(f) = schema.get("format").and_then(Value::as_str) {
                let ok = match f {
                    "date-time" => chrono::DateTime::parse_from_rfc3339(s).is_ok(),
                    "date" => chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok(),
                    "uuid" => regex::Regex::new(
                        "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
                    )
                    .map(|r| r.is_match(s))
                    .unwrap_or(true),
                    _ => true,
                };
                if !ok {
                    causes.push(Cause::type_invalid(
                        path,
                        value,
                        &format!("{path} in body must be of type {f}: {s:?}"),
                    ));
                }
            }
        }
        Value::Number(_) => {
            let x = value.as_f64().unwrap_or(0.0);
            if let Some(min) = schema.get("minimum").filter(|m| m.is_number()) {
                let m = min.as_f64().unwrap_or(f64::MIN);
                if truthy(schema, "exclusiveMinimum") {
                    if x <= m {
                        causes.push(Cause::invalid(
                            path,
                            value,
                            &format!("{path} in body should be greater than {}", num_str(min)),
                        ));
                    }
                } else if x < m {
                    causes.push(Cause::invalid(
                        path,
                        value,
                        &format!("{path} in body should be greater than or equal to {}", num_str(min)),
                    ));
                }
            }
            if let Some(max) = schema.get("maximum").filter(|m| m.is_number()) {
                let m = max.as_f64().unwrap_or(f64::MAX);
                if truthy(schema, "exclusiveMaximum") {
                    if x >= m {
                        causes.push(Cause::invalid(
                            path,
                            value,
                            &format!("{path} in body should be less than {}", num_str(max)),
                        ));
                    }
                } else if x > m {
                    causes.push(Cause::invalid(
                        path,
                        value,
                        &format!("{path} in body should be less than or equal to {}", num_str(max)),
                    ));
                }
            }
            if let Some(mo) = schema.get("multipleOf").and_then(Value::as_f64) {
                if mo != 0.0 && (x / mo).fract() != 0.0 {
                    causes.push(Cause::invalid(
                        path,
                        value,
                        &format!(
                            "{path} in body should be a multiple of {}",
                            num_str(&schema["multipleOf"])
                        ),
                    ));
                }
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
                if items.len() as u64 > max {
                    causes.push(Cause::too_many(path, items.len(), max));
                }
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64) {
                if (items.len() as u64) < min {
                    causes.push(Cause::invalid(
                        path,
                        value,
                        &format!("{path} in body should have at least {min} items"),
                    ));
                }
            }
            let set_like = truthy(schema, "uniqueItems")
                || schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("set");
            if set_like {
                for (i, it) in items.iter().enumerate() {
                    if items[..i].contains(it) {
                        causes.push(Cause {
                            reason: "FieldValueDuplicate",
                            field: format!("{path}[{i}]"),
                            message: format!("Duplicate value: {}", crate::status::show_value(it)),
                        });
                    }
                }
            }
            if let Some(is) = schema.get("items") {
                for (i, it) in items.iter().enumerate() {
                    validate(is, it, None, &format!("{path}[{i}]"), false, causes);
                }
            }
        }
        Value::Object(obj) => {
            if let Some(req) = schema.get("required").and_then(Value::as_array) {
                for r in req.iter().filter_map(Value::as_str) {
                    if root && r == "metadata" {
                        continue;
                    }
                    if !obj.contains_key(r) {
                        causes.push(Cause::required(&child(path, r), ""));
                    }
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let addl = schema.get("additionalProperties").filter(|a| a.is_object());
            for (k, v) in obj {
                if root && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(s) = props.and_then(|p| p.get(k)).or(addl) {
                    validate(s, v, old.and_then(|o| o.get(k)), &child(path, k), false, causes);
                }
            }
            if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64) {
                if obj.len() as u64 > max {
                    causes.push(Cause::too_many(path, obj.len(), max));
                }
            }
        }
        _ => {}
    }
    if let Some(rules) = schema.get("x-kubernetes-validations").and_then(Value::as_array) {
        for rule in rules {
            run_rule(rule, value, old, path, root, causes);
        }
    }
}

/// The kind of the list at `path` per the schema's `x-kubernetes-list-type`; metadata lists
/// follow the built-in rules.
pub fn list_kind(schema: &Value, path: &[String], items: &[Value]) -> crate::patch::ListKind {
    use crate::patch::ListKind;
    if path.first().map(String::as_str) == Some("metadata") {
        return crate::patch::builtin_lists(path, items);
    }
    let mut node = schema;
    for seg in path {
        let next = if seg.starts_with("k:") || seg.starts_with("v:") {
            node.get("items")
        } else {
            node.get("properties")
                .and_then(|p| p.get(seg))
                .or_else(|| node.get("additionalProperties").filter(|a| a.is_object()))
        };
        match next {
            Some(n) => node = n,
            None => return ListKind::Atomic,
        }
    }
    match node.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("map") => ListKind::Map(
            node.get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|k| k.as_str().map(str::to_string)).collect())
                .unwrap_or_default(),
        ),
        Some("set") => ListKind::Set,
        _ => ListKind::Atomic,
    }
}

/// Converts JSON to a CEL value (integers as `int`, as the apiserver does for `type: integer`).
pub fn to_cel(v: &Value) -> cel_interpreter::Value {
    use cel_interpreter::Value as C;
    match v {
        Value::Null => C::Null,
        Value::Bool(b) => C::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                C::Int(i)
            } else if let Some(u) = n.as_u64() {
                C::UInt(u)
            } else {
                C::Float(n.as_f64().unwrap_or(0.0))
            }
        }
        Value::String(s) => C::String(Arc::new(s.clone())),
        Value::Array(a) => C::List(Arc::new(a.iter().map(to_cel).collect())),
        Value::Object(o) => {
            let m: HashMap<String, cel_interpreter::Value> = o.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            C::Map(m.into())
        }
    }
}

/// At the root, CEL sees only `metadata.name` and `metadata.generateName`, as on the real server.
fn root_view(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        let mut md = Map::new();
        if let Some(m) = o.get("metadata") {
            for k in ["name", "generateName"] {
                if let Some(x) = m.get(k) {
                    md.insert(k.to_string(), x.clone());
                }
            }
        }
        o.insert("metadata".into(), Value::Object(md));
    }
    v
}

fn run_rule(rule: &Value, value: &Value, old: Option<&Value>, path: &str, root: bool, causes: &mut Vec<Cause>) {
    let Some(expr) = rule.get("rule").and_then(Value::as_str) else {
        return;
    };
    let transition = expr.contains("oldSelf");
    if transition && old.is_none() {
        return;
    }
    let (selfv, oldv) = if root {
        (root_view(value), old.map(root_view))
    } else {
        (value.clone(), old.cloned())
    };
    let mut field = path.to_string();
    if let Some(fp) = rule.get("fieldPath").and_then(Value::as_str) {
        let fp = fp.trim_start_matches('.');
        field = child(path, fp);
    }
    let shown = Value::String(type_name(value).to_string());
    let reason = match rule.get("reason").and_then(Value::as_str) {
        Some("FieldValueForbidden") => "FieldValueForbidden",
        Some("FieldValueRequired") => "FieldValueRequired",
        Some("FieldValueDuplicate") => "FieldValueDuplicate",
        _ => "FieldValueInvalid",
    };
    let mut ctx = cel_interpreter::Context::default();
    ctx.add_variable_from_value("self", to_cel(&selfv));
    if let Some(o) = &oldv {
        ctx.add_variable_from_value("oldSelf", to_cel(o));
    }
    let program = match cel_interpreter::Program::compile(expr) {
        Ok(p) => p,
        Err(e) => {
            // The real server would have refused the CRD; this CEL dialect may simply lack a
            // Kubernetes extension. Skip the rule rather than refuse every object.
            eprintln!("kube-test-server: skipping CEL rule {expr:?} at {path:?}: it does not compile here: {e}");
            return;
        }
    };
    let result = program.execute(&ctx);
    if let Err(
        e @ (cel_interpreter::ExecutionError::UndeclaredReference(_)
        | cel_interpreter::ExecutionError::NotSupportedAsMethod { .. }
        | cel_interpreter::ExecutionError::UnsupportedFunctionCallIdentifierType(_)),
    ) = &result
    {
        eprintln!("kube-test-server: skipping CEL rule {expr:?} at {path:?}: unsupported here: {e}");
        return;
    }
    let result = result.map_err(|e| format!("{e} evaluating rule: {expr}"));
    let detail = match result {
        Ok(cel_interpreter::Value::Bool(true)) => return,
        Ok(cel_interpreter::Value::Bool(false)) => {
            let mut msg = rule
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| format!("failed rule: {expr}"));
            if let Some(me) = rule.get("messageExpression").and_then(Value::as_str) {
                if let Ok(p) = cel_interpreter::Program::compile(me) {
                    if let Ok(cel_interpreter::Value::String(s)) = p.execute(&ctx) {
                        msg = s.to_string();
                    }
                }
            }
            msg
        }
        Ok(other) => format!("rule did not evaluate to a bool: {other:?} evaluating rule: {expr}"),
        Err(e) => e,
    };
    let mut c = Cause::invalid(&field, &shown, &detail);
    c.reason = reason;
    if reason != "FieldValueInvalid" {
        c.message = match reason {
            "FieldValueForbidden" => format!("Forbidden: {detail}"),
            "FieldValueRequired" => format!("Required value: {detail}"),
            _ => format!("Duplicate value: {}: {detail}", crate::status::show_value(&shown)),
        };
    }
    causes.push(c);
}

/// The DNS-1123 subdomain check the apiserver applies to most object names.
pub fn name_causes(rule: crate::resources::NameRule, name: &str) -> Vec<Cause> {
    use crate::resources::NameRule::*;
    let v = Value::String(name.to_string());
    let mut out = vec![];
    match rule {
        Dns1123Subdomain => {
            if name.len() > 253 {
                out.push(Cause::invalid(
                    "metadata.name",
                    &v,
                    "must be no more than 253 characters",
                ));
            }
            let re = regex::Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$").ok();
            if !re.is_some_and(|r| r.is_match(name)) {
                out.push(Cause::invalid("metadata.name", &v, "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"));
            }
        }
        Dns1123Label => {
            if name.len() > 63 {
                out.push(Cause::invalid(
                    "metadata.name",
                    &v,
                    "must be no more than 63 characters",
                ));
            }
            let re = regex::Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$").ok();
            if !re.is_some_and(|r| r.is_match(name)) {
                out.push(Cause::invalid("metadata.name", &v, "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"));
            }
        }
        Dns1035Label => {
            if name.len() > 63 {
                out.push(Cause::invalid(
                    "metadata.name",
                    &v,
                    "must be no more than 63 characters",
                ));
            }
            let re = regex::Regex::new(r"^[a-z]([-a-z0-9]*[a-z0-9])?$").ok();
            if !re.is_some_and(|r| r.is_match(name)) {
                out.push(Cause::invalid("metadata.name", &v, "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"));
            }
        }
        PathSegment => {
            if name == "." || name == ".." || name.contains('/') || name.contains('%') {
                out.push(Cause::invalid(
                    "metadata.name",
                    &v,
                    "may not contain '/' or '%' and may not be '.' or '..'",
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "x-kubernetes-validations": [{"rule": "self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 40", "message": "bad name", "fieldPath": ".metadata.name"}],
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["state"],
                    "properties": {
                        "state": {"type": "string", "enum": ["Active", "Suspended"]},
                        "limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 20},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "port": {"x-kubernetes-int-or-string": true},
                        "immutable": {"type": "string", "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "is immutable"}]},
                        "hasCheck": {"type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-validations": [{"rule": "has(self.a) && self.a.startsWith('x')", "message": "need a"}]}
                    }
                }
            }
        })
    }

    fn run(obj: &mut Value, old: Option<&Value>) -> (Vec<String>, Vec<String>) {
        let s = schema();
        let mut unknown = vec![];
        prune_and_default(&s, obj, "", true, &mut unknown);
        let mut causes = vec![];
        validate(&s, obj, old, "", true, &mut causes);
        (unknown, causes.iter().map(Cause::full).collect())
    }

    #[test]
    fn prune_default_validate() {
        let mut o = json!({"apiVersion": "x/v1", "kind": "T", "metadata": {"name": "ok"}, "spec": {"state": "Active", "junk": 1, "free": {"a": 1}, "port": "http"}});
        let (unknown, causes) = run(&mut o, None);
        assert_eq!(unknown, vec!["spec.junk".to_string()]);
        assert!(causes.is_empty(), "{causes:?}");
        assert_eq!(o["spec"]["limit"], json!(20));
        assert_eq!(o["spec"]["free"]["a"], json!(1));
    }

    #[test]
    fn errors() {
        let mut o =
            json!({"metadata": {"name": "Bad_Name"}, "spec": {"state": "Nope", "limit": 5000, "hasCheck": {"a": "y"}}});
        let (_, causes) = run(&mut o, None);
        assert!(
            causes.contains(
                &"spec.limit: Invalid value: 5000: spec.limit in body should be less than or equal to 1000".to_string()
            ),
            "{causes:?}"
        );
        assert!(
            causes.contains(
                &"spec.state: Unsupported value: \"Nope\": supported values: \"Active\", \"Suspended\"".to_string()
            ),
            "{causes:?}"
        );
        assert!(
            causes.contains(&"metadata.name: Invalid value: \"object\": bad name".to_string()),
            "{causes:?}"
        );
        assert!(
            causes.contains(&"spec.hasCheck: Invalid value: \"object\": need a".to_string()),
            "{causes:?}"
        );
        let mut o = json!({"metadata": {"name": "x"}, "spec": {}});
        let (_, causes) = run(&mut o, None);
        assert_eq!(causes, vec!["spec.state: Required value".to_string()]);
    }

    #[test]
    fn cel_dialect() {
        let v = json!({"a": "abc", "n": 3, "xs": [1, 2, 3], "m": {"k": "v"}});
        for (rule, want) in [
            (
                "self.a.startsWith('ab') && self.a.endsWith('c') && self.a.contains('b')",
                true,
            ),
            ("size(self.a) == 3 && self.a.size() == 3", true),
            ("self.a.matches('^[a-c]+$')", true),
            ("has(self.m.k) && !has(self.m.z)", true),
            ("self.xs.all(x, x > 0) && self.xs.exists(x, x == 2)", true),
            ("self.xs.filter(x, x > 1).size() == 2", true),
            ("self.n > 5 ? false : true", true),
            ("self.n in [1, 2]", false),
            // Kubernetes CEL libraries this dialect lacks: skipped, not failed
            ("isURL(self.a)", true),
            ("self.a.lowerAscii() == 'abc'", true),
        ] {
            let mut causes = vec![];
            let schema = json!({"type": "object", "x-kubernetes-validations": [{"rule": rule}]});
            validate(&schema, &v, None, "spec", false, &mut causes);
            assert_eq!(
                causes.is_empty(),
                want,
                "{rule}: {:?}",
                causes.iter().map(Cause::full).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn transition_rule() {
        let old = json!({"metadata": {"name": "x"}, "spec": {"state": "Active", "immutable": "a"}});
        let mut o = json!({"metadata": {"name": "x"}, "spec": {"state": "Active", "immutable": "b"}});
        let (_, causes) = run(&mut o, Some(&old));
        assert_eq!(
            causes,
            vec!["spec.immutable: Invalid value: \"string\": is immutable".to_string()]
        );
    }
}
