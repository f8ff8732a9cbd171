//! End to end, operations: every request the operator makes is allowed by
//! the chart's RBAC; of two replicas one leads and a standby takes over
//! when it dies; metrics and health endpoints report what they should.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use base64::Engine;
use sqlx::Connection as _;
use support::e2e::{http_get, metrics_addr, tenant_yaml, wait_for, Env, NAMESPACE};
use support::tools::{self, documents, render};
use support::unique;

const LEASE: &str = "tenant-operator-leader";

/// One request in the API test server's log, as RBAC sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Attrs {
    verb: String,
    group: String,
    /// `resource` or `resource/subresource`.
    resource: String,
    namespace: Option<String>,
}

/// The operator's requests in the API test server's log (one line per
/// request: time, method, URI, status, quoted user agent). kube-rs sends no
/// user agent; kubectl and helm do. Non-resource requests (discovery,
/// /version) are returned apart.
fn operator_requests(log: &str) -> (Vec<Attrs>, Vec<String>) {
    let (mut out, mut other) = (Vec::new(), Vec::new());
    for line in log.lines() {
        let mut f = line.splitn(5, ' ');
        let (Some(_time), Some(method), Some(uri), Some(_status), Some(ua)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if ua.trim() != "\"\"" {
            continue;
        }
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match segs.as_slice() {
            ["api", _v, rest @ ..] if !rest.is_empty() => ("", rest),
            ["apis", g, _v, rest @ ..] if !rest.is_empty() => (*g, rest),
            _ => {
                other.push(format!("{method} {path}"));
                continue;
            }
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            _ => (None, rest),
        };
        let resource = match rest {
            [r, _name, sub] => format!("{r}/{sub}"),
            [r, ..] => r.to_string(),
            [] => continue,
        };
        let named = rest.len() >= 2;
        let watch = query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
        let verb = match method {
            "GET" if watch => "watch",
            "GET" if named => "get",
            "GET" => "list",
            "POST" => "create",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" if named => "delete",
            "DELETE" => "deletecollection",
            m => m,
        };
        out.push(Attrs {
            verb: verb.into(),
            group: group.into(),
            resource,
            namespace,
        });
    }
    (out, other)
}

/// (apiGroups, resources, verbs) of one RBAC rule.
type Rule = (Vec<String>, Vec<String>, Vec<String>);

fn rules(doc: &serde_json::Value) -> Vec<Rule> {
    let strs = |v: &serde_json::Value| {
        v.as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    doc["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (strs(&r["apiGroups"]), strs(&r["resources"]), strs(&r["verbs"])))
        .collect()
}

fn allows(rules: &[Rule], a: &Attrs) -> bool {
    let has = |list: &Vec<String>, x: &str| list.iter().any(|i| i == x || i == "*");
    rules
        .iter()
        .any(|(g, r, v)| has(g, &a.group) && has(r, &a.resource) && has(v, &a.verb))
}

/// Rule verbs the e2e flow below may not exercise (rare paths): checked to
/// be few, so the chart's rules cannot grow unnoticed.
const RARE: &[(&str, &str, &str)] = &[
    // A rate-limit ConfigMap not yet labelled is read by name (adoption).
    ("", "configmaps", "get"),
    // Shards no longer needed are deleted.
    ("", "configmaps", "delete"),
    // A MigrationSet looked up before the watch cache has it.
    ("tenancy.dev", "migrationsets", "get"),
    // kube's Recorder patches an Event it published before within its
    // series window (the operator makes one per Event, so it does not).
    ("events.k8s.io", "events", "patch"),
    // Owned objects are written with Server-Side Apply (PATCH requests);
    // the API server also authorizes an apply that creates as `create`,
    // which the request log does not show as a request of its own.
    ("", "secrets", "create"),
    ("", "configmaps", "create"),
    // Backups and restores, which this flow does not run: the CronJob of a
    // tenant with spec.backup, a TenantRestore's Job, its pods and status.
    ("batch", "cronjobs", "create"),
    ("batch", "cronjobs", "patch"),
    ("batch", "cronjobs", "delete"),
    ("batch", "jobs", "get"),
    ("batch", "jobs", "create"),
    ("", "pods", "list"),
    ("tenancy.dev", "tenantrestores/status", "patch"),
    // Shards, which this flow does not create: a Shard's finalizer and
    // status.
    ("tenancy.dev", "shards", "patch"),
    ("tenancy.dev", "shards/status", "patch"),
];

#[tokio::test(flavor = "multi_thread")]
async fn every_request_the_operator_makes_is_allowed_by_the_charts_rbac() {
    let Some(helm) = tools::helm() else { return };
    if std::env::var("E2E_KUBECONFIG").is_ok_and(|v| !v.is_empty()) {
        eprintln!("SKIPPED: the RBAC check reads the API test server's request log");
        return;
    }
    // The sealed secret below comes from a source namespace (the chart's
    // secretSources.namespaces: a Role there).
    let src = unique("rbac-src");
    let docs = documents(&render(
        &helm,
        &["--set", &format!("secretSources.namespaces={{{src}}}")],
    ));
    let cluster = rules(docs.iter().find(|d| d["kind"] == "ClusterRole").expect("ClusterRole"));
    let role_doc = docs
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["namespace"] == NAMESPACE)
        .expect("Role");
    let role = rules(role_doc);
    let source_role = rules(
        docs.iter()
            .find(|d| d["kind"] == "Role" && d["metadata"]["namespace"] == src.as_str())
            .expect("the source namespace's Role"),
    );
    let rbac_kinds = [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ];
    let items: Vec<&serde_json::Value> = docs
        .iter()
        .filter(|d| rbac_kinds.iter().any(|k| d["kind"] == *k))
        .collect();
    assert_eq!(
        items.len(),
        7,
        "the chart renders a ServiceAccount, a ClusterRole, a Role, a Role in the source namespace and their bindings"
    );
    for b in items
        .iter()
        .filter(|d| d["kind"].as_str().unwrap().ends_with("Binding"))
    {
        let subject = &b["subjects"][0];
        assert_eq!(
            format!(
                "system:serviceaccount:{}:{}",
                subject["namespace"].as_str().unwrap(),
                subject["name"].as_str().unwrap()
            ),
            support::e2e::OPERATOR_USER
        );
    }
    // The source namespace comes first (its Role lives there).
    let rbac: String = std::iter::once(format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {src}\n"))
        .chain(
            items
                .iter()
                .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap())),
        )
        .collect();

    // The API test server enforces the chart's rules on the operator's
    // requests (its token is the chart's ServiceAccount): a request they do
    // not allow is refused with 403, and the flow below fails.
    let mut env = Env::start_with("ops_rbac", Some(&rbac), &[("SECRET_SOURCE_NAMESPACES", &src)]).await;
    // The enforcement is on: with the operator's credentials, kube-rs is
    // refused what the chart does not grant.
    let kc =
        kube::config::Kubeconfig::read_from(env.dir.path().join("operator.kubeconfig")).expect("operator kubeconfig");
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap();
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
    match namespaces.list(&Default::default()).await {
        Err(kube::Error::Api(e)) if e.code == 403 => assert!(
            e.message.contains("cannot list resource \"namespaces\""),
            "{}",
            e.message
        ),
        other => panic!("listing namespaces as the operator should be forbidden, got {other:?}"),
    }
    let own: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client, NAMESPACE);
    own.get("tenant-operator-root-keys")
        .await
        .expect("the operator reads its root keys");
    // The whole life of a tenant: sealed secrets from another namespace, a
    // MigrationSet, rate limits, a changed source, suspend, delete.
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let secret = |v: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: erp\n  namespace: {src}\ndata:\n  password: {}\n",
            b64(v)
        )
    };
    assert!(env.kubectl_stdin(&["apply"], &secret("first")).status.success());
    let ms = "apiVersion: tenancy.dev/v1alpha1\nkind: MigrationSet\nmetadata:\n  name: default\nspec:\n  migrations:\n    - version: 1\n      name: v1\n      sql: \"CREATE TABLE docs (id bigserial PRIMARY KEY)\"\n";
    let out = env.kubectl_stdin(&["apply"], ms);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let name = unique("rbac");
    let spec = format!(
        "  secrets:\n  - name: erp-password\n    secretRef: {{namespace: {src}, name: erp, key: password}}\n  rateLimits:\n    api:\n      requestsPerUnit: 10\n      unit: second\n"
    );
    assert!(env
        .kubectl_stdin(&["apply"], &tenant_yaml(&name, &spec))
        .status
        .success());
    env.wait_ready(&name);
    let limits = || {
        env.jsonpath(
            &["configmap", "-n", NAMESPACE, "tenant-ratelimits"],
            "{.data.api\\.yaml}",
        )
    };
    wait_for(
        Duration::from_secs(30),
        "the tenant in the rate-limit ConfigMap",
        || limits().contains(&name),
    );
    let limits_active = limits();
    wait_for(Duration::from_secs(60), "the tenant at schema version 1", || {
        env.jsonpath(&["tenant", &name], "{.status.schemaVersion}") == "1"
    });
    let sealed = || {
        env.jsonpath(
            &["secret", "-n", NAMESPACE, &format!("tenant-{name}-sealed")],
            "{.data.erp-password}",
        )
    };
    let before = sealed();
    assert!(env.kubectl_stdin(&["apply"], &secret("second")).status.success());
    wait_for(Duration::from_secs(30), "the changed source re-sealed", || {
        sealed() != before
    });
    env.kubectl_ok(&[
        "patch",
        "tenant",
        &name,
        "--type=merge",
        "-p",
        r#"{"spec":{"state":"Suspended"}}"#,
    ]);
    wait_for(Duration::from_secs(30), "phase Suspended", || {
        env.jsonpath(&["tenant", &name], "{.status.phase}") == "Suspended"
    });
    wait_for(
        Duration::from_secs(30),
        "the suspended tenant's limits rewritten",
        || limits() != limits_active,
    );
    env.kubectl_ok(&["delete", "tenant", &name, "--timeout=60s"]);
    // A few lease renewals and a rate-limit pass after the delete.
    std::thread::sleep(Duration::from_secs(6));
    env.stop_operator();

    // Without the probe above (the operator never lists namespaces).
    let log: String = env
        .server_log()
        .lines()
        .filter(|l| !l.contains(" GET /api/v1/namespaces? 403 "))
        .map(|l| format!("{l}\n"))
        .collect();
    let forbidden: Vec<&str> = log.lines().filter(|l| l.ends_with(" 403 \"\"")).collect();
    assert!(
        forbidden.is_empty(),
        "the API server refused the operator (RBAC):\n{}",
        forbidden.join("\n")
    );
    // The same requests, checked against the rules here too (a second
    // implementation of the matching, and the unused-rule check).
    let (requests, other) = operator_requests(&log);
    assert!(
        requests.len() > 20,
        "too few operator requests in the server log ({}): is the log format still `time method uri status \"ua\"`?",
        requests.len()
    );
    let denied: BTreeSet<&Attrs> = requests
        .iter()
        .filter(|a| {
            !(allows(&cluster, a)
                || (a.namespace.as_deref() == Some(NAMESPACE) && allows(&role, a))
                || (a.namespace.as_deref() == Some(src.as_str()) && allows(&source_role, a)))
        })
        .collect();
    assert!(
        denied.is_empty(),
        "requests the chart's ClusterRole/Role do not allow:\n{denied:#?}"
    );
    assert!(
        other.is_empty(),
        "non-resource requests (not covered by the chart): {other:?}"
    );

    // And nothing granted goes unused, but for the known rare paths.
    let seen: BTreeSet<(String, String, String, Option<String>)> = requests
        .iter()
        .map(|a| (a.group.clone(), a.resource.clone(), a.verb.clone(), a.namespace.clone()))
        .collect();
    let mut unused = Vec::new();
    for (rules, namespace) in [
        (&cluster, None),
        (&role, Some(NAMESPACE)),
        (&source_role, Some(src.as_str())),
    ] {
        for (groups, resources, verbs) in rules.iter() {
            for g in groups {
                for r in resources {
                    for v in verbs {
                        let used = seen.iter().any(|(sg, sr, sv, ns)| {
                            sg == g && sr == r && sv == v && (namespace.is_none() || ns.as_deref() == namespace)
                        });
                        if !used && !RARE.contains(&(g.as_str(), r.as_str(), v.as_str())) {
                            unused.push(format!("{g}/{r} {v}"));
                        }
                    }
                }
            }
        }
    }
    assert!(
        unused.is_empty(),
        "the chart grants what the operator never did in this run (remove it, or list it in RARE with why): {unused:?}"
    );
    // Secrets are written only in the operator namespace, and read nowhere
    // but there and in the source namespace.
    for a in &requests {
        if a.resource == "secrets" {
            assert!(
                a.namespace.as_deref() == Some(NAMESPACE) || a.namespace.as_deref() == Some(src.as_str()),
                "a Secret request elsewhere: {a:?}"
            );
        }
        if a.resource == "secrets" && !matches!(a.verb.as_str(), "get" | "list" | "watch") {
            assert_eq!(
                a.namespace.as_deref(),
                Some(NAMESPACE),
                "a Secret written outside the operator namespace: {a:?}"
            );
        }
    }
}

