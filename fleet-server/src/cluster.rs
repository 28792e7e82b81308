//! Several replicas of the server against one PostgreSQL and one external broker.
//!
//! Every replica serves the REST API, stores what devices send (the broker spreads the uplink
//! over the replicas through shared subscriptions) and answers chunk requests. Signing
//! directives and driving rollouts is the leader's alone: the replica holding the lease
//! `leader` in the `leases` table.
//!
//! The lease is judged by the database's clock, never a replica's: a replica takes it only
//! once it has expired, and each takeover raises its epoch. A leader renews it every third of
//! its length and considers itself the leader only until its last renewal's start plus the
//! lease, less a margin, by its own monotonic clock: it stops acting before anyone else may
//! start. On top of that, every directive sequence number is taken in a transaction that
//! checks (and on PostgreSQL share-locks) the lease of the leader's epoch, so an old leader
//! cannot number a directive after a takeover even if its clock misled it.
//!
//! A replica that does not lead and is asked for a directive (an operator's assign through
//! its API) records a request; the leader signs and publishes it and closes the request.
//!
//! A single server (no `[cluster] replica`) leads always and checks no lease.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::fleet::Fleet;
use crate::store::{Store, StoreError};

/// The name of the leader's lease.
pub const LEADER_LEASE: &str = "leader";

/// How often a replica that does not lead looks at the lease: a dead leader's successor takes
/// over at most this long after the lease expired.
const TAKEOVER_POLL: Duration = Duration::from_millis(500);

/// How often the leader looks for directive requests from the other replicas.
const REQUEST_POLL: Duration = Duration::from_millis(200);

/// What a leader holds: checked by the database with every sequence number it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// This run of this replica (`{replica}#{random}`): a restarted replica is another holder.
    pub holder: String,
    pub epoch: i64,
}

/// One replica's time as the leader.
#[derive(Debug, Clone)]
pub struct Term {
    pub fence: Fence,
    /// Until when this replica may act as the leader (its own monotonic clock).
    valid_until: Instant,
    /// When the previous holder's lease expired (database clock, ms), if there was one.
    pub previous_expiry_ms: Option<i64>,
}

/// Under what authority a directive is signed.
#[derive(Debug, Clone)]
pub enum Authority {
    /// A single server: it leads always.
    Single,
    /// The leader of a cluster, within its term.
    Leader(Fence),
}

impl Authority {
    pub fn fence(&self) -> Option<&Fence> {
        match self {
            Authority::Single => None,
            Authority::Leader(fence) => Some(fence),
        }
    }
}

/// Whether this process leads the fleet, and since when.
pub struct Leadership {
    /// The replica's name and this run's holder id; none for a single server.
    replica: Option<(String, String)>,
    term: watch::Sender<Option<Term>>,
    lease: Duration,
}

impl Leadership {
    /// A single server: always the leader.
    pub fn single() -> Arc<Leadership> {
        Arc::new(Leadership {
            replica: None,
            term: watch::channel(None).0,
            lease: Duration::ZERO,
        })
    }

    /// A replica named `name`: the leader only while it holds the lease.
    pub fn replica(name: &str, lease: Duration) -> Arc<Leadership> {
        let mut nonce = [0u8; 6];
        // The holder id only has to differ between runs; a clock is a fine fallback.
        if getrandom::fill(&mut nonce).is_err() {
            nonce.copy_from_slice(&crate::store::now_ms().to_le_bytes()[..6]);
        }
        Arc::new(Leadership {
            replica: Some((name.to_string(), format!("{name}#{}", hex::encode(nonce)))),
            term: watch::channel(None).0,
            lease,
        })
    }

    /// The replica's name, when this is one of several.
    pub fn replica_name(&self) -> Option<&str> {
        self.replica.as_ref().map(|(name, _)| name.as_str())
    }

