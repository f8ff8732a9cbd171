//! The names and numbers the audit log's pieces share: its tables,
//! functions and triggers in each tenant schema, the anchor schema and
//! role, the chunking of large statements, the genesis hash.
//!
//! Takes nothing (a tenant's name for [`AuditFns`]), gives constants; a
//! leaf (imports nothing of the audit module). No side effects.

use crate::names::TenantName;

/// The audit table in every tenant schema.
pub const AUDIT_TABLE: &str = "_tenancy_audit";

/// Its one-row chain head (last id, last hash, last prune).
pub const HEAD_TABLE: &str = "_tenancy_audit_head";

/// Entries appended but not yet sealed into the chain: the triggers write
/// here without any lock; the commit-time seal (or the operator's pass)
/// moves them into [`AUDIT_TABLE`] in order, hashing them onto the chain.
pub const PENDING_TABLE: &str = "_tenancy_audit_pending";

/// The index the seal reads [`PENDING_TABLE`] through: (xid, pid), from
/// the last seal's floor.
pub const PENDING_XID_INDEX: &str = "_tenancy_audit_pending_xid";

/// The transaction-local setting the seal sets while it deletes what it
/// sealed from [`PENDING_TABLE`] (the guard lets only that delete through).
pub(super) const SEAL_SETTING: &str = "tenancy.audit_seal";

/// The seal delay in milliseconds (a role's or session's setting; unset or
/// 0: every commit seals): a transaction starting within it of the
/// tenant's last seal leaves its entries to a later seal.
pub const SEAL_DELAY_SETTING: &str = "tenancy.audit_seal_delay_ms";

/// The audit functions' base names; each tenant's are these with its name
/// appended ([`AuditFns`]). Until 2026-12-03 they were the functions' names
/// in every schema.
pub(super) const TRIGGER_FN: &str = "_tenancy_audit_trigger";

pub(super) const WRITE_FN: &str = "_tenancy_audit_write";

pub(super) const GUARD_FN: &str = "_tenancy_audit_guard";

pub(super) const TAIL_FN: &str = "_tenancy_audit_tail";

pub(super) const SEAL_FN: &str = "_tenancy_audit_seal";

/// The audit functions as an earlier version named them, the same in every
/// tenant schema; a reconcile drops them once the triggers call the
/// tenant's own.
pub(super) const LEGACY_FUNCTIONS: [&str; 4] = [WRITE_FN, TRIGGER_FN, GUARD_FN, TAIL_FN];

/// The names of one tenant's audit functions: each base name, `_`, and the
/// tenant's name with dashes as underscores (`_tenancy_audit_trigger_acme`),
/// so no two tenants' functions share a name. PostgreSQL resolves a
/// function named in DDL (`CREATE TRIGGER ... EXECUTE FUNCTION`,
/// `REVOKE ... ON FUNCTION`, `DROP FUNCTION`), even schema-qualified,
/// through a cached list of every function of that name in every schema,
/// dropped at any change to `pg_proc` and rebuilt with each function's
/// source read out of TOAST; with one name in every schema, each tenant's
/// provisioning and each migration's new backend paid for all tenants'
/// functions (40% of the server's CPU in a 10,000-tenant burst,
/// docs/scale.md). At most 23 + 40 characters (`NAME_MAX_LEN`): within
/// PostgreSQL's 63.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditFns {
    pub write: String,
    pub trigger: String,
    pub guard: String,
    pub tail: String,
    /// Seals the pending entries into the chain (`p_wait boolean`): called
    /// by the tail at commit, and by the operator.
    pub seal: String,
    /// The transaction-local setting that marks the transaction's seal as
    /// queued (its first entry's): one seal per transaction.
    pub queued: String,
}

impl AuditFns {
    pub fn of(name: &TenantName) -> Self {
        let own = |base: &str| format!("{base}_{}", name.as_str().replace('-', "_"));
        Self {
            write: own(WRITE_FN),
            trigger: own(TRIGGER_FN),
            guard: own(GUARD_FN),
            tail: own(TAIL_FN),
            seal: own(SEAL_FN),
            queued: format!("tenancy.audit_queued_{}", name.as_str().replace('-', "_")),
        }
    }
}

pub(super) const GUARD_TRIGGER: &str = "_tenancy_audit_guard";

/// The deferred (commit-time) trigger on [`PENDING_TABLE`] that seals the
/// transaction's entries (and any others committed before) into the chain.
pub(super) const TAIL_TRIGGER: &str = "_tenancy_audit_tail";

/// The triggers on each tenant table: INSERT, UPDATE and DELETE
/// statement-level with transition tables (one append per statement,
/// however many rows), TRUNCATE.
pub const TABLE_TRIGGERS: [&str; 4] = [
    "_tenancy_audit_ins",
    "_tenancy_audit_update",
    "_tenancy_audit_del",
    "_tenancy_audit_trunc",
];

/// Table triggers of earlier versions, dropped when a table's triggers are
/// replaced: the per-row UPDATE trigger (one append per updated row, before
/// 2026-12).
pub(super) const LEGACY_TABLE_TRIGGERS: [&str; 1] = ["_tenancy_audit_upd"];

/// Keys per audit entry of an INSERT or DELETE statement: a statement of
/// 100,000 rows appends 10 entries, each a JSON array of 10,000 keys
/// (bounded, far below jsonb's 255 MB limit).
pub const CHUNK_ROWS: usize = 10_000;

/// Below this many rows, a statement's keys (and an UPDATE's changed
/// columns) are read and its entry appended by one statement planned once
/// per session; a larger one is read with a query planned for it.
pub(super) const SMALL_STATEMENT: usize = 64;

/// The `prev_hash` of the first row.
pub const GENESIS: [u8; 32] = [0; 32];

/// What the operator asks pgaudit to log for each tenant's app role.
pub const PGAUDIT_CLASSES: &str = "read, write";

/// The `search_path` of the audit functions: only the catalog, so no object
/// a tenant creates can stand in for a built-in.
pub(super) const FN_SEARCH_PATH: &str = "search_path=pg_catalog, pg_temp";

/// The schema of the per-tenant anchor functions (one per tenant, named
/// like the tenant's schema), owned by the admin; each tenant's owner may
/// use it (to call its own function) and nothing else.
pub const ANCHOR_SCHEMA: &str = "tenancy_audit";

/// The anchor role is this prefix and the database's oid (roles are
/// cluster-wide, anchor functions per database): NOLOGIN, owns the anchor
/// functions, may write `tenancy.audit_heads` and nothing else.
pub const ANCHOR_ROLE_PREFIX: &str = "tenancy_anchor_";

/// The domain separator of an anchor's MAC input ([`anchor_message`]).
pub const ANCHOR_DOMAIN: &[u8] = b"tenancy.dev/audit-anchor/v1\0";
