//! Per-tenant backups and single-tenant restores.
//!
//! Takes a [`TenantAccess`] (the tenant's ops login and its backup keys:
//! derived from the root keys by an admin caller, or handed over whole to a
//! Job that has neither the admin DSN nor the root keys) and an open
//! [`Store`]. Gives [`backup`] (`pg_dump -Fc -n <schema>` streamed through
//! the tenant's `backup` key into the store, a manifest beside it, then
//! pruning), [`restore`] (the whole restore, for the admin's restore
//! command: download, verify, prepare, `pg_restore`, finalize or put back),
//! [`restore_prepared`] (a Job's half: download, verify, `pg_restore` into a
//! schema the operator prepared), [`resolve`] and [`sync_registry`] (the
//! operator's side). Side effects: runs `pg_dump`/`pg_restore` as child
//! processes, objects under `tenants/<uid>/` in the store, and (admin
//! callers only) rows in `tenancy.backups` and the restore's steps
//! ([`crate::pg::backup_sql`]).
//!
//! `pg_dump` and `pg_restore` never run as the admin: their session user is
//! the tenant's ops login (`PGUSER`/`PGPASSWORD` in their environment, never
//! on a command line) and they `SET ROLE` to the tenant's owner
//! (`--role`). Whatever a dump contains (functions, CHECK constraints,
//! index expressions, defaults, triggers) runs at most as that owner.
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

use crate::crypto::{CryptoError, KeyVersion, Keyring, OpeningReader, Purpose, StreamEncryptor, TenantKey};
use crate::names::TenantName;
use crate::pg::backup_sql::{self as pgb, BackupRow};
use crate::pg::confined::{self, OpsLogin};
use crate::pg::{PgError, Target};

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
    Tool {
        program: String,
        status: String,
        stderr: String,
    },
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
    #[error("pg_restore of backup {id} failed (the operator puts the original schema back): {why}")]
    PgRestore { id: String, why: String },
    #[error("the schema of tenant {tenant} is not prepared for a restore ({why}); the operator prepares it before it starts the restore Job")]
    NotPrepared { tenant: String, why: String },
    #[error("the Job's credentials: {0}")]
    Credentials(String),
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
    let ok = id.len() == 20
        && id.is_ascii()
        && chrono::NaiveDateTime::parse_from_str(&id[..19], "%Y%m%dT%H%M%S%.3f").is_ok()
        && id.ends_with('Z');
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
pub fn plan_orphans(
    dir: &object_store::path::Path,
    objects: &[object_store::ObjectMeta],
    now: DateTime<Utc>,
    grace: Duration,
) -> Vec<String> {
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    let in_dir = |o: &object_store::ObjectMeta| {
        o.location
            .prefix_match(dir)
            .is_some_and(|mut rest| rest.next().is_some() && rest.next().is_none())
    };
    let names: std::collections::BTreeSet<&str> = objects
        .iter()
        .filter(|o| in_dir(o))
        .filter_map(|o| o.location.filename())
        .collect();
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
            Selector::PointInTime(t) => write!(
                f,
                "the newest at or before {}",
                t.to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
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
/// The `pg_dump` and `pg_restore` binaries.
#[derive(Clone, Debug)]
pub struct Tools {
    pub pg_dump: String,
    pub pg_restore: String,
}

impl Default for Tools {
    fn default() -> Self {
        Tools {
            pg_dump: "pg_dump".into(),
            pg_restore: "pg_restore".into(),
        }
    }
}

/// The tenant's backup keys (purpose `backup`), one per root key version
/// held; backups are sealed under `active`'s. `Debug` shows versions only.
#[derive(Clone)]
pub struct BackupKeys {
    keys: Vec<TenantKey>,
    active: KeyVersion,
}

impl std::fmt::Debug for BackupKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupKeys")
            .field("versions", &self.versions())
            .field("active", &self.active)
            .finish()
    }
}

impl BackupKeys {
    /// Derives the tenant's backup key under every version of the keyring.
    pub fn from_ring(ring: &Keyring, salt: &crate::crypto::TenantSalt, uid: &str) -> Result<Self, CryptoError> {
        let keys = ring
            .versions()
            .map(|v| ring.derive_tenant_key(v, salt, uid, Purpose::Backup))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(BackupKeys {
            keys,
            active: ring.active_version(),
        })
    }

    /// Keys handed over (a Job's); the newest version seals.
    pub fn from_keys(keys: Vec<TenantKey>) -> Result<Self, BackupError> {
        if let Some(k) = keys.iter().find(|k| k.purpose() != Purpose::Backup) {
            return Err(BackupError::Credentials(format!(
                "a key for purpose {} was given as a backup key",
                k.purpose()
            )));
        }
        let active = keys
            .iter()
            .map(TenantKey::version)
            .max()
            .ok_or_else(|| BackupError::Credentials("no backup key was given".into()))?;
        Ok(BackupKeys { keys, active })
    }

    /// The versions held, ascending.
    pub fn versions(&self) -> Vec<KeyVersion> {
        let mut v: Vec<KeyVersion> = self.keys.iter().map(TenantKey::version).collect();
        v.sort();
        v
    }

