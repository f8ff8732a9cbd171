//! MigrationSet rollouts against a real Postgres, as the non-superuser admin
//! role: the rollout pass (`controller::migration_set::pass`) and the Tenant
//! reconcile's migrations step, driven directly, without Kubernetes.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::tenant::{provision_many, Tenant};
use support::{unique, TestDb};
use tenant_operator::api::{Migration, MigrationSet, MigrationSetPhase, MigrationSetSpec, OnFailure, RolloutSpec};
use tenant_operator::controller::migration_set::apply::{Outcome, LOGIN_CHUNK};
use tenant_operator::controller::migration_set::plan::Blocked;
use tenant_operator::controller::migration_set::{pass, status, Pass};
use tenant_operator::controller::tenant::migrations as tenant_migrations;
use tenant_operator::crypto::Keyring;
use tenant_operator::names::TenantName;
use tenant_operator::pg;
use tenant_operator::pg::confined::OpsLogin;
use tenant_operator::pg::migrations::{MigrationSql, SetRef, TenantOutcome, Timeouts};

async fn setup(label: &str) -> TestDb {
    let db = TestDb::new(label).await;
    pg::migrate_control_schema(&db.admin).await.expect("control schema");
    let facts = pg::admin_facts(&db.admin).await.expect("facts");
    assert!(!facts.superuser, "tests must run as a non-superuser admin");
    pg::harden_database(&db.admin, &facts).await.expect("harden");
    db
}

/// The root keys the tests' operator holds (the ops logins' passwords are
/// derived from them).
/// The keyring the tenants were provisioned with (`support::tenant`): the
/// ops logins' passwords derive from it, so another one would make every
/// first login a password reset.
fn ring() -> Keyring {
    support::test_ring()
}

/// A tenant's ops login, as a rollout pass builds it.
async fn login(db: &TestDb, t: &TenantName) -> OpsLogin {
    pg::migrations::ops_login(&db.admin, &ring(), t)
        .await
        .expect("registry")
        .expect("registered")
}

fn m(version: i64, sql: &str) -> Migration {
    Migration {
        version,
        name: format!("v{version}"),
        sql: sql.into(),
        transactional: true,
    }
}

fn spec(migrations: Vec<Migration>, max_concurrent: u32, canary: u32, on_failure: OnFailure) -> MigrationSetSpec {
    MigrationSetSpec {
        migrations,
        rollout: RolloutSpec {
            max_concurrent,
            canary,
            on_failure,
        },
    }
}

fn names(ts: &[Tenant]) -> Vec<TenantName> {
    let mut v: Vec<TenantName> = ts.iter().map(|t| t.name.clone()).collect();
    v.sort();
    v
}

/// `count` tenant names sharing a unique prefix, in name order.
fn tenant_names(base: &str, count: usize) -> Vec<String> {
    let prefix = unique(base);
    (0..count).map(|i| format!("{prefix}-{i:04}")).collect()
}

/// Passes until nothing is left to do (or `limit` passes), as the
/// controller's requeues would.
async fn converge(
    db: &TestDb,
    set: &str,
    generation: i64,
    spec: &MigrationSetSpec,
    followers: &[TenantName],
    limit: usize,
) -> Vec<Pass> {
    let mut passes = Vec::new();
    for _ in 0..limit {
        let p = pass(
            &db.admin,
            &ring(),
            set,
            generation,
            spec,
            followers,
            &Timeouts::default(),
        )
        .await
        .expect("pass");
        let done = p.plan.is_empty() || p.plan.blocked.is_some();
        let more = p.more();
        passes.push(p);
        if done && !more {
            break;
        }
    }
    passes
}

async fn versions(db: &TestDb, ts: &[TenantName]) -> BTreeMap<String, i64> {
    let all = pg::migrations::observe_many(&db.admin, ts).await.unwrap();
    all.into_iter().map(|(n, v)| (n.to_string(), v.current())).collect()
}

async fn rows(db: &TestDb, t: &TenantName) -> Vec<(i64, String)> {
    sqlx::query_as::<_, (i64, String)>(sqlx::AssertSqlSafe(format!(
        "SELECT version, checksum FROM {}._tenancy_migrations ORDER BY version",
        t.schema()
    )))
    .fetch_all(&db.su)
    .await
    .unwrap()
}

async fn failure_rows(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tenancy.migration_failures")
        .fetch_one(&db.admin)
        .await
        .unwrap()
}

fn status_of(generation: i64, spec: &MigrationSetSpec, p: &Pass) -> tenant_operator::api::MigrationSetStatus {
    status::compute(
        None,
        Some(generation),
        spec,
        &p.plan,
        &p.after,
        p.more(),
        "2026-01-01T00:00:00Z",
    )
}

fn set_object(name: &str, generation: i64, spec: MigrationSetSpec) -> MigrationSet {
    let mut s = MigrationSet::new(name, spec);
    s.metadata.generation = Some(generation);
    s
}

