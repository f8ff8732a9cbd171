//! The Helm chart: its CRDs are the top-level ones, it lints clean, it
//! renders valid Kubernetes 1.32 objects (kubernetes-validate, offline),
//! and `helm install` into the API test server creates what it should.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::e2e::wait_for;
use support::tools::{self, documents, find_doc, render, run, text, CHART, ROOT};

#[test]
fn the_charts_crds_are_the_top_level_crds() {
    let top = std::fs::read_to_string(format!("{ROOT}/crds/crds.yaml")).expect("crds/crds.yaml");
    let chart =
        std::fs::read_to_string(format!("{CHART}/crds/crds.yaml")).expect("charts/tenant-operator/crds/crds.yaml");
    assert!(
        top == chart,
        "charts/tenant-operator/crds/crds.yaml differs from crds/crds.yaml (the one source of truth): \
         run `make crds` (it copies them), or `cp crds/crds.yaml charts/tenant-operator/crds/`"
    );
}

#[test]
fn helm_lint_strict_passes() {
    let Some(helm) = tools::helm() else { return };
    let o = run(&helm, &["lint", "--strict", CHART]);
    assert!(o.status.success(), "helm lint --strict: {}", text(&o));
    let o = run(
        &helm,
        &[
            "lint",
            "--strict",
            CHART,
            "--set",
            "rootKeys.kms.enabled=true,rootKeys.kms.keyId=alias/x,metrics.serviceMonitor.enabled=true",
        ],
    );
    assert!(
        o.status.success(),
        "helm lint --strict (KMS, ServiceMonitor): {}",
        text(&o)
    );
    let o = run(
        &helm,
        &[
            "lint",
            "--strict",
            CHART,
            "--set",
            "pgbouncer.enabled=true,pgbouncer.databaseHost=postgres.db.svc",
        ],
    );
    assert!(o.status.success(), "helm lint --strict (PgBouncer): {}", text(&o));
}

#[test]
fn the_values_schema_refuses_bad_values() {
    let Some(helm) = tools::helm() else { return };
    for (set, field) in [
        ("controller.concurrency=0", "controller.concurrency"),
        ("replicas=2", "replicas"),
        ("leaderElection.enabled=maybe", "leaderElection.enabled"),
        ("gateway.role=Tenancy-Gateway", "gateway.role"),
        ("gateway.role=1gateway", "gateway.role"),
        (
            "gateway.role=g234567890123456789012345678901234567890123456789012345678901234",
            "gateway.role",
        ),
        ("pgbouncer.poolSize=0", "pgbouncer.poolSize"),
        ("pgbouncer.databaseHost=db;x", "pgbouncer.databaseHost"),
    ] {
        let o = run(&helm, &["template", "t", CHART, "--set", set]);
        assert!(!o.status.success(), "--set {set} was accepted");
        assert!(
            text(&o).contains(field),
            "--set {set}: the error does not name {field}: {}",
            text(&o)
        );
    }
}

/// Writes `yaml` to a file and runs kubernetes-validate against 1.32 in
/// strict mode; fails on any error or warning (an unknown kind warns).
fn validate_1_32(kv: &std::path::Path, label: &str, yaml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{label}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let o = run(
        kv,
        &[
            "--kubernetes-version",
            "1.32.0",
            "--strict",
            "--quiet",
            file.to_str().unwrap(),
        ],
    );
    let out = text(&o);
    assert!(
        o.status.success() && !out.contains("WARN") && !out.contains("ERROR"),
        "kubernetes-validate ({label}):\n{out}"
    );
}