    pub fn contains(&self, version: KeyVersion) -> bool {
        self.keys.iter().any(|k| k.version() == version)
    }

    /// The key of `version`.
    pub fn get(&self, version: KeyVersion) -> Option<&TenantKey> {
        self.keys.iter().find(|k| k.version() == version)
    }

    fn active(&self) -> Result<&TenantKey, BackupError> {
        self.get(self.active)
            .ok_or_else(|| BackupError::Credentials(format!("no backup key for the active version {}", self.active)))
    }
}

/// One tenant, as a backup or restore reaches it: its ops login (the only
/// session user that runs pg_dump/pg_restore and reads its schema) and its
/// backup keys. `admin` is set for the admin's own commands, which may
/// repair the ops login's password; a Job has none.
#[derive(Clone)]
pub struct TenantAccess {
    pub login: OpsLogin,
    pub keys: BackupKeys,
    admin: Option<PgPool>,
}

impl std::fmt::Debug for TenantAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The login and keys print redacted; the admin pool not at all.
        f.debug_struct("TenantAccess")
            .field("login", &self.login)
            .field("keys", &self.keys)
            .field("admin", &self.admin.is_some())
            .finish()
    }
}

/// Environment variable of a Job's backup key of root key version `v`
/// (64 hex characters).
pub fn key_env_var(v: KeyVersion) -> String {
    format!("TENANT_BACKUP_KEY_{}", v.to_string().to_uppercase())
}

/// Environment variable naming the tenant's uid, for a Job.
pub const UID_ENV_VAR: &str = "TENANT_UID";

impl TenantAccess {
    /// For an admin caller holding the root keys: the tenant's uid and salt
    /// from the registry, its ops login and backup keys derived.
    pub async fn derive(
        admin: &PgPool,
        target: &Target,
        name: &TenantName,
        ring: &Keyring,
    ) -> Result<Self, BackupError> {
        let uid = crate::pg::registry::uid_of(admin, name.as_str())
            .await?
            .ok_or_else(|| BackupError::UnknownTenant(name.to_string()))?;
        let salt = crate::pg::registry::existing_key_salt(admin, &uid)
            .await?
            .ok_or_else(|| BackupError::NoSalt(name.to_string()))?;
        let login = OpsLogin::derive(target, name, &uid, ring, &salt).map_err(BackupError::Seal)?;
        let keys = BackupKeys::from_ring(ring, &salt, &uid).map_err(BackupError::Seal)?;
        Ok(TenantAccess {
            login,
            keys,
            admin: Some(admin.clone()),
        })
    }

    /// What a Job is given and nothing else: the ops login and the tenant
    /// key(s).
    pub fn new(login: OpsLogin, keys: BackupKeys) -> Self {
        TenantAccess {
            login,
            keys,
            admin: None,
        }
    }

    /// A Job's access from its environment (the per-tenant Secret the
    /// operator writes): libpq's `PGHOST`, `PGPORT`, `PGDATABASE`, `PGUSER`
    /// (the tenant's ops login), `PGPASSWORD`, optionally `PGSSLMODE`;
    /// [`UID_ENV_VAR`]; and one [`key_env_var`] per key version.
    pub fn from_env(name: &TenantName) -> Result<Self, BackupError> {
        let var = |k: &str| std::env::var(k).map_err(|_| BackupError::Credentials(format!("{k} is not set")));
        let user = var("PGUSER")?;
        if user != name.ops_role() {
            return Err(BackupError::Credentials(format!(
                "PGUSER is {user}, not tenant {name}'s ops login {}",
                name.ops_role()
            )));
        }
        let uid = var(UID_ENV_VAR)?;
        let password = zeroize::Zeroizing::new(var("PGPASSWORD")?);
        let target = Target::from_options(sqlx::postgres::PgConnectOptions::new());
        let mut keys = Vec::new();
        for (k, v) in std::env::vars() {
            let Some(version) = k.strip_prefix("TENANT_BACKUP_KEY_") else {
                continue;
            };
            let version: KeyVersion = version
                .to_lowercase()
                .parse()
                .map_err(|e: CryptoError| BackupError::Credentials(format!("{k}: {e}")))?;
            let v = zeroize::Zeroizing::new(v);
            let bytes = zeroize::Zeroizing::new(
                hex::decode(v.trim()).map_err(|_| BackupError::Credentials(format!("{k} is not hex")))?,
            );
            keys.push(
                TenantKey::from_bytes(&bytes, version, Purpose::Backup)
                    .map_err(|e| BackupError::Credentials(format!("{k}: {e}")))?,
            );
        }
        Ok(TenantAccess::new(
            OpsLogin::new(&target, name, &uid, password),
            BackupKeys::from_keys(keys)?,
        ))
    }

    pub fn name(&self) -> &TenantName {
        self.login.tenant()
    }

    pub fn uid(&self) -> &str {
        self.login.uid()
    }

