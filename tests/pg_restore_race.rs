//! A Tenant reconcile never lets the app role back in while a restore runs:
//! the restore's row lock in `tenancy.locks` orders the two. And a tenant
//! cannot stall either of them: holding every advisory lock the operator
//! used to take delays neither.

mod support;

use std::time::{Duration, Instant};

use support::tenant::Tenant;
use support::{unique, TestDb};
use tenant_operator::pg;
use tenant_operator::pg::tenant::DbAction;

#[tokio::test]
async fn a_reconcile_during_a_restore_keeps_the_app_role_locked_out() {
    let db = TestDb::new("restorerace").await;
    pg::migrate_control_schema(&db.admin).await.unwrap();
    let mut t = Tenant::new(&unique("race"));
    t.converge(&db).await.unwrap();
    t.app(&db).await.expect("the active tenant logs in");

    // A restore starts: it holds the lock and locks the app role out.
    let lock = pg::backup_sql::try_restore_lock(&db.admin, &t.uid)
        .await
        .unwrap()
        .expect("no restore running yet");
    assert_eq!(
        pg::backup_sql::prepare(&db.admin, &t.name, &t.uid, pg::backup_sql::BY_COMMAND, false)
            .await
            .unwrap(),
        pg::backup_sql::Prepared::Done
    );
    assert!(t.app(&db).await.is_err());

    // A reconcile that planned to turn login back on just before the
    // restore started backs off instead (its transaction cannot take the
    // lock shared) ...
    let login = [DbAction::SetLogin(true)];
    let err = pg::tenant::apply(&db.admin, &t.name, &t.uid, &login, None)
        .await
        .expect_err("a reconcile re-enabled login during a restore");
    assert!(
        matches!(err, pg::PgError::RestoreRunning(_)) && err.is_transient(),
        "{err}"
    );
    // ... and one that plans now sees the restore's schema and stops.
    assert!(
        t.converge(&db).await.is_err(),
        "a reconcile converged a tenant under restore"
    );
    assert!(
        t.app(&db).await.is_err(),
        "the app role logged in while the restore ran"
    );

    // A second restore cannot start while the first runs (it waits, then says so).
    let second = pg::backup_sql::restore_lock(&db.admin, &t.uid, Duration::from_millis(500))
        .await
        .unwrap();
    assert!(second.is_none(), "two restores of one tenant at once");
    // Nor can the TenantRestore controller's steps.
    assert_eq!(
        pg::backup_sql::put_back(&db.admin, &t.name, &t.uid, true)
            .await
            .unwrap(),
        pg::backup_sql::PutBack::Busy
    );

    // With the lock free but the restore's schemas still there (a
    // TenantRestore's Job runs between the controller's steps), login
    // stays off too.
    lock.release().await;
    let err = pg::tenant::apply(&db.admin, &t.name, &t.uid, &login, None)
        .await
        .expect_err("login enabled with a restore under way");
    assert!(matches!(err, pg::PgError::RestoreRunning(_)), "{err}");
    assert!(t.app(&db).await.is_err());
    assert_eq!(
        pg::backup_sql::put_back(&db.admin, &t.name, &t.uid, true)
            .await
            .unwrap(),
        pg::backup_sql::PutBack::Done
    );
    t.converge(&db).await.unwrap();
    t.app(&db).await.expect("login is back once the restore is done");
}

#[tokio::test]
async fn the_app_role_holding_the_old_advisory_keys_delays_neither_a_restore_nor_a_reconcile() {
    let db = TestDb::new("restoreadv").await;
    pg::migrate_control_schema(&db.admin).await.unwrap();
    let mut t = Tenant::new(&unique("adv"));
    t.converge(&db).await.unwrap();
    // The keys the restore lock used (pg_advisory_lock(0x74656e72,
    // hashtext(schema)), exclusive and shared forms), held by the tenant's
    // own app role in an open session.
    let mut app = t.app(&db).await.unwrap();
    sqlx::query(
        "SELECT pg_advisory_lock(1952804466, hashtext($1)), pg_advisory_lock_shared(1952804466, hashtext($1) + 1)",
    )
    .bind(t.name.schema())
    .execute(&mut app)
    .await
    .expect("any role can take advisory locks");

    // A restore's lock and steps go through at once.
    let started = Instant::now();
    let lock = pg::backup_sql::try_restore_lock(&db.admin, &t.uid)
        .await
        .unwrap()
        .expect("the restore lock is not stalled by the app's advisory locks");
    lock.release().await;
    assert_eq!(
        pg::backup_sql::prepare(&db.admin, &t.name, &t.uid, pg::backup_sql::BY_COMMAND, true)
            .await
            .unwrap(),
        pg::backup_sql::Prepared::Done
    );
    assert_eq!(
        pg::backup_sql::put_back(&db.admin, &t.name, &t.uid, true)
            .await
            .unwrap(),
        pg::backup_sql::PutBack::Done
    );
    // A reconcile that gives the login back (the prepare took it) too.
    t.converge(&db)
        .await
        .expect("a reconcile is not stalled by the app's advisory locks");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    t.app(&db).await.expect("login is back");
}
