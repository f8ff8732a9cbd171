//! External tools some suites need (helm, kubernetes-validate, lua5.4):
//! found on PATH or under the project's `.tools/` (scripts/setup.sh puts
//! them there). Missing: a failure when `CI` is set, else a skip with a
//! message saying how to install it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");
pub const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/tenant-operator");

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// `var`, then PATH, then `fallbacks`; None (a skip) unless `CI` is set.
pub fn find(name: &str, var: &str, fallbacks: &[&str], install: &str) -> Option<PathBuf> {
    let found = std::env::var_os(var)
        .map(PathBuf::from)
        .or_else(|| on_path(name))
        .or_else(|| fallbacks.iter().map(|f| Path::new(ROOT).join(f)).find(|p| p.is_file()));
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("{name} not found (set {var} or {install})");
        }
        eprintln!("SKIPPED: {name} not found; {install} or set {var}");
    }
    found
}

pub fn helm() -> Option<PathBuf> {
    find("helm", "HELM", &[".tools/bin/helm"], "run scripts/setup.sh")
}

pub fn kubernetes_validate() -> Option<PathBuf> {
    find(
        "kubernetes-validate",
        "KUBERNETES_VALIDATE",
        &[".tools/k8s-validate-venv/bin/kubernetes-validate"],
        "run scripts/setup.sh",
    )
}

pub fn lua() -> Option<PathBuf> {
    find(
        "lua5.4",
        "LUA",
        &[],
        "run scripts/setup.sh (Debian: apt-get install lua5.4)",
    )
}

pub fn run(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `helm template tenant-operator <chart> -n tenant-system <extra>`: stdout.
pub fn render(helm: &Path, extra: &[&str]) -> String {
    let mut args = vec!["template", "tenant-operator", CHART, "--namespace", "tenant-system"];
    args.extend_from_slice(extra);
    let o = run(helm, &args);
    assert!(o.status.success(), "helm template {}: {}", extra.join(" "), text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The documents of a multi-document YAML stream (empty ones dropped).
pub fn documents(yaml: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|d| serde_json::Value::deserialize(d).ok())
        .filter(|v| !v.is_null())
        .collect()
}

/// The first document of `kind` named `name` (any name when None).
pub fn find_doc<'a>(docs: &'a [serde_json::Value], kind: &str, name: Option<&str>) -> Option<&'a serde_json::Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && name.is_none_or(|n| d["metadata"]["name"] == n))
}
