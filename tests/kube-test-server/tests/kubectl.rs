//! Conformance through the real kubectl.
mod common;

use common::{eventually, fixture, stderr, stdout, TestServer};
use std::time::{Duration, Instant};

fn with_crd() -> TestServer {
    let s = TestServer::start();
    s.kubectl_ok(&["apply", "-f", &fixture("tenant-crd.yaml")]);
    s.kubectl_ok(&[
        "wait",
        "--for=condition=established",
        "crd/tenants.tenancy.dev",
        "--timeout=10s",
    ]);
    s
}

#[test]
fn crd_apply_get_printer_columns_and_short_name() {
    let s = with_crd();
    let out = s.kubectl_ok(&["apply", "-f", &fixture("tenant-acme.yaml")]);
    assert!(out.contains("tenant.tenancy.dev/acme created"), "{out}");
    let out = s.kubectl_ok(&["get", "tenants"]);
    let header = out.lines().next().unwrap();
    for col in ["NAME", "PHASE", "SCHEMA", "READY", "AGE"] {
        assert!(header.contains(col), "missing {col} in {out}");
    }
    assert!(out.contains("acme"), "{out}");
    let out = s.kubectl_ok(&[
        "get",
        "tn",
        "acme",
        "-o",
        "jsonpath={.spec.database.connectionLimit} {.spec.state} {.metadata.generation}",
    ]);
    assert_eq!(out, "50 Active 1", "defaults applied and generation set");
    // a second apply of the same file changes nothing
    let out = s.kubectl_ok(&["apply", "-f", &fixture("tenant-acme.yaml")]);
    assert!(out.contains("unchanged"), "{out}");
    // category and discovery
    let out = s.kubectl_ok(&["api-resources", "--api-group=tenancy.dev"]);
    assert!(
        out.contains("tenants") && out.contains("tn") && out.contains("Tenant"),
        "{out}"
    );
}

#[test]
fn server_side_apply_and_conflicts() {
    let s = with_crd();
    let out = s.kubectl_ok(&["apply", "--server-side", "-f", &fixture("tenant-acme.yaml")]);
    assert!(out.contains("serverside-applied"), "{out}");
    // another manager changes a field the kubectl manager owns: conflict, then force
    let other = s.write("other.yaml", "apiVersion: tenancy.dev/v1alpha1\nkind: Tenant\nmetadata: {name: acme}\nspec: {displayName: Acme Corp, database: {connectionLimit: 70}}\n");
    let o = s.kubectl(&["apply", "--server-side", "--field-manager=other", "-f", &other]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("conflict with \"kubectl\""), "{}", stderr(&o));
    assert!(stderr(&o).contains(".spec.database.connectionLimit"), "{}", stderr(&o));
    s.kubectl_ok(&[
        "apply",
        "--server-side",
        "--field-manager=other",
        "--force-conflicts",
        "-f",
        &other,
    ]);
    let v = s.kubectl_ok(&[
        "get",
        "tenant",
        "acme",
        "-o",
        "jsonpath={.spec.database.connectionLimit}",
    ]);
    assert_eq!(v, "70");
    let mf = s.kubectl_ok(&[
        "get",
        "tenant",
        "acme",
        "-o",
        "jsonpath={.metadata.managedFields[*].manager}",
        "--show-managed-fields",
    ]);
    assert!(mf.contains("kubectl") && mf.contains("other"), "{mf}");
    // server-side dry run does not write
    let rv1 = s.kubectl_ok(&["get", "tenant", "acme", "-o", "jsonpath={.metadata.resourceVersion}"]);
    let changed = s.write(
        "c.yaml",
        "apiVersion: tenancy.dev/v1alpha1\nkind: Tenant\nmetadata: {name: acme}\nspec: {displayName: Changed}\n",
    );
    s.kubectl_ok(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "--dry-run=server",
        "-f",
        &changed,
    ]);
    let rv2 = s.kubectl_ok(&[
        "get",
        "tenant",
        "acme",
        "-o",
        "jsonpath={.metadata.resourceVersion} {.spec.displayName}",
    ]);
    assert_eq!(rv2, format!("{rv1} Acme Corp"));
}