#[tokio::test]
async fn two_hundred_tenants_converge_to_a_three_version_set() {
    let db = setup("ms200").await;
    let start = Instant::now();
    let tenants = provision_many(&db, &tenant_names("f", 200), 4).await;
    let provisioned = start.elapsed();
    let followers = names(&tenants);
    let s = spec(
        vec![
            m(1, "CREATE TABLE orders (id bigserial PRIMARY KEY, total numeric NOT NULL)"),
            m(2, "ALTER TABLE orders ADD COLUMN placed_at timestamptz NOT NULL DEFAULT now()"),
            m(3, "CREATE INDEX orders_placed_at ON orders (placed_at); CREATE TABLE customers (id bigserial PRIMARY KEY, name text)"),
        ],
        8,
        1,
        OnFailure::Pause,
    );
    let start = Instant::now();
    let passes = converge(&db, "default", 1, &s, &followers, 20).await;
    let elapsed = start.elapsed();
    let migrated: usize = passes
        .iter()
        .map(|p| {
            p.report
                .count(|o| matches!(o, Outcome::Done(TenantOutcome::Migrated { applied, .. }) if applied.len() == 3))
        })
        .sum();
    println!("200 tenants provisioned in {provisioned:?}; migrated to version 3 in {elapsed:?} over {} passes (maxConcurrent 8)", passes.len());
    assert_eq!(migrated, 200, "each tenant applies the 3 versions exactly once");
    let v = versions(&db, &followers).await;
    assert!(
        v.values().all(|&x| x == 3),
        "tenants left behind: {:?}",
        v.iter().filter(|(_, &x)| x != 3).collect::<Vec<_>>()
    );
    for t in followers.iter().take(5) {
        assert_eq!(rows(&db, t).await.len(), 3);
    }
    let last = passes.last().unwrap();
    let st = status_of(1, &s, last);
    assert_eq!(st.phase, Some(MigrationSetPhase::Complete));
    assert_eq!(st.progress.as_deref(), Some("200/200"));
    assert_eq!(
        st.versions,
        vec![tenant_operator::api::VersionCount {
            version: 3,
            tenants: 200
        }]
    );
    // A converged set costs one observation and runs nothing.
    let again = pass(&db.admin, &ring(), "default", 1, &s, &followers, &Timeouts::default())
        .await
        .unwrap();
    assert!(
        again.plan.is_empty() && again.report.results.is_empty(),
        "a converged set ran {:?}",
        again.report.results.len()
    );
    assert!(
        last.report.peak_connections <= 8,
        "the rollout held {} connections, maxConcurrent is 8",
        last.report.peak_connections
    );
    // Both ways of reading the followers' versions (looked up one by one,
    // or every tenant of the database read and the others dropped, as for
    // more than 256) agree, also on a follower not provisioned yet; and a
    // tenant behind by one is seen as behind by both.
    sqlx::query("DELETE FROM tenancy.schema_versions WHERE tenant_uid = (SELECT uid FROM tenancy.tenants WHERE name = $1) AND version = 3")
        .bind(followers[7].as_str())
        .execute(&db.admin)
        .await
        .unwrap();
    let mut asked: Vec<TenantName> = followers.iter().take(150).cloned().collect();
    asked.push(TenantName::parse(&unique("notyet")).unwrap());
    let looked_up = pg::migrations::observe_many_with(&db.admin, &asked, false)
        .await
        .unwrap();
    let scanned = pg::migrations::observe_many_with(&db.admin, &asked, true)
        .await
        .unwrap();
    assert_eq!(looked_up, scanned);
    assert_eq!(scanned.len(), 151, "one entry per name asked, no other tenant");
    assert_eq!(scanned[&followers[7]].current(), 2);
    assert_eq!(
        scanned[&followers[8]]
            .applied
            .iter()
            .map(|a| a.version)
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(!scanned[asked.last().unwrap()].schema_exists);
}

/// `count` tenants named `prefix`..., following set `default` at version 1
/// (an `items` table); gives the database, the followers and that version.
async fn at_version_one(label: &str, prefix: &str, count: usize) -> (TestDb, Vec<TenantName>, Vec<Migration>) {
    let db = setup(label).await;
    let tenants = provision_many(&db, &tenant_names(prefix, count), 4).await;
    let followers = names(&tenants);
    let v1 = vec![m(1, "CREATE TABLE items (id int PRIMARY KEY)")];
    converge(
        &db,
        "default",
        1,
        &spec(v1.clone(), 4, 1, OnFailure::Continue),
        &followers,
        5,
    )
    .await;
    (db, followers, v1)
}

#[tokio::test]
async fn a_canary_failure_stops_the_rollout_before_any_other_tenant_changes() {
    let (db, followers, v1) = at_version_one("mscanary", "c", 6).await;

    // Version 2 fails everywhere; with Continue the canary still gates.
    let mut broken = v1.clone();
    broken.push(m(2, "ALTER TABLE items ADD COLUMN qty int; SELECT 1 / 0"));
    let s2 = spec(broken, 4, 1, OnFailure::Continue);
    let p = pass(&db.admin, &ring(), "default", 2, &s2, &followers, &Timeouts::default())
        .await
        .unwrap();
    assert_eq!(
        p.plan.canaries,
        vec![followers[0].clone()],
        "the canary is the first tenant by name"
    );
    assert!(p.report.canary_stopped);
    assert!(
        matches!(&p.report.results[0].1, Outcome::Done(TenantOutcome::Failed { at: 1, version: 2, sqlstate: Some(code), .. }) if code == "22012"),
        "{:?}",
        p.report.results[0]
    );
    let v = versions(&db, &followers).await;
    assert!(
        v.values().all(|&x| x == 1),
        "a tenant moved past the failed canary: {v:?}"
    );
    for t in &followers[1..] {
        assert_eq!(rows(&db, t).await.len(), 1, "{t} was touched");
    }
    let st = status_of(2, &s2, &p);
    assert_eq!(st.phase, Some(MigrationSetPhase::Paused));
    assert_eq!(st.failed.len(), 1);
    assert_eq!(st.failed[0].tenant, followers[0].as_str());
    assert!(st.failed[0].error.contains("division by zero"), "{:?}", st.failed[0]);
    // Later passes of this generation start nobody.
    let p = pass(&db.admin, &ring(), "default", 2, &s2, &followers, &Timeouts::default())
        .await
        .unwrap();
    assert_eq!(p.plan.blocked, Some(Blocked::CanaryFailed(followers[0].clone())));
    assert!(p.report.results.is_empty());
    // The canary's own condition says what failed.
    let set = set_object("default", 2, s2.clone());
    let (cond, version) = tenant_migrations::converge_pg(
        &db.admin,
        &ring(),
        &followers[0],
        "default",
        Some(&set),
        &Timeouts::default(),
    )
    .await
    .unwrap();
    assert_eq!((cond.status, cond.reason, version), (false, "MigrationFailed", 1));
    assert!(
        cond.message.contains("version 2 (v2) failed: division by zero"),
        "{}",
        cond.message
    );

    // No tenant recorded version 2, so its SQL may still be fixed: the new
    // generation retries the canary, then the rest.
    let mut fixed = v1.clone();
    fixed.push(m(2, "ALTER TABLE items ADD COLUMN qty int"));
    let s3 = spec(fixed, 4, 1, OnFailure::Continue);
    let passes = converge(&db, "default", 3, &s3, &followers, 5).await;
    assert!(versions(&db, &followers).await.values().all(|&x| x == 2));
    assert_eq!(
        status_of(3, &s3, passes.last().unwrap()).phase,
        Some(MigrationSetPhase::Complete)
    );
    assert_eq!(
        failure_rows(&db).await,
        0,
        "the fixed canary's failure record was not cleared"
    );
}

/// A pass reads and derives a tenant's ops login only when it reaches the
/// tenant (`apply::LOGIN_CHUNK` at a time), not for every planned follower
/// before its first migration: a pass the canary stopped reads no login
/// of the rest, and a pass `Pause` stopped in the rest's first chunk reads
/// none of the next chunk. Seen through the registry: reading the login of
/// a tenant whose row has no key salt (a row older than key salts) makes
/// one, so a follower the pass never reached keeps none.
#[tokio::test]
async fn a_pass_reads_no_login_of_a_tenant_it_does_not_reach() {
    let (db, followers, v1) = at_version_one("mslazy", "z", LOGIN_CHUNK + 3).await;
    let rest: Vec<&str> = followers[1..].iter().map(TenantName::as_str).collect();
    sqlx::query("UPDATE tenancy.tenants SET key_salt = NULL WHERE name = ANY($1)")
        .bind(&rest)
        .execute(&mut db.superuser().await)
        .await
        .unwrap();
    assert_eq!(salted(&db, &rest).await, 0);

    let mut broken = v1.clone();
    broken.push(m(2, "SELECT 1 / 0"));
    let s2 = spec(broken, 4, 1, OnFailure::Continue);
    let p = pass(&db.admin, &ring(), "default", 2, &s2, &followers, &Timeouts::default())
        .await
        .unwrap();
    assert!(p.report.canary_stopped, "{:?}", p.report.results[0]);
    assert_eq!(p.report.count(|o| matches!(o, Outcome::Skipped)), LOGIN_CHUNK + 2);
    assert_eq!(
        salted(&db, &rest).await,
        0,
        "the pass read the logins of tenants it did not reach"
    );

    // The canary passes; the first of the rest fails on its data and
    // `Pause` stops the stage inside its first chunk of logins.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {}.items VALUES (5)",
        followers[1].schema()
    )))
    .execute(&db.su)
    .await
    .unwrap();
    let mut checked = v1.clone();
    checked.push(m(2, "ALTER TABLE items ADD CONSTRAINT none_yet CHECK (id < 0)"));
    let s3 = spec(checked, 4, 1, OnFailure::Pause);
    let p = pass(&db.admin, &ring(), "default", 3, &s3, &followers, &Timeouts::default())
        .await
        .unwrap();
    let outcome = |t: &TenantName| &p.report.results.iter().find(|(n, _)| n == t).unwrap().1;
    assert!(outcome(&followers[0]).at_latest(2), "{:?}", outcome(&followers[0]));
    assert!(
        matches!(
            outcome(&followers[1]),
            Outcome::Done(TenantOutcome::Failed { version: 2, .. })
        ),
        "{:?}",
        outcome(&followers[1])
    );
    let second_chunk = &rest[LOGIN_CHUNK..];
    for t in &followers[1 + LOGIN_CHUNK..] {
        assert_eq!(outcome(t), &Outcome::Skipped, "{t}");
    }
    assert_eq!(salted(&db, &rest[..1]).await, 1, "the first chunk's logins were read");
    assert_eq!(
        salted(&db, second_chunk).await,
        0,
        "the pass read the logins of the chunk after the one it stopped in"
    );
}

