//! `Status` error bodies, formatted like the real API server's.

use serde_json::{json, Value};

/// One field-level cause of an `Invalid` error.
#[derive(Debug, Clone)]
pub struct Cause {
    pub reason: &'static str,
    pub field: String,
    /// The part after `field: ` in the real server's message, e.g. `Invalid value: 5: ...`.
    pub message: String,
}

impl Cause {
    pub fn invalid(field: &str, value: &Value, detail: &str) -> Cause {
        Cause {
            reason: "FieldValueInvalid",
            field: field.to_string(),
            message: format!("Invalid value: {}: {}", show_value(value), detail),
        }
    }
    pub fn required(field: &str, detail: &str) -> Cause {
        let message = if detail.is_empty() {
            "Required value".to_string()
        } else {
            format!("Required value: {detail}")
        };
        Cause {
            reason: "FieldValueRequired",
            field: field.to_string(),
            message,
        }
    }
    pub fn not_supported(field: &str, value: &Value, allowed: &[Value]) -> Cause {
        let list: Vec<String> = allowed.iter().map(show_value).collect();
        Cause {
            reason: "FieldValueNotSupported",
            field: field.to_string(),
            message: format!(
                "Unsupported value: {}: supported values: {}",
                show_value(value),
                list.join(", ")
            ),
        }
    }
    pub fn too_long(field: &str, max: u64) -> Cause {
        Cause {
            reason: "FieldValueTooLong",
            field: field.to_string(),
            message: format!("Too long: may not be more than {max} bytes"),
        }
    }
    pub fn too_many(field: &str, actual: usize, max: u64) -> Cause {
        Cause {
            reason: "FieldValueTooMany",
            field: field.to_string(),
            message: format!("Too many: {actual}: must have at most {max} items"),
        }
    }
    pub fn forbidden(field: &str, detail: &str) -> Cause {
        Cause {
            reason: "FieldValueForbidden",
            field: field.to_string(),
            message: format!("Forbidden: {detail}"),
        }
    }
    pub fn type_invalid(field: &str, value: &Value, detail: &str) -> Cause {
        Cause {
            reason: "FieldValueTypeInvalid",
            field: field.to_string(),
            message: format!("Invalid value: {}: {}", show_value(value), detail),
        }
    }
    /// `field: message` as in the real server's aggregated message; a root field prints as `<nil>`.
    pub fn full(&self) -> String {
        let f = if self.field.is_empty() { "<nil>" } else { &self.field };
        format!("{f}: {}", self.message)
    }
}

/// Formats a value the way apimachinery's field errors do (close enough: strings quoted, scalars bare).
pub fn show_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".to_string(),
        Value::Object(_) => "\"object\"".to_string(),
        Value::Array(_) => "\"array\"".to_string(),
    }
}

/// An error answered as a `Status` object.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

pub type ApiResult<T> = Result<T, ApiError>;

/// `resource.group` as the real server prints a qualified resource (`secrets` for the core group).
pub fn qualified(resource: &str, group: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }
    pub fn not_found(group: &str, resource: &str, name: &str) -> ApiError {
        ApiError {
            code: 404,
            reason: "NotFound",
            message: format!("{} {:?} not found", qualified(resource, group), name),
            details: Some(json!({"name": name, "group": group, "kind": resource})),
        }
    }
    pub fn already_exists(group: &str, resource: &str, name: &str) -> ApiError {
        ApiError {
            code: 409,
            reason: "AlreadyExists",
            message: format!("{} {:?} already exists", qualified(resource, group), name),
            details: Some(json!({"name": name, "group": group, "kind": resource})),
        }
    }
    pub fn conflict(group: &str, resource: &str, name: &str, why: &str) -> ApiError {
        ApiError {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {} {:?}: {}",
                qualified(resource, group),
                name,
                why
            ),
            details: Some(json!({"name": name, "group": group, "kind": resource})),
        }
    }
    pub fn stale(group: &str, resource: &str, name: &str) -> ApiError {
        ApiError::conflict(
            group,
            resource,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }
    pub fn invalid(group: &str, kind: &str, name: &str, causes: Vec<Cause>) -> ApiError {
        let qk = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let msg = if causes.len() == 1 {
            format!("{} {:?} is invalid: {}", qk, name, causes[0].full())
        } else {
            let all: Vec<String> = causes.iter().map(Cause::full).collect();
            format!("{} {:?} is invalid: [{}]", qk, name, all.join(", "))
        };
        let causes_json: Vec<Value> = causes
            .iter()
            .map(|c| {
                let mut o = json!({"reason": c.reason, "message": c.message});
                if !c.field.is_empty() {
                    o["field"] = json!(c.field);
                }
                o
            })
            .collect();
        ApiError {
            code: 422,
            reason: "Invalid",
            message: msg,
            details: Some(json!({"name": name, "group": group, "kind": kind, "causes": causes_json})),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }
    pub fn method_not_allowed(message: impl Into<String>) -> ApiError {
        ApiError::new(405, "MethodNotAllowed", message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(
            500,
            "InternalError",
            format!("Internal error occurred: {}", message.into()),
        )
    }
    pub fn expired(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }
    pub fn forbidden(group: &str, resource: &str, name: &str, why: &str) -> ApiError {
        ApiError {
            code: 403,
            reason: "Forbidden",
            message: format!("{} {:?} is forbidden: {}", qualified(resource, group), name, why),
            details: Some(json!({"name": name, "group": group, "kind": resource})),
        }
    }

    pub fn to_status(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        if self.reason.is_empty() {
            if let Some(o) = v.as_object_mut() {
                o.remove("reason");
            }
        }
        v
    }
}

/// A `Status` of success (returned by some deletes).
pub fn success_status(group: &str, resource: &str, name: &str, uid: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "group": group, "kind": resource, "uid": uid},
    })
}
