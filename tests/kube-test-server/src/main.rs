//! `kube-test-server --listen 127.0.0.1:0 --kubeconfig PATH`

use std::io::Write;
use std::time::Duration;

fn usage() -> ! {
    eprintln!(
        "usage: kube-test-server [--listen ADDR] [--kubeconfig PATH] [--watch-history N] [--bookmark-interval-ms MS] [--quiet] [--rbac-user TOKEN=USER]...\n\
         Serves an in-memory Kubernetes API over plain HTTP. Prints `listening on http://ADDR` when ready\n\
         and logs one line per request to stderr unless --quiet. Requests bearing a --rbac-user TOKEN are\n\
         authorized as USER against the stored Roles, ClusterRoles and bindings; others are allowed."
    );
    std::process::exit(2)
}

fn main() {
    let mut listen = "127.0.0.1:0".to_string();
    let mut kubeconfig: Option<String> = None;
    let mut config = kube_test_server::Config {
        log_requests: true,
        ..Default::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| args.next()).unwrap_or_else(|| usage());
        match flag.as_str() {
            "--listen" => listen = value(),
            "--kubeconfig" => kubeconfig = Some(value()),
            "--watch-history" => config.watch_history = value().parse().unwrap_or_else(|_| usage()),
            "--quiet" => config.log_requests = false,
            "--rbac-user" => {
                let v = value();
                let (token, user) = v.split_once('=').unwrap_or_else(|| usage());
                config.rbac_tokens.push((token.to_string(), user.to_string()));
            }
            "--bookmark-interval-ms" => {
                config.bookmark_interval = Duration::from_millis(value().parse().unwrap_or_else(|_| usage()))
            }
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kube-test-server: starting runtime: {e}");
            std::process::exit(1)
        }
    };
    let code = rt.block_on(async move {
        let handle = match kube_test_server::start_on(&listen, config).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("kube-test-server: binding {listen}: {e}");
                return 1;
            }
        };
        if let Some(path) = &kubeconfig {
            let tmp = format!("{path}.tmp.{}", std::process::id());
            let written = std::fs::write(&tmp, handle.kubeconfig()).and_then(|_| std::fs::rename(&tmp, path));
            if let Err(e) = written {
                eprintln!("kube-test-server: writing kubeconfig {path}: {e}");
                return 1;
            }
        }
        println!("listening on {}", handle.url());
        let _ = std::io::stdout().flush();
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("kube-test-server: installing SIGTERM handler: {e}");
                return 1;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        handle.shutdown().await;
        0
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    std::process::exit(code)
}