    /// May this process sign directives now, and under what authority.
    pub fn authority(&self) -> Option<Authority> {
        if self.replica.is_none() {
            return Some(Authority::Single);
        }
        self.term
            .borrow()
            .as_ref()
            .filter(|term| Instant::now() < term.valid_until)
            .map(|term| Authority::Leader(term.fence.clone()))
    }

    pub fn is_leader(&self) -> bool {
        self.authority().is_some()
    }

    /// Whether `authority` is still this process's (checked again right before publishing).
    pub fn still_holds(&self, authority: &Authority) -> bool {
        match (authority, self.authority()) {
            (Authority::Single, Some(Authority::Single)) => true,
            (Authority::Leader(held), Some(Authority::Leader(now))) => *held == now,
            _ => false,
        }
    }

    /// Terms as they begin and end.
    pub fn terms(&self) -> watch::Receiver<Option<Term>> {
        self.term.subscribe()
    }

    fn step_down(&self, why: &str) {
        let ended = self.term.send_replace(None);
        if let Some(term) = ended {
            tracing::warn!(epoch = term.fence.epoch, why, "no longer leading the fleet");
        }
    }
}

/// The lease as the database has it, for the API and the console.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseView {
    pub holder: String,
    pub epoch: i64,
    /// Milliseconds until it expires; negative when it has.
    pub expires_in_ms: i64,
}

/// The leader lease as stored, if any replica ever held it.
pub async fn current_lease(store: &Store) -> Result<Option<LeaseView>, StoreError> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT holder, epoch, expires_at_ms - {} FROM leases WHERE name = $1",
        store.now_sql()
    )))
    .bind(LEADER_LEASE)
    .fetch_optional(store.pool())
    .await?;
    row.map(|row| {
        Ok(LeaseView {
            holder: row.try_get(0)?,
            epoch: row.try_get(1)?,
            expires_in_ms: row.try_get(2)?,
        })
    })
    .transpose()
}

/// Takes the lease when it is free (never held, expired, or this holder's): returns the new
/// epoch and when the previous holder's lease expired.
async fn try_acquire(
    store: &Store,
    holder: &str,
    lease_ms: i64,
) -> Result<Option<(i64, Option<i64>)>, StoreError> {
    let now = store.now_sql();
    let previous = current_lease(store).await?;
    if let Some(previous) = &previous {
        if previous.expires_in_ms > 0 && previous.holder != holder {
            return Ok(None);
        }
    }
    let epoch: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "INSERT INTO leases (name, holder, epoch, expires_at_ms) VALUES ($1, $2, 1, {now} + $3) \
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, epoch = leases.epoch + 1, \
         expires_at_ms = excluded.expires_at_ms \
         WHERE leases.expires_at_ms <= {now} OR leases.holder = excluded.holder \
         RETURNING epoch"
    )))
    .bind(LEADER_LEASE)
    .bind(holder)
    .bind(lease_ms)
    .fetch_optional(store.pool())
    .await?;
    let previous_expiry = match previous {
        Some(p) => Some(crate::store::now_ms() + p.expires_in_ms),
        None => None,
    };
    Ok(epoch.map(|epoch| (epoch, previous_expiry)))
}

/// Extends the lease of `fence`, if it still holds it and it has not expired.
async fn renew(store: &Store, fence: &Fence, lease_ms: i64) -> Result<bool, StoreError> {
    let now = store.now_sql();
    let done = sqlx::query(AssertSqlSafe(format!(
        "UPDATE leases SET expires_at_ms = {now} + $4 \
         WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at_ms > {now}"
    )))
    .bind(LEADER_LEASE)
    .bind(&fence.holder)
    .bind(fence.epoch)
    .bind(lease_ms)
    .execute(store.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives the lease up at a clean stop, so another replica takes over at once.
async fn release(store: &Store, fence: &Fence) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE leases SET expires_at_ms = 0 WHERE name = $1 AND holder = $2 AND epoch = $3",
    )
    .bind(LEADER_LEASE)
    .bind(&fence.holder)
    .bind(fence.epoch)
    .execute(store.pool())
    .await?;
    Ok(())
}

