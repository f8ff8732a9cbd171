//! The binary's interface and wire details checked with raw HTTP: discovery fallbacks,
//! tables, protobuf negotiation, watch semantics (410 in-stream, bookmarks, timeouts).
mod common;

use common::TestServer;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

struct Resp {
    status: u16,
    headers: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    /// Newline-delimited watch events (chunk framing removed).
    fn events(&self) -> Vec<Value> {
        self.body
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn dechunk(raw: &str) -> String {
    let mut out = String::new();
    let mut rest = raw;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

fn http(url: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let host = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Resp {
        status,
        headers: head.to_string(),
        body,
    }
}

const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";

#[test]
fn binary_writes_kubeconfig_prints_ready_line_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kc");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kube-test-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--quiet",
            "--kubeconfig",
            kc.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("bad ready line {line:?}"))
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"));
    let config = std::fs::read_to_string(&kc).unwrap();
    assert!(config.contains(&format!("server: {url}")), "{config}");
    let out = Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
        .env("KUBECONFIG", &kc)
        .env("KUBECACHEDIR", dir.path().join("cache"))
        .args(["get", "namespaces", "-o", "name"])
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&out.stdout);
    for ns in ["namespace/default", "namespace/kube-system", "namespace/kube-public"] {
        assert!(names.contains(ns), "{names}");
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert!(status.success(), "exit on SIGTERM: {status:?}");
}

#[test]
fn discovery_answers_plain_json_to_aggregated_requests() {
    let s = TestServer::start();
    let r = http(&s.url, "GET", "/apis", &[("Accept", AGGREGATED)], "");
    assert_eq!(r.status, 200);
    assert!(
        r.headers
            .to_ascii_lowercase()
            .contains("content-type: application/json\r\n")
            || r.headers
                .to_ascii_lowercase()
                .ends_with("content-type: application/json")
    );
    assert_eq!(r.json()["kind"], "APIGroupList");
    let r = http(&s.url, "GET", "/api", &[("Accept", AGGREGATED)], "");
    assert_eq!(r.json()["kind"], "APIVersions");
    let r = http(&s.url, "GET", "/apis/apiextensions.k8s.io/v1", &[], "");
    let res = r.json();
    let names: Vec<&str> = res["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"customresourcedefinitions") && names.contains(&"customresourcedefinitions/status"));
    assert_eq!(http(&s.url, "GET", "/healthz", &[], "").body, "ok");
    assert_eq!(http(&s.url, "GET", "/version", &[], "").json()["major"], "1");
    assert_eq!(http(&s.url, "GET", "/apis/tenancy.dev/v1alpha1", &[], "").status, 404);
    // kubectl's own fallback path works (it asks for aggregated discovery first)
    let out = s.kubectl_ok(&["api-resources", "-o", "name"]);
    for r in [
        "secrets",
        "leases.coordination.k8s.io",
        "cronjobs.batch",
        "deployments.apps",
        "poddisruptionbudgets.policy",
        "events.events.k8s.io",
        "clusterroles.rbac.authorization.k8s.io",
    ] {
        assert!(out.lines().any(|l| l == r), "{r} missing from {out}");
    }
}

#[test]
fn protobuf_requests_get_json_and_tables_render() {
    let s = TestServer::start();
    s.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "s1",
        "--from-literal=a=b",
        "--from-literal=c=d",
    ]);
    let r = http(
        &s.url,
        "GET",
        "/api/v1/namespaces/default/secrets/s1",
        &[("Accept", "application/vnd.kubernetes.protobuf, */*")],
        "",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["kind"], "Secret");
    let r = http(
        &s.url,
        "GET",
        "/api/v1/namespaces/default/secrets",
        &[(
            "Accept",
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
        )],
        "",
    );
    let t = r.json();
    assert_eq!(t["kind"], "Table");
    let cols: Vec<&str> = t["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(cols, vec!["Name", "Type", "Data", "Age"]);
    assert_eq!(t["rows"][0]["cells"][0], "s1");
    assert_eq!(t["rows"][0]["cells"][2], 2);
    assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    let out = s.kubectl_ok(&["get", "secrets"]);
    assert!(out.starts_with("NAME") && out.contains("Opaque"), "{out}");
}

#[test]
fn watch_semantics() {
    let s = TestServer::start_with(kube_test_server::Config {
        watch_history: 3,
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    });
    let base = "/api/v1/namespaces/default/configmaps";
    let create = |name: &str, label: &str| {
        let body =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": {"tier": label}}})
                .to_string();
        let r = http(&s.url, "POST", base, &[("Content-Type", "application/json")], &body);
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()["metadata"]["resourceVersion"].as_str().unwrap().to_string()
    };
    let rv1 = create("a", "x");
    // rv "0": current state as ADDED, then live events; selectors filter; timeoutSeconds ends it
    let r = http(
        &s.url,
        "GET",
        &format!("{base}?watch=true&resourceVersion=0&timeoutSeconds=1&labelSelector=tier%3Dx"),
        &[],
        "",
    );
    let ev = r.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0]["type"].as_str(), ev[0]["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("a"))
    );
    // from a resourceVersion: only later events
    create("b", "y");
    let r = http(
        &s.url,
        "GET",
        &format!("{base}?watch=1&resourceVersion={rv1}&timeoutSeconds=1"),
        &[],
        "",
    );
    let names: Vec<&str> = r
        .events()
        .iter()
        .map(|e| e["object"]["metadata"]["name"].as_str().unwrap_or(""))
        .map(|s| s.to_owned().leak() as &str)
        .collect();
    assert_eq!(names, vec!["b"]);
    // bookmarks
    let r = http(
        &s.url,
        "GET",
        &format!("{base}?watch=1&resourceVersion={rv1}&timeoutSeconds=1&allowWatchBookmarks=true"),
        &[],
        "",
    );
    let bm: Vec<Value> = r.events().into_iter().filter(|e| e["type"] == "BOOKMARK").collect();
    assert!(!bm.is_empty());
    assert_eq!(bm[0]["object"]["kind"], "ConfigMap");
    assert!(bm[0]["object"]["metadata"]["resourceVersion"].as_str().is_some());
    // streaming list: initial events then the initial-events-end bookmark
    let r = http(&s.url, "GET", &format!("{base}?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1"), &[], "");
    let ev = r.events();
    assert_eq!(ev[0]["type"], "ADDED");
    assert_eq!(ev[2]["type"], "BOOKMARK");
    assert_eq!(
        ev[2]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    // history of 3 events: an old resourceVersion is answered with an in-stream 410
    for i in 0..5 {
        create(&format!("n{i}"), "z");
    }
    let r = http(
        &s.url,
        "GET",
        &format!("{base}?watch=1&resourceVersion={rv1}&timeoutSeconds=1"),
        &[],
        "",
    );
    assert_eq!(r.status, 200);
    let ev = r.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["type"], "ERROR");
    assert_eq!(ev[0]["object"]["kind"], "Status");
    assert_eq!(ev[0]["object"]["code"], 410);
    assert_eq!(ev[0]["object"]["reason"], "Expired");
    // a label change out of the selector is a DELETED for that watcher
    let list = http(&s.url, "GET", base, &[], "").json();
    let rv = list["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    http(
        &s.url,
        "PATCH",
        &format!("{base}/a"),
        &[("Content-Type", "application/merge-patch+json")],
        r#"{"metadata":{"labels":{"tier":"other"}}}"#,
    );
    let r = http(
        &s.url,
        "GET",
        &format!("{base}?watch=1&resourceVersion={rv}&timeoutSeconds=1&labelSelector=tier%3Dx"),
        &[],
        "",
    );
    let ev = r.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["type"], "DELETED");
}