    /// A confined session (the ops login acting as the owner).
    async fn connect(&self) -> Result<confined::Confined, BackupError> {
        Ok(match &self.admin {
            Some(admin) => confined::connect(admin, &self.login).await?,
            None => confined::connect_without_admin(&self.login).await?,
        })
    }

    /// A command for `program` connecting as the ops login: libpq's
    /// variables in its environment (the password never on a command
    /// line), and the conninfo naming only the database for `--dbname`.
    fn command(&self, program: &str) -> (std::process::Command, String) {
        let t = self.login.target();
        let mut cmd = std::process::Command::new(program);
        for k in [
            "PGHOST",
            "PGHOSTADDR",
            "PGPORT",
            "PGDATABASE",
            "PGUSER",
            "PGPASSWORD",
            "PGPASSFILE",
            "PGSERVICE",
            "PGOPTIONS",
            "PGSSLMODE",
        ] {
            cmd.env_remove(k);
        }
        cmd.env("PGHOST", &t.host)
            .env("PGPORT", t.port.to_string())
            .env("PGUSER", self.login.user())
            .env("PGPASSWORD", self.login.password());
        cmd.env("PGSSLMODE", libpq_ssl_mode(t)).env(
            "PGAPPNAME",
            format!("tenant-operator-{}", program.rsplit('/').next().unwrap_or(program)),
        );
        let escaped = t.database.replace('\\', "\\\\").replace('\'', "\\'");
        (cmd, format!("dbname='{escaped}'"))
    }
}

/// The target's TLS mode as libpq's `sslmode` names it.
pub fn libpq_ssl_mode(t: &Target) -> &'static str {
    use sqlx::postgres::PgSslMode;
    match t.ssl_mode() {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
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

/// Backs up one tenant's schema: `pg_dump -Fc -n <schema> --role=<owner>`
/// as its ops login, sealed on the fly under the tenant's `backup` key and
/// uploaded in parts; on success a manifest beside it, then pruning. On any
/// failure the upload is aborted: nothing appears under the final name.
/// Writes nothing in Postgres: an admin caller records the outcome with
/// [`record`]; the operator finds a Job's backups in the store
/// ([`sync_registry`]).
pub async fn backup(
    access: &TenantAccess,
    tools: &Tools,
    store: &Store,
    retention: Retention,
) -> Result<BackupOutcome, BackupError> {
    let (name, uid) = (access.name().clone(), access.uid().to_owned());
    // The schema version, read as the owner; it also proves the login
    // works (and, for an admin caller, sets its password) before pg_dump.
    let schema_version = {
        let mut conn = access.connect().await?;
        let v = pgb::schema_version(&mut conn).await;
        conn.close().await;
        v?
    };
    let started_at = Utc::now();
    let started = Instant::now();
    let id = backup_id(started_at);
    let mut enc =
        StreamEncryptor::with_tenant_key(access.keys.active()?, &uid, Purpose::Backup).map_err(BackupError::Seal)?;
    let key_version = enc.header().key_version.get();

    let (cmd, dbname) = access.command(&tools.pg_dump);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.arg("--format=custom")
        .arg(format!("--schema={}", crate::pg::quote_ident(&name.schema())?))
        .arg(format!("--role={}", name.owner_role()))
        .arg("--dbname")
        .arg(&dbname);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| BackupError::Spawn {
        program: tools.pg_dump.clone(),
        source,
    })?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| BackupError::Read(std::io::Error::other("no stdout")))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| BackupError::Read(std::io::Error::other("no stderr")))?;
    let stderr_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s).await;
        s
    });

    let dump_path = store.dump_path(&uid, &id);
    let mut upload = store
        .inner
        .put_multipart(&dump_path)
        .await
        .map_err(BackupError::Upload)?;
    let streamed = async {
        let mut hasher = Sha256::new();
        let mut total: u64 = 0;
        let mut part: Vec<u8> = Vec::with_capacity(PART_SIZE + crate::crypto::DEFAULT_CHUNK_SIZE as usize * 2);
        let mut buf = vec![0u8; 256 * 1024];
        let mut in_flight = futures::stream::FuturesOrdered::new();
        let mut send = |part: &mut Vec<u8>,
                        hasher: &mut Sha256,
                        total: &mut u64,
                        in_flight: &mut futures::stream::FuturesOrdered<_>| {
            hasher.update(&part[..]);
            *total += part.len() as u64;
            let data = std::mem::replace(
                part,
                Vec::with_capacity(PART_SIZE + crate::crypto::DEFAULT_CHUNK_SIZE as usize * 2),
            );
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
            return Err(BackupError::Tool {
                program: tools.pg_dump.clone(),
                status: status.to_string(),
                stderr: stderr.trim().to_owned(),
            });
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
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::BadManifest {
        id: id.clone(),
        why: e.to_string(),
    })?;
    if let Err(e) = store
        .inner
        .put(&store.manifest_path(&uid, &id), PutPayload::from(json))
        .await
    {
        // A dump without a manifest is never listed: remove it.
        let _ = store.delete_quiet(&dump_path).await;
        return Err(BackupError::Upload(e));
    }
    let pruned = prune(store, &uid, retention, Utc::now()).await?;
    Ok(BackupOutcome {
        manifest,
        pruned: pruned.backups,
        orphans_pruned: pruned.orphans,
    })
}