/// How many of the tenants `names` have a key salt in the registry.
async fn salted(db: &TestDb, names: &[&str]) -> i64 {
    sqlx::query_scalar("SELECT count(key_salt) FROM tenancy.tenants WHERE name = ANY($1)")
        .bind(names)
        .fetch_one(&mut db.superuser().await)
        .await
        .unwrap()
}

/// Six tenants at version 1 with an `items` table; the fourth holds a row a
/// version-2 CHECK rejects.
async fn data_dependent_setup(label: &str) -> (TestDb, Vec<TenantName>, Vec<Migration>) {
    let db = setup(label).await;
    let tenants = provision_many(&db, &tenant_names("d", 6), 4).await;
    let followers = names(&tenants);
    let v1 = vec![m(1, "CREATE TABLE items (id int PRIMARY KEY, qty int NOT NULL)")];
    converge(
        &db,
        "default",
        1,
        &spec(v1.clone(), 1, 1, OnFailure::Pause),
        &followers,
        5,
    )
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {}.items VALUES (1, -5)",
        followers[3].schema()
    )))
    .execute(&db.su)
    .await
    .unwrap();
    let mut v2 = v1;
    v2.push(m(
        2,
        "ALTER TABLE items ADD CONSTRAINT qty_not_negative CHECK (qty >= 0)",
    ));
    (db, followers, v2)
}

