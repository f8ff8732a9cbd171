//! The Argo CD health checks (deploy/argocd/health/*.lua) run in a real Lua
//! 5.4 against sample objects, one per health state; and the argocd-cm
//! snippet carries exactly those scripts.
//!
//! Argo CD hands a script the object as the global `obj` (JSON null becomes
//! nil); here the sample's JSON is turned into a Lua table literal.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use support::tools::{self, ROOT};

/// A Lua expression for `v`.
fn lua_literal(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => lua_string(s),
        Value::Array(a) => format!("{{{}}}", a.iter().map(lua_literal).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("[{}] = {}", lua_string(k), lua_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn lua_string(s: &str) -> String {
    let mut out = String::from("\"");
    for b in s.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\{b:03}")),
        }
    }
    out.push('"');
    out
}

/// Runs `script` (a file under deploy/argocd/health/) with `obj`; returns
/// (status, message).
fn health(lua: &std::path::Path, script: &str, obj: &Value) -> (String, String) {
    let path = format!("{ROOT}/deploy/argocd/health/{script}");
    let program = format!(
        "obj = {}\nlocal hs = assert(loadfile({}))()\nio.write(hs.status, \"\\n\", hs.message or \"\")\n",
        lua_literal(obj),
        lua_string(&path)
    );
    let mut child = Command::new(lua)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run lua5.4");
    child.stdin.take().unwrap().write_all(program.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{script} failed on {obj}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, message) = text.split_once('\n').unwrap_or((&text, ""));
    (status.to_string(), message.to_string())
}

fn cond(t: &str, status: bool, reason: &str, message: &str) -> Value {
    json!({"type": t, "status": if status { "True" } else { "False" }, "reason": reason, "message": message, "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

fn tenant(generation: i64, status: Option<Value>) -> Value {
    let mut t = json!({"apiVersion": "tenancy.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": "acme", "generation": generation}, "spec": {"displayName": "Acme"}});
    if let Some(s) = status {
        t["status"] = s;
    }
    t
}

fn tstatus(phase: &str, conds: Vec<Value>) -> Value {
    json!({"phase": phase, "observedGeneration": 2, "schema": "tenant_acme", "conditions": conds})
}

#[test]
fn tenant_health_covers_every_state() {
    let Some(lua) = tools::lua() else { return };
    let ready = || cond("Ready", true, "Provisioned", "schema tenant_acme is ready");
    let db = || cond("DatabaseReady", true, "Converged", "converged");
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("no status yet", tenant(1, None), "Progressing", "Waiting"),
        (
            "active and ready",
            tenant(
                2,
                Some(tstatus(
                    "Active",
                    vec![ready(), db(), cond("MigrationsApplied", true, "UpToDate", "v3")],
                )),
            ),
            "Healthy",
            "Provisioned",
        ),
        (
            "suspended",
            tenant(
                2,
                Some(tstatus(
                    "Suspended",
                    vec![cond("Ready", true, "Suspended", "the tenant is suspended"), db()],
                )),
            ),
            "Suspended",
            "suspended",
        ),
        (
            "failed",
            tenant(
                2,
                Some(tstatus(
                    "Failed",
                    vec![
                        cond("Ready", false, "OwnershipConflict", "role exists"),
                        cond("DatabaseReady", false, "OwnershipConflict", "role exists"),
                    ],
                )),
            ),
            "Degraded",
            "OwnershipConflict",
        ),
        (
            "provisioning",
            tenant(
                2,
                Some(tstatus(
                    "Provisioning",
                    vec![cond("Ready", false, "DatabaseUnavailable", "cannot reach Postgres")],
                )),
            ),
            "Progressing",
            "DatabaseUnavailable",
        ),
        (
            "pending",
            tenant(2, Some(tstatus("Pending", vec![]))),
            "Progressing",
            "Pending",
        ),
        (
            "spec change not yet observed",
            tenant(3, Some(tstatus("Active", vec![ready(), db()]))),
            "Progressing",
            "generation 3",
        ),
        (
            "active but Postgres lost",
            tenant(
                2,
                Some(tstatus(
                    "Active",
                    vec![cond("Ready", false, "DatabaseUnavailable", "cannot reach Postgres")],
                )),
            ),
            "Degraded",
            "DatabaseUnavailable",
        ),
        (
            "a source secret missing",
            tenant(
                2,
                Some(tstatus(
                    "Active",
                    vec![
                        ready(),
                        db(),
                        cond("SecretsSealed", false, "SourceMissing", "Secret a/b is missing"),
                    ],
                )),
            ),
            "Degraded",
            "SourceMissing",
        ),
        (
            "a migration rolling out",
            tenant(
                2,
                Some(tstatus(
                    "Active",
                    vec![
                        ready(),
                        db(),
                        cond("MigrationsApplied", false, "RollingOut", "at 2 of 3"),
                    ],
                )),
            ),
            "Progressing",
            "RollingOut",
        ),
        (
            "a failed migration",
            tenant(
                2,
                Some(tstatus(
                    "Active",
                    vec![
                        ready(),
                        db(),
                        cond("MigrationsApplied", false, "MigrationFailed", "v3 failed"),
                    ],
                )),
            ),
            "Degraded",
            "MigrationFailed",
        ),
        (
            "no MigrationSet (yet)",
            tenant(
                2,
                Some(tstatus(
                    "Active",
                    vec![
                        ready(),
                        db(),
                        cond("MigrationsApplied", false, "MigrationSetNotFound", "no set"),
                    ],
                )),
            ),
            "Healthy",
            "Provisioned",
        ),
        (
            "deleting",
            tenant(
                2,
                Some(tstatus("Deleting", vec![cond("Ready", false, "Deleting", "dropping")])),
            ),
            "Progressing",
            "deleted",
        ),
    ];
    let mut deleting = tenant(2, Some(tstatus("Active", vec![ready()])));
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    let mut blocked = tenant(
        2,
        Some(tstatus(
            "Deleting",
            vec![
                cond("Ready", false, "Deleting", "the Tenant is being deleted"),
                cond(
                    "DeletionBlocked",
                    true,
                    "DeletionProtection",
                    "spec.deletionProtection is true",
                ),
            ],
        )),
    );
    blocked["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    let cases = cases.into_iter().chain([
        ("delete under way", deleting, "Progressing", "deleted"),
        (
            "delete blocked by protection",
            blocked,
            "Degraded",
            "DeletionProtection",
        ),
    ]);
    let mut seen = std::collections::BTreeSet::new();
    for (what, obj, want, msg) in cases {
        let (status, message) = health(&lua, "tenant.lua", &obj);
        assert_eq!(status, want, "{what}: message {message:?}");
        assert!(message.contains(msg), "{what}: message {message:?} lacks {msg:?}");
        seen.insert(status);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["Degraded", "Healthy", "Progressing", "Suspended"]
    );
}

#[test]
fn migration_set_health_covers_every_state() {
    let Some(lua) = tools::lua() else { return };
    let set = |generation: i64, status: Option<Value>| {
        let mut s = json!({"apiVersion": "tenancy.dev/v1alpha1", "kind": "MigrationSet", "metadata": {"name": "default", "generation": generation}, "spec": {"migrations": []}});
        if let Some(st) = status {
            s["status"] = st;
        }
        s
    };
    let st = |phase: &str, conds: Vec<Value>| json!({"phase": phase, "observedGeneration": 1, "latestVersion": 3, "conditions": conds});
    let not_paused = || cond("Paused", false, "NotPaused", "");
    for (what, obj, want, msg) in [
        ("no status", set(1, None), "Progressing", "Waiting"),
        (
            "complete",
            set(
                1,
                Some(st(
                    "Complete",
                    vec![
                        cond("Ready", true, "RolledOut", "every tenant at version 3"),
                        not_paused(),
                    ],
                )),
            ),
            "Healthy",
            "every tenant",
        ),
        (
            "rolling out",
            set(
                1,
                Some(st(
                    "Progressing",
                    vec![cond("Ready", false, "RollingOut", "2 of 5 at version 3"), not_paused()],
                )),
            ),
            "Progressing",
            "2 of 5",
        ),
        (
            "paused on a failure",
            set(
                1,
                Some(st(
                    "Paused",
                    vec![
                        cond("Ready", false, "MigrationFailed", "1 tenant(s) failed"),
                        cond("Paused", true, "MigrationFailed", "1 tenant(s) failed"),
                    ],
                )),
            ),
            "Degraded",
            "MigrationFailed",
        ),
        (
            "new generation",
            set(2, Some(st("Complete", vec![cond("Ready", true, "RolledOut", "done")]))),
            "Progressing",
            "generation 2",
        ),
    ] {
        let (status, message) = health(&lua, "migrationset.lua", &obj);
        assert_eq!(status, want, "{what}: message {message:?}");
        assert!(message.contains(msg), "{what}: message {message:?} lacks {msg:?}");
    }
}

#[test]
fn tenant_restore_health_covers_every_state() {
    let Some(lua) = tools::lua() else { return };
    let restore = |status: Option<Value>| {
        let mut r = json!({"apiVersion": "tenancy.dev/v1alpha1", "kind": "TenantRestore", "metadata": {"name": "acme-restore", "generation": 1}, "spec": {"tenant": "acme", "backup": "b-1"}});
        if let Some(st) = status {
            r["status"] = st;
        }
        r
    };
    for (what, obj, want, msg) in [
        ("no status", restore(None), "Progressing", "Waiting"),
        (
            "pending",
            restore(Some(json!({"phase": "Pending"}))),
            "Progressing",
            "Pending",
        ),
        (
            "running",
            restore(Some(json!({"phase": "Running", "message": "restoring 2 of 9 chunks"}))),
            "Progressing",
            "2 of 9",
        ),
        (
            "succeeded",
            restore(Some(json!({"phase": "Succeeded", "message": "restored backup b-1"}))),
            "Healthy",
            "restored",
        ),
        (
            "failed",
            restore(Some(
                json!({"phase": "Failed", "conditions": [cond("Failed", true, "DecryptFailed", "chunk 3 does not authenticate")]}),
            )),
            "Degraded",
            "chunk 3",
        ),
    ] {
        let (status, message) = health(&lua, "tenantrestore.lua", &obj);
        assert_eq!(status, want, "{what}: message {message:?}");
        assert!(message.contains(msg), "{what}: message {message:?} lacks {msg:?}");
    }
}

#[test]
fn the_argocd_cm_snippet_carries_the_scripts_verbatim() {
    let cm: Value =
        serde_yaml::from_str(&std::fs::read_to_string(format!("{ROOT}/deploy/argocd/argocd-cm-health.yaml")).unwrap())
            .unwrap();
    assert_eq!(cm["metadata"]["name"], "argocd-cm");
    for (kind, file) in [
        ("Tenant", "tenant.lua"),
        ("MigrationSet", "migrationset.lua"),
        ("TenantRestore", "tenantrestore.lua"),
    ] {
        let key = format!("resource.customizations.health.tenancy.dev_{kind}");
        let script = std::fs::read_to_string(format!("{ROOT}/deploy/argocd/health/{file}")).unwrap();
        assert_eq!(
            cm["data"][&key].as_str(),
            Some(script.as_str()),
            "{key} in deploy/argocd/argocd-cm-health.yaml differs from deploy/argocd/health/{file}"
        );
    }
}

#[test]
fn the_example_application_syncs_the_tenant_folder() {
    let app: Value =
        serde_yaml::from_str(&std::fs::read_to_string(format!("{ROOT}/deploy/argocd/application.yaml")).unwrap())
            .unwrap();
    assert_eq!(app["kind"], "Application");
    let path = app["spec"]["source"]["path"].as_str().unwrap();
    let dir = std::path::Path::new(ROOT).join(path);
    let manifests: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "yaml"))
        .collect();
    assert!(!manifests.is_empty(), "{path} has no manifests");
    for m in manifests {
        let v: Value = serde_yaml::from_str(&std::fs::read_to_string(m.path()).unwrap()).unwrap();
        assert_eq!(v["kind"], "Tenant", "{} is not a Tenant", m.path().display());
    }
}