/// For an admin caller (the backup command run by a person): records a
/// backup's outcome in `tenancy.backups` (the new backup, minus the pruned
/// ones), as the operator's [`sync_registry`] would.
pub async fn record(admin: &PgPool, outcome: &BackupOutcome) -> Result<(), BackupError> {
    let m = &outcome.manifest;
    let row = BackupRow {
        id: m.id.clone(),
        taken_at: m.time,
        bytes: m.bytes as i64,
        key_version: m.key_version as i32,
    };
    pgb::sync_backups(admin, &m.tenant_uid, &[row], &outcome.pruned).await?;
    Ok(())
}

/// What [`sync_registry`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// Backups found in the store that `tenancy.backups` did not list.
    pub added: Vec<Manifest>,
    /// Ids `tenancy.backups` listed that are no longer in the store.
    pub removed: Vec<String>,
}

/// The operator's side of backups a Job took: makes `tenancy.backups`
/// list exactly the tenant's backups in the store. One listing of the
/// tenant's prefix and one read of the table; a manifest is read only for
/// an id the table lacks, and Postgres is written only on a change. A
/// manifest that names another tenant is ignored.
pub async fn sync_registry(admin: &PgPool, store: &Store, uid: &str) -> Result<Synced, BackupError> {
    let objects = store.list_tenant(uid).await?;
    let in_store: std::collections::BTreeSet<String> = objects
        .iter()
        .filter_map(|o| o.location.filename()?.strip_suffix(".manifest.json").map(str::to_owned))
        .filter(|id| check_id(id).is_ok())
        .collect();
    let recorded: std::collections::BTreeSet<String> = pgb::backup_ids(admin, uid).await?.into_iter().collect();
    let mut added = Vec::new();
    for id in in_store.difference(&recorded) {
        let m = read_manifest(store, uid, id).await?;
        if m.tenant_uid != uid || m.id != *id {
            tracing::warn!(tenant_uid = uid, backup = %id, "a manifest in the tenant's folder names another tenant or id: ignored");
            continue;
        }
        added.push(m);
    }
    let removed: Vec<String> = recorded.difference(&in_store).cloned().collect();
    let rows: Vec<BackupRow> = added
        .iter()
        .map(|m| BackupRow {
            id: m.id.clone(),
            taken_at: m.time,
            bytes: m.bytes as i64,
            key_version: m.key_version as i32,
        })
        .collect();
    pgb::sync_backups(admin, uid, &rows, &removed).await?;
    Ok(Synced { added, removed })
}

async fn read_manifest(store: &Store, uid: &str, id: &str) -> Result<Manifest, BackupError> {
    let bytes = store
        .inner
        .get(&store.manifest_path(uid, id))
        .await
        .map_err(|e| BackupError::Store(e.into()))?
        .bytes()
        .await
        .map_err(|e| BackupError::Store(e.into()))?;
    serde_json::from_slice(&bytes).map_err(|e| BackupError::BadManifest {
        id: id.to_owned(),
        why: e.to_string(),
    })
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
/// first, then manifest), then the orphan dumps older than
/// [`ORPHAN_GRACE`] at `now`. Store objects only: `tenancy.backups` follows
/// the store ([`record`] by hand, [`sync_registry`] in the operator).
pub async fn prune(store: &Store, uid: &str, retention: Retention, now: DateTime<Utc>) -> Result<Pruned, BackupError> {
    let objects = store.list_tenant(uid).await?;
    let manifests = read_manifests(store, &objects).await?;
    let doomed = plan_prune(&manifests, retention, now);
    for id in &doomed {
        store.delete_quiet(&store.dump_path(uid, id)).await?;
        store.delete_quiet(&store.manifest_path(uid, id)).await?;
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
        std::fs::remove_file(&path)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|source| BackupError::Local {
                path: path.display().to_string(),
                source,
            })?;
        orphans.push(id);
    }
    Ok(Pruned {
        backups: doomed,
        orphans,
    })
}

/// In a filesystem store, the staging files (`<id>.dump.enc#<n>`, which
/// listing does not show) of uploads that never completed (the process was
/// killed), last written more than `grace` before `now`.
fn stale_local_uploads(
    store: &Store,
    uid: &str,
    now: DateTime<Utc>,
    grace: Duration,
) -> Result<Vec<(String, std::path::PathBuf)>, BackupError> {
    let Some(dir) = store.local_tenant_dir(uid) else {
        return Ok(Vec::new());
    };
    let local = |source| BackupError::Local {
        path: dir.display().to_string(),
        source,
    };
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
        let Some((id, n)) = name.split_once(".dump.enc#") else {
            continue;
        };
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
        let Some(id) = file.strip_suffix(".manifest.json") else {
            continue;
        };
        let bytes = store
            .inner
            .get(&o.location)
            .await
            .map_err(|e| BackupError::Store(e.into()))?
            .bytes()
            .await
            .map_err(|e| BackupError::Store(e.into()))?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| BackupError::BadManifest {
            id: id.to_owned(),
            why: e.to_string(),
        })?;
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