#[tokio::test]
async fn with_continue_a_data_dependent_failure_holds_back_only_that_tenant() {
    let (db, followers, v2) = data_dependent_setup("mscont").await;
    let s = spec(v2, 2, 1, OnFailure::Continue);
    let passes = converge(&db, "default", 2, &s, &followers, 5).await;
    let v = versions(&db, &followers).await;
    for (i, t) in followers.iter().enumerate() {
        assert_eq!(v[t.as_str()], if i == 3 { 1 } else { 2 }, "{t}: {v:?}");
    }
    let st = status_of(2, &s, passes.last().unwrap());
    assert_eq!(
        st.phase,
        Some(MigrationSetPhase::Paused),
        "only the failed tenant is behind"
    );
    assert_eq!(st.progress.as_deref(), Some("5/6"));
    assert_eq!(st.failed_count, 1);
    assert_eq!(
        (st.failed[0].tenant.as_str(), st.failed[0].version),
        (followers[3].as_str(), 2)
    );
    assert!(
        st.failed[0].error.contains("qty_not_negative") && st.failed[0].error.contains("23514"),
        "{:?}",
        st.failed[0]
    );
    let set = set_object("default", 2, s.clone());
    let (cond, version) = tenant_migrations::converge_pg(
        &db.admin,
        &ring(),
        &followers[3],
        "default",
        Some(&set),
        &Timeouts::default(),
    )
    .await
    .unwrap();
    assert_eq!((cond.status, cond.reason, version), (false, "MigrationFailed", 1));
    assert!(cond.message.contains("qty_not_negative"), "{}", cond.message);
    let (cond, version) = tenant_migrations::converge_pg(
        &db.admin,
        &ring(),
        &followers[4],
        "default",
        Some(&set),
        &Timeouts::default(),
    )
    .await
    .unwrap();
    assert_eq!((cond.status, cond.reason, version), (true, "UpToDate", 2));
    // The failed tenant's schema is exactly as before: no constraint.
    let has: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'qty_not_negative' AND connamespace = $1::regnamespace)")
        .bind(followers[3].schema())
        .fetch_one(&db.su)
        .await
        .unwrap();
    assert!(!has, "the failed migration left its constraint behind");

    // Fix the data, change the spec (a new generation): the tenant is retried.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "UPDATE {}.items SET qty = 0",
        followers[3].schema()
    )))
    .execute(&db.su)
    .await
    .unwrap();
    converge(&db, "default", 3, &s, &followers, 5).await;
    assert_eq!(versions(&db, &followers).await[followers[3].as_str()], 2);
    assert_eq!(failure_rows(&db).await, 0);
}

#[tokio::test]
async fn with_pause_the_first_failure_stops_tenants_not_yet_started() {
    let (db, followers, v2) = data_dependent_setup("mspause").await;
    // One at a time, in name order: tenant 3 fails, 4 and 5 never start.
    let s = spec(v2, 1, 1, OnFailure::Pause);
    let p = pass(&db.admin, &ring(), "default", 2, &s, &followers, &Timeouts::default())
        .await
        .unwrap();
    let v = versions(&db, &followers).await;
    let got: Vec<i64> = followers.iter().map(|t| v[t.as_str()]).collect();
    assert_eq!(got, vec![2, 2, 2, 1, 1, 1], "{:?}", p.report.results);
    assert_eq!(p.report.count(|o| matches!(o, Outcome::Skipped)), 2);
    let st = status_of(2, &s, &p);
    assert_eq!(st.phase, Some(MigrationSetPhase::Paused));
    assert_eq!(
        st.conditions
            .iter()
            .find(|c| c.type_ == "Paused")
            .map(|c| c.reason.as_str()),
        Some("MigrationFailed")
    );
    let p = pass(&db.admin, &ring(), "default", 2, &s, &followers, &Timeouts::default())
        .await
        .unwrap();
    assert_eq!(p.plan.blocked, Some(Blocked::Paused(followers[3].clone())));
    assert!(p.report.results.is_empty(), "a paused set started tenants");
    // Deleting the failed tenant removes its failure record with it.
    let registry_uid = format!("uid-{}", followers[3]);
    pg::tenant::drop_tenant(&db.admin, &followers[3], &registry_uid, "test")
        .await
        .unwrap();
    assert_eq!(
        failure_rows(&db).await,
        0,
        "the dropped tenant's failure record survived"
    );
}

#[tokio::test]
async fn two_rollouts_at_once_never_apply_a_migration_twice() {
    let db = setup("msrace").await;
    let tenants = provision_many(&db, &tenant_names("r", 24), 4).await;
    let followers = names(&tenants);
    // Not idempotent: a second run fails (the table exists) and would be
    // recorded as a failure.
    let s = spec(
        vec![
            m(1, "CREATE TABLE once (x int); SELECT pg_sleep(0.05)"),
            m(2, "ALTER TABLE once ADD COLUMN y int"),
        ],
        4,
        0,
        OnFailure::Continue,
    );
    // Two operator instances: two pools, two rollouts at the same moment.
    let other = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&db.admin_url)
        .await
        .unwrap();
    let timeouts = Timeouts::default();
    let keys = ring();
    let (a, b) = tokio::join!(
        pass(&db.admin, &keys, "default", 1, &s, &followers, &timeouts),
        pass(&other, &keys, "default", 1, &s, &followers, &timeouts)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let applied = |p: &Pass| -> usize {
        p.report
            .results
            .iter()
            .map(|(_, o)| {
                if let Outcome::Done(TenantOutcome::Migrated { applied, .. }) = o {
                    applied.len()
                } else {
                    0
                }
            })
            .sum()
    };
    let busy = |p: &Pass| p.report.count(|o| matches!(o, Outcome::Done(TenantOutcome::Busy)));
    println!(
        "instance A applied {} and found {} busy; B applied {} and found {} busy",
        applied(&a),
        busy(&a),
        applied(&b),
        busy(&b)
    );
    for p in [&a, &b] {
        assert_eq!(
            p.report
                .count(|o| matches!(o, Outcome::Done(TenantOutcome::Failed { .. }))),
            0,
            "a migration ran twice: {:?}",
            p.report.results
        );
    }
    converge(&db, "default", 1, &s, &followers, 5).await;
    for t in &followers {
        let r = rows(&db, t).await;
        assert_eq!(r.iter().map(|(v, _)| *v).collect::<Vec<_>>(), vec![1, 2], "{t}");
    }
    assert_eq!(failure_rows(&db).await, 0);
    assert!(applied(&a) + applied(&b) <= 48);
}

