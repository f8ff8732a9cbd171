//! `tenant-operator top`: the tenants sorted by statement time, sessions or
//! bytes, like `kubectl top`, from the usage sampler's query
//! ([`crate::pg::usage`]). Needs only `DATABASE_URL` (the operator's admin
//! login, or any role with `pg_read_all_stats` that can read
//! `tenancy.tenants`).
//!
//! Rates (statement time, rows written) come from two samples `--interval`
//! seconds apart (60 by default: "the last minute"); `--watch` keeps
//! sampling and prints a table after each.

use std::time::Duration;

use anyhow::Context as _;

use crate::pg::usage::{self as us, SortBy};

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Sort by statement time per minute (cpu), sessions or schema bytes.
    #[arg(long, default_value = "cpu")]
    pub sort: SortBy,
    /// Seconds between the two samples the rates come from.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub interval: u64,
    /// Keep sampling, printing a table every interval.
    #[arg(long)]
    pub watch: bool,
    /// Show this many tenants at most (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// The gateway login whose tenant transactions count as the tenant's
    /// sessions (empty: none).
    #[arg(long, env = "GATEWAY_ROLE", default_value = crate::pg::gateway::DEFAULT_ROLE)]
    pub gateway_role: String,
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

/// Runs `top`: prints one table (or one per interval with `--watch`).
pub async fn run(args: TopArgs) -> anyhow::Result<()> {
    let (pool, _) = crate::pg::connect(&args.database_url, 1)
        .await
        .context("connecting to Postgres")?;
    if !crate::pg::watchdog::can_see_sessions(&pool).await? {
        eprintln!("warning: this login lacks pg_read_all_stats: other roles' sessions show no state (counted idle) and no timings");
    }
    let pgss = us::statements_source(&pool).await?;
    let window = Duration::from_secs(args.interval);
    let cfg = us::Config {
        gateway: (!args.gateway_role.is_empty()).then(|| args.gateway_role.clone()),
        window,
    };
    let mut prev = us::sample(&pool, &cfg, pgss.as_deref(), &[]).await?;
    loop {
        tokio::time::sleep(window).await;
        // Sizes whose files did not change are the last sample's (but a
        // fortieth's, read again, as the sampler does).
        let known = us::known_sizes_for_next(&prev);
        let cur = us::sample(&pool, &cfg, pgss.as_deref(), &known).await?;
        let mut figs = us::figures(Some(&prev), &cur);
        us::sort(&mut figs, args.sort);
        if args.limit > 0 {
            figs.truncate(args.limit);
        }
        print!("{}", us::render_table(&figs));
        if !args.watch {
            if pgss.is_none() {
                eprintln!("note: without pg_stat_statements, STMT-TIME is the running statements' time sampled at the end of the interval");
            }
            return Ok(());
        }
        println!();
        prev = cur;
    }
}
