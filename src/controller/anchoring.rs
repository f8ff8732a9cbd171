//! The periodic anchoring of the tenants' audit chains (docs/audit.md,
//! "Anchors"): every `--audit-anchor-seconds`, while this instance leads,
//! one pass writes an HMAC'd anchor for every tenant whose chain head moved
//! since its last anchor ([`crate::pg::audit::anchor_heads`]).
//!
//! Takes the context (every open shard's admin pool, root keys, interval); side effects: rows
//! in `tenancy.audit_anchors`. Never returns.

use std::sync::Arc;

use super::Context;

pub async fn run(ctx: Arc<Context>) {
    let mut tick = tokio::time::interval(ctx.settings.audit_anchor_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(ring) = ctx.keys.current() else {
            tracing::warn!("audit anchoring skipped: the root keys are not loaded");
            continue;
        };
        // Shard by shard: one that fails does not hold up the others.
        for shard in ctx.shards.all() {
            match crate::pg::audit::anchor_heads(&shard.pool, &ring, None).await {
                Ok(0) => tracing::debug!(shard = %shard.name, "audit anchoring: no head moved"),
                Ok(n) => {
                    tracing::info!(shard = %shard.name, anchors = n, "audit anchoring: anchored the tenants' moved chain heads")
                }
                Err(e) => {
                    tracing::warn!(shard = %shard.name, error = %e, "audit anchoring failed; retrying at the next pass")
                }
            }
        }
    }
}
