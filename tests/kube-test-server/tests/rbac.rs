//! RBAC for a chosen identity (`Config::rbac_tokens` / `--rbac-user`): its
//! requests are authorized against the stored Roles, ClusterRoles and
//! bindings; the admin's are not.
mod common;

use common::{stderr, TestServer};

const TOKEN: &str = "op-token";
const USER: &str = "system:serviceaccount:ops:operator";

fn as_operator(s: &TestServer, args: &[&str]) -> std::process::Output {
    // kubectl sends no bearer token over plain HTTP: it names the user with
    // the Impersonate-User header instead.
    let mut full = vec!["--as", USER];
    full.extend_from_slice(args);
    s.kubectl(&full)
}

#[test]
fn a_token_with_rbac_gets_exactly_what_its_bindings_grant() {
    let s = TestServer::start_with(kube_test_server::Config {
        rbac_tokens: vec![(TOKEN.into(), USER.into())],
        ..Default::default()
    });
    s.kubectl_ok(&["create", "namespace", "ops"]);
    s.kubectl_ok(&["create", "namespace", "other"]);
    // Nothing bound yet: refused, with the real server's message.
    let o = as_operator(&s, &["get", "secrets", "-n", "ops"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!("secrets is forbidden: User \"{USER}\" cannot list resource \"secrets\" in API group \"\" in the namespace \"ops\"")),
        "{}",
        stderr(&o)
    );
    let rbac = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: read-cm\nrules:\n- apiGroups: [\"\"]\n  resources: [\"configmaps\"]\n  verbs: [\"get\", \"list\"]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: read-cm\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: read-cm}\nsubjects:\n- {kind: ServiceAccount, name: operator, namespace: ops}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: secrets\n  namespace: ops\nrules:\n- apiGroups: [\"\"]\n  resources: [\"secrets\"]\n  verbs: [\"create\", \"list\"]\n- apiGroups: [\"\"]\n  resources: [\"secrets\"]\n  resourceNames: [\"mine\"]\n  verbs: [\"delete\"]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: secrets\n  namespace: ops\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: secrets}\nsubjects:\n- {kind: ServiceAccount, name: operator, namespace: ops}\n"
        .to_string();
    let path = s.write("rbac.yaml", &rbac);
    s.kubectl_ok(&["apply", "-f", &path]);
    // ClusterRoleBinding: everywhere.
    assert!(as_operator(&s, &["get", "configmaps", "-A"]).status.success());
    assert!(as_operator(&s, &["get", "configmaps", "-n", "other"]).status.success());
    // RoleBinding: only in its namespace.
    assert!(as_operator(
        &s,
        &["create", "secret", "generic", "mine", "-n", "ops", "--from-literal=a=b"]
    )
    .status
    .success());
    assert!(as_operator(&s, &["get", "secrets", "-n", "ops"]).status.success());
    let o = as_operator(
        &s,
        &["create", "secret", "generic", "x", "-n", "other", "--from-literal=a=b"],
    );
    assert!(
        !o.status.success() && stderr(&o).contains("cannot create resource \"secrets\""),
        "{}",
        stderr(&o)
    );
    // resourceNames: only the named object.
    s.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "theirs",
        "-n",
        "ops",
        "--from-literal=a=b",
    ]);
    let o = as_operator(&s, &["delete", "secret", "theirs", "-n", "ops"]);
    assert!(
        !o.status.success() && stderr(&o).contains("secrets \"theirs\" is forbidden"),
        "{}",
        stderr(&o)
    );
    assert!(as_operator(&s, &["delete", "secret", "mine", "-n", "ops"])
        .status
        .success());
    // Verbs not granted, and the admin (any other token) unaffected.
    assert!(
        !as_operator(&s, &["delete", "configmap", "kube-root-ca.crt", "-n", "default"])
            .status
            .success()
    );
    assert!(!as_operator(&s, &["get", "namespaces"]).status.success());
    s.kubectl_ok(&["get", "namespaces"]);
    // Discovery is open to everyone.
    assert!(as_operator(&s, &["api-resources"]).status.success());
}

#[test]
fn a_server_side_apply_that_creates_needs_create_as_well_as_patch() {
    let s = TestServer::start_with(kube_test_server::Config {
        rbac_tokens: vec![(TOKEN.into(), USER.into())],
        ..Default::default()
    });
    s.kubectl_ok(&["create", "namespace", "ops"]);
    let role = |verbs: &str| {
        format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: cm\n  namespace: ops\nrules:\n- apiGroups: [\"\"]\n  resources: [\"configmaps\"]\n  verbs: [{verbs}]\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: cm\n  namespace: ops\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: cm}}\nsubjects:\n- {{kind: ServiceAccount, name: operator, namespace: ops}}\n"
        )
    };
    s.kubectl_ok(&["apply", "-f", &s.write("patch.yaml", &role("\"get\", \"patch\""))]);
    let cm = s.write(
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  namespace: ops\ndata:\n  a: \"1\"\n",
    );
    let apply = |file: &str| {
        as_operator(
            &s,
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=op",
                "-f",
                file,
            ],
        )
    };
    // Absent: the apply would create it, which `patch` alone does not allow.
    let o = apply(&cm);
    assert!(
        !o.status.success() && stderr(&o).contains("cannot create resource \"configmaps\""),
        "{}",
        stderr(&o)
    );
    // Present: `patch` is enough.
    s.kubectl_ok(&["create", "configmap", "applied", "-n", "ops", "--from-literal=a=0"]);
    let o = apply(&cm);
    assert!(o.status.success(), "{}", stderr(&o));
    // With `create` too, an apply creates.
    s.kubectl_ok(&["delete", "configmap", "applied", "-n", "ops"]);
    s.kubectl_ok(&[
        "apply",
        "-f",
        &s.write("both.yaml", &role("\"get\", \"patch\", \"create\"")),
    ]);
    let o = apply(&cm);
    assert!(o.status.success(), "{}", stderr(&o));
}