impl TempFile {
    fn new(name: &TenantName, what: &str) -> Self {
        TempFile(std::env::temp_dir().join(format!("tenant-restore-{name}-{:016x}.{what}", rand::random::<u64>())))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Picks the backup `sel` names among the tenant's manifests and checks
/// that it is this tenant's and sealed under a version in `held`. Reads
/// the store only.
pub async fn resolve(
    store: &Store,
    name: &TenantName,
    uid: &str,
    sel: &Selector,
    held: &[KeyVersion],
) -> Result<Manifest, BackupError> {
    let manifests = list(store, uid).await?;
    let manifest = select(&manifests, sel)
        .cloned()
        .ok_or_else(|| BackupError::NoSuchBackup {
            tenant: name.to_string(),
            wanted: sel.to_string(),
        })?;
    let id = manifest.id.clone();
    check_id(&id)?;
    let refuse = |why: String| BackupError::Refused { id: id.clone(), why };
    if manifest.tenant_uid != uid || manifest.schema != name.schema() {
        return Err(refuse(format!(
            "it belongs to tenant uid {} (schema {}), not to {name}",
            manifest.tenant_uid, manifest.schema
        )));
    }
    if !KeyVersion::new(manifest.key_version).is_ok_and(|v| held.contains(&v)) {
        let held: Vec<String> = held.iter().map(|v| v.to_string()).collect();
        return Err(refuse(format!(
            "it is sealed under root key v{}, which the root keys given do not hold (they hold {}); restore with root keys that include v{}",
            manifest.key_version,
            held.join(", "),
            manifest.key_version
        )));
    }
    Ok(manifest)
}

/// Downloads backup `manifest` to a temporary file, checking its size and
/// SHA-256 against the manifest, then decrypts it once to nowhere (every
/// chunk's tag, and the final chunk). Touches nothing in Postgres.
async fn fetch_verified(store: &Store, access: &TenantAccess, manifest: &Manifest) -> Result<TempFile, BackupError> {
    let (name, uid, id) = (access.name(), access.uid(), manifest.id.clone());
    let refuse = |why: String| BackupError::Refused { id: id.clone(), why };
    let tmp = TempFile::new(name, "dump.enc");
    let local = |source| BackupError::Local {
        path: tmp.0.display().to_string(),
        source,
    };
    {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let mut file = tokio::fs::File::create(&tmp.0).await.map_err(local)?;
        let got = store
            .inner
            .get(&store.dump_path(uid, &id))
            .await
            .map_err(|e| refuse(format!("the dump object cannot be read: {e}")))?;
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
            return Err(refuse(format!(
                "its SHA-256/size ({sha}, {size} bytes) differ from the manifest's ({}, {} bytes)",
                manifest.sha256, manifest.bytes
            )));
        }
    }
    let (path, keys, uid_owned) = (tmp.0.clone(), access.keys.keys.clone(), uid.to_owned());
    let checked = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
        let mut r =
            OpeningReader::with_tenant_keys(f, keys, &uid_owned, Purpose::Backup).map_err(std::io::Error::other)?;
        std::io::copy(&mut r, &mut std::io::sink())
    })
    .await
    .map_err(|e| refuse(e.to_string()))?;
    checked.map_err(|e| refuse(format!("it does not decrypt as this tenant's backup: {e}")))?;
    Ok(tmp)
}

/// The whole restore, for the restore command run by a person with the
/// admin DSN and the root keys (disaster recovery): takes the restore lock
/// for its whole run, finishes an interrupted restore, picks and checks the
/// backup (nothing touched up to here), prepares (admin), runs
/// `pg_restore` as the ops login, then finalizes (admin; audit row
/// `Restored` by `actor`) or puts the original back. Only this tenant's
/// schema and app role are touched.
pub async fn restore(
    admin: &PgPool,
    ring: &Keyring,
    access: &TenantAccess,
    tools: &Tools,
    store: &Store,
    sel: &Selector,
    actor: &str,
) -> Result<RestoreOutcome, BackupError> {
    // A reconcile holds the lock for a moment (shared, while it may enable
    // login); only another restore holds it longer.
    let lock = pgb::restore_lock(admin, access.uid(), Duration::from_secs(30))
        .await?
        .ok_or_else(|| BackupError::RestoreRunning(access.name().to_string()))?;
    let result = restore_locked(admin, ring, access, tools, store, sel, actor).await;
    lock.release().await;
    result
}

