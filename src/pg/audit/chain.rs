//! The chain walk: [`Walker`] checks rows in id order (each `prev_hash` the
//! hash before it, each hash `sha256(prev_hash || content)`), the in-schema
//! head, an ANCHOR row at the start (confirmed by a PRUNE entry, at or
//! before the recorded cut) and every [`Checkpoint`] recorded outside the
//! schema; it reports the first break ([`VerifyReport`]).
//!
//! Takes [`ChainRow`]s and what was anchored ([`Anchored`]); gives the
//! report. Pure.

use sha2::{Digest, Sha256};

use super::consts::GENESIS;

/// Where the chain breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainBreak {
    /// The audit row where the break is found.
    pub id: i64,
    pub what: String,
}

/// The outcome of walking a tenant's chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub rows: u64,
    /// The ANCHOR row the walk started from, after a prune.
    pub anchor: Option<i64>,
    /// The hash of the last row (hex).
    pub head: String,
    /// Anchors (`tenancy.audit_anchors`) whose MAC verified and whose row
    /// the walk reached with the anchored hash.
    pub anchors_checked: u64,
    /// Anchors that could not be checked: before the retention cut, or made
    /// under a root key version no longer in the keyring.
    pub anchors_skipped: u64,
    pub first_break: Option<ChainBreak>,
    /// How many sessions read the chain (two share one snapshot for a long
    /// chain: `verify::SPLIT_WALK_ROWS`).
    pub sessions: u8,
}

/// One row as the walk sees it.
#[derive(Clone, Debug)]
pub struct ChainRow {
    pub id: i64,
    pub operation: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
    pub content: Vec<u8>,
    pub row_pk: Option<serde_json::Value>,
}

/// A point the walk must pass through: the hash of the chain at row `id`
/// (0: the empty chain, hash [`GENESIS`]), as recorded outside the tenant
/// schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub id: i64,
    pub hash: Vec<u8>,
    /// What recorded it, for the message ("anchor #3 of ...").
    pub what: String,
    /// An anchor (counted in the report) rather than the head or the cut.
    pub is_anchor: bool,
}

/// What the operator recorded outside the tenant schema, for the walk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Anchored {
    /// Checkpoints (the anchored head read before the walk, the verified
    /// anchors, the retention cut), in any order.
    pub checkpoints: Vec<Checkpoint>,
    /// The last retention cut the operator recorded (row id, hash): the
    /// only ANCHOR row the chain may start from is at or before it.
    pub cut: Option<(i64, Vec<u8>)>,
    /// The anchored head's row read after the walk's snapshot: a row of the
    /// snapshot beyond it was appended without moving it.
    pub head_after: Option<i64>,
}

/// The walk itself, over rows in id order, then the head. Pure.
pub struct Walker {
    expected: Vec<u8>,
    rows: u64,
    anchor: Option<(i64, Vec<u8>)>,
    anchor_confirmed: bool,
    last_id: i64,
    first_break: Option<ChainBreak>,
    /// The head row: the last entry as of the last commit (its id and
    /// hash); whether that row was seen; the first row after it.
    head: Option<(i64, Vec<u8>)>,
    head_seen: bool,
    after_head: Option<i64>,
    /// The anchoring, when checked: checkpoints sorted by id (the next one
    /// to reach first), how many were passed or skipped.
    anchored: Option<Anchored>,
    next_checkpoint: usize,
    anchors_checked: u64,
    anchors_skipped: u64,
}

impl Walker {
    /// A walk that ends by checking the head row's (last id, hash).
    pub fn new(head: Option<(i64, Vec<u8>)>) -> Self {
        Walker {
            expected: GENESIS.to_vec(),
            rows: 0,
            anchor: None,
            anchor_confirmed: false,
            last_id: 0,
            first_break: None,
            head,
            head_seen: false,
            after_head: None,
            anchored: None,
            next_checkpoint: 0,
            anchors_checked: 0,
            anchors_skipped: 0,
        }
    }

