//! Placement: which shard a tenant lives on.
//!
//! A placed tenant's shard is `status.shard`. A new one goes to the
//! matching Open shard with the fewest tenants (ties by name); the choice is
//! written to `status.shard` (field manager `tenant-operator-placement`)
//! before anything of the tenant is created, so a crash after it finds the
//! tenant where it was put, and a crash before it finds nothing to clean
//! up. Choices are serialized in this process (the leader is the only
//! writer) and remembered until the Tenant cache shows them, so two new
//! tenants never both take a shard's last place. A tenant provisioned
//! before shards existed (a status but no shard, and its registry row or
//! schema in the default database) lives on `default`, which is recorded
//! the first time it is seen. `choose` and `counts` are pure.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use kube::core::{Selector, SelectorExt};
use kube::ResourceExt;
use serde_json::json;

use crate::api::{PlacementSpec, ShardState, Tenant, Text, DEFAULT_SHARD};
use crate::controller::kit;
use crate::controller::shards::ShardConn;
use crate::controller::Context;

/// The field manager of `status.shard`.
pub const FIELD_MANAGER: &str = "tenant-operator-placement";

/// What placement knows of a shard.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub state: ShardState,
    pub max_tenants: Option<u32>,
    pub labels: &'a BTreeMap<String, String>,
}

/// Why a tenant cannot be placed (it waits, phase Pending, until a shard
/// opens or changes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("shard {0:?} is not open (no such Shard, or the operator cannot reach it; see its status)")]
    UnknownShard(String),
    #[error("shard {0:?} is {1:?}: it takes no new tenants")]
    NotOpen(String, ShardState),
    #[error("shard {0:?} is full ({1} tenants, spec.maxTenants)")]
    Full(String, u32),
    #[error("spec.placement.shardSelector is not valid: {0}")]
    BadSelector(String),
    #[error("no Open shard with room matches spec.placement ({0})")]
    NoShard(String),
}

impl PlacementError {
    pub fn reason(&self) -> &'static str {
        match self {
            PlacementError::UnknownShard(_) => "ShardNotFound",
            PlacementError::NotOpen(..) => "ShardNotOpen",
            PlacementError::Full(..) => "ShardFull",
            PlacementError::BadSelector(_) => "InvalidPlacement",
            PlacementError::NoShard(_) => "NoShardAvailable",
        }
    }
}

/// The shard for a new tenant with `placement`, given the open shards and
/// how many tenants each holds. Pure.
pub fn choose(
    placement: &PlacementSpec,
    shards: &[Candidate<'_>],
    counts: &HashMap<String, usize>,
) -> Result<String, PlacementError> {
    let count = |name: &str| counts.get(name).copied().unwrap_or(0);
    let has_room = |c: &Candidate<'_>| c.max_tenants.is_none_or(|m| count(c.name) < m as usize);
    if let Some(wanted) = &placement.shard {
        let c = shards
            .iter()
            .find(|c| c.name == wanted.as_str())
            .ok_or_else(|| PlacementError::UnknownShard(wanted.clone()))?;
        if c.state != ShardState::Open {
            return Err(PlacementError::NotOpen(wanted.clone(), c.state));
        }
        if !has_room(c) {
            return Err(PlacementError::Full(wanted.clone(), c.max_tenants.unwrap_or(0)));
        }
        return Ok(wanted.clone());
    }
    let selector = match &placement.shard_selector {
        Some(s) => Some(Selector::try_from((**s).clone()).map_err(|e| PlacementError::BadSelector(e.to_string()))?),
        None => None,
    };
    let why = match &selector {
        Some(_) => "shardSelector",
        None => "any shard",
    };
    shards
        .iter()
        .filter(|c| c.state == ShardState::Open && has_room(c))
        .filter(|c| selector.as_ref().is_none_or(|s| s.matches(c.labels)))
        .min_by(|a, b| count(a.name).cmp(&count(b.name)).then(a.name.cmp(b.name)))
        .map(|c| c.name.to_string())
        .ok_or_else(|| PlacementError::NoShard(why.into()))
}

/// The shard a Tenant's status records. Pure.
pub fn recorded(t: &Tenant) -> Option<String> {
    t.status.as_ref()?.shard.as_deref().map(String::from)
}

/// The shard a Tenant counts on: its recorded one, or `default` for one
/// whose status shows a provisioned schema but no shard (from before
/// shards). Pure.
fn counted_on(t: &Tenant) -> Option<String> {
    let s = t.status.as_ref()?;
    match (&s.shard, &s.schema, s.phase) {
        (Some(shard), _, _) => Some(shard.to_string()),
        (None, Some(_), Some(crate::api::TenantPhase::Active | crate::api::TenantPhase::Suspended)) => {
            Some(DEFAULT_SHARD.into())
        }
        _ => None,
    }
}

/// Tenants per shard: where this process last put each Tenant (`placed`,
/// by uid: the cache may not show it yet), else its recorded shard. Pure.
pub fn counts(tenants: &[Arc<Tenant>], placed: &HashMap<String, String>) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for t in tenants {
        let shard = t.uid().and_then(|u| placed.get(&u).cloned()).or_else(|| counted_on(t));
        if let Some(shard) = shard {
            *out.entry(shard).or_insert(0) += 1;
        }
    }
    out
}