async fn restore_locked(
    admin: &PgPool,
    ring: &Keyring,
    access: &TenantAccess,
    tools: &Tools,
    store: &Store,
    sel: &Selector,
    actor: &str,
) -> Result<RestoreOutcome, BackupError> {
    let (name, uid) = (access.name(), access.uid());
    // A restore killed earlier left the schema aside: finish that first.
    let recovered = pgb::recover_aside_locked(admin, name, uid).await?;
    let manifest = resolve(store, name, uid, sel, &access.keys.versions()).await?;
    let id = manifest.id.clone();
    let tmp = fetch_verified(store, access, &manifest).await?;
    // The ops login works (its password set) before anything is moved.
    access.connect().await?.close().await;

    match pgb::prepare(admin, name, uid, pgb::BY_COMMAND, false).await? {
        pgb::Prepared::Done | pgb::Prepared::Already => {}
        other => {
            return Err(BackupError::NotPrepared {
                tenant: name.to_string(),
                why: format!("{other:?}"),
            })
        }
    }
    match run_pg_restore(access, tools, &tmp.0).await {
        Ok(()) => {
            // The restored audit chain is older than the anchored head: the
            // anchors are reset to it (and that is recorded) before the app
            // may write again (docs/audit.md, "After a restore").
            let login = &access.login;
            crate::pg::audit::rebase_after_restore(admin, ring, login, actor, serde_json::json!({ "backup": id }))
                .await?;
            let record = pgb::RestoreRecord {
                backup_id: id.clone(),
                actor: actor.to_owned(),
                detail: serde_json::json!({ "bytes": manifest.bytes, "keyVersion": manifest.key_version }),
            };
            match pgb::finalize(admin, name, uid, pgb::BY_COMMAND, false, &record).await? {
                pgb::Finalized::Done | pgb::Finalized::Already => Ok(RestoreOutcome { manifest, recovered }),
                other => Err(BackupError::RestoreFailed {
                    id,
                    why: format!("finalizing found {other:?}"),
                }),
            }
        }
        Err(why) => {
            pgb::put_back(admin, name, uid, false).await?;
            Err(BackupError::RestoreFailed { id, why })
        }
    }
}

/// A restore Job's half, with only the tenant's ops login and backup keys:
/// picks backup `id`, downloads and checks it, checks that the operator
/// prepared the schema (an empty one marked restoring, the original
/// aside), and runs `pg_restore` into it. The operator finalizes or puts
/// back when the Job ends.
pub async fn restore_prepared(
    access: &TenantAccess,
    tools: &Tools,
    store: &Store,
    id: &str,
) -> Result<Manifest, BackupError> {
    check_id(id)?;
    let (name, uid) = (access.name(), access.uid());
    let manifest = resolve(store, name, uid, &Selector::Id(id.to_owned()), &access.keys.versions()).await?;
    let tmp = fetch_verified(store, access, &manifest).await?;
    let mut conn = access.connect().await?;
    let prepared = pgb::check_prepared(&mut conn, name, uid).await;
    conn.close().await;
    if let Err(why) = prepared? {
        return Err(BackupError::NotPrepared {
            tenant: name.to_string(),
            why,
        });
    }
    run_pg_restore(access, tools, &tmp.0)
        .await
        .map_err(|why| BackupError::PgRestore { id: id.to_owned(), why })?;
    Ok(manifest)
}

/// The TOC list `pg_restore -l` printed, without the entries of the
/// schema itself (its creation, comment and privileges): the restore goes
/// into a schema the admin created, owned by the tenant's owner, and only
/// the admin sets its comment. Pure.
pub fn restore_list(list: &str, schema: &str) -> String {
    let skip = [
        format!("SCHEMA - {schema} "),
        format!("COMMENT - SCHEMA {schema} "),
        format!("ACL - SCHEMA {schema} "),
    ];
    let mut out = String::with_capacity(list.len());
    for line in list.lines() {
        // `<dump id>; <table oid> <oid> <type> <namespace> <tag> <owner>`
        let entry = line.split_once("; ").and_then(|(_, rest)| rest.splitn(3, ' ').nth(2));
        if entry.is_some_and(|e| skip.iter().any(|s| e.starts_with(s.as_str()) || format!("{e} ") == *s)) {
            out.push(';');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Runs `cmd` with the decrypted dump on its stdin; returns its status,
/// stdout (when `capture`) and stderr. A decryption error kills it before
/// its input ends (pg_restore must never see a clean end and commit).
fn pipe_decrypted(
    mut cmd: std::process::Command,
    path: &std::path::Path,
    keys: Vec<TenantKey>,
    uid: &str,
    capture: bool,
) -> Result<(std::process::ExitStatus, String, String), String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::piped())
        .stdout(if capture { Stdio::piped() } else { Stdio::null() })
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("running {program}: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let err_thread = reader(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let out_thread = reader(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let copied = (|| -> std::io::Result<()> {
        let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
        let mut r = OpeningReader::with_tenant_keys(f, keys, uid, Purpose::Backup).map_err(std::io::Error::other)?;
        std::io::copy(&mut r, &mut stdin)?;
        stdin.flush()
    })();
    if let Err(e) = copied {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("decrypting the dump: {e}"));
        }
    }
    drop(stdin);
    let status = child.wait().map_err(|e| e.to_string())?;
    Ok((
        status,
        out_thread.join().unwrap_or_default(),
        err_thread.join().unwrap_or_default(),
    ))
}