#[test]
fn the_rendered_chart_is_valid_against_kubernetes_1_32() {
    let Some(helm) = tools::helm() else { return };
    let Some(kv) = tools::kubernetes_validate() else { return };
    let defaults = render(&helm, &["--include-crds"]);
    validate_1_32(&kv, "defaults", &defaults);
    let docs = documents(&defaults);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.contains(&kind), "no {kind} rendered; got {kinds:?}");
    }
    let all = render(
        &helm,
        &[
            "--set",
            "rootKeys.kms.enabled=true,rootKeys.kms.keyId=alias/root,rootKeys.kms.credentialsSecret=aws,database.tenantHost=db.example,database.tenantPort=6432,podDisruptionBudget.maxUnavailable=50%",
            "--set",
            "replicaCount=3,imagePullSecrets[0].name=regcred,nodeSelector.pool=ops,serviceAccount.annotations.a=b,secretSources.namespaces={acme-onboarding}",
            "--set",
            "backup.store=s3://tenant-backups/prod,backup.s3.endpoint=http://minio:9000,backup.s3.pathStyle=true,backup.envSecret=backup-env",
        ],
    );
    validate_1_32(&kv, "non-defaults", &all);
    // With a store, the Deployment passes the backup settings to the
    // operator, and the Jobs get an identity of their own.
    for env in [
        "BACKUP_STORE",
        "BACKUP_SERVICE_ACCOUNT",
        "BACKUP_ENV_SECRET",
        "BACKUP_S3_ENDPOINT",
        "BACKUP_S3_PATH_STYLE",
    ] {
        assert!(
            all.contains(&format!("name: {env}")),
            "{env} is not set on the operator"
        );
    }
    let backup_docs = documents(&all);
    let sa = find_doc(&backup_docs, "ServiceAccount", Some("tenant-operator-backup"))
        .expect("no ServiceAccount for the backup Jobs");
    // The Jobs call no API: their account has no token and no rights at
    // all (in particular not the root-keys Secret, nor any Tenant).
    assert_eq!(sa["automountServiceAccountToken"], false);
    for d in &backup_docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        if matches!(kind, "Role" | "ClusterRole") {
            assert!(
                d["metadata"]["name"] != "tenant-operator-backup",
                "a {kind} for the backup Jobs: {d}"
            );
        }
        if matches!(kind, "RoleBinding" | "ClusterRoleBinding") {
            let subjects = d["subjects"].as_array().cloned().unwrap_or_default();
            assert!(
                !subjects.iter().any(|s| s["name"] == "tenant-operator-backup"),
                "the backup Jobs' account is bound by {kind} {}",
                d["metadata"]["name"]
            );
        }
    }
    assert!(!defaults.contains("BACKUP_STORE"), "backups are configured by default");

    // The ServiceMonitor (a prometheus-operator kind, so not in the 1.32
    // schemas) selects the metrics Service.
    let with_sm = documents(&render(
        &helm,
        &[
            "--set",
            "metrics.serviceMonitor.enabled=true,metrics.serviceMonitor.labels.release=prom",
        ],
    ));
    let sm = find_doc(&with_sm, "ServiceMonitor", None).expect("a ServiceMonitor when metrics.serviceMonitor.enabled");
    let svc = find_doc(&with_sm, "Service", None).expect("the metrics Service");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &svc["metadata"]["labels"][k], v,
            "the ServiceMonitor selects {k}={v}, the Service lacks it"
        );
    }
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], svc["spec"]["ports"][0]["name"]);
    assert!(
        find_doc(&documents(&defaults), "ServiceMonitor", None).is_none(),
        "no ServiceMonitor by default"
    );
}

