//! The subcommands' work: `src/main.rs` parses the arguments and calls one
//! of these. Each takes plain values (names, a DSN, a key source), never
//! clap's types, except the commands whose flags are their own
//! ([`backup`], [`top`]).
//!
//! - [`run`]: the operator (start-up checks, root keys, metrics, leader
//!   election, the controllers, shutdown);
//! - [`audit`]: `audit verify|export|prune`;
//! - [`secrets`]: `secrets open`;
//! - [`backup`]: `backup` and `restore` (Job and by hand);
//! - [`top`]: the `top` command.

pub mod audit;
pub mod backup;
pub mod run;
pub mod secrets;
pub mod top;

/// Logs of the one-shot commands: plain lines on stderr (stdout carries
/// their result).
pub fn logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(default_filter())
        .init();
}

/// `RUST_LOG`, else info without kube's and sqlx's chatter.
pub fn default_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn,sqlx=warn".into())
}

/// The root keys of a command run by a person: from `file` (the root-keys
/// Secret's manifest, or just its keys) when given, else from the cluster's
/// Secret that `source` names.
pub async fn load_root_keys(
    source: &crate::keys::KeySource,
    file: Option<&std::path::Path>,
) -> anyhow::Result<crate::crypto::Keyring> {
    use anyhow::Context as _;
    Ok(match file {
        Some(path) => crate::keys::load_file(path, source.kms.as_ref()).await?,
        None => {
            let client = kube::Client::try_default().await.context(
                "building the Kubernetes client (kubeconfig or in-cluster; without a cluster, pass the keys with --root-keys-file)",
            )?;
            crate::keys::load(&client, source).await?
        }
    })
}
