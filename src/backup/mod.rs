//! Per-tenant backups and single-tenant restores.
//!
//! Takes the admin pool and DSN, a validated tenant name, the root keys and
//! an open [`Store`]. Gives [`backup`] (`pg_dump -Fc -n <schema>` streamed
//! through the tenant's `backup` key into the store, a manifest beside it,
//! then pruning) and [`restore`] (download, verify, move the live schema
//! aside, `pg_restore --single-transaction`, drop or put back). Side effects:
//! runs `pg_dump`/`pg_restore` as child processes, objects under
//! `tenants/<uid>/` in the store, rows in `tenancy.backups`, and (restore)
//! DDL on the tenant's own schema and app role, nothing else.
//!
//! Memory: a backup holds at most a few upload parts (8 MiB each); the dump
//! never touches local disk. A restore downloads to a temporary file first
//! so that the whole file is checked (SHA-256, then every chunk's tag)
//! before the live schema is touched.
//!
//! Pruning also deletes orphan dumps (no manifest: a backup that crashed
//! after its upload and before its manifest) once they are older than
//! [`ORPHAN_GRACE`], which is longer than a backup Job may run
//! ([`JOB_DEADLINE`]), so a backup still under way is never touched.

pub mod cli;
pub mod store;

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::io::AsyncReadExt;

pub use store::{Store, StoreConfig, StoreError};

use crate::crypto::{CryptoError, Keyring, OpeningReader, Purpose, StreamEncryptor};
use crate::names::TenantName;
use crate::pg::backup::{self as pgb, BackupRow};
use crate::pg::PgError;

/// Version of the manifest layout.
pub const MANIFEST_FORMAT: u32 = 1;

/// Size of one multipart upload part (S3 wants at least 5 MiB but the last).
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// Upload parts in flight at once.
const PARTS_IN_FLIGHT: usize = 2;

/// The longest a scheduled backup Job may run (its `activeDeadlineSeconds`):
/// Kubernetes kills it after that.
pub const JOB_DEADLINE: Duration = Duration::from_secs(5 * 3600);

/// How old a dump without a manifest must be before pruning deletes it.
/// Longer than [`JOB_DEADLINE`]: an S3 object's last-modified time is when
/// its multipart upload *started*, so a dump that has just completed may
/// look as old as its backup's whole run while its manifest is being
/// written.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(JOB_DEADLINE.as_secs() + 3600);

/// What is stored beside each dump, as `<id>.manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format: u32,
    /// The backup id: its start time, `YYYYMMDDTHHMMSS.mmmZ`.
    pub id: String,
    pub tenant_uid: String,
    pub tenant_name: String,
    pub schema: String,
    /// The schema's migration version when it has a version table.
    pub schema_version: Option<i64>,
    /// Root key version the stream is sealed under.
    pub key_version: u32,
    /// Size of the encrypted dump object in bytes.
    pub bytes: u64,
    /// SHA-256 of the encrypted dump object, lowercase hex.
    pub sha256: String,
    /// `pg_dump --version` of the dumping binary.
    pub pg_dump_version: String,
    /// When the dump started (RFC 3339).
    pub time: DateTime<Utc>,
    pub duration_ms: u64,
}

/// How many backups to keep. A backup is kept when it is among the newest
/// `count` (if set) and younger than `max_age` (if set); the newest one is
/// always kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    pub count: Option<u32>,
    pub max_age: Option<Duration>,
}

