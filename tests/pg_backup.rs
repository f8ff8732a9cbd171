//! Per-tenant backup and restore against a real Postgres with the real
//! pg_dump/pg_restore: a restore brings back exactly one tenant's data; a
//! corrupted, truncated or other tenant's backup is refused with the live
//! schema untouched; retention keeps what it should; an interrupted restore
//! leaves the original usable; the filesystem and S3 (moto) stores;
//! orphan dumps (no manifest) are pruned only after the grace period and
//! never restored; the built binary backs up and restores with
//! `--root-keys-file` and no Kubernetes cluster at all.
//!
//! Run: `bash scripts/with-postgres.sh cargo test --test pg_backup`
//! (the S3 test also needs `scripts/with-moto.sh`; it fails under CI
//! without it and is skipped with a message otherwise).

mod support;

use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path;
use support::tenant::Tenant;
use support::{as_owner, unique, TestDb};
use tenant_operator::backup::{
    self, BackupError, BackupOutcome, RestoreOutcome, Retention, Selector, Store, StoreConfig, TenantAccess, Tools,
};
use tenant_operator::crypto::{self, Keyring};
use tenant_operator::pg;
use tenant_operator::pg::backup_sql::AsideState;

fn keyring() -> Arc<Keyring> {
    let mut keys = std::collections::BTreeMap::new();
    keys.insert("v1".to_string(), crypto::generate_root_key().to_vec());
    Arc::new(Keyring::new(keys, "v1").unwrap())
}

struct Fixture {
    db: TestDb,
    ring: Arc<Keyring>,
    dir: tempfile::TempDir,
    store: Store,
    tools: Tools,
}

async fn setup(label: &str) -> Fixture {
    let db = TestDb::new(label).await;
    pg::migrate_control_schema(&db.admin).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreConfig {
        url: format!("file://{}", dir.path().display()),
        ..Default::default()
    })
    .unwrap();
    let tools = Tools::default();
    Fixture {
        db,
        ring: keyring(),
        dir,
        store,
        tools,
    }
}

/// The tenant's access as the admin's commands derive it (ops login,
/// backup keys).
async fn access(db: &TestDb, ring: &Keyring, name: &tenant_operator::names::TenantName) -> TenantAccess {
    let target = pg::Target::from_url(&db.admin_url).unwrap();
    TenantAccess::derive(&db.admin, &target, name, ring).await.unwrap()
}

/// A backup as the backup command by hand takes it: pg_dump as the ops
/// login, then recorded in tenancy.backups by the admin.
async fn bk_with(
    db: &TestDb,
    ring: &Keyring,
    tools: &Tools,
    store: &Store,
    name: &tenant_operator::names::TenantName,
    retention: Retention,
) -> Result<BackupOutcome, BackupError> {
    let out = backup::backup(&access(db, ring, name).await, tools, store, retention).await?;
    backup::record(&db.admin, &out).await?;
    Ok(out)
}

async fn rs_with(
    db: &TestDb,
    ring: &Keyring,
    tools: &Tools,
    store: &Store,
    name: &tenant_operator::names::TenantName,
    sel: &Selector,
) -> Result<RestoreOutcome, BackupError> {
    backup::restore(
        &db.admin,
        ring,
        &access(db, ring, name).await,
        tools,
        store,
        sel,
        "test",
    )
    .await
}

/// A provisioned tenant with a table `items` holding `rows` rows.
async fn tenant_with_data(db: &TestDb, base: &str, rows: i32) -> Tenant {
    let mut t = Tenant::new(&unique(base));
    t.converge(db).await.unwrap();
    let (schema, owner) = (t.name.schema(), t.name.owner_role());
    sqlx::raw_sql(sqlx::AssertSqlSafe(as_owner(
        &owner,
        &format!("CREATE TABLE \"{schema}\".items (id int PRIMARY KEY, label text NOT NULL)"),
    )))
    .execute(&db.admin)
    .await
    .unwrap();
    // The next reconcile grants the app DML on the new table.
    t.converge(db).await.unwrap();
    let mut app = t.app(db).await.unwrap();
    sqlx::query("INSERT INTO items SELECT g, 'row ' || g FROM generate_series(1, $1) g")
        .bind(rows)
        .execute(&mut app)
        .await
        .unwrap();
    t
}

/// The tenant's rows, as its app role reads them.
async fn rows(db: &TestDb, t: &Tenant) -> Vec<(i32, String)> {
    let mut app = t.app(db).await.expect("the app role can log in");
    sqlx::query_as("SELECT id, label FROM items ORDER BY id")
        .fetch_all(&mut app)
        .await
        .unwrap()
}

/// Adds `n` rows of hex noise (so that the dump spans several chunks).
async fn pad(db: &TestDb, t: &Tenant, n: i32) {
    let mut app = t.app(db).await.unwrap();
    sqlx::query(
        "INSERT INTO items SELECT g, md5(g::text) || md5(random()::text) FROM generate_series(100000, 100000 + $1) g",
    )
    .bind(n)
    .execute(&mut app)
    .await
    .unwrap();
}

async fn change(db: &TestDb, t: &Tenant) {
    let mut app = t.app(db).await.unwrap();
    sqlx::query("UPDATE items SET label = 'changed' WHERE id = 1")
        .execute(&mut app)
        .await
        .unwrap();
    sqlx::query("DELETE FROM items WHERE id = 2")
        .execute(&mut app)
        .await
        .unwrap();
    sqlx::query("INSERT INTO items VALUES (-1, 'new')")
        .execute(&mut app)
        .await
        .unwrap();
}

async fn schemas_like(db: &TestDb, t: &Tenant) -> Vec<String> {
    sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1 ORDER BY 1")
        .bind(format!("{}%", t.name.schema()))
        .fetch_all(&db.su)
        .await
        .unwrap()
}

