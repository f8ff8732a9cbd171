//! The per-tenant audit log: an append-only, hash-chained `_tenancy_audit`
//! table in each tenant schema, fed by triggers on every tenant table, its
//! head anchored outside the schema under a key only the operator holds,
//! and read auditing through pgaudit (docs/audit.md).
//!
//! Takes a validated [`TenantName`] (schema and role identifiers come only
//! from it; table names come from the catalog and are quoted), the tenant's
//! uid and the root keys; gives the observed audit state, the statements
//! that converge it, anchoring, chain verification, export and pruning.
//!
//! Who runs what: the admin pool reads catalogs and `tenancy.*` and writes
//! `tenancy.*` (heads, anchors), the anchor functions in schema
//! `tenancy_audit` and `ALTER ROLE <app> SET pgaudit.log`. Everything that
//! reads or writes a relation in the tenant schema, and the audit DDL there,
//! runs on a confined session ([`super::confined`]: session user
//! `tenant_<x>_ops`, acting as the tenant's owner), opened only when there
//! is something to do, so nothing the owner wrote (a trigger, an RLS policy,
//! a view in place of a table) ever runs as the admin.
//!
//! The chain: every audit row carries `prev_hash` and `hash =
//! sha256(prev_hash || content)`, content being [`content_sql`] of the row
//! (a JSON array text of its fields). The first row's `prev_hash` is 32
//! zero bytes. The triggers append without a lock, to
//! `_tenancy_audit_pending`; at commit, once per transaction (a deferred
//! constraint trigger queued by its first entry), the transaction seals
//! every pending entry it can see into `_tenancy_audit` in order, under the
//! head row's lock, taken with SKIP LOCKED (a writer never waits for
//! another's commit: what a seal under way cannot see, the next one seals,
//! or the operator's pass, [`seal_pending`]). The seal sets
//! `_tenancy_audit_head` to the last row's id and hash (so deleting the
//! last entries is found too) and moves the tenant's head in
//! `tenancy.audit_heads` through its anchor function (forward only); the
//! operator periodically writes an HMAC'd anchor of each head that moved
//! (`tenancy.audit_anchors`), so rewriting the chain before the latest
//! anchor is found by [`verify`] even when every hash is recomputed.
//!
//! The module, by concern (each file's doc says what it takes, gives and
//! does): [`consts`] (names shared by all, a leaf), [`content`] (the bytes a
//! row's hash covers), `functions` with `sql/*.sql` (the PL/pgSQL),
//! [`plan`] (states, actions, their SQL; pure), [`observe`] (reading the
//! catalogs, the light in-transaction check), [`converge`] (the reconcile's
//! and the migration's audit step), `session` (registry look-ups and the
//! confined session the effectful parts share), [`retention`] (prune), `seal` (sealing what no commit sealed),
//! [`chain`] (the walk; pure), [`anchor`] (HMAC'd heads), [`verify`],
//! [`export`], [`restore`] (rebase after restore, forget on delete).
//! Imports only go down that list's dependencies (consts and content are
//! leaves; no file imports this one); callers use the re-exports below.

mod anchor;
mod chain;
mod consts;
mod content;
mod converge;
mod export;
mod functions;
mod observe;
mod plan;
mod restore;
mod retention;
mod seal;
mod session;
mod verify;

#[cfg(test)]
mod sql_fingerprint;
#[cfg(test)]
mod tests;

pub use anchor::{anchor_heads, anchor_message, check_anchors, make_anchor, prepare_anchoring, AnchorRow};
pub use chain::{Anchored, ChainBreak, ChainRow, Checkpoint, VerifyReport, Walker};
pub use consts::{
    AuditFns, ANCHOR_DOMAIN, ANCHOR_ROLE_PREFIX, ANCHOR_SCHEMA, AUDIT_TABLE, CHUNK_ROWS, GENESIS, HEAD_TABLE,
    PENDING_TABLE, PGAUDIT_CLASSES, TABLE_TRIGGERS,
};
pub use content::{content_sql, epoch_text, header_sql, tail_sql, Content};
pub use converge::{converge, converge_keeping, record_exclusion, statements_in_tx, AuditOutcome};
pub use export::{export, AuditRecord};
pub use functions::anchor_function_body;
pub use observe::{audit_state, observe, observe_anchor, observe_in_tx, observe_pgaudit, CatalogFact};
pub use plan::{
    plan, plan_anchor, read_auditing, render, AnchorState, AuditAction, AuditState, PgauditState, ReadAuditing,
};
pub use restore::{forget_tenant, leftovers, rebase_after_restore, RebaseOutcome};
pub use retention::{prune, prune_due, PruneOutcome};
pub use seal::{seal_pending, tenants_with_pending};
pub use verify::{epoch_from_row, time_columns_sql, verify, SPLIT_WALK_ROWS};