/// Errors of a backup or restore, named after the failed step.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("tenant {0} is not in the registry")]
    UnknownTenant(String),
    #[error("tenant {0} has no key salt (a deleted tenant's backups cannot be opened)")]
    NoSalt(String),
    #[error(transparent)]
    Database(#[from] PgError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Tool { program: String, status: String, stderr: String },
    #[error("reading the dump: {0}")]
    Read(#[source] std::io::Error),
    #[error("sealing the dump: {0}")]
    Seal(#[source] CryptoError),
    #[error("uploading the backup: {0}")]
    Upload(#[source] object_store::Error),
    #[error("no backup of tenant {tenant} matches {wanted}")]
    NoSuchBackup { tenant: String, wanted: String },
    #[error("backup id {0:?} is not of the form YYYYMMDDTHHMMSS.mmmZ")]
    BadId(String),
    #[error("manifest {id}: {why}")]
    BadManifest { id: String, why: String },
    #[error("backup {id} is refused: {why}; the live schema was not touched")]
    Refused { id: String, why: String },
    #[error("another restore of tenant {0} is running")]
    RestoreRunning(String),
    #[error("restoring backup {id} failed, the original schema was put back: {why}")]
    RestoreFailed { id: String, why: String },
    #[error("local file {path}: {source}")]
    Local {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A backup id for a start time.
pub fn backup_id(t: DateTime<Utc>) -> String {
    t.format("%Y%m%dT%H%M%S%.3fZ").to_string()
}

/// Checks a user-given id before it goes into an object path.
pub fn check_id(id: &str) -> Result<(), BackupError> {
    let ok = id.len() == 20 && id.is_ascii() && chrono::NaiveDateTime::parse_from_str(&id[..19], "%Y%m%dT%H%M%S%.3f").is_ok() && id.ends_with('Z');
    if ok {
        Ok(())
    } else {
        Err(BackupError::BadId(id.to_owned()))
    }
}

/// The ids to delete so that `manifests` (any order) obey `retention` at
/// `now`. Pure.
pub fn plan_prune(manifests: &[Manifest], retention: Retention, now: DateTime<Utc>) -> Vec<String> {
    let mut sorted: Vec<&Manifest> = manifests.iter().collect();
    sorted.sort_by(|a, b| (b.time, &b.id).cmp(&(a.time, &a.id)));
    sorted
        .iter()
        .enumerate()
        .filter(|(i, m)| {
            if *i == 0 {
                return false;
            }
            let over_count = retention.count.is_some_and(|c| *i >= c.max(1) as usize);
            let too_old = retention.max_age.is_some_and(|age| {
                let age = chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
                now.signed_duration_since(m.time) > age
            });
            over_count || too_old
        })
        .map(|(_, m)| m.id.clone())
        .collect()
}

/// The ids of the orphan dumps among a tenant's `objects` (a listing of
/// its prefix, `dir`): `<id>.dump.enc` without `<id>.manifest.json`, last
/// modified more than `grace` before `now`. Sorted. Pure.
pub fn plan_orphans(dir: &object_store::path::Path, objects: &[object_store::ObjectMeta], now: DateTime<Utc>, grace: Duration) -> Vec<String> {
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    let in_dir = |o: &object_store::ObjectMeta| o.location.prefix_match(dir).is_some_and(|mut rest| rest.next().is_some() && rest.next().is_none());
    let names: std::collections::BTreeSet<&str> = objects.iter().filter(|o| in_dir(o)).filter_map(|o| o.location.filename()).collect();
    let mut out: Vec<String> = objects
        .iter()
        .filter(|o| in_dir(o) && now.signed_duration_since(o.last_modified) > grace)
        .filter_map(|o| o.location.filename()?.strip_suffix(".dump.enc"))
        .filter(|id| check_id(id).is_ok() && !names.contains(format!("{id}.manifest.json").as_str()))
        .map(str::to_owned)
        .collect();
    out.sort();
    out
}

/// Which backup to restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    Latest,
    Id(String),
    /// The newest backup taken at or before this time.
    PointInTime(DateTime<Utc>),
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Latest => write!(f, "latest"),
            Selector::Id(id) => write!(f, "id {id}"),
            Selector::PointInTime(t) => write!(f, "the newest at or before {}", t.to_rfc3339_opts(SecondsFormat::Secs, true)),
        }
    }
}

/// Picks the manifest `sel` names. Pure.
pub fn select<'a>(manifests: &'a [Manifest], sel: &Selector) -> Option<&'a Manifest> {
    let newest = |it: &mut dyn Iterator<Item = &'a Manifest>| it.max_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
    match sel {
        Selector::Latest => newest(&mut manifests.iter()),
        Selector::Id(id) => manifests.iter().find(|m| &m.id == id),
        Selector::PointInTime(t) => newest(&mut manifests.iter().filter(|m| m.time <= *t)),
    }
}