#[tokio::test]
async fn restore_brings_back_one_tenant_and_leaves_the_other_alone() {
    let f = setup("bk_roundtrip").await;
    let a = tenant_with_data(&f.db, "bk-a", 50).await;
    let b = tenant_with_data(&f.db, "bk-b", 20).await;
    let before_a = rows(&f.db, &a).await;

    let out = bk_with(&f.db, &f.ring, &f.tools, &f.store, &a.name, Retention::default())
        .await
        .unwrap();
    let m = &out.manifest;
    assert_eq!(
        (m.tenant_uid.as_str(), m.schema.as_str()),
        (a.uid.as_str(), a.name.schema().as_str())
    );
    assert!(
        m.pg_dump_version.contains("pg_dump"),
        "manifest lacks the pg_dump version: {m:?}"
    );
    let on_disk = std::fs::read(f.dir.path().join(format!("tenants/{}/{}.dump.enc", a.uid, m.id))).unwrap();
    assert_eq!(on_disk.len() as u64, m.bytes);
    assert_eq!(&on_disk[..4], b"TNBK", "the stored dump is not an encrypted stream");
    assert!(
        !on_disk.windows(5).any(|w| w == b"row 1"),
        "plaintext rows are visible in the stored dump"
    );
    let last = pg::backup_sql::last_backup(&f.db.admin, &a.uid)
        .await
        .unwrap()
        .expect("the backup is recorded");
    assert_eq!((last.id.as_str(), last.bytes), (m.id.as_str(), m.bytes as i64));

    change(&f.db, &a).await;
    change(&f.db, &b).await;
    let before_b = rows(&f.db, &b).await;
    assert_ne!(rows(&f.db, &a).await, before_a);

    let r = rs_with(&f.db, &f.ring, &f.tools, &f.store, &a.name, &Selector::Latest)
        .await
        .unwrap();
    assert_eq!(r.manifest.id, m.id);
    assert_eq!(
        rows(&f.db, &a).await,
        before_a,
        "the restored data is not the backed-up data"
    );
    assert_eq!(rows(&f.db, &b).await, before_b, "restoring A changed tenant B");
    assert_eq!(
        schemas_like(&f.db, &a).await,
        vec![a.name.schema()],
        "an aside schema was left behind"
    );
    // The app can write again, and the next reconcile has nothing to fix
    // but what the dump could not carry.
    let mut app = a.app(&f.db).await.unwrap();
    sqlx::query("INSERT INTO items VALUES (2000, 'after restore')")
        .execute(&mut app)
        .await
        .unwrap();
    let mut a = a;
    a.converge(&f.db).await.unwrap();
    let again = a.converge(&f.db).await.unwrap();
    assert_eq!(
        again.statements, 0,
        "the restored tenant does not converge: {:?}",
        again.plan.actions
    );
}

#[tokio::test]
async fn point_in_time_and_id_pick_the_right_backup() {
    let f = setup("bk_pit").await;
    let a = tenant_with_data(&f.db, "bk-pit", 3).await;
    let first = bk_with(&f.db, &f.ring, &f.tools, &f.store, &a.name, Retention::default())
        .await
        .unwrap()
        .manifest;
    let v1 = rows(&f.db, &a).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    change(&f.db, &a).await;
    let second = bk_with(&f.db, &f.ring, &f.tools, &f.store, &a.name, Retention::default())
        .await
        .unwrap()
        .manifest;
    let v2 = rows(&f.db, &a).await;
    rs_with(
        &f.db,
        &f.ring,
        &f.tools,
        &f.store,
        &a.name,
        &Selector::PointInTime(second.time - chrono::Duration::milliseconds(1)),
    )
    .await
    .unwrap();
    assert_eq!(
        rows(&f.db, &a).await,
        v1,
        "point in time before the second backup must pick the first"
    );
    rs_with(
        &f.db,
        &f.ring,
        &f.tools,
        &f.store,
        &a.name,
        &Selector::Id(second.id.clone()),
    )
    .await
    .unwrap();
    assert_eq!(rows(&f.db, &a).await, v2);
    let err = rs_with(
        &f.db,
        &f.ring,
        &f.tools,
        &f.store,
        &a.name,
        &Selector::PointInTime(first.time - chrono::Duration::seconds(1)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, BackupError::NoSuchBackup { .. }), "{err}");
}

/// Rewrites backup `id` of `uid` in the filesystem store with `dump` and a
/// manifest that matches it (so that only the encryption can refuse it).
fn forge(f: &Fixture, uid: &str, id: &str, dump: &[u8], manifest: &mut backup::Manifest) {
    use sha2::Digest;
    let dir = f.dir.path().join(format!("tenants/{uid}"));
    std::fs::create_dir_all(&dir).unwrap();
    manifest.bytes = dump.len() as u64;
    manifest.sha256 = hex::encode(sha2::Sha256::digest(dump));
    std::fs::write(dir.join(format!("{id}.dump.enc")), dump).unwrap();
    std::fs::write(
        dir.join(format!("{id}.manifest.json")),
        serde_json::to_vec(manifest).unwrap(),
    )
    .unwrap();
}