#[tokio::test]
async fn an_edited_migration_is_refused_and_never_rerun() {
    let db = setup("msedit").await;
    let tenants = provision_many(&db, &tenant_names("e", 3), 3).await;
    let followers = names(&tenants);
    let v1 = vec![m(1, "CREATE TABLE notes (id int PRIMARY KEY)")];
    converge(&db, "default", 1, &spec(v1, 2, 1, OnFailure::Pause), &followers, 5).await;
    let before = rows(&db, &followers[0]).await;

    let edited = spec(
        vec![
            m(1, "CREATE TABLE notes (id int PRIMARY KEY, body text)"),
            m(2, "CREATE TABLE more (id int)"),
        ],
        2,
        1,
        OnFailure::Continue,
    );
    let p = pass(
        &db.admin,
        &ring(),
        "default",
        2,
        &edited,
        &followers,
        &Timeouts::default(),
    )
    .await
    .unwrap();
    assert!(
        matches!(&p.plan.blocked, Some(Blocked::ChecksumMismatch(v)) if v.len() == 3),
        "{:?}",
        p.plan.blocked
    );
    assert!(p.report.results.is_empty(), "an edited set ran migrations");
    let st = status_of(2, &edited, &p);
    assert_eq!(st.phase, Some(MigrationSetPhase::Paused));
    assert_eq!(st.failed_count, 3);
    assert!(
        st.failed
            .iter()
            .all(|f| f.reason == "ChecksumMismatch" && f.version == 1),
        "{:?}",
        st.failed
    );
    // The per-tenant guard refuses too (another operator with the edited
    // spec), and records why.
    let migrations: Vec<MigrationSql> = tenant_operator::controller::migration_set::plan::migrations(&edited).unwrap();
    let out = pg::migrations::migrate_tenant(
        &db.admin,
        &login(&db, &followers[0]).await,
        &SetRef {
            name: "default".into(),
            generation: 2,
        },
        &migrations,
        &Timeouts::default(),
    )
    .await
    .unwrap();
    assert!(
        matches!(out, TenantOutcome::ChecksumMismatch { version: 1, .. }),
        "{out:?}"
    );
    assert_eq!(rows(&db, &followers[0]).await, before, "the version table changed");
    let body: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'notes' AND column_name = 'body')")
        .bind(followers[0].schema())
        .fetch_one(&db.su)
        .await
        .unwrap();
    assert!(!body, "the edited migration was re-run");
    let more: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{}.more", followers[0].schema()))
        .fetch_one(&db.su)
        .await
        .unwrap();
    assert!(!more, "a version after the edited one ran");
    let set = set_object("default", 2, edited);
    let (cond, _) = tenant_migrations::converge_pg(
        &db.admin,
        &ring(),
        &followers[1],
        "default",
        Some(&set),
        &Timeouts::default(),
    )
    .await
    .unwrap();
    assert_eq!((cond.status, cond.reason), (false, "ChecksumMismatch"));
}

#[tokio::test]
async fn a_connection_killed_mid_rollout_resumes_on_the_next_run() {
    let db = setup("mskill").await;
    let tenants = provision_many(&db, &tenant_names("k", 6), 4).await;
    let followers = names(&tenants);
    let s = spec(
        vec![m(1, "CREATE TABLE slow (x int); SELECT pg_sleep(1)")],
        2,
        0,
        OnFailure::Pause,
    );
    let pool = db.admin.clone();
    let (f, s2) = (followers.clone(), s.clone());
    let run = tokio::spawn(async move { pass(&pool, &ring(), "default", 1, &s2, &f, &Timeouts::default()).await });
    // Wait for a migration to be running, then end the admin's backends that
    // run it, from a superuser session.
    let mut su = db.superuser().await;
    let start = Instant::now();
    let killed = loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE datname = current_database() AND query LIKE '%pg_sleep(1)%' AND pid <> pg_backend_pid() AND state = 'active'",
        )
        .fetch_one(&mut su)
        .await
        .unwrap();
        if n > 0 {
            break n;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no migration started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let p = run.await.unwrap().expect("a pass survives a killed connection");
    let errors = p.report.count(|o| matches!(o, Outcome::Error(_)));
    println!(
        "killed {killed} backend(s); {errors} tenant(s) interrupted, {} skipped",
        p.report.count(|o| matches!(o, Outcome::Skipped))
    );
    assert!(errors >= 1, "{:?}", p.report.results);
    assert!(p.more(), "an interrupted pass must ask for another");
    for (t, o) in &p.report.results {
        if matches!(o, Outcome::Error(_)) {
            assert_eq!(
                versions(&db, std::slice::from_ref(t)).await[t.as_str()],
                0,
                "{t}: an interrupted migration was half-applied"
            );
        }
    }
    assert_eq!(
        failure_rows(&db).await,
        0,
        "a lost connection is not the migration's failure"
    );
    converge(&db, "default", 1, &s, &followers, 10).await;
    assert!(
        versions(&db, &followers).await.values().all(|&v| v == 1),
        "the rollout did not resume"
    );
}

