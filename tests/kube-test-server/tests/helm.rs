//! helm v3 against the server: install, list, upgrade, uninstall.
mod common;

use common::{fixture, stderr, stdout, TestServer};
use std::path::PathBuf;

/// helm from $HELM or PATH. Missing: a failure under CI, a skip (with a message) elsewhere.
fn helm() -> Option<PathBuf> {
    if let Ok(h) = std::env::var("HELM") {
        return Some(PathBuf::from(h));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|d| d.join("helm"))
        .find(|p| p.is_file());
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("helm not found (set HELM or install it with tests/kube-test-server/scripts/install-helm.sh)");
        }
        eprintln!(
            "SKIPPED: helm not found; install it with tests/kube-test-server/scripts/install-helm.sh or set HELM"
        );
    }
    found
}

#[test]
fn helm_install_list_upgrade_uninstall() {
    let Some(helm) = helm() else { return };
    let s = TestServer::start();
    let chart = fixture("chart");
    let o = s.helm(
        &helm,
        &[
            "install",
            "demo",
            &chart,
            "--namespace",
            "default",
            "--wait",
            "--timeout",
            "30s",
        ],
    );
    assert!(o.status.success(), "helm install: {}", stderr(&o));
    let o = s.helm(&helm, &["list", "--namespace", "default"]);
    assert!(
        stdout(&o).contains("demo") && stdout(&o).contains("deployed"),
        "{}",
        stdout(&o)
    );
    let out = s.kubectl_ok(&["get", "configmap", "demo-config", "-o", "jsonpath={.data.greeting}"]);
    assert_eq!(out, "hello");
    let out = s.kubectl_ok(&["get", "secret", "demo-secret", "-o", "jsonpath={.data.password}"]);
    assert_eq!(out, "czNjcmV0");
    s.kubectl_ok(&["get", "serviceaccount", "demo-sa"]);
    let o = s.helm(&helm, &["upgrade", "demo", &chart, "--set", "greeting=hi"]);
    assert!(o.status.success(), "helm upgrade: {}", stderr(&o));
    let out = s.kubectl_ok(&["get", "configmap", "demo-config", "-o", "jsonpath={.data.greeting}"]);
    assert_eq!(out, "hi");
    let o = s.helm(&helm, &["history", "demo"]);
    assert!(stdout(&o).contains("superseded"), "{}", stdout(&o));
    let o = s.helm(&helm, &["uninstall", "demo", "--wait"]);
    assert!(o.status.success(), "helm uninstall: {}", stderr(&o));
    let out = s.kubectl_ok(&["get", "configmaps,secrets,serviceaccounts", "-o", "name"]);
    assert!(!out.contains("demo"), "{out}");
    let o = s.helm(&helm, &["list", "-a"]);
    assert!(!stdout(&o).contains("demo"), "{}", stdout(&o));
}