/// Keeps this replica's claim on the lease until `shutdown`: takes it when it is free, renews
/// it while held, steps down when a renewal fails past the term. Returns at once for a single
/// server.
pub async fn keep_lease(
    store: Store,
    leadership: Arc<Leadership>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some((_, holder)) = leadership.replica.clone() else {
        return;
    };
    let lease = leadership.lease;
    let lease_ms = lease.as_millis() as i64;
    // Room for a directive handed to the broker just before the term ends to get there.
    let margin = (lease / 6).min(Duration::from_secs(1));
    let mut failing = false;
    loop {
        let term = leadership.term.borrow().clone();
        let started = Instant::now();
        let wait = match term {
            Some(term) => {
                match renew(&store, &term.fence, lease_ms).await {
                    Ok(true) => {
                        leadership.term.send_modify(|held| {
                            if let Some(held) = held.as_mut().filter(|h| h.fence == term.fence) {
                                held.valid_until = started + lease - margin;
                            }
                        });
                        failing = false;
                    }
                    Ok(false) => leadership.step_down("the lease was lost"),
                    Err(e) => {
                        if !std::mem::replace(&mut failing, true) {
                            tracing::warn!(error = %e, "cannot renew the leader lease");
                        }
                        if Instant::now() >= term.valid_until {
                            leadership.step_down("the lease could not be renewed in time");
                        }
                    }
                }
                lease / 3
            }
            None => {
                match try_acquire(&store, &holder, lease_ms).await {
                    Ok(Some((epoch, previous_expiry_ms))) => {
                        failing = false;
                        tracing::info!(epoch, holder, "leading the fleet");
                        leadership.term.send_replace(Some(Term {
                            fence: Fence {
                                holder: holder.clone(),
                                epoch,
                            },
                            valid_until: started + lease - margin,
                            previous_expiry_ms,
                        }));
                    }
                    Ok(None) => failing = false,
                    Err(e) => {
                        if !std::mem::replace(&mut failing, true) {
                            tracing::warn!(error = %e, "cannot read the leader lease");
                        }
                    }
                }
                TAKEOVER_POLL
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {
                let term = leadership.term.send_replace(None);
                if let Some(term) = term {
                    if let Err(e) = release(&store, &term.fence).await {
                        tracing::warn!(error = %e, "could not give the lease up");
                    } else {
                        tracing::info!(epoch = term.fence.epoch, "gave the leader lease up");
                    }
                }
                return;
            }
        }
    }
}

/// The leader's duties beyond rollouts (which `rollout_runner` steps only while leading):
/// at the start of each term, directives the previous leader may have signed and not
/// delivered are issued again; throughout, requests from the other replicas are answered.
pub async fn lead(fleet: Arc<Fleet>, mut shutdown: watch::Receiver<bool>) {
    use std::sync::atomic::Ordering;
    if fleet.leadership.replica_name().is_none() {
        fleet.metrics.leading.store(1, Ordering::Relaxed);
        return;
    }
    let mut terms = fleet.leadership.terms();
    let mut epoch_served = None;
    loop {
        let term = terms.borrow_and_update().clone();
        fleet
            .metrics
            .leading
            .store(u64::from(fleet.leadership.is_leader()), Ordering::Relaxed);
        if let Some(term) = term.filter(|t| Some(t.fence.epoch) != epoch_served) {
            epoch_served = Some(term.fence.epoch);
            fleet.metrics.leader_terms.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = fleet.take_over(&term).await {
                tracing::warn!(error = %e, "re-issuing the previous leader's last directives failed");
            }
        }
        if fleet.leadership.is_leader() {
            if let Err(e) = fleet.answer_directive_requests().await {
                tracing::warn!(error = %e, "answering directive requests failed");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(REQUEST_POLL) => {}
            _ = terms.changed() => {}
            _ = shutdown.changed() => return,
        }
    }
}
