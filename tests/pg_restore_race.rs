//! A Tenant reconcile never lets the app role back in while a restore runs:
//! the restore's lock orders the two.

mod support;

use support::tenant::Tenant;
use support::{unique, TestDb};
use tenant_operator::controller::tenant::ConvergeError;
use tenant_operator::pg;

#[tokio::test]
async fn a_reconcile_during_a_restore_keeps_the_app_role_locked_out() {
    let db = TestDb::new("restorerace").await;
    pg::migrate_control_schema(&db.admin).await.unwrap();
    let mut t = Tenant::new(&unique("race"));
    t.converge(&db).await.unwrap();
    t.app(&db).await.expect("the active tenant logs in");

    // A restore starts: it holds the lock and locks the app role out.
    let lock = pg::backup::try_restore_lock(&db.admin, &t.name).await.unwrap().expect("no restore running yet");
    pg::backup::lock_out_app(&db.admin, &t.name).await.unwrap();
    assert!(t.app(&db).await.is_err());

    // A reconcile that would turn login back on backs off instead.
    let err = t.converge(&db).await.expect_err("a reconcile re-enabled login during a restore");
    assert!(matches!(err, ConvergeError::Db(ref e) if e.is_transient()), "{err}");
    assert!(t.app(&db).await.is_err(), "the app role logged in while the restore ran");

    // A second restore cannot start while the first runs (it waits, then says so).
    let second = pg::backup::restore_lock(&db.admin, &t.name, std::time::Duration::from_millis(500)).await.unwrap();
    assert!(second.is_none(), "two restores of one tenant at once");

    lock.release().await;
    t.converge(&db).await.unwrap();
    t.app(&db).await.expect("login is back once the restore is done");
}