/// The placements this process made, by tenant uid (until the process
/// ends: a few bytes per tenant), and the lock that serializes choices.
#[derive(Default)]
pub struct Placements {
    placed: std::sync::Mutex<HashMap<String, String>>,
    /// The move fields this process last wrote, by uid (moved tenants only).
    moves: std::sync::Mutex<HashMap<String, MoveFields>>,
    /// Moves running out of each draining shard.
    draining: std::sync::Mutex<HashMap<String, u32>>,
    choosing: tokio::sync::Mutex<()>,
}

impl Placements {
    /// [`counts`] of `tenants` with this process's placements (read in
    /// place, not copied).
    pub fn counts_of(&self, tenants: &[Arc<Tenant>]) -> HashMap<String, usize> {
        counts(tenants, &self.placed.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn get(&self, uid: &str) -> Option<String> {
        self.placed.lock().unwrap_or_else(|p| p.into_inner()).get(uid).cloned()
    }

    fn insert(&self, uid: &str, shard: &str) {
        self.placed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_owned(), shard.to_owned());
    }

    /// A slot for one move out of the draining shard `shard`, when fewer
    /// than `max` are running; the slot is given back when dropped.
    pub fn drain_slot(&self, shard: &str, max: u32) -> Option<DrainSlot<'_>> {
        let mut running = self.draining.lock().unwrap_or_else(|p| p.into_inner());
        let n = running.entry(shard.to_owned()).or_insert(0);
        if *n >= max.max(1) {
            return None;
        }
        *n += 1;
        Some(DrainSlot {
            placements: self,
            shard: shard.to_owned(),
        })
    }

    /// Forgets a tenant that is gone.
    pub fn forget(&self, uid: &str) {
        self.placed.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
        self.moves.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
    }
}

/// One running move out of a draining shard ([`Placements::drain_slot`]).
pub struct DrainSlot<'a> {
    placements: &'a Placements,
    shard: String,
}