    /// A walk that also checks what the operator anchored outside the
    /// schema: every checkpoint must be passed with its hash, an ANCHOR row
    /// must be at or before the recorded cut, and no row may lie beyond the
    /// anchored head.
    pub fn with_anchors(head: Option<(i64, Vec<u8>)>, mut anchored: Anchored) -> Self {
        anchored.checkpoints.sort_by_key(|c| c.id);
        Walker {
            anchored: Some(anchored),
            ..Walker::new(head)
        }
    }

    /// Records a break found outside the walk (an anchor that does not
    /// verify); the walk then stops at once.
    pub fn broken(&mut self, b: ChainBreak) {
        self.broke(b.id, b.what);
    }

    /// Passes the checkpoints up to row `r` (all of them at the end, None).
    /// `start`: the chain's first row is an ANCHOR at this id: checkpoints
    /// before it were pruned away.
    fn pass_checkpoints(&mut self, r: Option<&ChainRow>) {
        let Some(anchored) = &self.anchored else { return };
        let start = self.anchor.as_ref().map(|a| a.0);
        let mut found: Option<ChainBreak> = None;
        let (mut checked, mut skipped) = (0, 0);
        let mut i = self.next_checkpoint;
        while let Some(c) = anchored.checkpoints.get(i) {
            if r.is_some_and(|r| c.id > r.id) {
                break;
            }
            i += 1;
            if start.is_some_and(|s| c.id < s) {
                skipped += u64::from(c.is_anchor);
                continue;
            }
            let ok = match r {
                Some(r) if r.id == c.id => r.hash == c.hash,
                _ if c.id == 0 && start.is_none() => c.hash == GENESIS,
                _ => false,
            };
            if ok {
                checked += u64::from(c.is_anchor);
                continue;
            }
            let what = match r {
                Some(r) if r.id == c.id => format!(
                    "{} records hash {} for row {} but the chain has {}: rows up to it were edited, inserted, deleted or re-chained",
                    c.what,
                    short(&c.hash),
                    c.id,
                    short(&r.hash)
                ),
                _ if c.id == 0 => format!("{} records the empty chain, but its hash is not the genesis", c.what),
                Some(r) => format!("{} names row {} but there is no such row (the next is {}): rows were deleted", c.what, c.id, r.id),
                None => format!("{} names row {} but the chain ends at row {}: rows at the end were deleted, or the chain was set back", c.what, c.id, self.last_id),
            };
            found = Some(ChainBreak { id: c.id, what });
            break;
        }
        self.next_checkpoint = i;
        self.anchors_checked += checked;
        self.anchors_skipped += skipped;
        if let Some(b) = found {
            self.broke(b.id, b.what);
        }
    }

    fn see(&mut self, r: &ChainRow) {
        if let Some((id, hash)) = &self.head {
            if r.id > *id && self.after_head.is_none() {
                self.after_head = Some(r.id);
            }
            if *id == r.id {
                self.head_seen = true;
                if *hash != r.hash {
                    let what = format!("the chain head records hash {} for row {id} but the row has {}: the head or the row was edited", short(hash), short(&r.hash));
                    self.broke(r.id, what);
                }
            }
        }
        if self.first_break.is_some() {
            return;
        }
        self.pass_checkpoints(Some(r));
        if let Some(after) = self.anchored.as_ref().and_then(|a| a.head_after) {
            if r.id > after && self.first_break.is_none() {
                self.broke(
                    r.id,
                    format!("row {} comes after the anchored head (row {after} in tenancy.audit_heads): appended without the commit-time head update (the trigger was off), or the head was set back", r.id),
                );
            }
        }
    }

    fn broke(&mut self, id: i64, what: String) {
        if self.first_break.is_none() {
            self.first_break = Some(ChainBreak { id, what });
        }
    }