#[test]
fn the_deployment_is_hardened_probed_and_wired() {
    let Some(helm) = tools::helm() else { return };
    let docs = documents(&render(&helm, &[]));
    let d = find_doc(&docs, "Deployment", Some("tenant-operator")).expect("Deployment tenant-operator");
    assert_eq!(d["spec"]["replicas"], 2);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(pod["serviceAccountName"], "tenant-operator");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let env = c["env"].as_array().unwrap();
    let var = |n: &str| {
        env.iter()
            .find(|e| e["name"] == n)
            .unwrap_or_else(|| panic!("env {n} missing"))
    };
    assert_eq!(var("POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    assert_eq!(
        var("POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        var("OPERATOR_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        var("DATABASE_URL")["valueFrom"]["secretKeyRef"],
        serde_json::json!({"name": "tenant-operator-db", "key": "url"})
    );
    assert_eq!(var("LEADER_ELECTION")["value"], "true");
    assert_eq!(var("METRICS_ADDR")["value"], "0.0.0.0:8080");
    assert_eq!(var("ROOT_KEYS_SECRET")["value"], "tenant-operator-root-keys");
    assert_eq!(
        var("OPERATOR_IMAGE")["value"],
        c["image"],
        "backup and restore Jobs run the operator's own image"
    );
    assert_eq!(
        var("GATEWAY_ROLE")["value"],
        "tenancy_gateway",
        "the gateway login is on by default"
    );
    // Every variable the chart sets is one the binary reads.
    let help = String::from_utf8_lossy(
        &Command::new(env!("CARGO_BIN_EXE_tenant-operator"))
            .args(["run", "--help"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    for e in env {
        let n = e["name"].as_str().unwrap();
        if !matches!(n, "POD_NAME" | "POD_NAMESPACE" | "RUST_LOG") {
            assert!(
                (help.contains(&format!("[env: {n}=")) || help.contains(&format!("[env: {n}]"))),
                "the chart sets {n}, which `tenant-operator run` does not read"
            );
        }
    }
    let pdb = find_doc(&docs, "PodDisruptionBudget", None).expect("PDB");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        d["spec"]["selector"]["matchLabels"]
    );
}

/// The `key = value` settings of one `[section]` of an ini file
/// (comments and blank lines skipped).
fn ini_section(ini: &str, section: &str) -> std::collections::BTreeMap<String, String> {
    let mut current = String::new();
    let mut out = std::collections::BTreeMap::new();
    for line in ini
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(';') && !l.starts_with('#'))
    {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_string();
        } else if current == section {
            let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("not a setting: {line}"));
            assert!(
                out.insert(k.trim().to_string(), v.trim().to_string()).is_none(),
                "{k} set twice in [{section}]"
            );
        }
    }
    out
}

#[test]
fn the_gateway_role_is_passed_to_the_operator() {
    let Some(helm) = tools::helm() else { return };
    for (set, want) in [("gateway.role=gw_saas_eu", "gw_saas_eu"), ("gateway.role=", "")] {
        let docs = documents(&render(&helm, &["--set", set]));
        let d = find_doc(&docs, "Deployment", Some("tenant-operator")).unwrap();
        let env = d["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap();
        let var = env
            .iter()
            .find(|e| e["name"] == "GATEWAY_ROLE")
            .unwrap_or_else(|| panic!("--set {set}: no GATEWAY_ROLE"));
        assert_eq!(var["value"], want, "--set {set}");
    }
}

#[test]
fn pgbouncer_is_off_by_default() {
    let Some(helm) = tools::helm() else { return };
    let defaults = render(&helm, &[]);
    assert!(
        !defaults.to_lowercase().contains("pgbouncer"),
        "something of PgBouncer is rendered by default"
    );
    // Its settings alone do not turn it on.
    assert!(!render(
        &helm,
        &["--set", "pgbouncer.databaseHost=postgres.db.svc,pgbouncer.poolSize=7"]
    )
    .to_lowercase()
    .contains("pgbouncer"));
}

#[test]
fn pgbouncer_pools_transactions_as_the_gateway_and_is_hardened() {
    let Some(helm) = tools::helm() else { return };
    let yaml = render(
        &helm,
        &["--set", "pgbouncer.enabled=true,pgbouncer.databaseHost=postgres.db.svc,pgbouncer.databasePort=5433,pgbouncer.poolSize=7,pgbouncer.serverLifetime=900,pgbouncer.maxClientConnections=500"],
    );
    if let Some(kv) = tools::kubernetes_validate() {
        validate_1_32(&kv, "pgbouncer", &yaml);
    }
    let docs = documents(&yaml);
    let name = "tenant-operator-pgbouncer";

    // The configuration: transaction pooling, the session reset after
    // every transaction, the configured sizes, one Postgres for every
    // database name, the gateway's credentials from a file.
    let cm = find_doc(&docs, "ConfigMap", Some(name)).expect("the PgBouncer ConfigMap");
    let ini = cm["data"]["pgbouncer.ini"].as_str().expect("pgbouncer.ini");
    let pgb = ini_section(ini, "pgbouncer");
    for (k, v) in [
        ("pool_mode", "transaction"),
        ("server_reset_query", "DISCARD ALL"),
        ("server_reset_query_always", "1"),
        ("ignore_startup_parameters", "extra_float_digits,options"),
        ("auth_type", "scram-sha-256"),
        ("auth_file", "/etc/pgbouncer-auth/userlist.txt"),
        ("default_pool_size", "7"),
        ("max_client_conn", "500"),
        ("server_lifetime", "900"),
        ("server_idle_timeout", "600"),
        ("listen_port", "6432"),
    ] {
        assert_eq!(pgb.get(k).map(String::as_str), Some(v), "pgbouncer.ini: {k}\n{ini}");
    }
    assert!(
        !pgb.contains_key("auth_query") && !pgb.contains_key("auth_user"),
        "auth_query needs a superuser's function: {ini}"
    );
    assert!(
        ini.contains("\"Catalog memory\""),
        "server_lifetime's comment points to docs/data-path.md: {ini}"
    );
    assert_eq!(
        ini_section(ini, "databases"),
        [("*".to_string(), "host=postgres.db.svc port=5433".to_string())].into()
    );
    let defaults = documents(&render(
        &helm,
        &["--set", "pgbouncer.enabled=true,pgbouncer.databaseHost=db"],
    ));
    let ini = find_doc(&defaults, "ConfigMap", Some(name)).unwrap()["data"]["pgbouncer.ini"]
        .as_str()
        .unwrap()
        .to_string();
    let pgb = ini_section(&ini, "pgbouncer");
    for (k, v) in [
        ("default_pool_size", "20"),
        ("max_client_conn", "1000"),
        ("server_lifetime", "600"),
    ] {
        assert_eq!(pgb.get(k).map(String::as_str), Some(v), "default {k}");
    }
    assert_eq!(ini_section(&ini, "databases")["*"], "host=db port=5432");

    // The Service selects the PgBouncer pods, and none of the operator's
    // selectors (its Deployment, metrics Service, PDB) does.
    let d = find_doc(&docs, "Deployment", Some(name)).expect("the PgBouncer Deployment");
    let pod_labels = d["spec"]["template"]["metadata"]["labels"].as_object().unwrap();
    let selects = |sel: &serde_json::Value| {
        sel.as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| pod_labels.get(k) == Some(v))
    };
    let svc = find_doc(&docs, "Service", Some(name)).expect("the PgBouncer Service");
    assert!(
        selects(&svc["spec"]["selector"]),
        "the Service does not select the PgBouncer pods: {}",
        svc["spec"]["selector"]
    );
    assert!(selects(&d["spec"]["selector"]["matchLabels"]));
    assert_eq!(svc["spec"]["ports"][0]["port"], 6432);
    let op = find_doc(&docs, "Deployment", Some("tenant-operator")).unwrap();
    for (what, sel) in [
        ("the operator's Deployment", &op["spec"]["selector"]["matchLabels"]),
        (
            "the metrics Service",
            &find_doc(&docs, "Service", Some("tenant-operator-metrics")).unwrap()["spec"]["selector"],
        ),
        (
            "the operator's PDB",
            &find_doc(&docs, "PodDisruptionBudget", None).unwrap()["spec"]["selector"]["matchLabels"],
        ),
    ] {
        assert!(!selects(sel), "{what} selects the PgBouncer pods");
    }

    // The pod: the init container writes userlist.txt from the gateway's
    // Secret into a memory volume PgBouncer reads; both are hardened.
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(pod["automountServiceAccountToken"], false);
    let init = &pod["initContainers"][0];
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "ghcr.io/cloudnative-pg/pgbouncer:1.23.1");
    assert_eq!(
        init["image"], c["image"],
        "the init container uses the PgBouncer image by default"
    );
    assert_eq!(
        c["command"],
        serde_json::json!(["pgbouncer", "/etc/pgbouncer/pgbouncer.ini"])
    );
    let env = init["env"].as_array().unwrap();
    let mut keys: Vec<&str> = env
        .iter()
        .map(|e| {
            let r = &e["valueFrom"]["secretKeyRef"];
            assert_eq!(r["name"], "tenant-gateway-db", "{e}");
            r["key"].as_str().unwrap()
        })
        .collect();
    keys.sort();
    assert_eq!(keys, ["password", "user"]);
    let script = init["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        script.starts_with("/bin/sh -c") && script.contains("/etc/pgbouncer-auth/userlist.txt"),
        "{script}"
    );
    let mount = |c: &serde_json::Value, path: &str| -> String {
        let m = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("{} mounts nothing at {path}", c["name"]));
        m["name"].as_str().unwrap().to_string()
    };
    let auth = mount(init, "/etc/pgbouncer-auth");
    assert_eq!(mount(c, "/etc/pgbouncer-auth"), auth);
    let vol = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == auth.as_str())
        .unwrap();
    assert_eq!(vol["emptyDir"]["medium"], "Memory", "the password stays off disk");
    let config = mount(c, "/etc/pgbouncer");
    let vol = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == config.as_str())
        .unwrap();
    assert_eq!(vol["configMap"]["name"], name);
    for c in [init, c] {
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "{}", c["name"]);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false, "{}", c["name"]);
        assert_eq!(c["securityContext"]["runAsNonRoot"], true, "{}", c["name"]);
        assert_eq!(
            c["securityContext"]["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{}",
            c["name"]
        );
        assert_eq!(
            c["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{}",
            c["name"]
        );
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "{} has no memory limit",
            c["name"]
        );
    }
    assert_eq!(c["ports"][0]["containerPort"], 6432);
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["tcpSocket"]["port"], "pgbouncer", "{probe}");
    }
    assert!(
        d["spec"]["template"]["metadata"]["annotations"]["checksum/config"].is_string(),
        "a changed pgbouncer.ini rolls the pods"
    );

    // A separate init image when asked.
    let docs = documents(&render(
        &helm,
        &[
            "--set",
            "pgbouncer.enabled=true,pgbouncer.databaseHost=db,pgbouncer.initImage=busybox:1.36",
        ],
    ));
    assert_eq!(
        find_doc(&docs, "Deployment", Some(name)).unwrap()["spec"]["template"]["spec"]["initContainers"][0]["image"],
        "busybox:1.36"
    );
}