/// The tools and how to reach Postgres with them.
#[derive(Clone, Debug)]
pub struct Tools {
    /// The admin DSN (libpq form; its password goes in PGPASSWORD, never on
    /// a command line).
    pub database_url: String,
    pub pg_dump: String,
    pub pg_restore: String,
}

impl Tools {
    pub fn new(database_url: &str) -> Self {
        Tools { database_url: database_url.to_owned(), pg_dump: "pg_dump".into(), pg_restore: "pg_restore".into() }
    }

    /// A command for `program` with the connection in its environment.
    fn command(&self, program: &str) -> Result<(std::process::Command, String), BackupError> {
        let mut url = url::Url::parse(&self.database_url).map_err(|e| BackupError::Spawn {
            program: program.into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("the database URL is not valid: {e}")),
        })?;
        let password = url.password().map(|p| percent_encoding::percent_decode_str(p).decode_utf8_lossy().into_owned());
        let _ = url.set_password(None);
        let mut cmd = std::process::Command::new(program);
        if let Some(p) = password {
            cmd.env("PGPASSWORD", p);
        }
        cmd.env("PGAPPNAME", "tenant-operator-backup");
        Ok((cmd, url.to_string()))
    }
}

/// The tenant's uid and salt from the registry.
async fn tenant_keys(pool: &PgPool, name: &TenantName) -> Result<(String, crate::crypto::TenantSalt), BackupError> {
    let uid = crate::pg::tenant::uid_of(pool, name.as_str()).await?.ok_or_else(|| BackupError::UnknownTenant(name.to_string()))?;
    let salt = crate::pg::tenant::existing_key_salt(pool, &uid).await?.ok_or_else(|| BackupError::NoSalt(name.to_string()))?;
    Ok((uid, salt))
}

/// What [`backup`] did.
#[derive(Clone, Debug)]
pub struct BackupOutcome {
    pub manifest: Manifest,
    /// Ids deleted by the retention.
    pub pruned: Vec<String>,
    /// Ids of orphan dumps (no manifest) deleted.
    pub orphans_pruned: Vec<String>,
}