#[test]
fn status_errors_look_like_the_real_server() {
    let s = TestServer::start();
    let r = http(&s.url, "GET", "/api/v1/namespaces/default/configmaps/nope", &[], "");
    assert_eq!(r.status, 404);
    let st = r.json();
    assert_eq!(st["kind"], "Status");
    assert_eq!(st["reason"], "NotFound");
    assert_eq!(st["message"], "configmaps \"nope\" not found");
    assert_eq!(
        st["details"],
        json!({"name": "nope", "group": "", "kind": "configmaps"})
    );
    let r = http(
        &s.url,
        "POST",
        "/api/v1/namespaces/missing/configmaps",
        &[("Content-Type", "application/json")],
        r#"{"metadata":{"name":"x"}}"#,
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["message"], "namespaces \"missing\" not found");
    let r = http(
        &s.url,
        "PUT",
        "/api/v1/namespaces/default/configmaps",
        &[("Content-Type", "application/json")],
        "{}",
    );
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["reason"], "MethodNotAllowed");
    let r = http(
        &s.url,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        &[("Content-Type", "application/json")],
        r#"{"metadata":{"generateName":"gen-"}}"#,
    );
    assert_eq!(r.status, 201);
    let name = r.json()["metadata"]["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
    let r = http(
        &s.url,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        &[("Content-Type", "application/json")],
        r#"{"metadata":{"name":"Bad_Name"}}"#,
    );
    assert_eq!(r.status, 422);
    assert!(r.json()["message"].as_str().unwrap().starts_with(
        "ConfigMap \"Bad_Name\" is invalid: metadata.name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain"
    ));
    let r = http(
        &s.url,
        "GET",
        "/api/v1/namespaces/default/configmaps?labelSelector=a%20in%20(",
        &[],
        "",
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["reason"], "BadRequest");
}
