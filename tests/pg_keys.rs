//! Tenant key material in Postgres: each tenant gets its own random salt in
//! the registry, kept nowhere else, and a delete destroys it
//! (crypto-shredding): envelopes and backup streams sealed before the delete
//! cannot be opened with the root keys alone.

mod support;

use std::io::{Read, Write};

use support::tenant::Tenant;
use support::{unique, TestDb};
use tenant_operator::crypto::{self, Keyring, OpeningReader, Purpose, SealingWriter};
use tenant_operator::pg;

fn keyring() -> Keyring {
    let mut keys = std::collections::BTreeMap::new();
    keys.insert("v1".to_string(), crypto::generate_root_key().to_vec());
    Keyring::new(keys, "v1").unwrap()
}

async fn setup(label: &str) -> TestDb {
    let db = TestDb::new(label).await;
    pg::migrate_control_schema(&db.admin).await.unwrap();
    db
}

/// Every column value in the database, as text, that contains `needle_hex`.
async fn occurrences(db: &TestDb, needle_hex: &str) -> Vec<String> {
    let mut su = db.superuser().await;
    let cols: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT table_schema::text, table_name::text, column_name::text FROM information_schema.columns
          WHERE table_schema NOT IN ('pg_catalog', 'information_schema') AND data_type IN ('bytea', 'text', 'jsonb', 'character varying')",
    )
    .fetch_all(&mut su)
    .await
    .unwrap();
    let mut hits = vec![];
    for (s, t, c) in cols {
        let sql = format!("SELECT count(*) FROM \"{s}\".\"{t}\" WHERE position($1 in encode(convert_to(\"{c}\"::text, 'UTF8'), 'hex')) > 0 OR position($1 in \"{c}\"::text) > 0");
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(needle_hex)
            .fetch_one(&mut su)
            .await
            .unwrap();
        if n > 0 {
            hits.push(format!("{s}.{t}.{c}"));
        }
    }
    hits
}

#[tokio::test]
async fn each_tenant_gets_its_own_salt_and_a_delete_shreds_it() {
    let db = setup("shred").await;
    let mut a = Tenant::new(&unique("shred-a"));
    let mut b = Tenant::new(&unique("shred-b"));
    a.converge(&db).await.unwrap();
    b.converge(&db).await.unwrap();
    let salt_a = pg::registry::key_salt(&db.admin, &a.uid)
        .await
        .unwrap()
        .expect("A has a salt");
    let salt_b = pg::registry::key_salt(&db.admin, &b.uid)
        .await
        .unwrap()
        .expect("B has a salt");
    assert_ne!(salt_a.as_bytes(), salt_b.as_bytes(), "two tenants share a salt");
    let again = pg::registry::key_salt(&db.admin, &a.uid).await.unwrap().unwrap();
    assert_eq!(salt_a.as_bytes(), again.as_bytes(), "the salt changed between reads");
    let hex_a = hex::encode(salt_a.as_bytes());
    assert_eq!(
        occurrences(&db, &hex_a).await,
        ["tenancy.tenants.key_salt"],
        "the salt is stored somewhere else too"
    );

    // Sealed before the delete: an envelope and a backup stream.
    let ring = keyring();
    let envelope = crypto::seal(&ring, &salt_a, &a.uid, Purpose::Secrets, "erp", b"top secret").unwrap();
    let mut w = SealingWriter::new(Vec::new(), &ring, &salt_a, &a.uid, Purpose::Backup).unwrap();
    w.write_all(&vec![7u8; 100_000]).unwrap();
    let stream = w.finish().unwrap();
    let mut back = Vec::new();
    OpeningReader::new(&stream[..], &ring, &salt_a, &a.uid, Purpose::Backup)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back.len(), 100_000);

    pg::tenant::drop_tenant(&db.admin, &a.name, &a.uid, "test")
        .await
        .unwrap();
    assert!(
        pg::registry::existing_key_salt(&db.admin, &a.uid)
            .await
            .unwrap()
            .is_none(),
        "the registry still has A's salt"
    );
    assert!(
        occurrences(&db, &hex_a).await.is_empty(),
        "A's salt survived the delete"
    );
    // With the root keys alone (any salt one could guess, here a fresh one
    // and an all-zero one) neither opens.
    for guess in [
        crypto::TenantSalt::generate(),
        crypto::TenantSalt::from_bytes(&[0u8; 32]).unwrap(),
    ] {
        assert!(crypto::open(&ring, &guess, &a.uid, Purpose::Secrets, "erp", &envelope).is_err());
        let mut sink = Vec::new();
        let r = OpeningReader::new(&stream[..], &ring, &guess, &a.uid, Purpose::Backup)
            .unwrap()
            .read_to_end(&mut sink);
        assert!(
            r.is_err() && sink.is_empty(),
            "a shredded backup stream released plaintext"
        );
    }
    // B keeps its salt.
    assert_eq!(
        pg::registry::existing_key_salt(&db.admin, &b.uid)
            .await
            .unwrap()
            .unwrap()
            .as_bytes(),
        salt_b.as_bytes()
    );
}

#[tokio::test]
async fn key_versions_in_use_follow_the_registry() {
    let db = setup("keyver").await;
    let mut a = Tenant::new(&unique("kv-a"));
    a.converge(&db).await.unwrap();
    assert!(pg::registry::key_versions_in_use(&db.admin).await.unwrap().is_empty());
    pg::registry::set_key_version(&db.admin, &a.uid, Some(2)).await.unwrap();
    assert_eq!(pg::registry::key_versions_in_use(&db.admin).await.unwrap(), [2]);
    let xmin: String = sqlx::query_scalar("SELECT xmin::text FROM tenancy.tenants WHERE uid = $1")
        .bind(&a.uid)
        .fetch_one(&db.admin)
        .await
        .unwrap();
    pg::registry::set_key_version(&db.admin, &a.uid, Some(2)).await.unwrap();
    let xmin2: String = sqlx::query_scalar("SELECT xmin::text FROM tenancy.tenants WHERE uid = $1")
        .bind(&a.uid)
        .fetch_one(&db.admin)
        .await
        .unwrap();
    assert_eq!(xmin, xmin2, "an unchanged key version rewrote the registry row");
}
