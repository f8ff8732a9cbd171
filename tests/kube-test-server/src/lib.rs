//! An in-memory Kubernetes API server for end-to-end tests: plain HTTP on loopback, speaking
//! enough of the real REST API (discovery, OpenAPI v3, CRUD, patch, server-side apply, watch,
//! finalizers, status subresource, garbage collection, CRD schema validation, tables) for
//! `kubectl`, `helm` and kube-rs to run against it unchanged. See README.md for what differs
//! from a real API server.

pub mod defaults;
pub mod discovery;
pub mod patch;
pub mod proto;
pub mod rbac;
pub mod resources;
pub mod schema;
pub mod selectors;
pub mod server;
pub mod status;
pub mod store;
pub mod table;

use axum::extract::{Request, State};
use axum::response::Response;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How many watch events are kept; a watch from an older resourceVersion gets 410 Expired.
    pub watch_history: usize,
    /// How often BOOKMARK events are sent to watches that allow them.
    pub bookmark_interval: Duration,
    /// Log one line per request (time, method, URI, status, user agent) to stderr.
    pub log_requests: bool,
    /// (bearer token, user): requests with one of these tokens, or
    /// impersonating one of these users (`kubectl --as`), are authorized as
    /// that user against the stored RBAC objects (see `rbac`); all other
    /// requests are allowed.
    pub rbac_tokens: Vec<(String, String)>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            watch_history: 1000,
            bookmark_interval: Duration::from_secs(10),
            log_requests: false,
            rbac_tokens: Vec::new(),
        }
    }
}

/// A running server. Dropping it leaves the server running until the runtime stops;
/// call [`ServerHandle::shutdown`] to stop it.
pub struct ServerHandle {
    pub addr: SocketAddr,
    app: Arc<server::App>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<()>>,
}

impl ServerHandle {
    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (YAML) pointing at this server, usable by kubectl, helm and kube-rs.
    pub fn kubeconfig(&self) -> String {
        kubeconfig_yaml(&self.url())
    }

    /// Makes every open watch end and forgets the event history, so clients resuming a watch
    /// get 410 Expired and must relist (as after an etcd compaction).
    pub fn expire_watch_history(&self) {
        self.app.lock().expire_history();
    }

    /// Stops accepting connections, ends open watches and waits for the server task.
    pub async fn shutdown(mut self) {
        self.stop().await;
    }

    async fn stop(&mut self) {
        self.app.lock().close_tx.send_modify(|e| *e += 1);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(j) = self.join.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), j).await;
        }
    }
}

/// The kubeconfig YAML for a server URL: one cluster, one user with a dummy token, one context.
pub fn kubeconfig_yaml(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-test-server\n  cluster:\n    server: {url}\nusers:\n- name: kube-test-server\n  user:\n    token: kube-test-server-dummy-token\ncontexts:\n- name: kube-test-server\n  context:\n    cluster: kube-test-server\n    user: kube-test-server\n    namespace: default\ncurrent-context: kube-test-server\npreferences: {{}}\n"
    )
}

async fn entry(State(app): State<Arc<server::App>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, 64 * 1024 * 1024).await {
        Ok(b) => b,
        Err(e) => return server::err_resp(&status::ApiError::bad_request(format!("reading request body: {e}"))),
    };
    let log = app.log_requests.then(|| {
        let ua = parts
            .headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        (parts.method.to_string(), parts.uri.to_string(), ua)
    });
    let r = server::Req {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: server::parse_query(parts.uri.query().unwrap_or("")),
        headers: parts.headers,
        body,
    };
    let resp = server::handle(app, r).await;
    if let Some((method, uri, ua)) = log {
        eprintln!("{} {method} {uri} {} {ua:?}", store::now(), resp.status().as_u16());
    }
    resp
}

/// Starts the server on `listener` in the current tokio runtime.
pub async fn start(listener: tokio::net::TcpListener, config: Config) -> std::io::Result<ServerHandle> {
    let addr = listener.local_addr()?;
    let app = Arc::new(server::App {
        store: Mutex::new(store::Store::new(config.watch_history)),
        addr: addr.to_string(),
        bookmark_interval: config.bookmark_interval,
        log_requests: config.log_requests,
        rbac_tokens: config.rbac_tokens.clone(),
    });
    let router = axum::Router::new().fallback(entry).with_state(app.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let join = tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await;
    });
    Ok(ServerHandle {
        addr,
        app,
        shutdown: Some(tx),
        join: Some(join),
    })
}

/// Binds `addr` (port 0 picks a free port) and starts the server.
pub async fn start_on(addr: &str, config: Config) -> std::io::Result<ServerHandle> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    start(listener, config).await
}