fn tool_version(program: &str) -> String {
    std::process::Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Backs up one tenant's schema: `pg_dump -Fc -n <schema>`, sealed on the
/// fly under the tenant's `backup` key and uploaded in parts; on success a
/// manifest beside it, a row in `tenancy.backups`, then pruning. On any
/// failure the upload is aborted: nothing appears under the final name.
pub async fn backup(pool: &PgPool, tools: &Tools, name: &TenantName, keyring: &Keyring, store: &Store, retention: Retention) -> Result<BackupOutcome, BackupError> {
    let (uid, salt) = tenant_keys(pool, name).await?;
    let schema_version = pgb::schema_version(pool, name).await?;
    let started_at = Utc::now();
    let started = Instant::now();
    let id = backup_id(started_at);
    let mut enc = StreamEncryptor::new(keyring, &salt, &uid, Purpose::Backup).map_err(BackupError::Seal)?;
    let key_version = enc.header().key_version.get();

    let (cmd, url) = tools.command(&tools.pg_dump)?;
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.arg("--format=custom").arg(format!("--schema={}", crate::pg::quote_ident(&name.schema())?)).arg("--dbname").arg(&url);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| BackupError::Spawn { program: tools.pg_dump.clone(), source })?;
    let mut stdout = child.stdout.take().ok_or_else(|| BackupError::Read(std::io::Error::other("no stdout")))?;
    let mut stderr = child.stderr.take().ok_or_else(|| BackupError::Read(std::io::Error::other("no stderr")))?;
    let stderr_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s).await;
        s
    });

    let dump_path = store.dump_path(&uid, &id);
    let mut upload = store.inner.put_multipart(&dump_path).await.map_err(BackupError::Upload)?;
    let streamed = async {
        let mut hasher = Sha256::new();
        let mut total: u64 = 0;
        let mut part: Vec<u8> = Vec::with_capacity(PART_SIZE + crate::crypto::DEFAULT_CHUNK_SIZE as usize * 2);
        let mut buf = vec![0u8; 256 * 1024];
        let mut in_flight = futures::stream::FuturesOrdered::new();
        let mut send = |part: &mut Vec<u8>, hasher: &mut Sha256, total: &mut u64, in_flight: &mut futures::stream::FuturesOrdered<_>| {
            hasher.update(&part[..]);
            *total += part.len() as u64;
            let data = std::mem::replace(part, Vec::with_capacity(PART_SIZE + crate::crypto::DEFAULT_CHUNK_SIZE as usize * 2));
            in_flight.push_back(upload.put_part(PutPayload::from(data)));
        };
        loop {
            let n = stdout.read(&mut buf).await.map_err(BackupError::Read)?;
            if n == 0 {
                break;
            }
            enc.push(&buf[..n], &mut part).map_err(BackupError::Seal)?;
            if part.len() >= PART_SIZE {
                send(&mut part, &mut hasher, &mut total, &mut in_flight);
                while in_flight.len() > PARTS_IN_FLIGHT {
                    use futures::StreamExt;
                    in_flight.next().await.transpose().map_err(BackupError::Upload)?;
                }
            }
        }
        let status = child.wait().await.map_err(BackupError::Read)?;
        let stderr = stderr_task.await.unwrap_or_default();
        if !status.success() {
            return Err(BackupError::Tool { program: tools.pg_dump.clone(), status: status.to_string(), stderr: stderr.trim().to_owned() });
        }
        enc.finish(&mut part).map_err(BackupError::Seal)?;
        send(&mut part, &mut hasher, &mut total, &mut in_flight);
        {
            use futures::StreamExt;
            while let Some(r) = in_flight.next().await {
                r.map_err(BackupError::Upload)?;
            }
        }
        Ok((hex::encode(hasher.finalize()), total))
    }
    .await;
    let (sha256, bytes) = match streamed {
        Ok(v) => v,
        Err(e) => {
            let _ = upload.abort().await;
            return Err(e);
        }
    };
    if let Err(e) = upload.complete().await {
        let _ = upload.abort().await;
        return Err(BackupError::Upload(e));
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        id: id.clone(),
        tenant_uid: uid.clone(),
        tenant_name: name.to_string(),
        schema: name.schema(),
        schema_version,
        key_version,
        bytes,
        sha256,
        pg_dump_version: tool_version(&tools.pg_dump),
        time: started_at,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::BadManifest { id: id.clone(), why: e.to_string() })?;
    if let Err(e) = store.inner.put(&store.manifest_path(&uid, &id), PutPayload::from(json)).await {
        // A dump without a manifest is never listed: remove it.
        let _ = store.delete_quiet(&dump_path).await;
        return Err(BackupError::Upload(e));
    }
    pgb::record_backup(pool, &uid, &BackupRow { id: id.clone(), taken_at: started_at, bytes: bytes as i64, key_version: key_version as i32 }).await?;
    let pruned = prune(pool, &uid, store, retention, Utc::now()).await?;
    Ok(BackupOutcome { manifest, pruned: pruned.backups, orphans_pruned: pruned.orphans })
}

/// What [`prune`] deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Backups the retention no longer keeps.
    pub backups: Vec<String>,
    /// Ids of orphan dumps (and, in a filesystem store, of uploads that
    /// never completed) older than [`ORPHAN_GRACE`].
    pub orphans: Vec<String>,
}