#[tokio::test]
async fn corrupted_truncated_and_foreign_backups_are_refused_and_the_live_schema_is_unchanged() {
    let f = setup("bk_refuse").await;
    let a = tenant_with_data(&f.db, "bk-ra", 2000).await;
    let b = tenant_with_data(&f.db, "bk-rb", 10).await;
    pad(&f.db, &a, 60_000).await;
    let m = bk_with(&f.db, &f.ring, &f.tools, &f.store, &a.name, Retention::default())
        .await
        .unwrap()
        .manifest;
    change(&f.db, &a).await;
    let live = rows(&f.db, &a).await;
    let path = f.dir.path().join(format!("tenants/{}/{}.dump.enc", a.uid, m.id));
    let good = std::fs::read(&path).unwrap();

    let by_id = Selector::Id(m.id.clone());
    let restore = || rs_with(&f.db, &f.ring, &f.tools, &f.store, &a.name, &by_id);
    let check_untouched = |what: &'static str| {
        let (db, a, live) = (&f.db, &a, &live);
        async move {
            assert_eq!(rows(db, a).await, *live, "{what}: the live data changed");
            assert_eq!(
                schemas_like(db, a).await,
                vec![a.name.schema()],
                "{what}: schemas left behind"
            );
        }
    };

    // One flipped byte, manifest untouched: the SHA-256 refuses it.
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    std::fs::write(&path, &flipped).unwrap();
    let err = restore().await.unwrap_err();
    assert!(matches!(err, BackupError::Refused { .. }), "flipped byte: {err}");
    check_untouched("flipped byte").await;

    // The same with a manifest forged to match: the chunk tags refuse it.
    let mut forged = m.clone();
    forge(&f, &a.uid, &m.id, &flipped, &mut forged);
    let err = restore().await.unwrap_err();
    assert!(
        matches!(err, BackupError::Refused { .. }) && err.to_string().contains("decrypt"),
        "flipped byte, forged manifest: {err}"
    );
    check_untouched("flipped byte, forged manifest").await;

    // Truncated (at a chunk boundary and mid-chunk), manifest forged to match.
    for cut in [crypto::STREAM_HEADER_LEN + 1024 * 1024 + 16, good.len() - 7] {
        if cut >= good.len() {
            continue;
        }
        let mut forged = m.clone();
        forge(&f, &a.uid, &m.id, &good[..cut], &mut forged);
        let err = restore().await.unwrap_err();
        assert!(matches!(err, BackupError::Refused { .. }), "truncated at {cut}: {err}");
        check_untouched("truncated").await;
    }

    // B's backup dressed up as A's.
    let mb = bk_with(&f.db, &f.ring, &f.tools, &f.store, &b.name, Retention::default())
        .await
        .unwrap()
        .manifest;
    let b_dump = std::fs::read(f.dir.path().join(format!("tenants/{}/{}.dump.enc", b.uid, mb.id))).unwrap();
    let mut as_a = mb.clone();
    as_a.tenant_uid = a.uid.clone();
    as_a.schema = a.name.schema();
    as_a.id = m.id.clone();
    forge(&f, &a.uid, &m.id, &b_dump, &mut as_a);
    let err = restore().await.unwrap_err();
    assert!(
        matches!(err, BackupError::Refused { .. }),
        "other tenant's backup: {err}"
    );
    check_untouched("other tenant's backup").await;

    // B's manifest as it is, copied into A's folder: refused by the manifest.
    let mut b_manifest = mb.clone();
    b_manifest.id = "20000101T000000.000Z".into();
    forge(&f, &a.uid, &b_manifest.id.clone(), &b_dump, &mut b_manifest);
    let err = rs_with(
        &f.db,
        &f.ring,
        &f.tools,
        &f.store,
        &a.name,
        &Selector::Id(b_manifest.id.clone()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, BackupError::Refused { .. }),
        "other tenant's manifest: {err}"
    );
    check_untouched("other tenant's manifest").await;

    // And the intact file still restores.
    std::fs::write(&path, &good).unwrap();
    let mut intact = m.clone();
    forge(&f, &a.uid, &m.id, &good, &mut intact);
    restore().await.unwrap();
    assert_ne!(rows(&f.db, &a).await, live);
}

#[tokio::test]
async fn a_failed_pg_restore_puts_the_original_back() {
    let f = setup("bk_fail").await;
    let a = tenant_with_data(&f.db, "bk-fail", 5).await;
    bk_with(&f.db, &f.ring, &f.tools, &f.store, &a.name, Retention::default())
        .await
        .unwrap();
    change(&f.db, &a).await;
    let live = rows(&f.db, &a).await;
    // A pg_restore that reads part of its input and fails.
    let script = f.dir.path().join("bad-pg-restore.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nhead -c 100 >/dev/null\necho 'simulated failure' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let tools = Tools {
        pg_restore: script.display().to_string(),
        ..f.tools.clone()
    };
    let err = rs_with(&f.db, &f.ring, &tools, &f.store, &a.name, &Selector::Latest)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BackupError::RestoreFailed { .. }) && err.to_string().contains("simulated failure"),
        "{err}"
    );
    assert_eq!(
        rows(&f.db, &a).await,
        live,
        "the original schema was not put back untouched (or login not restored)"
    );
    assert_eq!(schemas_like(&f.db, &a).await, vec![a.name.schema()]);
}

