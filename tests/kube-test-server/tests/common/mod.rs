//! Shared helpers: start a server per test, run kubectl/helm against it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub struct TestServer {
    pub url: String,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    handle: Option<kube_test_server::ServerHandle>,
    rt: Option<tokio::runtime::Runtime>,
}

impl TestServer {
    /// Starts the server in-process on its own runtime (so blocking kubectl calls are fine).
    pub fn start() -> TestServer {
        Self::start_with(kube_test_server::Config::default())
    }

    pub fn start_with(config: kube_test_server::Config) -> TestServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let handle = rt.block_on(kube_test_server::start_on("127.0.0.1:0", config)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, handle.kubeconfig()).unwrap();
        TestServer {
            url: handle.url(),
            dir,
            kubeconfig,
            handle: Some(handle),
            rt: Some(rt),
        }
    }

    pub fn handle(&self) -> &kube_test_server::ServerHandle {
        self.handle.as_ref().unwrap()
    }

    fn env(&self, c: &mut Command) {
        c.env("KUBECONFIG", &self.kubeconfig)
            .env("KUBECACHEDIR", self.dir.path().join("kube-cache"))
            .env("HOME", self.dir.path())
            .env("HELM_CACHE_HOME", self.dir.path().join("helm-cache"))
            .env("HELM_CONFIG_HOME", self.dir.path().join("helm-config"))
            .env("HELM_DATA_HOME", self.dir.path().join("helm-data"));
    }

    pub fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()));
        self.env(&mut c);
        c.args(args);
        c
    }

    /// Runs kubectl; returns the output whatever the exit code.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args).output().expect("running kubectl")
    }

    /// Runs kubectl and panics unless it succeeds; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    pub fn helm(&self, helm: &Path, args: &[&str]) -> Output {
        let mut c = Command::new(helm);
        self.env(&mut c);
        c.args(args);
        c.output().expect("running helm")
    }

    pub fn write(&self, name: &str, content: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p.to_string_lossy().to_string()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let (Some(rt), Some(h)) = (self.rt.take(), self.handle.take()) {
            rt.block_on(h.shutdown());
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

pub fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .to_string_lossy()
        .to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Polls `f` until it returns true or `secs` pass.
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}