/// `pg_restore --single-transaction --exit-on-error --role=<owner>
/// --use-list <list>` into the tenant's database as its ops login, and the
/// list file it reads (to be written first).
fn restore_command(access: &TenantAccess, tools: &Tools) -> (std::process::Command, TempFile) {
    let name = access.name();
    let (mut cmd, dbname) = access.command(&tools.pg_restore);
    let list_file = TempFile::new(name, "list");
    cmd.arg("--single-transaction")
        .arg("--exit-on-error")
        .arg(format!("--role={}", name.owner_role()))
        .arg("--use-list")
        .arg(&list_file.0)
        .arg("--dbname")
        .arg(&dbname);
    (cmd, list_file)
}

/// Restores the decrypted dump at `path` as the ops login acting as the
/// owner: `pg_restore -l` for its TOC, the schema's own entries left out
/// ([`restore_list`]), then `pg_restore --single-transaction
/// --exit-on-error --role=<owner> -L <list>`.
async fn run_pg_restore(access: &TenantAccess, tools: &Tools, path: &std::path::Path) -> Result<(), String> {
    let name = access.name().clone();
    let (cmd, list_file) = restore_command(access, tools);
    let mut list_cmd = std::process::Command::new(&tools.pg_restore);
    list_cmd.arg("--list");
    let (path, keys, uid, program) = (
        path.to_owned(),
        access.keys.keys.clone(),
        access.uid().to_owned(),
        tools.pg_restore.clone(),
    );
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let (status, list, stderr) = pipe_decrypted(list_cmd, &path, keys.clone(), &uid, true)?;
        if !status.success() {
            return Err(format!("{program} --list failed ({status}): {}", stderr.trim()));
        }
        std::fs::write(&list_file.0, restore_list(&list, &name.schema()))
            .map_err(|e| format!("writing {}: {e}", list_file.0.display()))?;
        let (status, _, stderr) = pipe_decrypted(cmd, &path, keys, &uid, false)?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{program} failed ({status}): {}", stderr.trim()))
        }
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The `by` of a move's schema copy (its restoring marker).
pub const BY_MOVE: &str = "tenant move";