impl Drop for DrainSlot<'_> {
    fn drop(&mut self) {
        let mut running = self.placements.draining.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = running.get_mut(&self.shard) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Where a tenant is, for a reconcile.
pub enum Placed {
    /// On this open shard.
    On(Arc<ShardConn>),
    /// Recorded on a shard that is not open now (unreachable, or its
    /// Shard is gone): the reconcile waits.
    Unavailable(String),
    /// Not placed, and cannot be now.
    Waiting(PlacementError),
}

/// The shard of a tenant that exists on one, without placing it: this
/// process's latest write of it, or its recorded shard. None: never placed.
pub fn shard_of(ctx: &Context, t: &Tenant) -> Option<String> {
    // This process's own writes first: a move's commit may not be in the
    // cache yet.
    t.uid().and_then(|u| ctx.placements.get(&u)).or_else(|| recorded(t))
}

/// Why a tenant's shard could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("recording the tenant's shard: {0}")]
    Record(#[source] kube::Error),
    #[error(transparent)]
    Database(#[from] crate::pg::PgError),
}

/// The shard a tenant is on, without placing it: recorded, placed by this
/// process, or (a status but no shard) found in the default database,
/// where tenants lived before shards. None: nothing of it exists anywhere.
pub async fn locate(ctx: &Context, t: &Tenant, uid: &str) -> Result<Option<String>, crate::pg::PgError> {
    if let Some(name) = shard_of(ctx, t) {
        return Ok(Some(name));
    }
    // A tenant without a status was never reconciled: nothing exists.
    if t.status.is_none() {
        return Ok(None);
    }
    let schema = crate::names::TenantName::parse(&t.name_any())
        .map(|n| n.schema())
        .unwrap_or_default();
    let default = ctx.shards.default_shard();
    Ok(crate::pg::registry::holds_tenant(&default.pool, uid, &schema)
        .await?
        .then(|| DEFAULT_SHARD.to_string()))
}

/// The tenant's shard; a new tenant is placed first (the choice written to
/// its status before this returns), and one from before shards gets
/// `default` recorded.
pub async fn resolve(ctx: &Context, t: &Tenant, uid: &str) -> Result<Placed, ResolveError> {
    if let Some(name) = shard_of(ctx, t) {
        return Ok(match ctx.shards.get(&name) {
            Some(conn) => Placed::On(conn),
            None => Placed::Unavailable(name),
        });
    }
    // Choices take turns only when one can take another's room (more than
    // one shard, or a limit); one shard without a limit places at once.
    let contended = {
        let open = ctx.shards.all();
        open.len() > 1 || open.iter().any(|c| c.max_tenants.is_some())
    };
    let _turn = match contended {
        true => Some(ctx.placements.choosing.lock().await),
        false => None,
    };
    if let Some(name) = locate(ctx, t, uid).await? {
        record(ctx, t, uid, &name).await?;
        return Ok(ctx.shards.get(&name).map_or(Placed::Unavailable(name), Placed::On));
    }
    // Placed by a reconcile that held the lock before this one.
    if let Some(name) = ctx.placements.get(uid) {
        return Ok(ctx.shards.get(&name).map_or(Placed::Unavailable(name), Placed::On));
    }
    let open = ctx.shards.all();
    let candidates: Vec<Candidate<'_>> = open
        .iter()
        .map(|c| Candidate {
            name: &c.name,
            state: c.state,
            max_tenants: c.max_tenants,
            labels: &c.labels,
        })
        .collect();
    // Counting every tenant matters only when there is a choice or a
    // limit: with one shard and no limit, nothing is counted (10,000 new
    // tenants would count 10,000 tenants each).
    let counts = if candidates.len() > 1 || candidates.iter().any(|c| c.max_tenants.is_some()) {
        crate::controller::shards::tenants_per_shard(ctx)
    } else {
        HashMap::new()
    };
    let chosen = match choose(&t.spec.placement, &candidates, &counts) {
        Ok(c) => c,
        Err(e) => return Ok(Placed::Waiting(e)),
    };
    record(ctx, t, uid, &chosen).await?;
    tracing::info!(tenant = %t.name_any(), shard = %chosen, "tenant placed");
    kit::event(ctx, t, false, "Placed", format!("placed on shard {chosen}")).await;
    Ok(ctx.shards.get(&chosen).map_or(Placed::Unavailable(chosen), Placed::On))
}

/// Writes `status.shard` (keeping `lastMove`) and remembers it until the
/// cache shows it.
async fn record(ctx: &Context, t: &Tenant, uid: &str, shard: &str) -> Result<(), ResolveError> {
    let state = State {
        shard: shard.to_owned(),
        moving: None,
        last_move: t.status.as_ref().and_then(|s| s.last_move.as_deref().cloned()),
    };
    let writing = ctx.own_writes.writing(t);
    let written = write(ctx, t, uid, &state).await.map_err(ResolveError::Record)?;
    // The reconcile goes on on this shard: the echo brings nothing new.
    if let Some(w) = &written {
        ctx.own_writes.note(w);
    }
    drop(writing);
    Ok(())
}

/// `status.moving` and `status.lastMove` as this process last wrote them.
type MoveFields = (
    Option<crate::api::shard::MoveStatus>,
    Option<crate::api::shard::LastMove>,
);

/// `t` with placement's status fields as this process last wrote them:
/// the cache may not show a write made a moment ago (a reconcile that
/// read the older status would undo it).
pub fn with_latest<'a>(ctx: &Context, t: &'a Tenant) -> std::borrow::Cow<'a, Tenant> {
    let Some(uid) = t.uid() else {
        return std::borrow::Cow::Borrowed(t);
    };
    let moves = ctx
        .placements
        .moves
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&uid)
        .cloned();
    let Some((moving, last_move)) = moves else {
        return std::borrow::Cow::Borrowed(t);
    };
    let mut fresh = t.clone();
    let status = fresh.status.get_or_insert_with(Default::default);
    status.shard = ctx.placements.get(&uid).map(Text::from).or(status.shard.take());
    status.moving = moving.map(Box::new);
    status.last_move = last_move.map(Box::new);
    std::borrow::Cow::Owned(fresh)
}