/// Deletes the tenant's backups that `retention` no longer keeps (dump
/// first, then manifest) and forgets them in `tenancy.backups`; then the
/// orphan dumps older than [`ORPHAN_GRACE`] at `now`.
pub async fn prune(pool: &PgPool, uid: &str, store: &Store, retention: Retention, now: DateTime<Utc>) -> Result<Pruned, BackupError> {
    let objects = store.list_tenant(uid).await?;
    let manifests = read_manifests(store, &objects).await?;
    let doomed = plan_prune(&manifests, retention, now);
    for id in &doomed {
        store.delete_quiet(&store.dump_path(uid, id)).await?;
        store.delete_quiet(&store.manifest_path(uid, id)).await?;
    }
    if !doomed.is_empty() {
        pgb::forget_backups(pool, uid, &doomed).await?;
    }
    let mut orphans = Vec::new();
    for id in plan_orphans(&store.tenant_dir(uid), &objects, now, ORPHAN_GRACE) {
        // A manifest written since the listing makes it a backup after all;
        // when in doubt, keep it.
        match store.inner.head(&store.manifest_path(uid, &id)).await {
            Err(object_store::Error::NotFound { .. }) => {}
            _ => continue,
        }
        tracing::warn!(tenant_uid = uid, backup = %id, "deleting an orphan dump: it has no manifest and is older than the grace period");
        store.delete_quiet(&store.dump_path(uid, &id)).await?;
        orphans.push(id);
    }
    for (id, path) in stale_local_uploads(store, uid, now, ORPHAN_GRACE)? {
        tracing::warn!(tenant_uid = uid, backup = %id, "deleting the staging file of an upload that never completed");
        std::fs::remove_file(&path).or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) }).map_err(|source| BackupError::Local { path: path.display().to_string(), source })?;
        orphans.push(id);
    }
    Ok(Pruned { backups: doomed, orphans })
}