#[test]
fn pgbouncer_refuses_to_render_without_a_database_host_or_a_gateway() {
    let Some(helm) = tools::helm() else { return };
    for (set, says) in [
        ("pgbouncer.enabled=true", "pgbouncer.databaseHost is required"),
        (
            "pgbouncer.enabled=true,pgbouncer.databaseHost=db,gateway.role=",
            "set gateway.role",
        ),
    ] {
        let o = run(
            &helm,
            &[
                "template",
                "tenant-operator",
                CHART,
                "--namespace",
                "tenant-system",
                "--set",
                set,
            ],
        );
        assert!(!o.status.success(), "--set {set} rendered");
        assert!(
            text(&o).contains(says),
            "--set {set}: the error does not say {says:?}: {}",
            text(&o)
        );
    }
}

/// The rules of `doc` (a Role or ClusterRole) that mention Secrets.
fn secret_rules(doc: &serde_json::Value) -> Vec<serde_json::Value> {
    doc["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == "secrets" || x == "*")
        })
        .cloned()
        .collect()
}

#[test]
fn the_chart_grants_no_cluster_wide_secret_access_and_reads_only_configured_namespaces() {
    let Some(helm) = tools::helm() else { return };
    for (set, backup) in [
        (None, false),
        (Some("backup.store=s3://bucket/p,backup.envSecret=e"), true),
    ] {
        let docs = documents(&render(
            &helm,
            set.map(|s| vec!["--set", s]).unwrap_or_default().as_slice(),
        ));
        // Whatever is enabled, no ClusterRole names Secrets: cluster-wide
        // list/watch of Secrets is reading every Secret.
        for cr in docs.iter().filter(|d| d["kind"] == "ClusterRole") {
            assert!(
                secret_rules(cr).is_empty(),
                "ClusterRole {} grants Secrets: {:?}",
                cr["metadata"]["name"],
                secret_rules(cr)
            );
        }
        // Secrets only in the release namespace, and no source namespace
        // by default. The backup Jobs get no Role at all (no API token: their
        // tenant's login and key come in a Secret mounted by the kubelet).
        let roles: Vec<&serde_json::Value> = docs.iter().filter(|d| d["kind"] == "Role").collect();
        assert_eq!(roles.len(), 1, "Roles (backup enabled: {backup}): {roles:?}");
        for r in &roles {
            assert_eq!(r["metadata"]["namespace"], "tenant-system");
        }
        let d = find_doc(&docs, "Deployment", Some("tenant-operator")).unwrap();
        let env = d["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap();
        assert!(
            !env.iter().any(|e| e["name"] == "SECRET_SOURCE_NAMESPACES"),
            "a source namespace by default"
        );
    }
    // Each configured source namespace gets a Role reading Secrets there
    // (list/watch: the operator watches them by metadata), bound to the
    // operator's ServiceAccount, and the operator is told the list.
    let docs = documents(&render(
        &helm,
        &["--set", "secretSources.namespaces={acme-onboarding,erp-secrets}"],
    ));
    for ns in ["acme-onboarding", "erp-secrets"] {
        let role = docs
            .iter()
            .find(|d| d["kind"] == "Role" && d["metadata"]["namespace"] == ns)
            .unwrap_or_else(|| panic!("no Role in {ns}"));
        assert_eq!(
            role["rules"],
            serde_json::json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}])
        );
        let binding = docs
            .iter()
            .find(|d| d["kind"] == "RoleBinding" && d["metadata"]["namespace"] == ns)
            .unwrap_or_else(|| panic!("no RoleBinding in {ns}"));
        assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
        assert_eq!(
            binding["subjects"],
            serde_json::json!([{"kind": "ServiceAccount", "name": "tenant-operator", "namespace": "tenant-system"}])
        );
    }
    assert_eq!(docs.iter().filter(|d| d["kind"] == "Role").count(), 3);
    let d = find_doc(&docs, "Deployment", Some("tenant-operator")).unwrap();
    let env = d["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    let var = env
        .iter()
        .find(|e| e["name"] == "SECRET_SOURCE_NAMESPACES")
        .expect("SECRET_SOURCE_NAMESPACES");
    assert_eq!(var["value"], "acme-onboarding,erp-secrets");
    // The release namespace (root keys, database DSN) is never a source.
    let o = run(
        &helm,
        &[
            "template",
            "tenant-operator",
            CHART,
            "--namespace",
            "tenant-system",
            "--set",
            "secretSources.namespaces={tenant-system}",
        ],
    );
    assert!(
        !o.status.success() && text(&o).contains("never sources"),
        "{}",
        text(&o)
    );
    let o = run(
        &helm,
        &[
            "template",
            "tenant-operator",
            CHART,
            "--namespace",
            "tenant-system",
            "--set",
            "secretSources.namespaces={Not_A_Namespace}",
        ],
    );
    assert!(
        !o.status.success() && text(&o).contains("secretSources.namespaces"),
        "{}",
        text(&o)
    );
}