#[tokio::test]
async fn tables_created_by_migrations_belong_to_the_owner_and_the_app_gets_dml() {
    let db = setup("msdml").await;
    let mut t = Tenant::new(&unique("dml"));
    t.converge(&db).await.unwrap();
    let set = set_object(
        "default",
        1,
        spec(
            vec![
                m(1, "CREATE TABLE docs (id bigserial PRIMARY KEY, body text NOT NULL)"),
                Migration {
                    version: 2,
                    name: "index".into(),
                    sql: "CREATE INDEX CONCURRENTLY IF NOT EXISTS docs_body ON docs (body)".into(),
                    transactional: false,
                },
            ],
            4,
            1,
            OnFailure::Pause,
        ),
    );
    // A brand-new tenant is brought to the latest version by its reconcile
    // (on a one-connection pool, to look at that session afterwards).
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.admin_url)
        .await
        .unwrap();
    let (cond, version) =
        tenant_migrations::converge_pg(&one, &ring(), &t.name, "default", Some(&set), &Timeouts::default())
            .await
            .unwrap();
    assert_eq!(
        (cond.status, cond.reason, version),
        (true, "UpToDate", 2),
        "{}",
        cond.message
    );
    let owner: String =
        sqlx::query_scalar("SELECT tableowner::text FROM pg_tables WHERE schemaname = $1 AND tablename = 'docs'")
            .bind(t.name.schema())
            .fetch_one(&db.su)
            .await
            .unwrap();
    assert_eq!(owner, t.name.owner_role());
    let valid: bool = sqlx::query_scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)")
        .bind(format!("{}.docs_body", t.name.schema()))
        .fetch_one(&db.su)
        .await
        .unwrap();
    assert!(valid, "the concurrent index is not valid");

    let mut app = t.app(&db).await.unwrap();
    sqlx::query("INSERT INTO docs (body) VALUES ('a'), ('b')")
        .execute(&mut app)
        .await
        .expect("INSERT (and the sequence) on a migrated table");
    sqlx::query("UPDATE docs SET body = body || '!'")
        .execute(&mut app)
        .await
        .expect("UPDATE");
    sqlx::query("DELETE FROM docs WHERE body = 'a!'")
        .execute(&mut app)
        .await
        .expect("DELETE");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM docs")
        .fetch_one(&mut app)
        .await
        .expect("SELECT");
    assert_eq!(n, 1);
    // The version table is readable, not writable, by the app.
    let v: i64 = sqlx::query_scalar("SELECT max(version) FROM _tenancy_migrations")
        .fetch_one(&mut app)
        .await
        .unwrap();
    assert_eq!(v, 2);
    let err = sqlx::query("DELETE FROM _tenancy_migrations")
        .execute(&mut app)
        .await
        .expect_err("the app forged its schema version");
    assert_eq!(err.as_database_error().and_then(|d| d.code()).as_deref(), Some("42501"));
    // The session that ran the non-transactional step is back to the admin.
    let (user, path): (String, String) = sqlx::query_as("SELECT current_user::text, current_setting('search_path')")
        .fetch_one(&one)
        .await
        .unwrap();
    assert_eq!(user, "tenancy_admin");
    assert!(!path.contains(&t.name.schema()), "{path}");
    // The migrations are not drift: the next reconcile runs nothing.
    let again = t.converge(&db).await.unwrap();
    assert_eq!(
        again.statements, 0,
        "a reconcile after migrations ran {:?}",
        again.plan.actions
    );
    let again =
        tenant_migrations::converge_pg(&db.admin, &ring(), &t.name, "default", Some(&set), &Timeouts::default())
            .await
            .unwrap();
    assert_eq!(again.1, 2);
}

#[tokio::test]
async fn a_tenant_waits_while_its_set_does_not_exist() {
    let db = setup("msnone").await;
    let mut t = Tenant::new(&unique("wait"));
    t.converge(&db).await.unwrap();
    let (cond, version) =
        tenant_migrations::converge_pg(&db.admin, &ring(), &t.name, "default", None, &Timeouts::default())
            .await
            .unwrap();
    assert_eq!((cond.status, cond.reason, version), (false, "MigrationSetNotFound", 0));
    let table: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{}._tenancy_migrations", t.name.schema()))
        .fetch_one(&db.su)
        .await
        .unwrap();
    assert!(!table, "a tenant without a set got a version table");
}

/// A database with one provisioned tenant, and the set reference its
/// direct `migrate_tenant` runs record failures under.
async fn one_tenant(label: &str) -> (TestDb, TenantName, SetRef) {
    let db = setup(label).await;
    let tenants = provision_many(&db, &tenant_names(label, 1), 1).await;
    let name = tenants[0].name.clone();
    (
        db,
        name,
        SetRef {
            name: "default".into(),
            generation: 1,
        },
    )
}

/// The operator's pool plans its own statements once per connection
/// (`plan_cache_mode = force_generic_plan`, docs/scale.md); a tenant's
/// migration, on the tenant's ops login derived from that pool, runs under
/// the server's mode: a start-up option would have been inherited.
#[tokio::test]
async fn a_migration_runs_under_the_servers_plan_cache_mode_not_the_operators() {
    let (db, t, set) = one_tenant("msplans").await;
    let (pool, _) = pg::connect(&db.admin_url, 4).await.unwrap();
    let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode, "force_generic_plan");
    let login = pg::migrations::ops_login(&pool, &ring(), &t).await.unwrap().unwrap();
    let v1 = MigrationSql::new(
        1,
        "v1",
        "CREATE TABLE seen (mode text NOT NULL); INSERT INTO seen SELECT current_setting('plan_cache_mode')",
        true,
    );
    let out = pg::migrations::migrate_tenant(&pool, &login, &set, &[v1], &Timeouts::default())
        .await
        .unwrap();
    assert!(matches!(out, TenantOutcome::Migrated { to: 1, .. }), "{out:?}");
    let seen: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT mode FROM {}.seen", t.schema())))
        .fetch_one(&db.su)
        .await
        .unwrap();
    assert_eq!(seen, "auto");
}

#[tokio::test]
async fn deferred_checks_run_at_commit_with_the_tenant_search_path_and_their_failure_is_the_migrations() {
    let (db, t, set) = one_tenant("msdefer").await;
    let t = &t;
    // A deferred constraint trigger whose function names its table without a
    // schema: it runs at COMMIT, after the operator's own statements, and
    // must resolve `items` in the tenant schema as the migration did.
    let check = "CREATE TABLE items (n int NOT NULL);
        CREATE FUNCTION items_check() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF (SELECT sum(n) FROM items) > 10 THEN RAISE EXCEPTION 'items over budget'; END IF;
          RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER items_budget AFTER INSERT ON items DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION items_check();
        INSERT INTO items VALUES (3), (4);";
    let v1 = MigrationSql::new(1, "v1", check, true);
    let out = pg::migrations::migrate_tenant(
        &db.admin,
        &login(&db, t).await,
        &set,
        std::slice::from_ref(&v1),
        &Timeouts::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        out,
        TenantOutcome::Migrated {
            from: 0,
            to: 1,
            applied: vec![1]
        }
    );
    // Over budget: the check fails at COMMIT. That is the migration's
    // failure: recorded, and the schema stays at version 1 without its rows.
    let v2 = MigrationSql::new(2, "v2", "INSERT INTO items VALUES (5)", true);
    let out = pg::migrations::migrate_tenant(
        &db.admin,
        &login(&db, t).await,
        &set,
        &[v1.clone(), v2.clone()],
        &Timeouts::default(),
    )
    .await
    .unwrap();
    match &out {
        TenantOutcome::Failed {
            at: 1,
            version: 2,
            error,
            ..
        } => assert!(error.contains("items over budget"), "{error}"),
        other => panic!("expected the deferred check to fail version 2: {other:?}"),
    }
    assert_eq!(versions(&db, std::slice::from_ref(t)).await[t.as_str()], 1);
    let sum: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT sum(n)::int8 FROM {}.items",
        t.schema()
    )))
    .fetch_one(&db.su)
    .await
    .unwrap();
    assert_eq!(sum, 7, "the failed migration's row was kept");
    assert_eq!(failure_rows(&db).await, 1);
    // The lock was released: the next run takes it, and a fixed set clears
    // the record.
    let v2b = MigrationSql::new(2, "v2", "INSERT INTO items VALUES (1)", true);
    let out = pg::migrations::migrate_tenant(&db.admin, &login(&db, t).await, &set, &[v1, v2b], &Timeouts::default())
        .await
        .unwrap();
    assert_eq!(
        out,
        TenantOutcome::Migrated {
            from: 1,
            to: 2,
            applied: vec![2]
        }
    );
    assert_eq!(failure_rows(&db).await, 0);
}

