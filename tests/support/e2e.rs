//! The end-to-end environment: a Kubernetes API (the bundled test server, or
//! a real cluster named by `E2E_KUBECONFIG`), a database of the test's own
//! on the suite's Postgres, and the operator binary, driven with kubectl.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::TestDb;

pub const NAMESPACE: &str = "tenant-system";
pub const ROOT_KEYS: &str = "tenant-operator-root-keys";
/// The image and env Secret the operator gives backup and restore Jobs.
pub const BACKUP_IMAGE: &str = "tenant-operator:e2e";
pub const BACKUP_ENV_SECRET: &str = "tenant-operator-backup-env";

/// The identity the operator has under [`Env::start_rbac`] (the chart's
/// ServiceAccount) and the bearer token that carries it.
pub const OPERATOR_USER: &str = "system:serviceaccount:tenant-system:tenant-operator";
pub const OPERATOR_TOKEN: &str = "tenant-operator-e2e-token";

pub struct Env {
    pub db: TestDb,
    pub admin_role: String,
    pub admin_url: String,
    pub kubeconfig: PathBuf,
    pub dir: tempfile::TempDir,
    server: Option<Child>,
    operator: Option<Child>,
    /// The operator's own kubeconfig when it runs under RBAC
    /// ([`Env::start_rbac`]); else it uses `kubeconfig`.
    operator_kubeconfig: Option<PathBuf>,
    /// Extra environment of the operator processes ([`Env::start_with`]).
    operator_env: Vec<(String, String)>,
    /// Held while a real cluster is shared: its tests run one at a time.
    _serial: Option<std::sync::MutexGuard<'static, ()>>,
}