    /// Checks one row; stops checking after the first break.
    pub fn push(&mut self, r: &ChainRow) {
        if self.first_break.is_some() {
            return;
        }
        let first = self.rows == 0;
        self.rows += 1;
        self.last_id = r.id;
        if r.operation == "ANCHOR" {
            if !first {
                return self.broke(
                    r.id,
                    "an ANCHOR row in the middle of the chain (only a prune's cut, at the start, may hold one)".into(),
                );
            }
            if r.prev_hash != r.hash {
                return self.broke(
                    r.id,
                    "the ANCHOR row's prev_hash and hash differ (both must be the hash at the cut)".into(),
                );
            }
            if let Some(anchored) = &self.anchored {
                match &anchored.cut {
                    None => {
                        return self.broke(r.id, "the chain starts at an ANCHOR row, but the operator recorded no retention cut: rows before it were removed".into())
                    }
                    Some((cut, _)) if r.id > *cut => {
                        let cut = *cut;
                        return self.broke(
                            r.id,
                            format!("the chain starts at an ANCHOR row (row {}) after the operator's last retention cut (row {cut}): rows were removed", r.id),
                        );
                    }
                    _ => {}
                }
            }
            self.anchor = Some((r.id, r.hash.clone()));
            self.expected = r.hash.clone();
            return self.see(r);
        }
        if r.prev_hash != self.expected {
            return self.broke(
                r.id,
                format!(
                    "prev_hash {} is not the hash of the row before it ({}): a row was deleted, inserted or reordered",
                    short(&r.prev_hash),
                    short(&self.expected)
                ),
            );
        }
        let mut h = Sha256::new();
        h.update(&r.prev_hash);
        h.update(&r.content);
        let computed = h.finalize().to_vec();
        if computed != r.hash {
            return self.broke(
                r.id,
                format!(
                    "the row's content does not match its hash (stored {}, content gives {}): the row was edited",
                    short(&r.hash),
                    short(&computed)
                ),
            );
        }
        if r.operation == "PRUNE" {
            if let (Some((aid, ahash)), Some(pk)) = (&self.anchor, &r.row_pk) {
                let through = pk.get("through_id").and_then(|v| v.as_i64());
                let cut = pk.get("cut_hash").and_then(|v| v.as_str());
                if through == Some(*aid) && cut == Some(hex::encode(ahash).as_str()) {
                    self.anchor_confirmed = true;
                }
            }
        }
        if first {
            // The empty chain's checkpoints (row 0) come before the first row.
            self.pass_zero();
        }
        self.expected = r.hash.clone();
        self.see(r);
    }

    /// Checkpoints at row 0 (the empty chain), before a chain that starts
    /// at the genesis.
    fn pass_zero(&mut self) {
        let zero = ChainRow {
            id: 0,
            operation: String::new(),
            prev_hash: Vec::new(),
            hash: GENESIS.to_vec(),
            content: Vec::new(),
            row_pk: None,
        };
        self.pass_checkpoints(Some(&zero));
    }

    /// Ends the walk: the anchor must be confirmed and the head's row seen.
    pub fn finish(mut self) -> VerifyReport {
        if self.first_break.is_none() {
            if let Some((aid, _)) = &self.anchor {
                if !self.anchor_confirmed {
                    let aid = *aid;
                    self.broke(aid, "the ANCHOR row is not confirmed by a PRUNE row in the chain (through_id and cut_hash): rows before it may have been removed".into());
                }
            }
        }
        if self.first_break.is_none() {
            match (self.head.clone(), self.after_head) {
                (Some((0, hash)), _) if hash != GENESIS => self.broke(0, "the chain head was edited (it records a start at row 0 with a hash that is not the genesis)".into()),
                (Some((id, _)), _) if id > 0 && !self.head_seen => self.broke(
                    id,
                    format!("the chain head names row {id} (the last entry at the last commit) but there is no such row: rows at the end were deleted"),
                ),
                (Some((id, _)), Some(after)) => {
                    self.broke(after, format!("row {after} comes after the chain head (row {id}): appended without the commit-time head update, or the head was set back"))
                }
                (None, _) if self.rows > 0 => self.broke(self.last_id, "the chain head row is missing".into()),
                _ => {}
            }
        }
        if self.first_break.is_none() {
            if self.rows == 0 {
                self.pass_zero();
            }
            self.pass_checkpoints(None);
        }
        VerifyReport {
            rows: self.rows,
            anchor: self.anchor.map(|a| a.0),
            head: hex::encode(&self.expected),
            anchors_checked: self.anchors_checked,
            anchors_skipped: self.anchors_skipped,
            first_break: self.first_break,
            sessions: 1,
        }
    }
}

fn short(h: &[u8]) -> String {
    let s = hex::encode(h);
    s[..s.len().min(16)].to_string()
}