#[tokio::test]
async fn a_restore_killed_half_way_leaves_the_original_usable() {
    let f = setup("bk_kill").await;
    let mut a = tenant_with_data(&f.db, "bk-kill", 5).await;
    let live = rows(&f.db, &a).await;
    let other = tenant_with_data(&f.db, "bk-kother", 3).await;

    // Killed after the admin prepared (the original aside, an empty schema
    // marked restoring, the app role locked out), before pg_restore ran.
    let lock = pg::backup_sql::try_restore_lock(&f.db.admin, &a.uid)
        .await
        .unwrap()
        .expect("lock is free");
    assert_eq!(
        pg::backup_sql::prepare(&f.db.admin, &a.name, &a.uid, pg::backup_sql::BY_COMMAND, false)
            .await
            .unwrap(),
        pg::backup_sql::Prepared::Done
    );
    assert!(a.app(&f.db).await.is_err(), "the app role can log in during a restore");
    assert_eq!(
        schemas_like(&f.db, &a).await,
        vec![a.name.schema(), pg::backup_sql::aside_schema(&a.name)]
    );
    // While a restore holds the lock, recovery keeps out, and so does a
    // reconcile that would give the login back.
    assert_eq!(
        pg::backup_sql::recover_aside(&f.db.admin, &a.name, &a.uid)
            .await
            .unwrap(),
        AsideState::RestoreRunning
    );
    assert!(a.converge(&f.db).await.is_err(), "a reconcile ran during a restore");
    drop(lock); // the process died: its session ends, so does the lock
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Even with the lock free, a reconcile does not let the app in while a
    // restore's schemas are there ...
    assert!(
        a.converge(&f.db).await.is_err(),
        "a reconcile let the app in with a restore under way"
    );
    assert!(a.app(&f.db).await.is_err());
    // ... the reconcile's pre-step puts it back, then the reconcile restores login.
    assert_eq!(
        pg::backup_sql::recover_aside(&f.db.admin, &a.name, &a.uid)
            .await
            .unwrap(),
        AsideState::PutBack
    );
    a.converge(&f.db).await.unwrap();
    assert_eq!(
        rows(&f.db, &a).await,
        live,
        "the original schema is not usable after recovery"
    );
    assert_eq!(
        pg::backup_sql::recover_aside(&f.db.admin, &a.name, &a.uid)
            .await
            .unwrap(),
        AsideState::Clean
    );
    assert_eq!(a.converge(&f.db).await.unwrap().statements, 0, "recovery left drift");

    // Killed after pg_restore committed, before the admin finalized: the
    // schema still says "restoring", so recovery drops what was restored
    // and puts the original back.
    assert_eq!(
        pg::backup_sql::prepare(&f.db.admin, &a.name, &a.uid, pg::backup_sql::BY_COMMAND, true)
            .await
            .unwrap(),
        pg::backup_sql::Prepared::Done
    );
    {
        let acc = access(&f.db, &f.ring, &a.name).await;
        let mut c = pg::confined::connect(&f.db.admin, &acc.login).await.unwrap();
        sqlx::raw_sql("CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL); INSERT INTO items VALUES (1, 'restored, never finalized')").execute(&mut *c).await.unwrap();
        c.close().await;
    }
    assert_eq!(
        pg::backup_sql::recover_aside(&f.db.admin, &a.name, &a.uid)
            .await
            .unwrap(),
        AsideState::PutBack
    );
    a.converge(&f.db).await.unwrap();
    assert_eq!(rows(&f.db, &a).await, live, "an unfinalized restore survived recovery");
    assert_eq!(schemas_like(&f.db, &a).await, vec![a.name.schema()]);

    // The TenantRestore controller's steps are safe to repeat after a crash.
    let by = pg::backup_sql::by_tenant_restore("r1");
    assert_eq!(
        pg::backup_sql::prepare(&f.db.admin, &a.name, &a.uid, &by, true)
            .await
            .unwrap(),
        pg::backup_sql::Prepared::Done
    );
    assert_eq!(
        pg::backup_sql::prepare(&f.db.admin, &a.name, &a.uid, &by, true)
            .await
            .unwrap(),
        pg::backup_sql::Prepared::Already
    );
    assert_eq!(
        pg::backup_sql::prepare(&f.db.admin, &a.name, &a.uid, "TenantRestore/other", true)
            .await
            .unwrap(),
        pg::backup_sql::Prepared::Unfinished
    );
    assert_eq!(
        pg::backup_sql::put_back(&f.db.admin, &a.name, &a.uid, true)
            .await
            .unwrap(),
        pg::backup_sql::PutBack::Done
    );
    assert_eq!(
        pg::backup_sql::put_back(&f.db.admin, &a.name, &a.uid, true)
            .await
            .unwrap(),
        pg::backup_sql::PutBack::Nothing
    );
    let record = pg::backup_sql::RestoreRecord {
        backup_id: "x".into(),
        actor: "test".into(),
        detail: serde_json::json!({}),
    };
    assert!(
        matches!(
            pg::backup_sql::finalize(&f.db.admin, &a.name, &a.uid, &by, true, &record)
                .await
                .unwrap(),
            pg::backup_sql::Finalized::NotPrepared(_)
        ),
        "a put-back restore taken for finalized"
    );
    a.converge(&f.db).await.unwrap();
    assert_eq!(rows(&f.db, &a).await, live);
    // Finalize twice (another tenant: this restores nothing into it): the
    // second says it was done (the audit log has it).
    let mut c = tenant_with_data(&f.db, "bk-kfin", 1).await;
    assert_eq!(
        pg::backup_sql::prepare(&f.db.admin, &c.name, &c.uid, &by, true)
            .await
            .unwrap(),
        pg::backup_sql::Prepared::Done
    );
    assert_eq!(
        pg::backup_sql::finalize(&f.db.admin, &c.name, &c.uid, &by, true, &record)
            .await
            .unwrap(),
        pg::backup_sql::Finalized::Done
    );
    assert_eq!(
        pg::backup_sql::finalize(&f.db.admin, &c.name, &c.uid, &by, true, &record)
            .await
            .unwrap(),
        pg::backup_sql::Finalized::Already
    );
    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM tenancy.audit_log WHERE tenant_uid = $1 AND action = 'Restored' AND detail->>'backupId' = 'x'")
        .bind(&c.uid)
        .fetch_one(&f.db.admin)
        .await
        .unwrap();
    assert_eq!(logged, 1, "the restore is in the operator's audit log once");
    assert_eq!(schemas_like(&f.db, &c).await, vec![c.name.schema()]);
    c.converge(&f.db).await.unwrap();
    assert_eq!(
        c.converge(&f.db).await.unwrap().statements,
        0,
        "a finalized restore left drift"
    );

    // Killed after pg_restore committed, before the old schema was dropped:
    // the restore command's start finishes it (drops the aside one).
    bk_with(&f.db, &f.ring, &f.tools, &f.store, &a.name, Retention::default())
        .await
        .unwrap();
    let copy = format!("CREATE SCHEMA \"{}\"", pg::backup_sql::aside_schema(&a.name));
    sqlx::raw_sql(sqlx::AssertSqlSafe(copy))
        .execute(&f.db.admin)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "COMMENT ON SCHEMA \"{}\" IS '{}'",
        pg::backup_sql::aside_schema(&a.name),
        pg::tenant::ownership_marker(&a.uid)
    )))
    .execute(&f.db.admin)
    .await
    .unwrap();
    let r = rs_with(&f.db, &f.ring, &f.tools, &f.store, &a.name, &Selector::Latest)
        .await
        .unwrap();
    assert_eq!(r.recovered, AsideState::DroppedOld);
    assert_eq!(rows(&f.db, &a).await, live);
    assert_eq!(schemas_like(&f.db, &a).await, vec![a.name.schema()]);
    // Other tenants are never touched.
    assert_eq!(rows(&f.db, &other).await.len(), 3);
}