/// In a filesystem store, the staging files (`<id>.dump.enc#<n>`, which
/// listing does not show) of uploads that never completed (the process was
/// killed), last written more than `grace` before `now`.
fn stale_local_uploads(store: &Store, uid: &str, now: DateTime<Utc>, grace: Duration) -> Result<Vec<(String, std::path::PathBuf)>, BackupError> {
    let Some(dir) = store.local_tenant_dir(uid) else { return Ok(Vec::new()) };
    let local = |source| BackupError::Local { path: dir.display().to_string(), source };
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(local(e)),
    };
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(local)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((id, n)) = name.split_once(".dump.enc#") else { continue };
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || check_id(id).is_err() {
            continue;
        }
        let modified = entry.metadata().and_then(|m| m.modified()).map_err(local)?;
        if now.signed_duration_since(DateTime::<Utc>::from(modified)) > grace {
            out.push((id.to_owned(), entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The tenant's backups (their manifests), oldest first. A dump without a
/// manifest is not a backup: it is never listed, so never `latest`.
pub async fn list(store: &Store, uid: &str) -> Result<Vec<Manifest>, BackupError> {
    read_manifests(store, &store.list_tenant(uid).await?).await
}

/// The manifests among `objects`, oldest first.
async fn read_manifests(store: &Store, objects: &[object_store::ObjectMeta]) -> Result<Vec<Manifest>, BackupError> {
    let mut out = Vec::new();
    for o in objects {
        let Some(file) = o.location.filename() else { continue };
        let Some(id) = file.strip_suffix(".manifest.json") else { continue };
        let bytes = store.inner.get(&o.location).await.map_err(|e| BackupError::Store(e.into()))?.bytes().await.map_err(|e| BackupError::Store(e.into()))?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| BackupError::BadManifest { id: id.to_owned(), why: e.to_string() })?;
        out.push(m);
    }
    out.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
    Ok(out)
}

/// What [`restore`] did.
#[derive(Clone, Debug)]
pub struct RestoreOutcome {
    pub manifest: Manifest,
    /// Whether an interrupted earlier restore was finished first.
    pub recovered: pgb::AsideState,
}

/// A temporary file removed on drop.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Restores one tenant's schema from one of its backups. Only this tenant's
/// schema and app role are touched; on any failure the original schema is
/// back in place, untouched.
pub async fn restore(pool: &PgPool, tools: &Tools, name: &TenantName, keyring: std::sync::Arc<Keyring>, store: &Store, sel: &Selector) -> Result<RestoreOutcome, BackupError> {
    let (uid, salt) = tenant_keys(pool, name).await?;
    // A reconcile holds the lock for a moment (shared, while it may enable
    // login); only another restore holds it longer.
    let lock = pgb::restore_lock(pool, name, std::time::Duration::from_secs(30))
        .await?
        .ok_or_else(|| BackupError::RestoreRunning(name.to_string()))?;
    let result = restore_locked(pool, tools, name, &keyring, store, sel, &uid, &salt).await;
    lock.release().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn restore_locked(
    pool: &PgPool,
    tools: &Tools,
    name: &TenantName,
    keyring: &std::sync::Arc<Keyring>,
    store: &Store,
    sel: &Selector,
    uid: &str,
    salt: &crate::crypto::TenantSalt,
) -> Result<RestoreOutcome, BackupError> {
    // A restore killed earlier left the schema aside: finish that first.
    let recovered = pgb::recover_aside_locked(pool, name, uid).await?;
    let manifests = list(store, uid).await?;
    let manifest = select(&manifests, sel).cloned().ok_or_else(|| BackupError::NoSuchBackup { tenant: name.to_string(), wanted: sel.to_string() })?;
    let id = manifest.id.clone();
    check_id(&id)?;
    let refuse = |why: String| BackupError::Refused { id: id.clone(), why };
    if manifest.tenant_uid != uid || manifest.schema != name.schema() {
        return Err(refuse(format!("it belongs to tenant uid {} (schema {}), not to {name}", manifest.tenant_uid, manifest.schema)));
    }
    if !crate::crypto::KeyVersion::new(manifest.key_version).is_ok_and(|v| keyring.contains(v)) {
        let held: Vec<String> = keyring.versions().map(|v| v.to_string()).collect();
        return Err(refuse(format!(
            "it is sealed under root key v{}, which the root keys given do not hold (they hold {}); restore with root keys that include v{}",
            manifest.key_version,
            held.join(", "),
            manifest.key_version
        )));
    }

    // Download, hashing as it comes.
    let tmp = TempFile(std::env::temp_dir().join(format!("tenant-restore-{}-{:016x}.dump.enc", name, rand::random::<u64>())));
    let local = |source| BackupError::Local { path: tmp.0.display().to_string(), source };
    {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let mut file = tokio::fs::File::create(&tmp.0).await.map_err(local)?;
        let got = store.inner.get(&store.dump_path(uid, &id)).await.map_err(|e| refuse(format!("the dump object cannot be read: {e}")))?;
        let mut stream = got.into_stream();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| refuse(format!("downloading the dump: {e}")))?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(local)?;
        }
        file.flush().await.map_err(local)?;
        let sha = hex::encode(hasher.finalize());
        if size != manifest.bytes || sha != manifest.sha256 {
            return Err(refuse(format!("its SHA-256/size ({sha}, {size} bytes) differ from the manifest's ({}, {} bytes)", manifest.sha256, manifest.bytes)));
        }
    }

    // Every chunk's tag, before anything is touched.
    {
        let (path, ring, salt, uid) = (tmp.0.clone(), keyring.clone(), salt.clone(), uid.to_owned());
        let checked = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
            let mut r = OpeningReader::new(f, &ring, &salt, &uid, Purpose::Backup).map_err(std::io::Error::other)?;
            std::io::copy(&mut r, &mut std::io::sink())
        })
        .await
        .map_err(|e| refuse(e.to_string()))?;
        checked.map_err(|e| refuse(format!("it does not decrypt as this tenant's backup: {e}")))?;
    }

    // The switch: lock the app out, move the live schema aside, restore.
    pgb::lock_out_app(pool, name).await?;
    let had_live = pgb::live_schema_is_ours(pool, name, uid).await?;
    if had_live {
        pgb::move_aside(pool, name).await?;
    }
    let ran = run_pg_restore(tools, &tmp.0, keyring, salt, uid).await;
    match ran {
        Ok(()) => {
            pgb::drop_aside(pool, name).await?;
            // The restored audit chain is older than the anchored head: the
            // anchors are reset to it (and that is recorded) before the app
            // may write again (docs/audit.md, "After a restore").
            let rebased = async {
                let login = crate::pg::confined::OpsLogin::derive(&crate::pg::Target::of_pool(pool), name, uid, keyring, salt).map_err(crate::pg::PgError::Keys)?;
                crate::pg::audit::rebase_after_restore(pool, keyring, &login, "tenant-operator restore", serde_json::json!({ "backup": id })).await
            }
            .await;
            pgb::restore_login(pool, name, uid).await?;
            rebased?;
            Ok(RestoreOutcome { manifest, recovered })
        }
        Err(why) => {
            if had_live {
                pgb::put_back(pool, name, uid).await?;
            }
            pgb::restore_login(pool, name, uid).await?;
            Err(BackupError::RestoreFailed { id, why })
        }
    }
}

