//! Several shards: one [`Gateway`] per shard, each tenant routed to the
//! shard that serves it, following a move without a restart.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use sqlx::{Postgres, Transaction};

use crate::{Error, Gateway};

/// A tenant found Not Active on its shard looks on the others again at
/// most this often (a suspended tenant costs one extra round trip a
/// second, not one per request).
const NOT_ACTIVE_RECHECK: Duration = Duration::from_secs(1);

/// Every shard's gateway (tenant-operator's Shards: the gateway login is
/// the same on each, with the same password), and where each tenant was
/// last served. [`ShardedGateway::begin`] tries the tenant's shard; when
/// that shard no longer has the tenant (moved away: the app role is gone
/// there, or it is not Active there during the move), the other shards are
/// tried and the one that serves it is remembered.
#[derive(Debug)]
pub struct ShardedGateway {
    shards: Vec<(String, Gateway)>,
    routes: RwLock<HashMap<String, Route>>,
}

#[derive(Clone, Copy, Debug)]
struct Route {
    shard: usize,
    /// When the tenant was last refused as not active there and the other
    /// shards were looked at.
    rechecked: Option<Instant>,
}

impl ShardedGateway {
    /// `shards`: (shard name, its gateway), e.g. `("default", ...)`,
    /// `("eu-2", ...)`.
    pub fn new(shards: Vec<(String, Gateway)>) -> Self {
        Self {
            shards,
            routes: RwLock::new(HashMap::new()),
        }
    }

    /// The shard that served `tenant` last, if any.
    pub fn shard_of(&self, tenant: &str) -> Option<&str> {
        let i = self.routes.read().expect("routes lock").get(tenant)?.shard;
        self.shards.get(i).map(|(n, _)| n.as_str())
    }

    /// [`Gateway::begin`] on the tenant's shard (found on first use, and
    /// again when it moved).
    pub async fn begin(
        &self,
        tenant: &str,
        actor: &str,
        request_id: &str,
    ) -> Result<Transaction<'static, Postgres>, Error> {
        let route = self.routes.read().expect("routes lock").get(tenant).copied();
        let first = match route {
            Some(r) => match self.shards[r.shard].1.begin(tenant, actor, request_id).await {
                Ok(tx) => return Ok(tx),
                // Gone from there: look everywhere.
                Err(Error::UnknownTenant(_)) => None,
                // Not active there: suspended, or moving away. Look at the
                // others, at most once a second.
                Err(Error::TenantNotActive(t)) => {
                    if r.rechecked.is_some_and(|at| at.elapsed() < NOT_ACTIVE_RECHECK) {
                        return Err(Error::TenantNotActive(t));
                    }
                    self.remember(tenant, r.shard, Some(Instant::now()));
                    Some((r.shard, Error::TenantNotActive(t)))
                }
                Err(e) => return Err(e),
            },
            None => None,
        };
        // The other shards, in order; the tenant's own last.
        let skip = first.as_ref().map(|(i, _)| *i);
        let mut not_active = None;
        for (i, (_, gw)) in self.shards.iter().enumerate().filter(|(i, _)| Some(*i) != skip) {
            match gw.begin(tenant, actor, request_id).await {
                Ok(tx) => {
                    self.remember(tenant, i, None);
                    return Ok(tx);
                }
                Err(Error::UnknownTenant(_)) => {}
                Err(Error::TenantNotActive(t)) => {
                    not_active.get_or_insert((i, t));
                }
                Err(e) => return Err(e),
            }
        }
        match (first, not_active) {
            (Some((_, e)), _) => Err(e),
            (None, Some((i, t))) => {
                self.remember(tenant, i, Some(Instant::now()));
                Err(Error::TenantNotActive(t))
            }
            (None, None) => Err(Error::UnknownTenant(tenant.to_owned())),
        }
    }

    fn remember(&self, tenant: &str, shard: usize, rechecked: Option<Instant>) {
        self.routes
            .write()
            .expect("routes lock")
            .insert(tenant.to_owned(), Route { shard, rechecked });
    }
}