/// What placement owns in a Tenant's status.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    pub shard: String,
    pub moving: Option<crate::api::shard::MoveStatus>,
    pub last_move: Option<crate::api::shard::LastMove>,
}

/// Writes placement's fields of the status, all of them (a field left out
/// is removed: Server-Side Apply), and remembers the shard until the cache
/// shows it.
pub async fn write(ctx: &Context, t: &Tenant, uid: &str, state: &State) -> Result<Option<Tenant>, kube::Error> {
    let mut body = json!({ "shard": state.shard });
    if let Some(m) = &state.moving {
        body["moving"] = serde_json::to_value(m).map_err(kube::Error::SerdeError)?;
    }
    if let Some(l) = &state.last_move {
        body["lastMove"] = serde_json::to_value(l).map_err(kube::Error::SerdeError)?;
    }
    let written = kit::apply_status::<Tenant>(ctx, &t.name_any(), FIELD_MANAGER, body, false).await?;
    ctx.placements.insert(uid, &state.shard);
    if state.moving.is_some() || state.last_move.is_some() {
        ctx.placements
            .moves
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_owned(), (state.moving.clone(), state.last_move.clone()));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn counts_of(kv: &[(&str, usize)]) -> HashMap<String, usize> {
        kv.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn a_new_tenant_goes_to_the_open_shard_with_the_fewest_tenants_ties_by_name() {
        let eu = labels(&[("region", "eu")]);
        let us = labels(&[("region", "us")]);
        let shards = [
            Candidate {
                name: "default",
                state: ShardState::Open,
                max_tenants: None,
                labels: &eu,
            },
            Candidate {
                name: "b",
                state: ShardState::Open,
                max_tenants: None,
                labels: &us,
            },
            Candidate {
                name: "a",
                state: ShardState::Open,
                max_tenants: None,
                labels: &us,
            },
        ];
        let any = PlacementSpec::default();
        assert_eq!(
            choose(&any, &shards, &counts_of(&[("default", 3), ("a", 1), ("b", 0)])).unwrap(),
            "b"
        );
        assert_eq!(
            choose(&any, &shards, &counts_of(&[("default", 1), ("a", 1), ("b", 1)])).unwrap(),
            "a"
        );
        assert_eq!(choose(&any, &shards, &HashMap::new()).unwrap(), "a");
    }

    #[test]
    fn closed_draining_and_full_shards_take_no_new_tenant() {
        let none = BTreeMap::new();
        let shards = [
            Candidate {
                name: "closed",
                state: ShardState::Closed,
                max_tenants: None,
                labels: &none,
            },
            Candidate {
                name: "draining",
                state: ShardState::Draining,
                max_tenants: None,
                labels: &none,
            },
            Candidate {
                name: "full",
                state: ShardState::Open,
                max_tenants: Some(2),
                labels: &none,
            },
            Candidate {
                name: "open",
                state: ShardState::Open,
                max_tenants: Some(3),
                labels: &none,
            },
        ];
        let c = counts_of(&[("full", 2), ("open", 2)]);
        assert_eq!(choose(&PlacementSpec::default(), &shards, &c).unwrap(), "open");
        let c = counts_of(&[("full", 2), ("open", 3)]);
        assert_eq!(
            choose(&PlacementSpec::default(), &shards, &c).unwrap_err().reason(),
            "NoShardAvailable"
        );
        let named = |n: &str| PlacementSpec {
            shard: Some(n.into()),
            shard_selector: None,
        };
        assert_eq!(
            choose(&named("closed"), &shards, &c).unwrap_err().reason(),
            "ShardNotOpen"
        );
        assert_eq!(
            choose(&named("draining"), &shards, &c).unwrap_err().reason(),
            "ShardNotOpen"
        );
        assert_eq!(
            choose(&named("full"), &shards, &c).unwrap_err(),
            PlacementError::Full("full".into(), 2)
        );
        assert_eq!(
            choose(&named("nowhere"), &shards, &c).unwrap_err().reason(),
            "ShardNotFound"
        );
        assert_eq!(
            choose(&named("open"), &shards, &counts_of(&[("open", 2)])).unwrap(),
            "open"
        );
    }

    #[test]
    fn a_selector_limits_the_candidates() {
        let eu = labels(&[("region", "eu"), ("tier", "gold")]);
        let us = labels(&[("region", "us")]);
        let shards = [
            Candidate {
                name: "eu-1",
                state: ShardState::Open,
                max_tenants: None,
                labels: &eu,
            },
            Candidate {
                name: "us-1",
                state: ShardState::Open,
                max_tenants: None,
                labels: &us,
            },
        ];
        let by_labels = |m: &[(&str, &str)]| PlacementSpec {
            shard: None,
            shard_selector: Some(Box::new(LabelSelector {
                match_labels: Some(labels(m)),
                match_expressions: None,
            })),
        };
        let c = counts_of(&[("eu-1", 10)]);
        assert_eq!(choose(&by_labels(&[("region", "eu")]), &shards, &c).unwrap(), "eu-1");
        assert_eq!(choose(&by_labels(&[("region", "us")]), &shards, &c).unwrap(), "us-1");
        assert_eq!(
            choose(&by_labels(&[("region", "ap")]), &shards, &c)
                .unwrap_err()
                .reason(),
            "NoShardAvailable"
        );
        let expr = PlacementSpec {
            shard: None,
            shard_selector: Some(Box::new(LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "Exists".into(),
                    values: None,
                }]),
            })),
        };
        assert_eq!(choose(&expr, &shards, &c).unwrap(), "eu-1");
        let bad = PlacementSpec {
            shard: None,
            shard_selector: Some(Box::new(LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "Sometimes".into(),
                    values: None,
                }]),
            })),
        };
        assert_eq!(choose(&bad, &shards, &c).unwrap_err().reason(), "InvalidPlacement");
    }

    #[test]
    fn counts_take_this_process_placements_then_the_status_and_legacy_tenants_are_on_default() {
        let tenant = |name: &str, uid: &str, shard: Option<&str>, schema: bool| {
            let mut t = Tenant::new(name, serde_json::from_value(serde_json::json!({})).unwrap());
            t.metadata.uid = Some(uid.into());
            if shard.is_some() || schema {
                t.status = Some(crate::api::TenantStatus {
                    shard: shard.map(Text::from),
                    schema: schema.then(|| format!("tenant_{name}")),
                    phase: Some(crate::api::TenantPhase::Active),
                    ..Default::default()
                });
            }
            Arc::new(t)
        };
        let tenants = [
            tenant("a", "u-a", Some("s1"), true),
            tenant("b", "u-b", None, true),
            tenant("c", "u-c", None, false),
            tenant("d", "u-d", None, false),
            // Moved by this process to s2; the cache still shows s1.
            tenant("e", "u-e", Some("s1"), true),
        ];
        let placed: HashMap<String, String> = [
            ("u-c".to_string(), "s1".to_string()),
            ("u-e".to_string(), "s2".to_string()),
        ]
        .into();
        let c = counts(&tenants, &placed);
        assert_eq!(c.get("s1"), Some(&2), "a (status) and c (placed, not in the cache yet)");
        assert_eq!(
            c.get("s2"),
            Some(&1),
            "e where this process put it, not where the cache says"
        );
        assert_eq!(c.get("default"), Some(&1));
        assert_eq!(c.values().sum::<usize>(), 4, "d is not placed yet");
        assert_eq!(
            recorded(&tenants[1]),
            None,
            "from before shards: found in the database, then recorded"
        );
        assert_eq!(recorded(&tenants[0]).as_deref(), Some("s1"));
    }
}