#[tokio::test]
async fn retention_keeps_exactly_what_it_should() {
    let f = setup("bk_retain").await;
    let a = tenant_with_data(&f.db, "bk-keep", 3).await;
    let mut ids = vec![];
    for _ in 0..4 {
        ids.push(
            bk_with(&f.db, &f.ring, &f.tools, &f.store, &a.name, Retention::default())
                .await
                .unwrap()
                .manifest
                .id,
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let out = bk_with(
        &f.db,
        &f.ring,
        &f.tools,
        &f.store,
        &a.name,
        Retention {
            count: Some(2),
            max_age: None,
        },
    )
    .await
    .unwrap();
    ids.push(out.manifest.id.clone());
    assert_eq!(out.pruned, vec![ids[2].clone(), ids[1].clone(), ids[0].clone()]);
    let kept: Vec<String> = backup::list(&f.store, &a.uid)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(kept, ids[3..].to_vec());
    let files = std::fs::read_dir(f.dir.path().join(format!("tenants/{}", a.uid)))
        .unwrap()
        .count();
    assert_eq!(files, 4, "pruned objects (or temporary upload files) left in the store");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tenancy.backups WHERE tenant_uid = $1")
        .bind(&a.uid)
        .fetch_one(&f.db.admin)
        .await
        .unwrap();
    assert_eq!(rows, 2);
    // maxAge: everything but the newest is older than a millisecond by now.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let pruned = backup::prune(
        &f.store,
        &a.uid,
        Retention {
            count: None,
            max_age: Some(Duration::from_millis(1)),
        },
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    assert_eq!(
        pruned,
        backup::Pruned {
            backups: vec![ids[3].clone()],
            orphans: vec![]
        }
    );
    // Deleting the tenant's backups empties its prefix.
    assert_eq!(backup::delete_all(&f.store, &a.uid).await.unwrap(), 2);
    assert!(backup::list(&f.store, &a.uid).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_failing_pg_dump_leaves_nothing_under_the_final_name() {
    let f = setup("bk_dumpfail").await;
    let a = tenant_with_data(&f.db, "bk-df", 3).await;
    let script = f.dir.path().join("bad-pg-dump.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nhead -c 3000000 /dev/urandom\necho 'dump broke' >&2\nexit 2\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let tools = Tools {
        pg_dump: script.display().to_string(),
        ..f.tools.clone()
    };
    let err = bk_with(&f.db, &f.ring, &tools, &f.store, &a.name, Retention::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("dump broke"), "{err}");
    assert!(
        f.store.list_tenant(&a.uid).await.unwrap().is_empty(),
        "a failed backup left objects"
    );
    assert!(pg::backup_sql::last_backup(&f.db.admin, &a.uid)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn s3_store_against_moto() {
    let Ok(endpoint) = std::env::var("TEST_KMS_ENDPOINT").or_else(|_| std::env::var("TEST_S3_ENDPOINT")) else {
        if std::env::var_os("CI").is_some() {
            panic!("TEST_KMS_ENDPOINT is not set under CI: run this suite through scripts/with-moto.sh");
        }
        eprintln!("skipping s3_store_against_moto: no S3 endpoint (run through scripts/with-moto.sh)");
        return;
    };
    let f = setup("bk_s3").await;
    let bucket = format!("tenant-backups-{:08x}", rand::random::<u32>());
    // moto creates buckets on an unsigned PUT.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let resp = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("moto answers");
    assert!(resp.status().is_success(), "creating bucket: {}", resp.status());
    let store = Store::open(&StoreConfig {
        url: format!("s3://{bucket}/some/prefix"),
        s3_endpoint: Some(endpoint.clone()),
        s3_path_style: true,
        s3_region: None,
    })
    .unwrap();
    let a = tenant_with_data(&f.db, "bk-s3", 3).await;
    // Incompressible enough for a dump of more than one 8 MiB upload part.
    pad(&f.db, &a, 400_000).await;
    let before = rows(&f.db, &a).await;
    let m = bk_with(&f.db, &f.ring, &f.tools, &store, &a.name, Retention::default())
        .await
        .unwrap()
        .manifest;
    let meta = object_store::ObjectStoreExt::head(
        &*store_inner(&store),
        &Path::from(format!("some/prefix/tenants/{}/{}.dump.enc", a.uid, m.id)),
    )
    .await
    .unwrap();
    assert_eq!(meta.size, m.bytes);
    assert!(
        m.bytes > backup::PART_SIZE as u64,
        "the dump ({} bytes) fits one upload part: the multipart path is not exercised",
        m.bytes
    );
    change(&f.db, &a).await;
    rs_with(&f.db, &f.ring, &f.tools, &store, &a.name, &Selector::Latest)
        .await
        .unwrap();
    assert_eq!(rows(&f.db, &a).await, before);
    assert_eq!(backup::delete_all(&store, &a.uid).await.unwrap(), 2);
    assert!(store.list_tenant(&a.uid).await.unwrap().is_empty());
}

/// Writes `name` into the tenant's folder of the filesystem store, last
/// modified `age` ago.
fn put_aged(f: &Fixture, uid: &str, name: &str, age: Duration) -> std::path::PathBuf {
    let path = f.dir.path().join(format!("tenants/{uid}/{name}"));
    std::fs::write(&path, b"TNBK half an upload").unwrap();
    let when = std::time::SystemTime::now() - age;
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(when)
        .unwrap();
    path
}

fn files_of(f: &Fixture, uid: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(f.dir.path().join(format!("tenants/{uid}")))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn orphan_dumps_are_pruned_after_the_grace_and_never_restored() {
    let f = setup("bk_orphan").await;
    let a = tenant_with_data(&f.db, "bk-orph", 4).await;
    let mut ids = vec![];
    for _ in 0..3 {
        ids.push(
            bk_with(&f.db, &f.ring, &f.tools, &f.store, &a.name, Retention::default())
                .await
                .unwrap()
                .manifest
                .id,
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let newest = rows(&f.db, &a).await;
    change(&f.db, &a).await;
    // Dumps whose manifest was never written, with ids newer than every
    // backup (so that `latest` would pick them if they counted): one past
    // the grace, one still inside it; and the staging files a killed upload
    // leaves in a filesystem store, one stale, one fresh.
    let hour = Duration::from_secs(3600);
    let id_at = |mins: i64| backup::backup_id(chrono::Utc::now() + chrono::Duration::minutes(mins));
    let (old, young, stale_up, live_up) = (id_at(10), id_at(20), id_at(30), id_at(40));
    put_aged(&f, &a.uid, &format!("{old}.dump.enc"), backup::ORPHAN_GRACE + hour);
    put_aged(&f, &a.uid, &format!("{young}.dump.enc"), backup::ORPHAN_GRACE - hour);
    put_aged(
        &f,
        &a.uid,
        &format!("{stale_up}.dump.enc#1"),
        backup::ORPHAN_GRACE + hour,
    );
    put_aged(&f, &a.uid, &format!("{live_up}.dump.enc#3"), Duration::from_secs(5));
    put_aged(&f, &a.uid, "README", backup::ORPHAN_GRACE * 4);

    // Orphans are not backups: not listed, not `latest`, not restored.
    let listed: Vec<String> = backup::list(&f.store, &a.uid)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(listed, ids, "an orphan dump is listed as a backup");
    let r = rs_with(&f.db, &f.ring, &f.tools, &f.store, &a.name, &Selector::Latest)
        .await
        .unwrap();
    assert_eq!(r.manifest.id, ids[2], "latest picked an orphan dump");
    assert_eq!(rows(&f.db, &a).await, newest);
    let at = chrono::Utc::now() + chrono::Duration::minutes(15);
    assert_eq!(
        backup::select(
            &backup::list(&f.store, &a.uid).await.unwrap(),
            &Selector::PointInTime(at)
        )
        .unwrap()
        .id,
        ids[2]
    );

    let pruned = backup::prune(
        &f.store,
        &a.uid,
        Retention {
            count: Some(2),
            max_age: None,
        },
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    assert_eq!(pruned.backups, vec![ids[0].clone()], "retention");
    assert_eq!(pruned.orphans, vec![old.clone(), stale_up.clone()], "orphans pruned");
    let mut want = vec![
        format!("{}.dump.enc", ids[1]),
        format!("{}.manifest.json", ids[1]),
        format!("{}.dump.enc", ids[2]),
        format!("{}.manifest.json", ids[2]),
        format!("{young}.dump.enc"),
        format!("{live_up}.dump.enc#3"),
        "README".to_string(),
    ];
    want.sort();
    assert_eq!(
        files_of(&f, &a.uid),
        want,
        "the store holds other objects than retention and the grace keep"
    );

    // Pruning after a backup does the same, and says so.
    let again = format!("{}.dump.enc", id_at(50));
    put_aged(&f, &a.uid, &again, backup::ORPHAN_GRACE + hour);
    let out = bk_with(&f.db, &f.ring, &f.tools, &f.store, &a.name, Retention::default())
        .await
        .unwrap();
    assert_eq!(
        out.orphans_pruned,
        vec![again.trim_end_matches(".dump.enc").to_string()]
    );
    assert!(out.pruned.is_empty());
    assert!(!files_of(&f, &a.uid).contains(&again));
    assert!(
        files_of(&f, &a.uid).contains(&format!("{young}.dump.enc")),
        "a dump inside the grace was deleted"
    );
}

/// Runs the built binary with no way to reach a cluster: KUBECONFIG names a
/// missing file, no in-cluster variables, an empty HOME.
fn without_cluster(home: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tenant-operator"));
    cmd.args(args)
        .env("KUBECONFIG", home.join("no-such-kubeconfig"))
        .env("HOME", home);
    for var in [
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
        "DATABASE_URL",
        "BACKUP_STORE",
        "ROOT_KEYS_FILE",
        "ROOT_KEYS_SECRET",
        "ROOT_KEYS_KMS",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().expect("run tenant-operator");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A root-keys Secret as `kubectl get secret -o yaml` prints it.
fn kubectl_secret_yaml(keys: &[(&str, &[u8])], active: &str) -> String {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut y = String::from("apiVersion: v1\ndata:\n");
    y += &format!("  active: {}\n", b64(active.as_bytes()));
    for (v, k) in keys {
        y += &format!("  {v}: {}\n", b64(k));
    }
    y += "kind: Secret\nmetadata:\n  creationTimestamp: \"2026-01-05T10:00:00Z\"\n  name: tenant-operator-root-keys\n  namespace: tenant-system\n  resourceVersion: \"4711\"\n  uid: 5d6f0e0c-1111-2222-3333-444455556666\ntype: Opaque\n";
    y
}

#[tokio::test]
async fn disaster_recovery_without_a_cluster_uses_a_keys_file() {
    use base64::Engine;
    let db = TestDb::new("bk_dr").await;
    pg::migrate_control_schema(&db.admin).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let a = tenant_with_data(&db, "bk-dr", 40).await;
    let other = tenant_with_data(&db, "bk-dr-other", 5).await;
    let backed_up = rows(&db, &a).await;

    let key = crypto::generate_root_key();
    let secret_file = home.path().join("root-keys.yaml");
    std::fs::write(&secret_file, kubectl_secret_yaml(&[("v1", key.as_slice())], "v1")).unwrap();
    let store_url = format!("file://{}", dir.path().join("backups").display());
    let common = |keys: &std::path::Path| -> Vec<String> {
        [
            "--database-url",
            &db.admin_url,
            "--backup-store",
            &store_url,
            "--root-keys-file",
            &keys.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |cmd: &str, extra: &[&str], keys: &std::path::Path| {
        let mut args: Vec<String> = vec![cmd.into(), "--tenant".into(), a.name.to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(common(keys));
        without_cluster(home.path(), &args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // Back up with no cluster: works, and says what it skipped.
    let (ok, stdout, stderr) = run("backup", &[], &secret_file);
    assert!(ok, "backup without a cluster failed: {stderr}");
    assert!(
        stderr.contains("running without Kubernetes") && stderr.contains("Events"),
        "no log line says the Kubernetes side was skipped: {stderr}"
    );
    let out: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let id = out["manifest"]["id"].as_str().unwrap().to_string();
    assert_eq!(out["manifest"]["keyVersion"], 1);
    assert!(
        dir.path()
            .join(format!("backups/tenants/{}/{id}.dump.enc", a.uid))
            .is_file(),
        "no dump in the store"
    );
    assert_eq!(
        pg::backup_sql::last_backup(&db.admin, &a.uid)
            .await
            .unwrap()
            .expect("recorded in tenancy.backups")
            .id,
        id
    );

    change(&db, &a).await;
    let live = rows(&db, &a).await;
    let unchanged = |what: &'static str| {
        let (db, a, live) = (&db, &a, &live);
        async move {
            assert_eq!(rows(db, a).await, *live, "{what}: the live data changed");
            assert_eq!(
                schemas_like(db, a).await,
                vec![a.name.schema()],
                "{what}: schemas left behind"
            );
        }
    };

    // A missing file, a malformed one, the wrong key, a keyring without the
    // backup's version: refused, with the live schema as it was.
    let (ok, _, stderr) = run("restore", &[], &home.path().join("nope.yaml"));
    assert!(
        !ok && stderr.contains("root-keys file") && stderr.contains("nope.yaml") && stderr.contains("No such file"),
        "missing file: {stderr}"
    );
    unchanged("missing keys file").await;
    let malformed = home.path().join("malformed.yaml");
    std::fs::write(&malformed, "kind: Secret\ndata:\n  v1: '%%% not base64'\n").unwrap();
    let (ok, _, stderr) = run("restore", &[], &malformed);
    assert!(
        !ok && stderr.contains("data.v1 is not base64"),
        "malformed file: {stderr}"
    );
    unchanged("malformed keys file").await;
    let wrong = home.path().join("wrong.yaml");
    std::fs::write(
        &wrong,
        kubectl_secret_yaml(&[("v1", crypto::generate_root_key().as_slice())], "v1"),
    )
    .unwrap();
    let (ok, _, stderr) = run("restore", &[], &wrong);
    assert!(
        !ok && stderr.contains("refused") && stderr.contains("does not decrypt"),
        "wrong key: {stderr}"
    );
    unchanged("wrong keys file").await;
    let other_version = home.path().join("v2-only.yaml");
    std::fs::write(&other_version, kubectl_secret_yaml(&[("v2", key.as_slice())], "v2")).unwrap();
    let (ok, _, stderr) = run("restore", &["--backup", &id], &other_version);
    assert!(
        !ok && stderr.contains("sealed under root key v1") && stderr.contains("hold v2"),
        "keys without the backup's version: {stderr}"
    );
    unchanged("keys without the backup's version").await;

    // The right keys, as just the keys map: restored.
    let flat = home.path().join("keys.yaml");
    std::fs::write(
        &flat,
        format!(
            "v1: {}\nactive: v1\n",
            base64::engine::general_purpose::STANDARD.encode(key.as_slice())
        ),
    )
    .unwrap();
    let (ok, stdout, stderr) = run("restore", &["--backup", "latest"], &flat);
    assert!(ok, "restore without a cluster failed: {stderr}");
    assert!(stderr.contains("running without Kubernetes"), "{stderr}");
    assert!(stdout.contains(&id), "{stdout}");
    assert_eq!(
        rows(&db, &a).await,
        backed_up,
        "the restored data is not the backed-up data"
    );
    assert_eq!(schemas_like(&db, &a).await, vec![a.name.schema()]);
    assert_eq!(rows(&db, &other).await.len(), 5, "another tenant was touched");
}

fn store_inner(s: &Store) -> Arc<dyn object_store::ObjectStore> {
    s.object_store()
}

/// A tenant whose schema holds code that would, run as the admin, change
/// the admin, the registry, another tenant's data and roles: backed up and
/// restored, none of it happens. The CHECK constraint's function runs
/// during the restore (pg_restore's COPY evaluates it), as the tenant's
/// owner on its ops login, and is denied each time; the trigger and the
/// default are restored too (and would fare no better).
#[tokio::test]
async fn a_hostile_dump_restores_without_reaching_outside_its_tenant() {
    let f = setup("bk_hostile").await;
    let a = tenant_with_data(&f.db, "bk-host", 3).await;
    let b = tenant_with_data(&f.db, "bk-victim", 4).await;
    let b_rows = rows(&f.db, &b).await;
    let admin: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&f.db.admin)
        .await
        .unwrap();
    let evil = format!("evil_{:08x}", rand::random::<u32>());
    let attempts = [
        ("alter admin", format!("ALTER ROLE \"{admin}\" CONNECTION LIMIT 3")),
        (
            "write registry",
            format!(
                "UPDATE tenancy.tenants SET state = 'Suspended' WHERE name = '{}'",
                b.name
            ),
        ),
        ("read registry", "PERFORM count(*) FROM tenancy.tenants".to_string()),
        (
            "write other tenant",
            format!("INSERT INTO \"{}\".items VALUES (-99, 'from a')", b.name.schema()),
        ),
        (
            "alter another tenant role",
            format!("ALTER ROLE \"{}\" CONNECTION LIMIT 1", b.name.app_role()),
        ),
        ("create role", format!("CREATE ROLE {evil} LOGIN")),
    ];
    let mut body = String::new();
    for (what, stmt) in &attempts {
        let stmt = if stmt.starts_with("PERFORM") {
            stmt.clone()
        } else {
            format!("EXECUTE {}", pg::quote_literal(stmt).unwrap())
        };
        body += &format!(
            "BEGIN {stmt}; r := 'did'; EXCEPTION WHEN OTHERS THEN r := 'denied ' || SQLSTATE; END;
             INSERT INTO \"{schema}\".evidence VALUES (current_setting('application_name'), session_user || '/' || current_user, '{what}: ' || r);\n",
            schema = a.name.schema()
        );
    }
    let setup_sql = format!(
        "CREATE TABLE evidence (app text, who text, what text);
         CREATE FUNCTION hostile(int) RETURNS boolean LANGUAGE plpgsql AS $fn$ DECLARE r text; BEGIN {body} RETURN true; END $fn$;
         CREATE TABLE victim (id int CHECK (hostile(id)), flag boolean DEFAULT hostile(0));
         CREATE FUNCTION hostile_trigger() RETURNS trigger LANGUAGE plpgsql AS $fn$ BEGIN PERFORM {schema}.hostile(0); RETURN NEW; END $fn$;
         CREATE TRIGGER hostile BEFORE INSERT OR UPDATE ON victim FOR EACH ROW EXECUTE FUNCTION hostile_trigger();
         INSERT INTO victim (id) VALUES (1), (2);",
        schema = pg::quote_ident(&a.name.schema()).unwrap()
    );
    let acc = access(&f.db, &f.ring, &a.name).await;
    let mut c = pg::confined::connect(&f.db.admin, &acc.login).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(setup_sql))
        .execute(&mut *c)
        .await
        .expect("the owner sets its trap");
    c.close().await;

    let m = bk_with(&f.db, &f.ring, &f.tools, &f.store, &a.name, Retention::default())
        .await
        .unwrap()
        .manifest;
    let admin_before: (i32, bool, bool) =
        sqlx::query_as("SELECT rolconnlimit, rolcreaterole, rolsuper FROM pg_roles WHERE rolname = current_user")
            .fetch_one(&f.db.admin)
            .await
            .unwrap();
    rs_with(&f.db, &f.ring, &f.tools, &f.store, &a.name, &Selector::Id(m.id.clone()))
        .await
        .expect("the hostile dump restores (its code is harmless)");

    // The code ran during the restore, as the owner on the ops login, and
    // every attempt was denied.
    let acc = access(&f.db, &f.ring, &a.name).await;
    let mut c = pg::confined::connect(&f.db.admin, &acc.login).await.unwrap();
    let during: Vec<(String, String)> =
        sqlx::query_as("SELECT who, what FROM evidence WHERE app LIKE 'tenant-operator-pg_restore%' ORDER BY what")
            .fetch_all(&mut *c)
            .await
            .unwrap();
    c.close().await;
    assert!(
        !during.is_empty(),
        "the dump's CHECK function never ran during the restore: the test proves nothing"
    );
    for (who, what) in &during {
        assert_eq!(
            who,
            &format!("{}/{}", a.name.ops_role(), a.name.owner_role()),
            "the dump's code ran as {who}"
        );
        assert!(what.contains(": denied"), "the dump's code, during the restore: {what}");
    }
    assert_eq!(during.len(), attempts.len() * 2, "{during:?}");
    // And nothing outside the tenant changed.
    let admin_after: (i32, bool, bool) =
        sqlx::query_as("SELECT rolconnlimit, rolcreaterole, rolsuper FROM pg_roles WHERE rolname = current_user")
            .fetch_one(&f.db.admin)
            .await
            .unwrap();
    assert_eq!(admin_after, admin_before, "the admin role changed");
    assert_eq!(rows(&f.db, &b).await, b_rows, "tenant B's data changed");
    let (b_state, b_limit): (String, i32) = sqlx::query_as(
        "SELECT t.state, r.rolconnlimit FROM tenancy.tenants t, pg_roles r WHERE t.name = $1 AND r.rolname = $2",
    )
    .bind(b.name.as_str())
    .bind(b.name.app_role())
    .fetch_one(&f.db.admin)
    .await
    .unwrap();
    assert_eq!(b_state, "Active", "the registry changed");
    assert_ne!(b_limit, 1, "tenant B's app role changed");
    let evil_exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(&evil)
        .fetch_one(&f.db.admin)
        .await
        .unwrap();
    assert!(!evil_exists, "the dump's code created a role");
    assert_eq!(schemas_like(&f.db, &a).await, vec![a.name.schema()]);
}

/// A Job's half of a restore, with nothing but the tenant's ops login and
/// the backup key of one version: it refuses a schema the operator did
/// not prepare, and restores into one it did; it backs up too.
#[tokio::test]
async fn a_job_restores_only_into_a_prepared_schema_with_its_tenants_key_alone() {
    let f = setup("bk_job").await;
    let a = tenant_with_data(&f.db, "bk-job", 6).await;
    let before = rows(&f.db, &a).await;
    // What the operator hands the Job: the login and one key, no admin.
    let derived = access(&f.db, &f.ring, &a.name).await;
    // The operator sets the ops login's password before it writes it into
    // the Job's Secret (a confined session does the same).
    pg::confined::connect(&f.db.admin, &derived.login)
        .await
        .unwrap()
        .close()
        .await;
    let key = derived.keys.get(f.ring.active_version()).unwrap().clone();
    let job = TenantAccess::new(derived.login.clone(), backup::BackupKeys::from_keys(vec![key]).unwrap());
    let m = backup::backup(&job, &f.tools, &f.store, Retention::default())
        .await
        .expect("a Job backs up with its tenant's key alone")
        .manifest;
    change(&f.db, &a).await;
    let live = rows(&f.db, &a).await;

    let err = backup::restore_prepared(&job, &f.tools, &f.store, &m.id)
        .await
        .unwrap_err();
    assert!(matches!(err, BackupError::NotPrepared { .. }), "{err}");
    assert_eq!(rows(&f.db, &a).await, live, "an unprepared schema was touched");

    let by = pg::backup_sql::by_tenant_restore("r-job");
    assert_eq!(
        pg::backup_sql::prepare(&f.db.admin, &a.name, &a.uid, &by, true)
            .await
            .unwrap(),
        pg::backup_sql::Prepared::Done
    );
    backup::restore_prepared(&job, &f.tools, &f.store, &m.id)
        .await
        .expect("the Job restores into the prepared schema");
    let record = pg::backup_sql::RestoreRecord {
        backup_id: m.id.clone(),
        actor: by.clone(),
        detail: serde_json::json!({}),
    };
    assert_eq!(
        pg::backup_sql::finalize(&f.db.admin, &a.name, &a.uid, &by, true, &record)
            .await
            .unwrap(),
        pg::backup_sql::Finalized::Done
    );
    assert_eq!(rows(&f.db, &a).await, before);

    // A key of another version, or another tenant's login, gets nowhere.
    let other_ring = keyring();
    let wrong = access(&f.db, &other_ring, &a.name).await;
    let wrong_key = TenantAccess::new(derived.login.clone(), wrong.keys.clone());
    assert!(matches!(
        backup::restore_prepared(&wrong_key, &f.tools, &f.store, &m.id)
            .await
            .unwrap_err(),
        BackupError::Refused { .. }
    ));
}

#[test]
fn the_restore_list_leaves_out_the_schemas_own_entries() {
    let list = "; Archive created at 2026-12-01 10:00:00 UTC\n;\n6; 2615 16390 SCHEMA - tenant_acme tenant_acme_owner\n3390; 0 0 COMMENT - SCHEMA tenant_acme tenant_acme_owner\n222; 1259 16400 TABLE tenant_acme items tenant_acme_owner\n3391; 0 0 ACL - SCHEMA tenant_acme tenant_acme_owner\n3392; 0 0 ACL tenant_acme TABLE items tenant_acme_owner\n7; 2615 16391 SCHEMA - tenant_acme2 tenant_acme2_owner\n";
    let out = backup::restore_list(list, "tenant_acme");
    let kept: Vec<&str> = out.lines().filter(|l| !l.starts_with(';')).collect();
    assert_eq!(
        kept,
        [
            "222; 1259 16400 TABLE tenant_acme items tenant_acme_owner",
            "3392; 0 0 ACL tenant_acme TABLE items tenant_acme_owner",
            "7; 2615 16391 SCHEMA - tenant_acme2 tenant_acme2_owner"
        ]
    );
}