/// A move's first step with strategy `Logical`: the tenant's schema
/// without its data (tables, their triggers, functions, grants), dumped
/// from the source as its ops login and restored into the target as the
/// target's ops login, through the restore's prepare and finalize (the
/// target's converged schema set aside, an empty one made, then marked the
/// tenant's). The data comes by logical replication. Idempotent: a schema
/// already copied is copied again (the target serves nothing yet).
pub async fn copy_schema(
    to_admin: &PgPool,
    from: &TenantAccess,
    to: &TenantAccess,
    tools: &Tools,
    actor: &str,
) -> Result<(), BackupError> {
    let (name, uid) = (from.name().clone(), from.uid().to_owned());
    let dump = TempFile::new(&name, "schema");
    let (mut cmd, dbname) = from.command(&tools.pg_dump);
    cmd.arg("--format=custom")
        .arg("--schema-only")
        .arg(format!("--schema={}", crate::pg::quote_ident(&name.schema())?))
        .arg(format!("--role={}", name.owner_role()))
        .arg("--file")
        .arg(&dump.0)
        .arg("--dbname")
        .arg(&dbname);
    let program = tools.pg_dump.clone();
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .map_err(|e| BackupError::Read(std::io::Error::other(e)))?
        .map_err(|source| BackupError::Spawn {
            program: program.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(BackupError::Tool {
            program,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    // The target's login works (its password set) before anything moves.
    to.connect().await?.close().await;
    // A copy interrupted earlier: its schema is put back first.
    pgb::recover_aside(to_admin, &name, &uid).await?;
    match pgb::prepare(to_admin, &name, &uid, BY_MOVE, false).await? {
        pgb::Prepared::Done | pgb::Prepared::Already => {}
        other => {
            return Err(BackupError::NotPrepared {
                tenant: name.to_string(),
                why: format!("{other:?}"),
            })
        }
    }
    let restored = {
        let (mut cmd, list_file) = restore_command(to, tools);
        cmd.arg(&dump.0);
        let mut list_cmd = std::process::Command::new(&tools.pg_restore);
        list_cmd.arg("--list").arg(&dump.0);
        let (program, schema) = (tools.pg_restore.clone(), name.schema());
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let list = list_cmd.output().map_err(|e| format!("running {program}: {e}"))?;
            if !list.status.success() {
                return Err(format!(
                    "{program} --list failed ({}): {}",
                    list.status,
                    String::from_utf8_lossy(&list.stderr).trim()
                ));
            }
            std::fs::write(
                &list_file.0,
                restore_list(&String::from_utf8_lossy(&list.stdout), &schema),
            )
            .map_err(|e| format!("writing {}: {e}", list_file.0.display()))?;
            let out = cmd.output().map_err(|e| format!("running {program}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{program} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
    };
    if let Err(why) = restored {
        pgb::put_back(to_admin, &name, &uid, false).await?;
        return Err(BackupError::RestoreFailed {
            id: "schema copy".into(),
            why,
        });
    }
    let record = pgb::RestoreRecord {
        backup_id: format!("move-schema-{}", Utc::now().format("%Y%m%dT%H%M%S%.3fZ")),
        actor: actor.to_owned(),
        detail: serde_json::json!({ "schemaOnly": true }),
    };
    match pgb::finalize(to_admin, &name, &uid, BY_MOVE, false, &record).await? {
        pgb::Finalized::Done | pgb::Finalized::Already => Ok(()),
        other => Err(BackupError::RestoreFailed {
            id: "schema copy".into(),
            why: format!("finalizing found {other:?}"),
        }),
    }
}

/// Deletes every backup of the tenant from the store (the delete
/// finalizer); returns how many objects went.
pub async fn delete_all(store: &Store, uid: &str) -> Result<usize, BackupError> {
    Ok(store.delete_tenant(uid).await?)
}

/// `30m`, `36h`, `14d`, `2w`, `90s`.
pub fn parse_age(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or("a unit is needed: s, m, h, d or w")?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} does not start with a number"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return Err(format!("unknown unit {unit:?}: use s, m, h, d or w")),
    };
    if n == 0 {
        return Err("must be more than 0".into());
    }
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| "too long".into())
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
    fn debug_shows_no_password_or_key() {
        let target = crate::pg::Target::from_url("postgresql://admin:adminpw@db:5432/saas").unwrap();
        let name = TenantName::parse("acme").unwrap();
        let key = TenantKey::from_bytes(&[0xab; 32], KeyVersion::new(1).unwrap(), Purpose::Backup).unwrap();
        let access = TenantAccess::new(
            OpsLogin::new(&target, &name, "u-1", zeroize::Zeroizing::new("opspw-123".into())),
            BackupKeys::from_keys(vec![key]).unwrap(),
        );
        let shown = format!("{access:?} {access:#?}");
        for secret in ["opspw-123", "adminpw", "abab", "171, 171"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    #[test]
    fn ids_round_trip_and_bad_ids_are_refused() {
        let id = backup_id(DateTime::from_timestamp(1_700_000_000, 5_000_000).unwrap());
        assert_eq!(id, "20231114T221320.005Z");
        check_id(&id).unwrap();
        for bad in [
            "../../etc/passwd",
            "20231114T221320.005",
            "20231114T221320.005Z/x",
            "latest",
            "",
        ] {
            assert!(check_id(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn retention_by_count_keeps_the_newest() {
        let all: Vec<Manifest> = (0..5).map(|i| m(i * 60)).collect();
        let now = all[4].time;
        let doomed = plan_prune(
            &all,
            Retention {
                count: Some(2),
                max_age: None,
            },
            now,
        );
        assert_eq!(doomed, vec![all[2].id.clone(), all[1].id.clone(), all[0].id.clone()]);
        assert!(
            plan_prune(&all, Retention::default(), now).is_empty(),
            "no retention keeps everything"
        );
    }

    #[test]
    fn retention_by_age_never_deletes_the_newest() {
        let all: Vec<Manifest> = (0..3).map(|i| m(i * 3600)).collect();
        let now = all[2].time + chrono::Duration::hours(10);
        let doomed = plan_prune(
            &all,
            Retention {
                count: None,
                max_age: Some(Duration::from_secs(3600 * 10 + 1800)),
            },
            now,
        );
        assert_eq!(doomed, vec![all[1].id.clone(), all[0].id.clone()]);
        let both = plan_prune(
            &all,
            Retention {
                count: Some(2),
                max_age: Some(Duration::from_secs(3600 * 13)),
            },
            now,
        );
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
        let (old, new, backed, other) = (
            "20270101T000000.000Z",
            "20270101T060000.000Z",
            "20260101T000000.000Z",
            "20250101T000000.000Z",
        );
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
        elsewhere.push(object_store::ObjectMeta {
            location: object_store::path::Path::from(format!("pre/tenants/v/{old}.manifest.json")),
            ..obj("x", 0)
        });
        elsewhere.push(object_store::ObjectMeta {
            location: dir.clone().join("sub").join(format!("{other}.dump.enc")),
            ..obj("x", 90 * 86400)
        });
        assert_eq!(plan_orphans(&dir, &elsewhere, now, grace), vec![old.to_string()]);
        // The grace is the line: a dump exactly as old is kept.
        assert!(plan_orphans(&dir, &[obj(&format!("{old}.dump.enc"), 6 * 3600)], now, grace).is_empty());
        assert!(
            ORPHAN_GRACE > JOB_DEADLINE,
            "a backup Job may still be uploading a dump the grace lets pruning delete"
        );
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
        assert_eq!(
            select(
                &all,
                &Selector::PointInTime(all[1].time + chrono::Duration::seconds(59))
            )
            .unwrap()
            .id,
            all[1].id
        );
        assert!(select(&all, &Selector::PointInTime(all[0].time - chrono::Duration::seconds(1))).is_none());
    }
}
