//! `tenant-operator audit verify|export|prune`: one tenant's data audit log
//! ([`crate::pg::audit`]), on the admin's DSN with the root keys (the
//! anchors' MAC key derives from them).

use anyhow::Context as _;

use crate::crypto::Keyring;
use crate::names::TenantName;
use crate::pg;

async fn open(tenant: &str, database_url: &str) -> anyhow::Result<(TenantName, sqlx::PgPool)> {
    let name = TenantName::parse(tenant)?;
    let (pool, _) = pg::connect(database_url, 2).await.context("connecting to Postgres")?;
    Ok((name, pool))
}

/// Checks the hash chain and the anchors; prints `ok: ...` or `BROKEN at
/// row ...` (and fails).
pub async fn verify(tenant: &str, database_url: &str, ring: &Keyring) -> anyhow::Result<()> {
    let (name, pool) = open(tenant, database_url).await?;
    let report = pg::audit::verify(&pool, ring, &name).await?;
    let from = report
        .anchor
        .map(|a| format!(" from the anchor at row {a}"))
        .unwrap_or_default();
    match report.first_break {
        None => {
            let skipped = if report.anchors_skipped > 0 {
                format!(
                    ", {} not checkable (pruned, or a retired root key)",
                    report.anchors_skipped
                )
            } else {
                String::new()
            };
            println!(
                "ok: {} row(s){from}, chain head {}; {} anchor(s) checked{skipped}",
                report.rows, report.head, report.anchors_checked
            );
            Ok(())
        }
        Some(b) => {
            println!("BROKEN at row {}: {}", b.id, b.what);
            anyhow::bail!("the audit chain of tenant {name} is broken at row {}", b.id)
        }
    }
}

/// Writes the rows since `since` to stdout as JSON lines.
pub async fn export(
    tenant: &str,
    since: chrono::DateTime<chrono::Utc>,
    database_url: &str,
    ring: &Keyring,
) -> anyhow::Result<()> {
    let (name, pool) = open(tenant, database_url).await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let n = pg::audit::export(&pool, ring, &name, since, &mut out).await?;
    std::io::Write::flush(&mut out)?;
    eprintln!("exported {n} audit row(s) of tenant {name}");
    Ok(())
}

/// Deletes rows older than `retention_days`, leaving an anchor.
pub async fn prune(tenant: &str, retention_days: u32, database_url: &str, ring: &Keyring) -> anyhow::Result<()> {
    let (name, pool) = open(tenant, database_url).await?;
    let before = chrono::Utc::now() - chrono::Duration::days(i64::from(retention_days));
    let p = pg::audit::prune(&pool, ring, &name, before, "tenant-operator audit prune").await?;
    println!("pruned {} row(s) before {before}; anchor: {:?}", p.deleted, p.anchor);
    Ok(())
}
