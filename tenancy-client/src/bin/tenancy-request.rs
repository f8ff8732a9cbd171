//! One request per tenant through the gateway (the demo's last step):
//! `tenancy-request <gateway URL> <tenant>...` prints, per tenant, who the
//! transaction ran as and its search_path, or why it was refused.

use tenancy_client::{Error, Gateway};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().ok_or("usage: tenancy-request <gateway URL> <tenant>...")?;
    let gateway = Gateway::connect(&url).await?;
    for (i, tenant) in args.enumerate() {
        match gateway.begin(&tenant, "demo", &format!("demo-{i}")).await {
            Ok(mut tx) => {
                let (user, path, timeout): (String, String, String) = sqlx::query_as(
                    "SELECT current_user::text, current_setting('search_path'), current_setting('statement_timeout')",
                )
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                println!("{tenant}: ok, as {user}, search_path {path}, statement_timeout {timeout}");
            }
            Err(e @ (Error::TenantNotActive(_) | Error::UnknownTenant(_))) => println!("{tenant}: refused: {e}"),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