#[test]
fn server_side_apply_after_client_side_apply_takes_over_without_conflict() {
    let s = with_crd();
    s.kubectl_ok(&["apply", "-f", &fixture("tenant-acme.yaml")]);
    let changed = s.write(
        "t.yaml",
        "apiVersion: tenancy.dev/v1alpha1\nkind: Tenant\nmetadata: {name: acme}\nspec: {displayName: Acme Corp, database: {connectionLimit: 60}}\n",
    );
    s.kubectl_ok(&["apply", "--server-side", "-f", &changed]);
    let v = s.kubectl_ok(&[
        "get",
        "tenant",
        "acme",
        "-o",
        "jsonpath={.spec.database.connectionLimit}",
    ]);
    assert_eq!(v, "60");
    // a different manager still conflicts
    let other = s.write(
        "o.yaml",
        "apiVersion: tenancy.dev/v1alpha1\nkind: Tenant\nmetadata: {name: acme}\nspec: {displayName: Acme Corp, database: {connectionLimit: 61}}\n",
    );
    let o = s.kubectl(&["apply", "--server-side", "--field-manager=someone", "-f", &other]);
    assert!(stderr(&o).contains("conflict with \"kubectl\""), "{}", stderr(&o));
}

#[test]
fn status_subresource_and_wait_for_condition() {
    let s = with_crd();
    s.kubectl_ok(&["apply", "-f", &fixture("tenant-acme.yaml")]);
    let mut waiter = s
        .kubectl_cmd(&["wait", "--for=condition=Ready", "tenant/acme", "--timeout=20s"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        waiter.try_wait().unwrap().is_none(),
        "wait returned before the condition was set"
    );
    let patch = r#"{"status":{"phase":"Active","schema":"tenant_acme","conditions":[{"type":"Ready","status":"True","reason":"Provisioned","message":"ok","lastTransitionTime":"2025-01-01T00:00:00Z"}]},"spec":{"displayName":"ignored on status"}}"#;
    s.kubectl_ok(&[
        "patch",
        "tenant",
        "acme",
        "--subresource=status",
        "--type=merge",
        "-p",
        patch,
    ]);
    let st = waiter.wait().unwrap();
    assert!(st.success());
    let out = s.kubectl_ok(&["get", "tenants", "--no-headers"]);
    let cols: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(&cols[..4], &["acme", "Active", "tenant_acme", "True"], "{out}");
    let out = s.kubectl_ok(&[
        "get",
        "tenant",
        "acme",
        "-o",
        "jsonpath={.spec.displayName} {.metadata.generation}",
    ]);
    assert_eq!(out, "Acme Corp 1", "status writes ignore spec and keep generation");
    // main-resource writes ignore status; spec changes bump generation
    s.kubectl_ok(&[
        "patch",
        "tenant",
        "acme",
        "--type=merge",
        "-p",
        r#"{"spec":{"displayName":"New"},"status":{"phase":"Hacked"}}"#,
    ]);
    let out = s.kubectl_ok(&[
        "get",
        "tenant",
        "acme",
        "-o",
        "jsonpath={.spec.displayName} {.status.phase} {.metadata.generation}",
    ]);
    assert_eq!(out, "New Active 2");
    // metadata-only change: no generation bump
    s.kubectl_ok(&["label", "tenant", "acme", "team=a"]);
    let out = s.kubectl_ok(&["get", "tenant", "acme", "-o", "jsonpath={.metadata.generation}"]);
    assert_eq!(out, "2");
}

#[test]
fn delete_blocks_until_finalizer_removed() {
    let s = with_crd();
    s.kubectl_ok(&["apply", "-f", &fixture("tenant-acme.yaml")]);
    s.kubectl_ok(&["patch", "tenant", "acme", "--type=json", "-p", r#"[{"op":"test","path":"/metadata/finalizers","value":null},{"op":"add","path":"/metadata/finalizers","value":["tenancy.dev/cleanup"]}]"#]);
    let started = Instant::now();
    let mut del = s
        .kubectl_cmd(&["delete", "tenant", "acme", "--timeout=30s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(eventually(10, || !s
        .kubectl_ok(&["get", "tenant", "acme", "-o", "jsonpath={.metadata.deletionTimestamp}"])
        .is_empty()));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        del.try_wait().unwrap().is_none(),
        "kubectl delete returned while a finalizer was pending"
    );
    let out = s.kubectl_ok(&[
        "get",
        "tenant",
        "acme",
        "-o",
        "jsonpath={.metadata.deletionGracePeriodSeconds}",
    ]);
    assert_eq!(out, "0");
    // new finalizers are refused while deleting
    let o = s.kubectl(&[
        "patch",
        "tenant",
        "acme",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["tenancy.dev/cleanup","x/y"]}}"#,
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no new finalizers can be added if the object is being deleted"),
        "{}",
        stderr(&o)
    );
    s.kubectl_ok(&["patch", "tenant", "acme", "--type=json", "-p", r#"[{"op":"test","path":"/metadata/finalizers/0","value":"tenancy.dev/cleanup"},{"op":"remove","path":"/metadata/finalizers/0"}]"#]);
    let out = del.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(25));
    let o = s.kubectl(&["get", "tenant", "acme"]);
    assert!(
        stderr(&o).contains(r#"tenants.tenancy.dev "acme" not found"#),
        "{}",
        stderr(&o)
    );
}

#[test]
fn invalid_objects_are_refused_with_field_paths() {
    let s = with_crd();
    let o = s.kubectl(&["apply", "-f", &fixture("tenant-invalid.yaml")]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("spec.database.connectionLimit: Invalid value: 5000: spec.database.connectionLimit in body should be less than or equal to 1000"), "{e}");
    assert!(
        e.contains(r#"spec.state: Unsupported value: "Sleeping": supported values: "Active", "Suspended""#),
        "{e}"
    );
    // CEL rule on the name (valid subdomain, but not a DNS label of <= 40 chars)
    let long = "a".repeat(41);
    let f = s.write(
        "long.yaml",
        &format!(
            "apiVersion: tenancy.dev/v1alpha1\nkind: Tenant\nmetadata: {{name: {long}}}\nspec: {{displayName: x}}\n"
        ),
    );
    let o = s.kubectl(&["apply", "-f", &f]);
    assert!(stderr(&o).contains("metadata.name: Invalid value: \"object\": the tenant name must be a DNS-1123 label of at most 40 characters"), "{}", stderr(&o));
    let f = s.write(
        "dot.yaml",
        "apiVersion: tenancy.dev/v1alpha1\nkind: Tenant\nmetadata: {name: a.b}\nspec: {displayName: x}\n",
    );
    let o = s.kubectl(&["apply", "-f", &f]);
    assert!(
        stderr(&o).contains("the tenant name must be a DNS-1123 label"),
        "{}",
        stderr(&o)
    );
    let f = s.write(
        "upper.yaml",
        "apiVersion: tenancy.dev/v1alpha1\nkind: Tenant\nmetadata: {name: Bad_Name}\nspec: {displayName: x}\n",
    );
    let o = s.kubectl(&["apply", "-f", &f]);
    assert!(stderr(&o).contains("a lowercase RFC 1123 subdomain"), "{}", stderr(&o));
    // required field
    let f = s.write(
        "req.yaml",
        "apiVersion: tenancy.dev/v1alpha1\nkind: Tenant\nmetadata: {name: req}\nspec: {state: Active}\n",
    );
    let o = s.kubectl(&["apply", "-f", &f]);
    assert!(
        stderr(&o).contains("spec.displayName: Required value"),
        "{}",
        stderr(&o)
    );
    // unknown fields: strict field validation (kubectl's default)
    let f = s.write(
        "unknown.yaml",
        "apiVersion: tenancy.dev/v1alpha1\nkind: Tenant\nmetadata: {name: unk}\nspec: {displayName: x, foo: 1}\n",
    );
    let o = s.kubectl(&["apply", "-f", &f]);
    assert!(
        stderr(&o).contains(r#"strict decoding error: unknown field "spec.foo""#),
        "{}",
        stderr(&o)
    );
    // with --validate=warn it is pruned with a warning
    let o = s.kubectl(&["apply", "--validate=warn", "-f", &f]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(r#"unknown field "spec.foo""#), "{}", stderr(&o));
    let out = s.kubectl_ok(&["get", "tenant", "unk", "-o", "json"]);
    assert!(!out.contains("\"foo\""), "{out}");
    assert!(stdout(&s.kubectl(&["get", "tenants", "-o", "name"])).contains("tenant.tenancy.dev/unk"));
}

#[test]
fn builtins_apply_strategic_merge_and_namespace_deletion() {
    let s = TestServer::start();
    let ns = s.write("ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: team-a}\n");
    s.kubectl_ok(&["apply", "-f", &ns]);
    let dep = |image: &str, env: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: team-a, labels: {{app: web}}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      containers:\n      - name: web\n        image: {image}\n        env: [{{name: A, value: \"{env}\"}}]\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: creds, namespace: team-a}}\nstringData: {{password: hunter2}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cfg, namespace: team-a}}\ndata: {{a: \"{env}\"}}\n---\napiVersion: batch/v1\nkind: CronJob\nmetadata: {{name: backup, namespace: team-a}}\nspec:\n  schedule: \"0 3 * * *\"\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers: [{{name: b, image: busybox}}]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: r, namespace: team-a}}\nrules: [{{apiGroups: [\"\"], resources: [secrets], verbs: [get]}}]\n---\napiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {{name: pdb, namespace: team-a}}\nspec: {{maxUnavailable: 1, selector: {{matchLabels: {{app: web}}}}}}\n"
        )
    };
    let f = s.write("dep.yaml", &dep("nginx:1", "1"));
    s.kubectl_ok(&["apply", "-f", &f]);
    let f = s.write("dep.yaml", &dep("nginx:2", "2"));
    let out = s.kubectl_ok(&["apply", "-f", &f]);
    assert!(out.contains("deployment.apps/web configured"), "{out}");
    let out = s.kubectl_ok(&["get", "deploy", "web", "-n", "team-a", "-o", "jsonpath={.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].env[0].value} {.metadata.generation}"]);
    assert_eq!(out, "nginx:2 2 2");
    let out = s.kubectl_ok(&[
        "get",
        "secret",
        "creds",
        "-n",
        "team-a",
        "-o",
        "jsonpath={.data.password} {.type}",
    ]);
    assert_eq!(out, "aHVudGVyMg== Opaque");
    let out = s.kubectl_ok(&["get", "secrets", "-A"]);
    assert!(out.contains("team-a") && out.contains("creds"), "{out}");
    let out = s.kubectl_ok(&["get", "cm", "-n", "team-a", "-l", "app notin (x)", "-o", "name"]);
    assert!(out.contains("configmap/cfg"), "{out}");
    // missing namespace
    let o = s.kubectl(&["create", "configmap", "x", "-n", "nope"]);
    assert!(stderr(&o).contains(r#"namespaces "nope" not found"#), "{}", stderr(&o));
    // deleting the namespace deletes what is in it; kubectl waits for it
    s.kubectl_ok(&["delete", "namespace", "team-a", "--timeout=20s"]);
    let out = s.kubectl_ok(&[
        "get",
        "secrets,configmaps,deployments,cronjobs,roles,pdb",
        "-A",
        "-o",
        "name",
    ]);
    assert!(
        !out.contains("creds") && !out.contains("cfg") && !out.contains("web"),
        "{out}"
    );
    let o = s.kubectl(&["get", "ns", "team-a"]);
    assert!(stderr(&o).contains(r#"namespaces "team-a" not found"#));
}

#[test]
fn garbage_collection_of_owned_objects() {
    let s = TestServer::start();
    s.kubectl_ok(&["create", "configmap", "owner"]);
    let uid = s.kubectl_ok(&["get", "cm", "owner", "-o", "jsonpath={.metadata.uid}"]);
    let dep = s.write(
        "dep.yaml",
        &format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: owned\n  ownerReferences: [{{apiVersion: v1, kind: ConfigMap, name: owner, uid: {uid}}}]\n"),
    );
    s.kubectl_ok(&["apply", "-f", &dep]);
    s.kubectl_ok(&["delete", "cm", "owner"]);
    assert!(eventually(5, || !s
        .kubectl(&["get", "secret", "owned"])
        .status
        .success()));
    // orphan policy keeps the dependent and drops the reference
    s.kubectl_ok(&["create", "configmap", "owner2"]);
    let uid = s.kubectl_ok(&["get", "cm", "owner2", "-o", "jsonpath={.metadata.uid}"]);
    let dep = s.write(
        "dep2.yaml",
        &format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: kept\n  ownerReferences: [{{apiVersion: v1, kind: ConfigMap, name: owner2, uid: {uid}}}]\n"),
    );
    s.kubectl_ok(&["apply", "-f", &dep]);
    s.kubectl_ok(&["delete", "cm", "owner2", "--cascade=orphan"]);
    let out = s.kubectl_ok(&["get", "secret", "kept", "-o", "jsonpath={.metadata.ownerReferences}"]);
    assert_eq!(out, "");
}

#[test]
fn crd_deletion_removes_its_resources_and_discovery() {
    let s = with_crd();
    s.kubectl_ok(&["apply", "-f", &fixture("tenant-acme.yaml")]);
    s.kubectl_ok(&["delete", "crd", "tenants.tenancy.dev", "--timeout=20s"]);
    let o = s.kubectl(&["get", "tenants"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("the server doesn't have a resource type \"tenants\"")
            || e.contains("the server could not find the requested resource"),
        "{e}"
    );
    let apis = s.kubectl_ok(&["get", "--raw", "/apis"]);
    assert!(!apis.contains("tenancy.dev"), "{apis}");
    let o = s.kubectl(&["get", "--raw", "/apis/tenancy.dev/v1alpha1/tenants"]);
    assert!(!o.status.success());
}

#[test]
fn kubectl_create_generators_send_protobuf_that_is_decoded() {
    let s = TestServer::start();
    s.kubectl_ok(&["create", "namespace", "gen"]);
    for args in [
        vec![
            "create",
            "secret",
            "generic",
            "s",
            "--from-literal=password=hunter2",
            "-n",
            "gen",
        ],
        vec!["create", "configmap", "c", "--from-literal=a=b", "-n", "gen"],
        vec!["create", "serviceaccount", "sa", "-n", "gen"],
        vec![
            "create",
            "deployment",
            "d",
            "--image=nginx:1",
            "--replicas=2",
            "--port=8080",
            "-n",
            "gen",
        ],
        vec![
            "create",
            "cronjob",
            "backup",
            "--image=busybox",
            "--schedule=0 3 * * *",
            "-n",
            "gen",
            "--",
            "date",
        ],
        vec!["create", "job", "manual", "--from=cronjob/backup", "-n", "gen"],
        vec!["create", "service", "clusterip", "svc", "--tcp=80:8080", "-n", "gen"],
        vec!["create", "role", "r", "--verb=get", "--resource=secrets", "-n", "gen"],
        vec![
            "create",
            "rolebinding",
            "rb",
            "--role=r",
            "--serviceaccount=gen:sa",
            "-n",
            "gen",
        ],
        vec![
            "create",
            "poddisruptionbudget",
            "pdb",
            "--selector=app=d",
            "--min-available=1",
            "-n",
            "gen",
        ],
    ] {
        s.kubectl_ok(&args);
    }
    let out = s.kubectl_ok(&["get", "deploy", "d", "-n", "gen", "-o", "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].ports[0].containerPort}"]);
    assert_eq!(out, "2 nginx:1 8080");
    let out = s.kubectl_ok(&[
        "get",
        "job",
        "manual",
        "-n",
        "gen",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].command[0]} {.metadata.ownerReferences[0].kind}",
    ]);
    assert_eq!(out, "date CronJob");
    let out = s.kubectl_ok(&[
        "get",
        "secret",
        "s",
        "-n",
        "gen",
        "-o",
        "jsonpath={.data.password} {.type}",
    ]);
    assert_eq!(out, "aHVudGVyMg== Opaque");
    let out = s.kubectl_ok(&[
        "get",
        "svc",
        "svc",
        "-n",
        "gen",
        "-o",
        "jsonpath={.spec.type} {.spec.ports[0].targetPort}",
    ]);
    assert_eq!(out, "ClusterIP 8080");
    let out = s.kubectl_ok(&[
        "get",
        "rolebinding",
        "rb",
        "-n",
        "gen",
        "-o",
        "jsonpath={.roleRef.name} {.subjects[0].name}",
    ]);
    assert_eq!(out, "r sa");
}