#[tokio::test]
async fn a_run_cut_short_gives_back_neither_its_lock_nor_an_open_transaction() {
    let (db, t, set) = one_tenant("mscancel").await;
    let t = &t;
    let slow = MigrationSql::new(1, "v1", "CREATE TABLE half (x int); SELECT pg_sleep(2)", true);
    // One connection, so a connection handed back would be the next one used.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.admin_url)
        .await
        .unwrap();
    let cut = tokio::time::timeout(
        Duration::from_millis(500),
        pg::migrations::migrate_tenant(
            &pool,
            &login(&db, t).await,
            &set,
            std::slice::from_ref(&slow),
            &Timeouts::default(),
        ),
    )
    .await;
    assert!(cut.is_err(), "the run should still have been sleeping");
    // The dropped run's session is closed: Postgres rolls it back and frees
    // the lock, so another pool's run is not told the tenant is busy.
    let fast = MigrationSql::new(1, "v1", "CREATE TABLE half (x int)", true);
    let start = Instant::now();
    loop {
        let out = pg::migrations::migrate_tenant(
            &db.admin,
            &login(&db, t).await,
            &set,
            std::slice::from_ref(&fast),
            &Timeouts::default(),
        )
        .await
        .unwrap();
        if out != TenantOutcome::Busy {
            assert_eq!(
                out,
                TenantOutcome::Migrated {
                    from: 0,
                    to: 1,
                    applied: vec![1]
                }
            );
            break;
        }
        // Postgres finishes the statement in flight (the sleep) before it
        // notices its client went away; a pooled session would hold the lock
        // for as long as the pool keeps it.
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the cut-short run still holds the tenant's lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the one-connection pool gives a clean session: no transaction left
    // open (SAVEPOINT works only inside one), no lock, no role.
    let mut conn = pool.acquire().await.unwrap();
    let err = sqlx::raw_sql("SAVEPOINT probe")
        .execute(&mut *conn)
        .await
        .expect_err("a pooled session was left inside the cut-short run's transaction");
    assert_eq!(
        err.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("25P01"),
        "{err}"
    );
    let clean: bool = sqlx::query_scalar("SELECT current_user = session_user AND NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(clean, "a pooled session kept the run's role or lock");
}

/// A new tenant's reconcile logs in as the tenant once: the audit step's
/// confined session is handed, acting as nobody again, to the first
/// migration run of the new schema. Shown with the ops login limited to one
/// connection while that session is open: a second login would be refused.
#[tokio::test]
async fn a_new_schemas_first_migrations_run_on_the_session_the_audit_step_opened() {
    let db = setup("mshand").await;
    let mut t = Tenant::new(&unique("mshand"));
    let out = t.converge(&db).await.expect("provision");
    // Acting as nobody: neither the owner nor in the tenant's schema.
    let mut session = out
        .session
        .expect("the audit step opened a confined session for the new schema");
    let (user, path): (String, String) = sqlx::query_as("SELECT current_user::text, current_setting('search_path')")
        .fetch_one(&mut *session)
        .await
        .unwrap();
    assert_eq!(user, t.name.ops_role(), "the handed session acts as the ops login only");
    assert!(
        !path.contains(&t.name.schema()),
        "the handed session keeps the tenant's search_path: {path}"
    );
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER ROLE {} CONNECTION LIMIT 1",
        t.name.ops_role()
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let set = set_object(
        "default",
        1,
        spec(vec![m(1, "CREATE TABLE first (x int)")], 4, 1, OnFailure::Pause),
    );
    let (cond, version) = tenant_migrations::converge_pg_on(
        &db.admin,
        &ring(),
        &t.name,
        "default",
        Some(&set),
        &Timeouts::default(),
        Some(session),
    )
    .await
    .expect("the first run on the handed session");
    assert_eq!((cond.status, version), (true, 1), "{}", cond.message);
    // The limit does refuse a second login while one is open (what a run
    // logging in again would have met).
    let login = login(&db, &t.name).await;
    let first = pg::confined::log_in(&db.admin, &login).await.expect("one login");
    let second = pg::confined::log_in(&db.admin, &login).await;
    assert!(second.is_err(), "the ops login's limit of one connection did not hold");
    first.close().await;
}

/// A new tenant's first migration (its reconcile) and a rollout pass may
/// start on it at once. The second is told the tenant is busy at once: the
/// lock row exists from the tenant's registration, so it does not wait for
/// the first run's insert of it (for the whole first run, as in a
/// provisioning burst, where such waits of up to 260 ms added up to about 5 s
/// per 2,000 tenants).
#[tokio::test]
async fn a_second_run_on_a_new_tenant_is_told_busy_without_waiting_for_the_first() {
    let (db, t, set) = one_tenant("msbusy").await;
    let held: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM tenancy.locks l JOIN tenancy.tenants t ON l.key = t.uid
                         WHERE l.kind = 'migrate' AND t.name = $1)",
    )
    .bind(t.as_str())
    .fetch_one(&db.admin)
    .await
    .unwrap();
    assert!(held, "the migration lock row is made with the registry row");
    let slow = MigrationSql::new(1, "v1", "CREATE TABLE first (x int); SELECT pg_sleep(3)", true);
    let first = {
        let (admin, login, set) = (db.admin.clone(), login(&db, &t).await, set.clone());
        tokio::spawn(async move {
            pg::migrations::migrate_new_tenant(&admin, &login, &set, &[slow], &Timeouts::default()).await
        })
    };
    // The first run holds the lock while its migration sleeps: wait until
    // the lock row is locked by a transaction in progress (its xmax), read
    // without locking it. Trying the lock instead (FOR UPDATE NOWAIT) could
    // hold the row for an instant just as the first run asks for it, and the
    // first run would end Busy; the admin cannot see other roles' queries in
    // pg_stat_activity.
    let start = Instant::now();
    loop {
        let locked: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM tenancy.locks l JOIN tenancy.tenants t ON l.key = t.uid
                             WHERE l.kind = 'migrate' AND t.name = $1 AND l.xmax::text::bigint <> 0
                               AND txid_status(l.xmax::text::bigint) = 'in progress')",
        )
        .bind(t.as_str())
        .fetch_one(&db.admin)
        .await
        .unwrap();
        if locked {
            break;
        }
        if first.is_finished() {
            panic!(
                "the first run ended before it was seen holding the lock: {:?}",
                first.await
            );
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the first run never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fast = MigrationSql::new(1, "v1", "CREATE TABLE first (x int)", true);
    let second_start = Instant::now();
    let second = pg::migrations::migrate_new_tenant(
        &db.admin,
        &login(&db, &t).await,
        &set,
        std::slice::from_ref(&fast),
        &Timeouts::default(),
    )
    .await
    .unwrap();
    let waited = second_start.elapsed();
    assert_eq!(second, TenantOutcome::Busy, "the second run must not apply anything");
    // Before, it waited on the row's insert until the first run committed
    // (3 s here) and then found nothing to do.
    assert!(waited < Duration::from_millis(1500), "the second run waited {waited:?}");
    let first = first.await.unwrap().unwrap();
    assert_eq!(
        first,
        TenantOutcome::Migrated {
            from: 0,
            to: 1,
            applied: vec![1]
        }
    );
}