static REAL_CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn workspace_bin(name: &str) -> PathBuf {
    // Integration tests run from target/<profile>/deps/; the workspace's
    // binaries sit one level up (`make test` builds them first).
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace --bins`)",
        bin.display()
    );
    bin
}

impl Env {
    pub async fn start(label: &str) -> Env {
        Self::start_opts(label, None).await
    }

    /// Like [`Env::start`], with the operator authorized by RBAC on the API
    /// test server: `rbac` (ServiceAccount, Roles, bindings: what the chart
    /// renders) is applied, and the operator's requests carry the token of
    /// [`OPERATOR_USER`], so the server refuses (403) anything those rules
    /// do not allow. Not for a real cluster.
    pub async fn start_rbac(label: &str, rbac: &str) -> Env {
        Self::start_opts(label, Some(rbac)).await
    }

    /// Like [`Env::start`] (or [`Env::start_rbac`] when `rbac` is given),
    /// with extra environment variables for the operator.
    pub async fn start_with(label: &str, rbac: Option<&str>, env: &[(&str, &str)]) -> Env {
        Self::start_env(label, rbac, env).await
    }

    async fn start_opts(label: &str, rbac: Option<&str>) -> Env {
        Self::start_env(label, rbac, &[]).await
    }

    async fn start_env(label: &str, rbac: Option<&str>, operator_env: &[(&str, &str)]) -> Env {
        let (db, admin_role, admin_url) = TestDb::with_own_admin(label).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let (kubeconfig, server, serial) = match std::env::var("E2E_KUBECONFIG") {
            Ok(path) if !path.is_empty() => (
                PathBuf::from(path),
                None,
                Some(REAL_CLUSTER.lock().unwrap_or_else(|p| p.into_inner())),
            ),
            _ => {
                let kubeconfig = dir.path().join("kubeconfig");
                let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
                let mut server = Command::new(workspace_bin("kube-test-server"));
                if rbac.is_some() {
                    server.args(["--rbac-user", &format!("{OPERATOR_TOKEN}={OPERATOR_USER}")]);
                }
                let child = server
                    .args(["--listen", "127.0.0.1:0", "--kubeconfig"])
                    .arg(&kubeconfig)
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("start kube-test-server");
                wait_for(Duration::from_secs(20), "the API test server's kubeconfig", || {
                    kubeconfig.exists()
                });
                (kubeconfig, Some(child), None)
            }
        };
        assert!(
            rbac.is_none() || server.is_some(),
            "start_rbac needs the API test server (E2E_KUBECONFIG is set)"
        );
        let mut env = Env {
            db,
            admin_role,
            admin_url,
            kubeconfig,
            dir,
            server,
            operator: None,
            operator_kubeconfig: None,
            operator_env: operator_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _serial: serial,
        };
        env.kubectl_ok(&["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/crds/crds.yaml")]);
        env.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "crd/tenants.tenancy.dev",
            "--timeout=30s",
        ]);
        let ns = env.kubectl(&["get", "namespace", NAMESPACE]);
        if !ns.status.success() {
            env.kubectl_ok(&["create", "namespace", NAMESPACE]);
        }
        if !env
            .kubectl(&["get", "secret", "-n", NAMESPACE, ROOT_KEYS])
            .status
            .success()
        {
            let yaml = tenant_operator::keys::new_secret_yaml(NAMESPACE, ROOT_KEYS);
            let out = env.kubectl_stdin(&["apply"], &yaml);
            assert!(
                out.status.success(),
                "creating the root keys: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if let Some(rbac) = rbac {
            let out = env.kubectl_stdin(&["apply"], rbac);
            assert!(
                out.status.success(),
                "applying the RBAC objects: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let admin = std::fs::read_to_string(&env.kubeconfig).expect("kubeconfig");
            assert!(
                admin.contains("kube-test-server-dummy-token"),
                "the API test server's kubeconfig changed format"
            );
            let path = env.dir.path().join("operator.kubeconfig");
            std::fs::write(&path, admin.replace("kube-test-server-dummy-token", OPERATOR_TOKEN)).unwrap();
            env.operator_kubeconfig = Some(path);
        }
        env.start_operator();
        env
    }

    /// Runs the operator binary with this environment's kubeconfig and
    /// database (for its CLI subcommands).
    pub fn operator_cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tenant-operator"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("DATABASE_URL", &self.admin_url)
            .env("OPERATOR_NAMESPACE", NAMESPACE)
            .output()
            .expect("run the operator CLI")
    }

    pub fn start_operator(&mut self) {
        // The same identity across restarts: a restarted operator renews
        // its own leader Lease at once instead of waiting for it to expire.
        let child = self.spawn_operator("operator-0", "operator.log");
        self.operator = Some(child);
    }

    /// Starts one more operator process (leader election: `identity` is its
    /// POD_NAME), logging to `log` in the test's directory; the caller owns
    /// the process. Its metrics server listens on a free loopback port
    /// (see [`metrics_addr`]).
    pub fn spawn_operator(&self, identity: &str, log: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(log))
            .unwrap();
        Command::new(env!("CARGO_BIN_EXE_tenant-operator"))
            .arg("run")
            .env(
                "KUBECONFIG",
                self.operator_kubeconfig.as_ref().unwrap_or(&self.kubeconfig),
            )
            .env("DATABASE_URL", &self.admin_url)
            .env("OPERATOR_NAMESPACE", NAMESPACE)
            .env("RESYNC_SECONDS", "2")
            .env("TENANT_CONCURRENCY", "4")
            .env("RUST_LOG", "info,tenant_operator=debug")
            .env("POD_NAME", identity)
            // Roles are cluster-wide: each test database its own gateway.
            .env("GATEWAY_ROLE", format!("gw_{}", self.db.name))
            .env("METRICS_ADDR", "127.0.0.1:0")
            // The usage sampler writes status.usage of new tenants; off, so
            // that the steady-state checks (no write at all) keep their meaning.
            .env("USAGE_INTERVAL_SECONDS", "0")
            // Backups (tests/e2e_backup.rs): CronJobs and restore Jobs run
            // this image; the store is a folder of the test's own.
            .env("OPERATOR_IMAGE", BACKUP_IMAGE)
            .env("BACKUP_ENV_SECRET", BACKUP_ENV_SECRET)
            .env("BACKUP_STORE", self.backup_store())
            .envs(self.operator_env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the operator")
    }

    /// The backup store of this environment (a folder in its directory).
    pub fn backup_store(&self) -> String {
        format!("file://{}/backups", self.dir.path().display())
    }

    /// The content of a log file in the test's directory.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// The API test server's request log (empty against a real cluster).
    pub fn server_log(&self) -> String {
        self.log("server.log")
    }

    pub fn stop_operator(&mut self) {
        if let Some(mut c) = self.operator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn operator_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("operator.log")).unwrap_or_default()
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("run kubectl")
    }

    /// Runs kubectl and returns its stdout; panics with its stderr and the
    /// operator's log on failure.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}\n--- operator log (tail) ---\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.operator_log(), 30)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl <args> -f -` with `yaml` on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], yaml: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }

    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("client config");
        kube::Client::try_from(cfg).expect("client")
    }

    /// `kubectl get` of one field through jsonpath.
    pub fn jsonpath(&self, what: &[&str], path: &str) -> String {
        let arg = format!("jsonpath={path}");
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["-o", &arg]);
        let out = self.kubectl(&args);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One key of a Secret in the operator's namespace, decoded.
    pub fn secret_value(&self, secret: &str, key: &str) -> String {
        use base64::Engine;
        let b64 = self.jsonpath(&["secret", "-n", NAMESPACE, secret], &format!("{{.data.{key}}}"));
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .unwrap_or_default(),
        )
        .unwrap_or_default()
    }

    pub fn wait_ready(&self, tenant: &str) {
        self.kubectl_ok(&[
            "wait",
            "--for=condition=Ready",
            &format!("tenant/{tenant}"),
            "--timeout=60s",
        ]);
    }

    /// `kubectl patch --type=merge` of Tenant `name` with `patch` (JSON).
    pub fn patch_tenant(&self, name: &str, patch: &str) -> String {
        self.kubectl_ok(&["patch", "tenant", name, "--type=merge", "-p", patch])
    }

    /// `kubectl apply` of Tenant `name` ([`tenant_yaml`] with `extra_spec`),
    /// then waits for it to be Ready.
    pub fn apply_ready(&self, name: &str, extra_spec: &str) {
        let out = self.kubectl_stdin(&["apply"], &tenant_yaml(name, extra_spec));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        self.wait_ready(name);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop_operator();
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

/// The address the operator's metrics server bound (from the last
/// "metrics and health server listening" line of its JSON log).
pub fn metrics_addr(log: &str) -> Option<String> {
    log.lines()
        .filter(|l| l.contains("metrics and health server listening"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.pointer("/fields/addr").and_then(|a| a.as_str()).map(str::to_owned))
        .next_back()
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `cond` every 100ms until it holds; panics naming `what` after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Tenant manifest.
pub fn tenant_yaml(name: &str, extra_spec: &str) -> String {
    format!("apiVersion: tenancy.dev/v1alpha1\nkind: Tenant\nmetadata:\n  name: {name}\nspec:\n  displayName: Test {name}\n{extra_spec}")
}
