//! The periodic sealing and anchoring of the tenants' audit chains
//! (docs/audit.md, "Sealing" and "Anchors"), while this instance leads:
//! every `--audit-seal-seconds`, and before each anchoring, a pass seals
//! the entries no commit sealed, for every tenant whose pending table holds
//! some ([`crate::pg::audit::seal_pending`]); every
//! `--audit-anchor-seconds` a pass then writes an HMAC'd anchor for every
//! tenant whose chain head moved since its last anchor
//! ([`crate::pg::audit::anchor_heads`]).
//!
//! Takes the context (every open shard's admin pool, root keys,
//! intervals); side effects: each such tenant's seal on its confined
//! session, rows in `tenancy.audit_anchors`. Never returns.

use std::sync::Arc;

use super::Context;

pub async fn run(ctx: Arc<Context>) {
    let mut anchor_tick = tokio::time::interval(ctx.settings.audit_anchor_interval);
    anchor_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seal_tick = tokio::time::interval(ctx.settings.audit_seal_interval);
    seal_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let anchor = tokio::select! {
            _ = anchor_tick.tick() => true,
            _ = seal_tick.tick() => false,
        };
        let Some(ring) = ctx.keys.current() else {
            tracing::warn!("audit sealing and anchoring skipped: the root keys are not loaded");
            continue;
        };
        // Shard by shard: one that fails does not hold up the others.
        for shard in ctx.shards.all() {
            // What no commit sealed first, so the anchors cover it.
            match crate::pg::audit::seal_pending(&shard.pool, &ring).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(shard = %shard.name, entries = n, "audit sealing: sealed the entries no commit sealed")
                }
                Err(e) => {
                    tracing::warn!(shard = %shard.name, error = %e, "audit sealing failed; retrying at the next pass")
                }
            }
            if !anchor {
                continue;
            }
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
