//! End to end: sealed secrets, root key rotation and crypto-shredding,
//! through kubectl, the operator binary and its `secrets open` CLI.

mod support;

use std::time::Duration;

use base64::Engine;
use support::e2e::{tenant_yaml, wait_for, Env, NAMESPACE, ROOT_KEYS};
use support::unique;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn source_secret(ns: &str, name: &str, pairs: &[(&str, &str)]) -> String {
    let data: String = pairs
        .iter()
        .map(|(k, v)| format!("  {k}: {}\n", B64.encode(v)))
        .collect();
    format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {ns}\ndata:\n{data}")
}

fn with_secrets(name: &str, ns: &str) -> String {
    tenant_yaml(
        name,
        &format!(
            "  secrets:\n  - name: erp-password\n    secretRef: {{namespace: {ns}, name: erp, key: password}}\n  - name: sso-secret\n    secretRef: {{namespace: {ns}, name: sso, key: client-secret}}\n"
        ),
    )
}

fn open(env: &Env, tenant: &str, name: &str) -> Result<String, String> {
    let out = env.operator_cli(&["secrets", "open", "--tenant", tenant, "--name", name]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn cond(env: &Env, tenant: &str, field: &str) -> String {
    env.jsonpath(
        &["tenant", tenant],
        &format!("{{.status.conditions[?(@.type==\"SecretsSealed\")].{field}}}"),
    )
}

fn sealed_value(env: &Env, tenant: &str, key: &str) -> Vec<u8> {
    let escaped = key.replace('.', "\\.");
    let v = env.jsonpath(
        &["secret", "-n", NAMESPACE, &format!("tenant-{tenant}-sealed")],
        &format!("{{.data.{escaped}}}"),
    );
    B64.decode(v.trim()).unwrap_or_default()
}

fn set_root_keys(env: &Env, keys: &[(&str, [u8; 32])], active: &str) {
    let data: String = keys
        .iter()
        .map(|(v, k)| format!("  {v}: {}\n", B64.encode(k)))
        .collect();
    let yaml = format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: {ROOT_KEYS}\n  namespace: {NAMESPACE}\ndata:\n{data}  active: {}\n", B64.encode(active));
    let out = env.kubectl_stdin(&["replace"], &yaml);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn current_root_keys(env: &Env) -> Vec<(String, [u8; 32])> {
    let json = env.kubectl_ok(&["get", "secret", "-n", NAMESPACE, ROOT_KEYS, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut out = vec![];
    for (k, val) in v["data"].as_object().unwrap() {
        if k != "active" {
            let bytes = B64.decode(val.as_str().unwrap()).unwrap();
            out.push((k.clone(), bytes.try_into().unwrap()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_are_sealed_opened_rotated_and_shredded() {
    let (a, b) = (unique("seal-a"), unique("seal-b"));
    let src_ns = format!("src-{}", &a[a.len() - 6..]);
    // A source namespace: every Secret in it may be sealed, and a missing
    // one is reported as missing.
    let env = Env::start_with("e2e_seal", None, &[("SECRET_SOURCE_NAMESPACES", &src_ns)]).await;
    env.kubectl_ok(&["create", "namespace", &src_ns]);
    for (n, pairs) in [
        ("erp", vec![("password", "erp-pass-1")]),
        ("sso", vec![("client-secret", "sso-secret-1")]),
    ] {
        assert!(env
            .kubectl_stdin(&["apply"], &source_secret(&src_ns, n, &pairs))
            .status
            .success());
    }
    for t in [&a, &b] {
        assert!(env
            .kubectl_stdin(&["apply"], &with_secrets(t, &src_ns))
            .status
            .success());
    }
    env.wait_ready(&a);
    env.wait_ready(&b);
    wait_for(Duration::from_secs(30), "SecretsSealed", || {
        cond(&env, &a, "status") == "True" && cond(&env, &b, "status") == "True"
    });

    // Sealed values are envelopes, never the plaintext; the CLI opens them.
    let sealed = env.kubectl_ok(&[
        "get",
        "secret",
        "-n",
        NAMESPACE,
        &format!("tenant-{a}-sealed"),
        "-o",
        "yaml",
    ]);
    assert!(
        !sealed.contains(&B64.encode("erp-pass-1")) && !sealed.contains("erp-pass-1"),
        "plaintext in the sealed Secret"
    );
    assert_eq!(open(&env, &a, "erp-password").unwrap(), "erp-pass-1");
    assert_eq!(open(&env, &a, "sso-secret").unwrap(), "sso-secret-1");
    assert_eq!(env.jsonpath(&["tenant", &a], "{.status.keyVersion}"), "v1");
    assert!(
        !env.operator_log().contains("erp-pass-1"),
        "plaintext in the operator's log"
    );

    // B's envelope presented as A's: authentication error.
    let b_env = sealed_value(&env, &b, "erp-password");
    let file = env.dir.path().join("b-envelope");
    std::fs::write(&file, &b_env).unwrap();
    let out = env.operator_cli(&[
        "secrets",
        "open",
        "--tenant",
        &a,
        "--name",
        "erp-password",
        "--envelope-file",
        file.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "A opened B's envelope");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("authentication"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A changed source is re-sealed; a missing one is named, the other stays.
    assert!(env
        .kubectl_stdin(
            &["apply"],
            &source_secret(&src_ns, "erp", &[("password", "erp-pass-2")])
        )
        .status
        .success());
    wait_for(Duration::from_secs(30), "the re-seal", || {
        open(&env, &a, "erp-password").ok().as_deref() == Some("erp-pass-2")
    });
    env.kubectl_ok(&["delete", "secret", "-n", &src_ns, "sso"]);
    wait_for(Duration::from_secs(30), "SourceMissing", || {
        cond(&env, &a, "reason") == "SourceMissing"
    });
    assert!(
        cond(&env, &a, "message").contains(&format!("Secret {src_ns}/sso not found")),
        "{}",
        cond(&env, &a, "message")
    );
    assert_eq!(open(&env, &a, "erp-password").unwrap(), "erp-pass-2");
    assert!(env
        .kubectl_stdin(
            &["apply"],
            &source_secret(&src_ns, "sso", &[("client-secret", "sso-secret-1")])
        )
        .status
        .success());
    wait_for(Duration::from_secs(30), "Sealed again", || {
        cond(&env, &a, "status") == "True"
    });

    // Rotation: v2 becomes active; every tenant is re-sealed under it and
    // old envelopes keep opening while v1 is present.
    let a_v1 = sealed_value(&env, &a, "erp-password");
    let mut keys = current_root_keys(&env);
    let v2: [u8; 32] = rand::random();
    keys.push(("v2".into(), v2));
    let refs: Vec<(&str, [u8; 32])> = keys.iter().map(|(v, k)| (v.as_str(), *k)).collect();
    set_root_keys(&env, &refs, "v2");
    wait_for(Duration::from_secs(30), "keyVersion v2", || {
        env.jsonpath(&["tenant", &a], "{.status.keyVersion}") == "v2"
            && env.jsonpath(&["tenant", &b], "{.status.keyVersion}") == "v2"
    });
    assert_eq!(open(&env, &a, "erp-password").unwrap(), "erp-pass-2");
    std::fs::write(&file, &a_v1).unwrap();
    let out = env.operator_cli(&[
        "secrets",
        "open",
        "--tenant",
        &a,
        "--name",
        "erp-password",
        "--envelope-file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "erp-pass-2",
        "a v1 envelope no longer opens: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Removing v2 while it is in use is refused: the old keys stay, the
    // condition says why, secrets keep opening.
    let v1_only: Vec<(&str, [u8; 32])> = refs.iter().filter(|(v, _)| *v == "v1").cloned().collect();
    set_root_keys(&env, &v1_only, "v1");
    wait_for(Duration::from_secs(30), "KeyRemovalRefused", || {
        cond(&env, &a, "reason") == "KeyRemovalRefused"
    });
    assert!(cond(&env, &a, "message").contains("v2"));
    set_root_keys(&env, &refs, "v2");
    wait_for(Duration::from_secs(30), "Sealed after the keys came back", || {
        cond(&env, &a, "reason") == "Sealed"
    });

    // Crypto-shredding: after the delete the salt is gone, so the envelope
    // copied out before cannot be opened with the root keys.
    let a_env = sealed_value(&env, &a, "erp-password");
    env.kubectl_ok(&["delete", "tenant", &a, "--timeout=60s"]);
    assert!(
        !env.kubectl(&["get", "secret", "-n", NAMESPACE, &format!("tenant-{a}-sealed")])
            .status
            .success(),
        "the sealed Secret survived"
    );
    std::fs::write(&file, &a_env).unwrap();
    let out = env.operator_cli(&[
        "secrets",
        "open",
        "--tenant",
        &a,
        "--name",
        "erp-password",
        "--envelope-file",
        file.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "a deleted tenant's envelope still opens");
    assert_eq!(
        open(&env, &b, "erp-password").unwrap(),
        "erp-pass-2",
        "B was disturbed by A's delete"
    );
}

fn labelled_secret(ns: &str, name: &str, labels: &[(&str, &str)], pairs: &[(&str, &str)]) -> String {
    let labels: String = labels.iter().map(|(k, v)| format!("    {k}: \"{v}\"\n")).collect();
    let data: String = pairs
        .iter()
        .map(|(k, v)| format!("  {k}: {}\n", B64.encode(v)))
        .collect();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n{labels}data:\n{data}"
    )
}

fn sealed_keys(env: &Env, tenant: &str) -> Vec<String> {
    let json = env.kubectl_ok(&[
        "get",
        "secret",
        "-n",
        NAMESPACE,
        &format!("tenant-{tenant}-sealed"),
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["data"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// A Tenant author cannot have the operator seal what the author could not
/// read: under the chart's default RBAC (no source namespace, no
/// cluster-wide Secret access), naming the root keys, the operator's
/// database Secret, a kube-system Secret (present or not) or a Secret
/// opted in for another tenant gets `SourceNotAllowed` with one message
/// whether the Secret exists or not, and nothing of them is sealed; a
/// Secret whose namespace owner granted the operator `get` on it and
/// labelled it for the tenant is sealed, until the label goes.
#[tokio::test(flavor = "multi_thread")]
async fn only_opted_in_sources_are_sealed_and_refusals_do_not_tell_existence() {
    let Some(helm) = support::tools::helm() else { return };
    if std::env::var("E2E_KUBECONFIG").is_ok_and(|v| !v.is_empty()) {
        eprintln!("SKIPPED: needs the API test server's RBAC enforcement");
        return;
    }
    let docs = support::tools::documents(&support::tools::render(&helm, &[]));
    let rbac: String = docs
        .iter()
        .filter(|d| {
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
            ]
            .iter()
            .any(|k| d["kind"] == *k)
        })
        .map(|d| format!("---\n{}", serde_yaml::to_string(d).unwrap()))
        .collect();
    let mut env = Env::start_rbac("e2e_src", &rbac).await;
    let t = unique("src");
    let optin = format!("optin-{}", &t[t.len() - 6..]);
    env.kubectl_ok(&["create", "namespace", &optin]);
    // The namespace owner's part: the label naming the tenant, and a Role
    // letting the operator get exactly these Secrets.
    for y in [
        labelled_secret(
            &optin,
            "erp",
            &[("tenancy.dev/seal-for", &t)],
            &[("password", "erp-opted-in")],
        ),
        labelled_secret(
            &optin,
            "for-another",
            &[("tenancy.dev/seal-for", "globex")],
            &[("password", "not-for-you")],
        ),
        labelled_secret("kube-system", "cluster-secret", &[], &[("token", "kube-system-token")]),
        labelled_secret(
            NAMESPACE,
            "tenant-operator-db",
            &[("tenancy.dev/seal-for", &t)],
            &[("url", "postgresql://admin:pw@db/x")],
        ),
    ] {
        let out = env.kubectl_stdin(&["apply"], &y);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let grant = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: seal-source, namespace: {optin}}}\n\
         rules:\n- apiGroups: [\"\"]\n  resources: [secrets]\n  resourceNames: [erp, for-another]\n  verbs: [get]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: seal-source, namespace: {optin}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: seal-source}}\n\
         subjects:\n- {{kind: ServiceAccount, name: tenant-operator, namespace: {NAMESPACE}}}\n"
    );
    let out = env.kubectl_stdin(&["apply"], &grant);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let entry = |name: &str, ns: &str, secret: &str, key: &str| {
        format!("  - name: {name}\n    secretRef: {{namespace: {ns}, name: {secret}, key: {key}}}\n")
    };
    let refs = [
        ("erp", optin.as_str(), "erp", "password"),
        ("root", NAMESPACE, support::e2e::ROOT_KEYS, "v1"),
        ("db", NAMESPACE, "tenant-operator-db", "url"),
        ("kube", "kube-system", "cluster-secret", "token"),
        ("ghost", "kube-system", "no-such-secret", "token"),
        ("other", optin.as_str(), "for-another", "password"),
        ("unlisted", optin.as_str(), "not-granted", "password"),
    ];
    let spec = format!(
        "  secrets:\n{}",
        refs.iter().map(|(n, ns, s, k)| entry(n, ns, s, k)).collect::<String>()
    );
    assert!(env.kubectl_stdin(&["apply"], &tenant_yaml(&t, &spec)).status.success());
    env.wait_ready(&t);
    wait_for(Duration::from_secs(30), "SourceNotAllowed", || {
        cond(&env, &t, "reason") == "SourceNotAllowed"
    });
    wait_for(Duration::from_secs(30), "the opted-in source sealed", || {
        open(&env, &t, "erp").ok().as_deref() == Some("erp-opted-in")
    });
    assert_eq!(sealed_keys(&env, &t), ["erp"], "only the opted-in source is sealed");

    let message = cond(&env, &t, "message");
    let (policy, _) = tenant_operator::controller::tenant::sealing::SourcePolicy::new(NAMESPACE, "");
    let spec_of = |name: &str| {
        let (n, ns, s, k) = refs.iter().find(|r| r.0 == name).unwrap();
        tenant_operator::api::tenant::TenantSecret {
            name: n.to_string(),
            secret_ref: tenant_operator::api::tenant::SecretKeyRef {
                namespace: ns.to_string(),
                name: s.to_string(),
                key: k.to_string(),
            },
        }
    };
    let expect =
        |name: &str| tenant_operator::controller::tenant::sealing::not_allowed_message(&policy, &t, &spec_of(name));
    for name in ["root", "db", "kube", "ghost", "other", "unlisted"] {
        assert!(message.contains(&expect(name)), "{name}: {message}");
    }
    // A kube-system Secret that exists and one that does not read the same
    // (and nothing anywhere says "not found").
    assert_eq!(
        expect("kube")
            .replace("kube:", "ghost:")
            .replace("cluster-secret", "no-such-secret"),
        expect("ghost")
    );
    assert!(
        !message.contains("not found") && !message.contains("forbidden"),
        "{message}"
    );
    for plain in ["kube-system-token", "not-for-you", "postgresql://admin"] {
        assert!(!env.operator_log().contains(plain), "{plain} in the operator's log");
    }

    // The owner withdraws the opt-in: at the next resync the source is no
    // longer allowed and its envelope leaves the sealed Secret.
    env.kubectl_ok(&["label", "secret", "-n", &optin, "erp", "tenancy.dev/seal-for-"]);
    wait_for(Duration::from_secs(30), "the withdrawn source dropped", || {
        sealed_keys(&env, &t).is_empty()
    });
    assert!(cond(&env, &t, "message").contains(&expect("erp")));
    env.stop_operator();
    // The operator never read a kube-system Secret: it has no right to, and
    // it did not try to read their data.
    let log = env.server_log();
    let tried: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("/namespaces/kube-system/secrets") && l.ends_with(" \"\""))
        .collect();
    assert!(
        tried.iter().all(|l| l.contains(" 403 ")),
        "the operator read kube-system Secrets: {tried:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_short_or_garbled_root_keys_stop_start_up_with_a_clear_message() {
    let env = Env::start("e2e_badkeys").await;
    let run = |secret: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenant-operator"))
            .arg("run")
            .env("KUBECONFIG", &env.kubeconfig)
            .env("DATABASE_URL", &env.admin_url)
            .env("OPERATOR_NAMESPACE", NAMESPACE)
            .env("ROOT_KEYS_SECRET", secret)
            .output()
            .unwrap();
        assert!(!out.status.success(), "the operator started with root keys {secret}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run("no-such-keys");
    assert!(err.contains("no-such-keys") && err.contains("does not exist"), "{err}");

    let short = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: short-keys\n  namespace: {NAMESPACE}\ndata:\n  v1: {}\n  active: {}\n",
        B64.encode([1u8; 16]),
        B64.encode("v1")
    );
    assert!(env.kubectl_stdin(&["apply"], &short).status.success());
    let err = run("short-keys");
    assert!(
        err.contains("v1") && err.contains("16"),
        "the message should name the version and its length: {err}"
    );

    let no_active = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: no-active\n  namespace: {NAMESPACE}\ndata:\n  v1: {}\n",
        B64.encode([1u8; 32])
    );
    assert!(env.kubectl_stdin(&["apply"], &no_active).status.success());
    let err = run("no-active");
    assert!(err.contains("active"), "{err}");
}

/// The KMS path end to end: `keys new-secret --kms-key-id` wraps a fresh key
/// with KMS (moto on loopback), the Secret holds only ciphertext, and the
/// operator unwraps it at start; without KMS the same Secret is refused.
#[tokio::test(flavor = "multi_thread")]
async fn kms_wrapped_root_keys_are_unwrapped_at_start() {
    let Some(endpoint) = std::env::var("TEST_KMS_ENDPOINT").ok().filter(|e| !e.is_empty()) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "TEST_KMS_ENDPOINT is not set but CI is: run through scripts/with-moto.sh"
        );
        eprintln!("skipping: TEST_KMS_ENDPOINT is not set (run through scripts/with-moto.sh)");
        return;
    };
    let env = Env::start("e2e_kms").await;
    let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into());
    let conf = aws_sdk_kms::Config::builder()
        .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
        .region(aws_sdk_kms::config::Region::new(region.clone()))
        .credentials_provider(aws_sdk_kms::config::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .endpoint_url(&endpoint)
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .build();
    let key_id = aws_sdk_kms::Client::from_conf(conf)
        .create_key()
        .send()
        .await
        .unwrap()
        .key_metadata()
        .unwrap()
        .key_id()
        .to_owned();

    let out = env.operator_cli(&[
        "keys",
        "new-secret",
        "--name",
        "kms-keys",
        "--kms-key-id",
        &key_id,
        "--kms-endpoint",
        &endpoint,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifest = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(env.kubectl_stdin(&["apply"], &manifest).status.success());
    let stored = env.kubectl_ok(&[
        "get",
        "secret",
        "-n",
        NAMESPACE,
        "kms-keys",
        "-o",
        "jsonpath={.data.v1}",
    ]);
    assert!(
        B64.decode(stored.trim()).unwrap().len() > 32,
        "the Secret holds a raw key, not a KMS ciphertext"
    );

    let client = env.client().await;
    let kms = tenant_operator::keys::kms::KmsConfig {
        endpoint: Some(endpoint.clone()),
        region,
        key_id: Some(key_id),
    };
    let src = tenant_operator::keys::KeySource {
        namespace: NAMESPACE.into(),
        secret: "kms-keys".into(),
        kms: Some(kms),
    };
    let ring = tenant_operator::keys::load(&client, &src)
        .await
        .expect("the operator unwraps the KMS-wrapped keys");
    assert_eq!(ring.active_version().to_string(), "v1");
    let plain = tenant_operator::keys::KeySource {
        kms: None,
        ..src.clone()
    };
    let err = tenant_operator::keys::load(&client, &plain)
        .await
        .expect_err("a wrapped key was used as a raw key");
    assert!(err.to_string().contains("v1"), "{err}");

    // The operator binary starts with them.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tenant-operator"))
        .arg("run")
        .env("KUBECONFIG", &env.kubeconfig)
        .env("DATABASE_URL", &env.admin_url)
        .env("OPERATOR_NAMESPACE", NAMESPACE)
        .env("ROOT_KEYS_SECRET", "kms-keys")
        .env("ROOT_KEYS_KMS", "true")
        .env("KMS_ENDPOINT", &endpoint)
        .env("LEADER_ELECTION", "false")
        .env("METRICS_ADDR", "127.0.0.1:0")
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("root keys loaded") {
                let _ = tx.send(line);
                return;
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.is_ok(), "the operator did not load the KMS-wrapped keys");
}