#[tokio::test]
async fn the_record_is_resynced_from_the_schema_after_a_crash_between_the_commits() {
    let (db, t, set) = one_tenant("msresync").await;
    let v1 = m(1, "CREATE TABLE a (x int)");
    let v2 = m(2, "CREATE TABLE b (x int)");
    let v3 = m(3, "CREATE TABLE c (x int)");
    let sqls = |ms: &[&Migration]| {
        ms.iter()
            .map(|m| MigrationSql::new(m.version, &m.name, &m.sql, m.transactional))
            .collect::<Vec<_>>()
    };
    let out = pg::migrations::migrate_tenant(
        &db.admin,
        &login(&db, &t).await,
        &set,
        &sqls(&[&v1, &v2]),
        &Timeouts::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        out,
        TenantOutcome::Migrated {
            from: 0,
            to: 2,
            applied: vec![1, 2]
        }
    );
    // The confined session committed version 2; the admin's record of it
    // was lost (a crash between the two commits).
    let mut su = db.superuser().await;
    sqlx::raw_sql("DELETE FROM tenancy.schema_versions WHERE version = 2")
        .execute(&mut su)
        .await
        .unwrap();
    assert_eq!(versions(&db, std::slice::from_ref(&t)).await[t.as_str()], 1);
    // The next pass plans the tenant as behind; its run re-syncs the record
    // and applies nothing twice, and the pass's state afterwards says so.
    let s = spec(vec![v1.clone(), v2.clone()], 2, 0, OnFailure::Pause);
    let p = pass(
        &db.admin,
        &ring(),
        "default",
        1,
        &s,
        std::slice::from_ref(&t),
        &Timeouts::default(),
    )
    .await
    .unwrap();
    assert!(
        matches!(&p.report.results[0].1, Outcome::Done(TenantOutcome::Migrated { from: 2, to: 2, applied }) if applied.is_empty()),
        "{:?}",
        p.report.results
    );
    assert_eq!(
        p.after.versions[&t].current(),
        2,
        "the pass's state afterwards kept the stale record"
    );
    assert_eq!(versions(&db, std::slice::from_ref(&t)).await[t.as_str()], 2);
    assert_eq!(rows(&db, &t).await.len(), 2);

    // An operator upgraded from one without the record: none at all. The
    // Tenant reconcile re-syncs it at once, and does not apply the set's
    // newer version itself (that is the rollout's, canaries first).
    sqlx::raw_sql("DELETE FROM tenancy.schema_versions")
        .execute(&mut su)
        .await
        .unwrap();
    let set3 = set_object("default", 2, spec(vec![v1, v2, v3], 2, 1, OnFailure::Pause));
    let (cond, version) =
        tenant_migrations::converge_pg(&db.admin, &ring(), &t, "default", Some(&set3), &Timeouts::default())
            .await
            .unwrap();
    assert_eq!(
        (cond.status, cond.reason, version),
        (false, "RollingOut", 2),
        "{}",
        cond.message
    );
    assert_eq!(
        rows(&db, &t).await.len(),
        2,
        "the reconcile applied version 3 past the rollout"
    );
    // A version table the owner rewrote is what the record follows (its
    // own tenant only): a row forged in, a row taken out.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {s}._tenancy_migrations WHERE version = 2; INSERT INTO {s}._tenancy_migrations (version, name, checksum, duration_ms) VALUES (7, 'forged', 'not-a-checksum', 0)",
        s = t.schema()
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let out = pg::migrations::migrate_tenant(
        &db.admin,
        &login(&db, &t).await,
        &set,
        &sqls(&[&m(1, "CREATE TABLE a (x int)")]),
        &Timeouts::default(),
    )
    .await
    .unwrap();
    assert!(
        matches!(out, TenantOutcome::ChecksumMismatch { version: 7, .. }),
        "{out:?}"
    );
    let recorded: Vec<i64> = sqlx::query_scalar("SELECT version FROM tenancy.schema_versions ORDER BY 1")
        .fetch_all(&db.admin)
        .await
        .unwrap();
    assert_eq!(recorded, vec![1, 7]);
}
