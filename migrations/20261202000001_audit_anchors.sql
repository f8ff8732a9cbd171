-- The tenants' audit chains, anchored outside their schemas (docs/audit.md,
-- "Anchors"). Runs with search_path = tenancy.
--
-- audit_heads: each tenant's chain head as of its last commit, moved by the
-- tenant's commit-time trigger through its anchor function
-- (tenancy_audit.<schema>(bigint, bytea), SECURITY DEFINER, owned by the
-- anchor role), which only moves it forward. The operator resets it after a
-- restore. cut_id/cut_hash: the last retention cut the operator recorded
-- (the only ANCHOR row the chain may start from is at or before it);
-- pruned_at: when the operator last pruned.
CREATE TABLE IF NOT EXISTS tenancy.audit_heads (
    tenant_uid text PRIMARY KEY,
    last_id    bigint NOT NULL,
    hash       bytea NOT NULL,
    moved_at   timestamptz NOT NULL DEFAULT now(),
    cut_id     bigint,
    cut_hash   bytea,
    pruned_at  timestamptz
);

-- audit_anchors: what the operator vouched for, keyed: mac =
-- HMAC-SHA256(the tenant's `audit` key under root key key_version, the
-- canonical encoding of (uid, seq, last_id, hash, anchored_at, key_version,
-- prev_mac)) (src/pg/audit.rs, anchor_message). The key never enters the
-- database. prev_mac links each anchor to the one before (NULL for the
-- first, or the first after a restore).
CREATE TABLE IF NOT EXISTS tenancy.audit_anchors (
    tenant_uid  text NOT NULL,
    seq         bigint NOT NULL,
    last_id     bigint NOT NULL,
    hash        bytea NOT NULL,
    anchored_at timestamptz NOT NULL,
    key_version integer NOT NULL,
    prev_mac    bytea,
    mac         bytea NOT NULL,
    PRIMARY KEY (tenant_uid, seq)
);