fn lease_holder(env: &Env) -> String {
    env.jsonpath(&["lease", "-n", NAMESPACE, LEASE], "{.spec.holderIdentity}")
}

fn get_metrics(env: &Env, log: &str) -> String {
    let addr = metrics_addr(&env.log(log)).unwrap_or_else(|| panic!("no metrics address in {log}"));
    let (status, body) = http_get(&addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn one_replica_leads_and_a_standby_takes_over_when_it_dies() {
    let mut env = Env::start("ops_leader").await;
    wait_for(Duration::from_secs(20), "operator-0 to hold the lease", || {
        lease_holder(&env) == "operator-0"
    });
    let mut standby = env.spawn_operator("operator-1", "operator-1.log");
    wait_for(Duration::from_secs(30), "operator-1 to stand by", || {
        env.log("operator-1.log").contains("standing by")
    });

    let a = unique("lead");
    assert!(env.kubectl_stdin(&["apply"], &tenant_yaml(&a, "")).status.success());
    env.wait_ready(&a);
    assert_eq!(lease_holder(&env), "operator-0");
    wait_for(Duration::from_secs(20), "both metrics servers", || {
        metrics_addr(&env.log("operator-1.log")).is_some() && metrics_addr(&env.log("operator.log")).is_some()
    });
    assert!(get_metrics(&env, "operator.log").contains("tenant_operator_leader 1"));
    assert!(get_metrics(&env, "operator-1.log").contains("tenant_operator_leader 0"));
    let addr1 = metrics_addr(&env.log("operator-1.log")).unwrap();
    assert_eq!(
        http_get(&addr1, "/readyz").unwrap().0,
        200,
        "a standby is ready (it can take over)"
    );
    let standby_log = env.log("operator-1.log");
    assert!(
        !standby_log.contains(&a),
        "the standby touched tenant {a}:\n{standby_log}"
    );
    assert!(
        env.operator_log().contains(&format!("\"tenant\":\"{a}\"")),
        "the leader's logs name the tenant as a field"
    );

    // The leader dies without releasing the lease: the standby takes over
    // once it has not been renewed for the lease duration (15s).
    env.stop_operator();
    let killed = Instant::now();
    wait_for(Duration::from_secs(30), "operator-1 to take the lease over", || {
        lease_holder(&env) == "operator-1"
    });
    let took = killed.elapsed();
    assert!(took <= Duration::from_secs(25), "take-over took {took:?}");
    assert!(env.log("operator-1.log").contains("acquired the leader lease"));

    // Tenants keep converging under the new leader.
    let b = unique("after");
    assert!(env.kubectl_stdin(&["apply"], &tenant_yaml(&b, "")).status.success());
    env.wait_ready(&b);
    assert!(env.log("operator-1.log").contains(&b), "the new leader reconciled {b}");
    assert!(get_metrics(&env, "operator-1.log").contains("tenant_operator_leader 1"));
    let transitions = env.jsonpath(&["lease", "-n", NAMESPACE, LEASE], "{.spec.leaseTransitions}");
    assert_eq!(transitions, "1");

    // A leader that finds the Lease taken stops its controllers and exits
    // non-zero (Kubernetes restarts it as a standby).
    env.kubectl_ok(&[
        "patch",
        "lease",
        "-n",
        NAMESPACE,
        LEASE,
        "--type=merge",
        "-p",
        r#"{"spec":{"holderIdentity":"intruder"}}"#,
    ]);
    let mut status = None;
    wait_for(Duration::from_secs(20), "the deposed leader to exit", || {
        status = standby.try_wait().expect("try_wait");
        status.is_some()
    });
    let status = status.unwrap();
    assert!(!status.success(), "the deposed leader exited with {status}");
    assert!(
        env.log("operator-1.log").contains("lost the leader lease"),
        "{}",
        support::e2e::tail(&env.log("operator-1.log"), 5)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_health_report_reconciles_phases_pool_and_readiness() {
    let env = Env::start("ops_metrics").await;
    let a = unique("met");
    assert!(env.kubectl_stdin(&["apply"], &tenant_yaml(&a, "")).status.success());
    env.wait_ready(&a);
    wait_for(Duration::from_secs(20), "the metrics address", || {
        metrics_addr(&env.operator_log()).is_some()
    });
    let addr = metrics_addr(&env.operator_log()).unwrap();
    let (code, body) = http_get(&addr, "/healthz").unwrap();
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, body) = http_get(&addr, "/readyz").unwrap();
    assert_eq!((code, body.trim()), (200, "ok"));
    // The gauge reads the controller's watch cache, which follows the API
    // server by a moment.
    wait_for(Duration::from_secs(10), "the Active tenant in the phase gauge", || {
        get_metrics(&env, "operator.log").contains("tenant_operator_tenants{phase=\"Active\"} 1")
    });
    // The front queue empties: nothing waits, and every tenant let into the
    // controller's queue was reconciled (its outcome let it go).
    wait_for(Duration::from_secs(20), "an empty front queue", || {
        let m = get_metrics(&env, "operator.log");
        m.contains("tenant_operator_tenant_queue{state=\"waiting\"} 0")
            && m.contains("tenant_operator_tenant_queue{state=\"in_controller\"} 0")
    });
    let m = get_metrics(&env, "operator.log");
    for needle in [
        "tenant_operator_reconciles_total{controller=\"tenant\"}",
        "tenant_operator_reconciles_total{controller=\"ratelimits\"}",
        "tenant_operator_reconcile_duration_seconds_bucket{",
        "tenant_operator_tenants{phase=\"Active\"} 1",
        "tenant_operator_tenants{phase=\"Failed\"} 0",
        "tenant_operator_db_pool_connections{state=\"idle\"}",
        "tenant_operator_db_pool_connections{state=\"in_use\"}",
        "tenant_operator_leader 1",
        "# EOF",
    ] {
        assert!(m.contains(needle), "/metrics lacks {needle}:\n{m}");
    }
    let (code, _) = http_get(&addr, "/nope").unwrap();
    assert_eq!(code, 404);
}

/// The front queue's gauge: (waiting, in_controller), None before it has
/// series.
fn tenant_queue(env: &Env) -> Option<(u64, u64)> {
    let m = get_metrics(env, "operator.log");
    let of = |state: &str| {
        let prefix = format!("tenant_operator_tenant_queue{{state=\"{state}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map(|v| v.trim().parse::<u64>().expect("a count"))
    };
    Some((of("waiting")?, of("in_controller")?))
}

/// A burst larger than the controller's queue bound (`TENANT_QUEUE_BOUND`,
/// here 2) waits in the operator's front queue, by name, while at most 2
/// are in the controller's queue; each reconcile's end lets the next in,
/// and every Tenant converges (src/controller/tenant/gate.rs).
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_past_the_queue_bound_waits_in_front_and_every_tenant_converges() {
    let env = Env::start_with("ops_gate", None, &[("TENANT_QUEUE_BOUND", "2")]).await;
    wait_for(Duration::from_secs(20), "the metrics address", || {
        metrics_addr(&env.operator_log()).is_some()
    });
    wait_for(Duration::from_secs(20), "the queue gauge", || {
        tenant_queue(&env).is_some()
    });
    let names: Vec<String> = (0..12).map(|i| unique(&format!("gate{i}"))).collect();
    let manifest: Vec<String> = names.iter().map(|n| tenant_yaml(n, "")).collect();
    let out = env.kubectl_stdin(&["apply"], &manifest.join("---\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ready =
        |n: &String| env.jsonpath(&["tenant", n], "{.status.conditions[?(@.type==\"Ready\")].status}") == "True";
    let (mut most_waiting, mut most_in) = (0, 0);
    wait_for(Duration::from_secs(120), "every Tenant Ready", || {
        if let Some((waiting, handed)) = tenant_queue(&env) {
            most_waiting = most_waiting.max(waiting);
            most_in = most_in.max(handed);
        }
        names.iter().all(ready)
    });
    // The gauge reports the names handed over, which the gate caps: seen
    // in use, and never past the bound.
    assert!(
        (1..=2).contains(&most_in),
        "{most_in} Tenants seen in the controller's queue at once"
    );
    assert!(
        most_waiting > 0,
        "no Tenant was ever seen waiting in front of the controller's queue"
    );
    wait_for(Duration::from_secs(20), "an empty front queue", || {
        tenant_queue(&env) == Some((0, 0))
    });
}

/// The tenant controller's reconciles so far, from /metrics.
fn tenant_reconciles(env: &Env) -> u64 {
    reconciles_of(env, "tenant").unwrap_or_else(|m| panic!("no tenant reconcile count in /metrics:\n{m}"))
}

/// The reconciles of `controller` so far, from /metrics; Err(the page)
/// when it has no line for that controller (none run yet).
fn reconciles_of(env: &Env, controller: &str) -> Result<u64, String> {
    let m = get_metrics(env, "operator.log");
    let prefix = format!("tenant_operator_reconciles_total{{controller=\"{controller}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|v| v.trim().parse().expect("a count"))
        .ok_or(m)
}

/// Light Tenant reconciles of `kind` so far (0 before the first).
fn light_reconciles(env: &Env, kind: &str) -> u64 {
    let m = get_metrics(env, "operator.log");
    let prefix = format!("tenant_operator_tenant_light_reconciles_total{{kind=\"{kind}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|v| v.trim().parse::<u64>().expect("a count"))
        .unwrap_or(0)
}

/// The Tenant controller's count once it has not moved for `quiet`.
fn settled_reconciles(env: &Env, quiet: Duration) -> u64 {
    settled_count(env, "tenant", quiet)
}

/// The reconciles of `controller` (0 before its first) once the count has
/// not moved for `quiet`.
fn settled_count(env: &Env, controller: &str, quiet: Duration) -> u64 {
    let count = || reconciles_of(env, controller).unwrap_or(0);
    let mut last = count();
    let mut since = Instant::now();
    let limit = Instant::now() + Duration::from_secs(60);
    while since.elapsed() < quiet {
        assert!(
            Instant::now() < limit,
            "the {controller} controller never went quiet ({last} reconciles):\n{}",
            support::e2e::tail(&env.operator_log(), 40)
        );
        std::thread::sleep(Duration::from_millis(200));
        let now = count();
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    last
}

/// A spec change is one reconcile: the status it writes (Ready) comes back
/// through the watch, and that echo of the operator's own write starts no
/// second reconcile (src/controller/tenant/echoes.rs). A change made by
/// someone else to the same Tenant (an annotation) still starts one.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_own_status_write_starts_no_reconcile_of_its_own() {
    // No resync during the test: every reconcile counted has a cause.
    let env = Env::start_with("ops_echo", None, &[("RESYNC_SECONDS", "600")]).await;
    let a = unique("echo");
    env.apply_ready(&a, "  database:\n    connectionLimit: 5\n");
    wait_for(Duration::from_secs(20), "the metrics address", || {
        metrics_addr(&env.operator_log()).is_some()
    });
    let before = settled_reconciles(&env, Duration::from_secs(3));
    env.patch_tenant(&a, r#"{"spec":{"database":{"connectionLimit":7}}}"#);
    let generation = env.jsonpath(&["tenant", &a], "{.metadata.generation}");
    wait_for(Duration::from_secs(30), "the new generation observed", || {
        env.jsonpath(&["tenant", &a], "{.status.observedGeneration}") == generation
    });
    let after = settled_reconciles(&env, Duration::from_secs(3));
    assert_eq!(after - before, 1, "a spec change ran {} reconciles", after - before);
    // Someone else's write: a reconcile (which writes nothing).
    env.kubectl_ok(&["annotate", "tenant", &a, "example.com/note=hello"]);
    let annotated = settled_reconciles(&env, Duration::from_secs(3));
    assert_eq!(
        annotated - after,
        1,
        "an annotation ran {} reconciles",
        annotated - after
    );
}

/// A MigrationSet's pass runs for a change of its spec, not for the echo of
/// the status it wrote itself (in a provisioning burst that echo ran every
/// set's pass about once a second: each pass wrote the followers' new
/// count), nor for metadata the controller does not read.
#[tokio::test(flavor = "multi_thread")]
async fn a_sets_own_status_write_does_not_run_its_pass_again() {
    // No resync during the test: every pass counted has a cause.
    let env = Env::start_with("ops_set_echo", None, &[("RESYNC_SECONDS", "600")]).await;
    wait_for(Duration::from_secs(20), "the metrics address", || {
        metrics_addr(&env.operator_log()).is_some()
    });
    let set = unique("echo");
    let set_yaml = |versions: &[i64]| {
        let mut y = format!(
            "apiVersion: tenancy.dev/v1alpha1\nkind: MigrationSet\nmetadata:\n  name: {set}\nspec:\n  migrations:\n"
        );
        for v in versions {
            y.push_str(&format!(
                "  - version: {v}\n    name: m{v}\n    sql: \"CREATE TABLE t{v} (id int)\"\n"
            ));
        }
        y
    };
    let settled = || settled_count(&env, "migrationset", Duration::from_secs(3));
    let phase = || env.jsonpath(&["migrationset", &set], "{.status.phase}/{.status.latestVersion}");
    let out = env.kubectl_stdin(&["apply"], &set_yaml(&[1]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(Duration::from_secs(30), "the set Complete at 1", || {
        phase() == "Complete/1"
    });
    let before = settled();
    assert!(before >= 1, "no pass counted");
    let out = env.kubectl_stdin(&["apply"], &set_yaml(&[1, 2]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(Duration::from_secs(30), "the set Complete at 2", || {
        phase() == "Complete/2"
    });
    let after = settled();
    assert_eq!(
        after - before,
        1,
        "a new version ran {} passes (its status write must not bring the set back):\n{}",
        after - before,
        support::e2e::tail(&env.operator_log(), 40)
    );
    env.kubectl_ok(&["annotate", "migrationset", &set, "example.com/note=hello"]);
    let annotated = settled();
    assert_eq!(annotated - after, 0, "an annotation ran {} passes", annotated - after);
}

/// The usage sampler's writes of `status.usage` are the operator's own: the
/// Tenant controller reads nothing of it, so their echo starts no reconcile
/// (each started a full one, a second observation of every new tenant in a
/// provisioning burst).
#[tokio::test(flavor = "multi_thread")]
async fn the_usage_samplers_writes_start_no_reconcile() {
    let env = Env::start_with(
        "ops_usage_echo",
        None,
        &[("RESYNC_SECONDS", "600"), ("USAGE_INTERVAL_SECONDS", "1")],
    )
    .await;
    wait_for(Duration::from_secs(20), "the metrics address", || {
        metrics_addr(&env.operator_log()).is_some()
    });
    let a = unique("use");
    env.apply_ready(&a, "");
    let sessions = || {
        env.jsonpath(&["tenant", &a], "{.status.usage.sessions}")
            .trim()
            .to_string()
    };
    // The sampler spaces its samples by ten times what each took
    // (`controller::usage::PACE`): on a loaded machine (the whole suite in
    // CI, this file's tests in parallel) a sample of a few seconds puts the
    // next tens of seconds away, so the waits on the sampler allow for that.
    let sampled = Duration::from_secs(90);
    wait_for(sampled, "a first status.usage", || sessions() == "0");
    let before = settled_reconciles(&env, Duration::from_secs(3));
    let rv = || env.jsonpath(&["tenant", &a], "{.metadata.resourceVersion}");
    let rv_before = rv();
    // Two of the app's sessions, then none: two more usage writes.
    let uri = env.secret_value(&format!("tenant-{a}-db"), "uri");
    let one = sqlx::PgConnection::connect(&uri).await.expect("app login");
    let two = sqlx::PgConnection::connect(&uri).await.expect("app login");
    wait_for(sampled, "status.usage.sessions = 2", || sessions() == "2");
    one.close().await.expect("close");
    two.close().await.expect("close");
    wait_for(sampled, "status.usage.sessions = 0", || sessions() == "0");
    assert_ne!(rv(), rv_before, "the sampler wrote the Tenant");
    let after = settled_reconciles(&env, Duration::from_secs(3));
    assert_eq!(
        after - before,
        0,
        "the usage writes ran {} reconciles:\n{}",
        after - before,
        support::e2e::tail(&env.operator_log(), 60)
    );
    // Anyone else's write still starts one.
    env.kubectl_ok(&["annotate", "tenant", &a, "example.com/note=hello"]);
    wait_for(Duration::from_secs(30), "a reconcile for the annotation", || {
        tenant_reconciles(&env) > after
    });
}

/// A new tenant is observed in Postgres once. The rate-limit writer renders
/// its limits about a second after the reconcile that provisioned it, and
/// brings it back for `RateLimitsApplied` alone: a light reconcile, which
/// rewrites that condition without observing Postgres
/// (src/controller/tenant/triggers.rs). A changed limit is a spec change:
/// one full reconcile, then the writer's light one again.
#[tokio::test(flavor = "multi_thread")]
async fn the_rate_limit_writers_report_is_answered_by_a_light_reconcile() {
    let env = Env::start_with("ops_rl_light", None, &[("RESYNC_SECONDS", "600")]).await;
    wait_for(Duration::from_secs(20), "the metrics address", || {
        metrics_addr(&env.operator_log()).is_some()
    });
    let rl = |t: &str| {
        env.jsonpath(
            &["tenant", t],
            "{.status.conditions[?(@.type==\"RateLimitsApplied\")].status}|{.status.conditions[?(@.type==\"RateLimitsApplied\")].message}",
        )
    };
    // A first tenant, so the counters exist; the one counted is the second.
    let first = unique("rl");
    env.apply_ready(&first, "");
    wait_for(
        Duration::from_secs(30),
        "the first tenant's RateLimitsApplied True",
        || rl(&first).starts_with("True|"),
    );
    let before = settled_reconciles(&env, Duration::from_secs(3));
    let light_before = light_reconciles(&env, "rate_limits");
    let a = unique("rl");
    env.apply_ready(&a, "");
    wait_for(Duration::from_secs(30), "RateLimitsApplied True", || {
        rl(&a).starts_with("True|")
    });
    let after = settled_reconciles(&env, Duration::from_secs(3));
    let light = light_reconciles(&env, "rate_limits") - light_before;
    let log = || support::e2e::tail(&env.operator_log(), 60);
    assert!(light >= 1, "the writer's report ran no light reconcile:\n{}", log());
    assert_eq!(
        after - before - light,
        1,
        "a new tenant ran {} full reconciles ({light} light):\n{}",
        after - before - light,
        log()
    );
    assert_eq!(
        env.jsonpath(&["tenant", &a], "{.status.conditions[?(@.type==\"Ready\")].status}"),
        "True"
    );

    // A new limit: the spec change's full reconcile says Pending, the
    // writer's report (light) says the new limit is rendered.
    env.patch_tenant(
        &a,
        r#"{"spec":{"rateLimits":{"api":{"requestsPerUnit":7,"unit":"second"}}}}"#,
    );
    wait_for(Duration::from_secs(30), "the new limit rendered", || {
        let s = rl(&a);
        s.starts_with("True|") && s.contains("api 7/second")
    });
    let changed = settled_reconciles(&env, Duration::from_secs(3));
    let light_changed = light_reconciles(&env, "rate_limits") - light_before - light;
    assert!(light_changed >= 1, "no light reconcile for the new limit:\n{}", log());
    assert_eq!(
        changed - after - light_changed,
        1,
        "a changed limit ran {} full reconciles:\n{}",
        changed - after - light_changed,
        log()
    );
}

/// The light reconcile (src/controller/tenant/triggers.rs): when a
/// MigrationSet starts rolling a new version out, its followers still
/// shown `UpToDate` at the old one are told `RollingOut` from the watch
/// caches alone, and every one is shown the new version once the set is
/// `Complete`. Something else bringing a follower back meanwhile (its
/// connection Secret deleted) still gets a full reconcile.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_tells_its_waiting_followers_rolling_out_without_postgres() {
    let env = Env::start_with("ops_light", None, &[("RESYNC_SECONDS", "600")]).await;
    let set = unique("light");
    let set_yaml = |versions: &[(i64, &str)]| {
        let mut y = format!(
            "apiVersion: tenancy.dev/v1alpha1\nkind: MigrationSet\nmetadata:\n  name: {set}\nspec:\n  rollout:\n    maxConcurrent: 1\n    canary: 1\n  migrations:\n"
        );
        for (v, sql) in versions {
            y.push_str(&format!("  - version: {v}\n    name: m{v}\n    sql: \"{sql}\"\n"));
        }
        y
    };
    let v1 = (1, "CREATE TABLE docs (id bigserial PRIMARY KEY)");
    let out = env.kubectl_stdin(&["apply"], &set_yaml(&[v1]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tenants: Vec<String> = (0..4).map(|_| unique("lf")).collect();
    let spec = format!("  database:\n    migrationSet: {set}\n");
    for t in &tenants {
        assert!(env.kubectl_stdin(&["apply"], &tenant_yaml(t, &spec)).status.success());
    }
    let shown = |t: &str| {
        env.jsonpath(
            &["tenant", t],
            "{.status.schemaVersion}/{.status.conditions[?(@.type==\"MigrationsApplied\")].reason}",
        )
    };
    for t in &tenants {
        env.wait_ready(t);
        wait_for(Duration::from_secs(60), "version 1, UpToDate", || {
            shown(t) == "1/UpToDate"
        });
    }
    wait_for(Duration::from_secs(30), "the set Complete at 1", || {
        env.jsonpath(&["migrationset", &set], "{.status.phase}/{.status.latestVersion}") == "Complete/1"
    });
    wait_for(Duration::from_secs(20), "the metrics address", || {
        metrics_addr(&env.operator_log()).is_some()
    });
    let light_of = |kind: &str| light_reconciles(&env, kind);
    let light = || light_of("rolling_out");
    assert_eq!((light(), light_of("settled")), (0, 0), "no rollout yet");
    // Quiet first: a full reconcile running as the new version is applied
    // (the rate-limit writer's report of new tenants, say) would tell the
    // followers `RollingOut` itself, reading the set's new spec.
    settled_reconciles(&env, Duration::from_secs(3));

    // Version 2 takes 4 s per tenant, one tenant at a time: the first pass
    // stops at its 10 s budget with the last tenant left, and its requeue
    // (a second later: tenants were deferred) brings that one back.
    let v2 = (2, "ALTER TABLE docs ADD COLUMN tag text; SELECT pg_sleep(4)");
    let out = env.kubectl_stdin(&["apply"], &set_yaml(&[v1, v2]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut rolling_out_seen = false;
    let mut set_seen: Vec<String> = Vec::new();
    let mut secret_deleted = false;
    let last = &tenants[3];
    let secret = format!("tenant-{last}-db");
    let uid0 = env.jsonpath(&["secret", "-n", NAMESPACE, &secret], "{.metadata.uid}");
    wait_for(Duration::from_secs(90), "the set Complete at 2", || {
        for t in &tenants {
            // Reason and message of one read of the Tenant.
            let c = env.jsonpath(
                &["tenant", t],
                "{.status.conditions[?(@.type==\"MigrationsApplied\")].reason}|{.status.conditions[?(@.type==\"MigrationsApplied\")].message}",
            );
            if let Some(message) = c.strip_prefix("RollingOut|") {
                rolling_out_seen = true;
                assert!(message.contains(" of 2;"), "{t}: {message}");
            }
        }
        if rolling_out_seen && !secret_deleted {
            env.kubectl_ok(&["delete", "secret", "-n", NAMESPACE, &secret]);
            secret_deleted = true;
        }
        let phase = env.jsonpath(
            &["migrationset", &set],
            "{.status.phase}/{.status.latestVersion}/{.status.progress}",
        );
        if set_seen.last() != Some(&phase) {
            set_seen.push(phase.clone());
        }
        phase.starts_with("Complete/2/")
    });
    assert!(rolling_out_seen, "no follower was shown RollingOut during the rollout");
    assert!(
        light() >= 1,
        "no light reconcile ran; the set went {set_seen:?}:\n{}",
        support::e2e::tail(&env.operator_log(), 150)
    );
    // Once the set is Complete, its followers are told from their
    // recorded versions (the settled light reconcile), not a full one.
    wait_for(Duration::from_secs(30), "a settled light reconcile", || {
        light_of("settled") >= 1
    });
    for t in &tenants {
        wait_for(Duration::from_secs(30), "version 2, UpToDate", || {
            shown(t) == "2/UpToDate"
        });
        assert_eq!(
            env.jsonpath(&["tenant", t], "{.status.conditions[?(@.type==\"Ready\")].status}"),
            "True"
        );
    }
    assert!(secret_deleted);
    wait_for(Duration::from_secs(30), "the deleted Secret to come back", || {
        let uid = env.jsonpath(&["secret", "-n", NAMESPACE, &secret], "{.metadata.uid}");
        !uid.is_empty() && uid != uid0
    });
}