/// The API test server binary, started on a free port.
struct Server {
    child: std::process::Child,
    kubeconfig: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        let exe = std::env::current_exe().unwrap();
        let bin = exe.parent().and_then(|p| p.parent()).unwrap().join("kube-test-server");
        assert!(
            bin.exists(),
            "{} is missing: build the workspace's binaries first",
            bin.display()
        );
        let child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--quiet", "--kubeconfig"])
            .arg(&kubeconfig)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(Duration::from_secs(20), "the API test server's kubeconfig", || {
            kubeconfig.exists()
        });
        Server {
            child,
            kubeconfig,
            _dir: dir,
        }
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let o = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl");
        assert!(o.status.success(), "kubectl {}: {}", args.join(" "), text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn helm_install_into_the_api_test_server_creates_the_operators_objects() {
    let Some(helm) = tools::helm() else { return };
    let s = Server::start();
    let kc = s.kubeconfig.to_str().unwrap();
    let o = run(
        &helm,
        &[
            "--kubeconfig",
            kc,
            "install",
            "tenant-operator",
            CHART,
            "--namespace",
            "tenant-system",
            "--create-namespace",
            "--timeout",
            "60s",
        ],
    );
    assert!(o.status.success(), "helm install: {}", text(&o));
    assert!(
        text(&o).contains("tenant-operator keys new-secret"),
        "NOTES.txt tells how to make the root keys: {}",
        text(&o)
    );
    for (kind, name, ns) in [
        ("crd", "tenants.tenancy.dev", None),
        ("crd", "migrationsets.tenancy.dev", None),
        ("deployment", "tenant-operator", Some("tenant-system")),
        ("serviceaccount", "tenant-operator", Some("tenant-system")),
        ("clusterrole", "tenant-operator", None),
        ("clusterrolebinding", "tenant-operator", None),
        ("role", "tenant-operator", Some("tenant-system")),
        ("rolebinding", "tenant-operator", Some("tenant-system")),
        ("service", "tenant-operator-metrics", Some("tenant-system")),
        ("poddisruptionbudget", "tenant-operator", Some("tenant-system")),
    ] {
        let mut args = vec!["get", kind, name, "-o", "name"];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        s.kubectl(&args);
    }
    // The stored Deployment keeps what the pods need.
    let image = s.kubectl(&[
        "get",
        "deployment",
        "tenant-operator",
        "-n",
        "tenant-system",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    ]);
    assert_eq!(image, "tenant-operator:0.1.0");
    let subject = s.kubectl(&[
        "get",
        "clusterrolebinding",
        "tenant-operator",
        "-o",
        "jsonpath={.subjects[0].namespace}/{.subjects[0].name}",
    ]);
    assert_eq!(subject, "tenant-system/tenant-operator");
    // A Tenant can be applied right after the install (the CRDs came first).
    let t = "apiVersion: tenancy.dev/v1alpha1\nkind: Tenant\nmetadata:\n  name: acme\nspec:\n  displayName: Acme\n";
    let mut child = Command::new("kubectl")
        .args(["--kubeconfig", kc, "apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), t.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "kubectl apply tenant: {}", text(&o));
    let o = run(
        &helm,
        &[
            "--kubeconfig",
            kc,
            "upgrade",
            "tenant-operator",
            CHART,
            "--namespace",
            "tenant-system",
            "--set",
            "replicaCount=3,pgbouncer.enabled=true,pgbouncer.databaseHost=db.example",
        ],
    );
    assert!(o.status.success(), "helm upgrade: {}", text(&o));
    assert!(
        text(&o).contains("rollout restart deployment/tenant-operator-pgbouncer"),
        "NOTES.txt tells how to pick up a new gateway password: {}",
        text(&o)
    );
    assert_eq!(
        s.kubectl(&[
            "get",
            "deployment",
            "tenant-operator",
            "-n",
            "tenant-system",
            "-o",
            "jsonpath={.spec.replicas}"
        ]),
        "3"
    );
    for kind in ["deployment", "service", "configmap"] {
        s.kubectl(&[
            "get",
            kind,
            "tenant-operator-pgbouncer",
            "-n",
            "tenant-system",
            "-o",
            "name",
        ]);
    }
    let o = run(
        &helm,
        &[
            "--kubeconfig",
            kc,
            "uninstall",
            "tenant-operator",
            "--namespace",
            "tenant-system",
        ],
    );
    assert!(o.status.success(), "helm uninstall: {}", text(&o));
}

#[test]
fn the_dev_postgres_manifest_is_valid_against_kubernetes_1_32() {
    let Some(kv) = tools::kubernetes_validate() else { return };
    validate_1_32(
        &kv,
        "dev-postgres",
        &std::fs::read_to_string(format!("{ROOT}/deploy/dev/postgres.yaml")).unwrap(),
    );
}

#[test]
fn the_image_runs_as_the_non_root_user_the_chart_expects() {
    let dockerfile = std::fs::read_to_string(format!("{ROOT}/Dockerfile")).unwrap();
    let values: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(format!("{CHART}/values.yaml")).unwrap()).unwrap();
    let uid = values["podSecurityContext"]["runAsUser"]
        .as_i64()
        .expect("podSecurityContext.runAsUser");
    assert_ne!(uid, 0);
    let user = dockerfile
        .lines()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("a USER line in the runtime stage");
    assert_eq!(
        user,
        format!("USER {uid}:{uid}"),
        "the image's user and the chart's runAsUser differ"
    );
    assert!(
        dockerfile.contains("postgresql-client-${PG_MAJOR}") && dockerfile.contains("ARG PG_MAJOR=15"),
        "the runtime carries postgresql-client-15"
    );
    assert!(
        dockerfile.contains("FROM debian:${DEBIAN_RELEASE}-slim") && dockerfile.contains("ARG DEBIAN_RELEASE=bookworm")
    );
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/tenant-operator\"]"));
}