/// Streams the decrypted dump into `pg_restore --single-transaction`. A
/// decryption error kills pg_restore before it can commit.
async fn run_pg_restore(tools: &Tools, path: &std::path::Path, keyring: &std::sync::Arc<Keyring>, salt: &crate::crypto::TenantSalt, uid: &str) -> Result<(), String> {
    let (mut cmd, url) = tools.command(&tools.pg_restore).map_err(|e| e.to_string())?;
    cmd.arg("--single-transaction").arg("--exit-on-error").arg("--dbname").arg(&url);
    cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let (path, ring, salt, uid, program) = (path.to_owned(), keyring.clone(), salt.clone(), uid.to_owned(), tools.pg_restore.clone());
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let mut child = cmd.spawn().map_err(|e| format!("running {program}: {e}"))?;
        let mut stdin = child.stdin.take().ok_or("no stdin")?;
        let mut stderr = child.stderr.take().ok_or("no stderr")?;
        let err_thread = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let copied = (|| -> std::io::Result<()> {
            let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&path)?);
            let mut r = OpeningReader::new(f, &ring, &salt, &uid, Purpose::Backup).map_err(std::io::Error::other)?;
            std::io::copy(&mut r, &mut stdin)?;
            stdin.flush()
        })();
        if let Err(e) = copied {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                // Kill before closing stdin: pg_restore must never see a
                // clean end of input and commit.
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("decrypting the dump: {e}"));
            }
        }
        drop(stdin);
        let status = child.wait().map_err(|e| e.to_string())?;
        let stderr = err_thread.join().unwrap_or_default();
        if status.success() {
            Ok(())
        } else {
            Err(format!("{program} failed ({status}): {}", stderr.trim()))
        }
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Deletes every backup of the tenant from the store (the delete
/// finalizer); returns how many objects went.
pub async fn delete_all(store: &Store, uid: &str) -> Result<usize, BackupError> {
    Ok(store.delete_tenant(uid).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id_secs: i64) -> Manifest {
        let t = DateTime::from_timestamp(1_700_000_000 + id_secs, 0).unwrap();
        Manifest {
            format: 1,
            id: backup_id(t),
            tenant_uid: "u".into(),
            tenant_name: "a".into(),
            schema: "tenant_a".into(),
            schema_version: None,
            key_version: 1,
            bytes: 1,
            sha256: String::new(),
            pg_dump_version: String::new(),
            time: t,
            duration_ms: 0,
        }
    }

    #[test]
    fn ids_round_trip_and_bad_ids_are_refused() {
        let id = backup_id(DateTime::from_timestamp(1_700_000_000, 5_000_000).unwrap());
        assert_eq!(id, "20231114T221320.005Z");
        check_id(&id).unwrap();
        for bad in ["../../etc/passwd", "20231114T221320.005", "20231114T221320.005Z/x", "latest", ""] {
            assert!(check_id(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn retention_by_count_keeps_the_newest() {
        let all: Vec<Manifest> = (0..5).map(|i| m(i * 60)).collect();
        let now = all[4].time;
        let doomed = plan_prune(&all, Retention { count: Some(2), max_age: None }, now);
        assert_eq!(doomed, vec![all[2].id.clone(), all[1].id.clone(), all[0].id.clone()]);
        assert!(plan_prune(&all, Retention::default(), now).is_empty(), "no retention keeps everything");
    }

    #[test]
    fn retention_by_age_never_deletes_the_newest() {
        let all: Vec<Manifest> = (0..3).map(|i| m(i * 3600)).collect();
        let now = all[2].time + chrono::Duration::hours(10);
        let doomed = plan_prune(&all, Retention { count: None, max_age: Some(Duration::from_secs(3600 * 10 + 1800)) }, now);
        assert_eq!(doomed, vec![all[1].id.clone(), all[0].id.clone()]);
        let both = plan_prune(&all, Retention { count: Some(2), max_age: Some(Duration::from_secs(3600 * 13)) }, now);
        assert_eq!(both, vec![all[0].id.clone()]);
    }

    #[test]
    fn only_old_dumps_without_a_manifest_are_orphans() {
        let dir = object_store::path::Path::from("pre/tenants/u");
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let grace = Duration::from_secs(6 * 3600);
        let obj = |name: &str, age_secs: i64| object_store::ObjectMeta {
            location: dir.clone().join(name),
            last_modified: now - chrono::Duration::seconds(age_secs),
            size: 1,
            e_tag: None,
            version: None,
        };
        let (old, new, backed, other) = ("20270101T000000.000Z", "20270101T060000.000Z", "20260101T000000.000Z", "20250101T000000.000Z");
        let objects = vec![
            obj(&format!("{old}.dump.enc"), 6 * 3600 + 1),
            obj(&format!("{new}.dump.enc"), 6 * 3600 - 1),
            obj(&format!("{backed}.dump.enc"), 90 * 86400),
            obj(&format!("{backed}.manifest.json"), 90 * 86400),
            obj("notes.txt.dump.enc", 90 * 86400),
            obj(&format!("{other}.manifest.json"), 90 * 86400),
        ];
        assert_eq!(plan_orphans(&dir, &objects, now, grace), vec![old.to_string()]);
        // A manifest of the same id elsewhere does not make it a backup, and
        // a dump in a sub-folder is not the tenant's.
        let mut elsewhere = objects.clone();
        elsewhere.push(object_store::ObjectMeta { location: object_store::path::Path::from(format!("pre/tenants/v/{old}.manifest.json")), ..obj("x", 0) });
        elsewhere.push(object_store::ObjectMeta { location: dir.clone().join("sub").join(format!("{other}.dump.enc")), ..obj("x", 90 * 86400) });
        assert_eq!(plan_orphans(&dir, &elsewhere, now, grace), vec![old.to_string()]);
        // The grace is the line: a dump exactly as old is kept.
        assert!(plan_orphans(&dir, &[obj(&format!("{old}.dump.enc"), 6 * 3600)], now, grace).is_empty());
        assert!(ORPHAN_GRACE > JOB_DEADLINE, "a backup Job may still be uploading a dump the grace lets pruning delete");
    }

    #[test]
    fn ids_with_multibyte_characters_are_refused_without_panicking() {
        assert!(check_id("2023111\u{e9}T221320.05Z").is_err());
        assert!(check_id("20231114T221320.00\u{e9}").is_err());
    }

    #[test]
    fn selection_by_id_latest_and_point_in_time() {
        let all: Vec<Manifest> = (0..3).map(|i| m(i * 60)).collect();
        assert_eq!(select(&all, &Selector::Latest).unwrap().id, all[2].id);
        assert_eq!(select(&all, &Selector::Id(all[1].id.clone())).unwrap().id, all[1].id);
        assert_eq!(select(&all, &Selector::PointInTime(all[1].time + chrono::Duration::seconds(59))).unwrap().id, all[1].id);
        assert!(select(&all, &Selector::PointInTime(all[0].time - chrono::Duration::seconds(1))).is_none());
    }
}
