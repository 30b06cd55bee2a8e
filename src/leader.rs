//! Leader election across epp replicas (`--ha-enable-leader-election`) with a
//! `coordination.k8s.io/v1` Lease, the protocol client-go's leader election uses: the holder
//! renews `renewTime` every `retry_period`; a candidate takes the Lease over only once
//! `renewTime + leaseDurationSeconds` has passed. Every write carries the `resourceVersion` it
//! read, so two candidates cannot both win a race (the loser gets 409 Conflict). Only the
//! leader reports ready, so Envoy talks to one replica; the others keep their datastores warm.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

/// Lease timing (client-go's defaults: 15 s lease, renew every 2 s).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub lease_duration: Duration,
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// One candidate.
#[derive(Debug, Clone)]
pub struct Elector {
    api: Api<Lease>,
    lease_name: String,
    identity: String,
    timing: Timing,
    leader: Arc<AtomicBool>,
}

/// The Lease name for a pool (one election per pool).
pub fn lease_name(pool: &str) -> String {
    format!("{pool}-epp-leader")
}

impl Elector {
    pub fn new(api: Api<Lease>, lease_name: String, identity: String, timing: Timing) -> Self {
        Self {
            api,
            lease_name,
            identity,
            timing,
            leader: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A flag that is true while this candidate holds the Lease.
    pub fn leader_flag(&self) -> Arc<AtomicBool> {
        self.leader.clone()
    }

    fn lease(&self, previous: Option<&Lease>, now: Timestamp) -> Lease {
        let spec = previous.and_then(|l| l.spec.clone()).unwrap_or_default();
        let taking_over = spec.holder_identity.as_deref() != Some(self.identity.as_str());
        Lease {
            metadata: ObjectMeta {
                name: Some(self.lease_name.clone()),
                resource_version: previous.and_then(|l| l.metadata.resource_version.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.timing.lease_duration.as_secs().max(1) as i32),
                acquire_time: if taking_over {
                    Some(MicroTime(now))
                } else {
                    spec.acquire_time.clone()
                },
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(
                    spec.lease_transitions.unwrap_or(0)
                        + i32::from(taking_over && previous.is_some()),
                ),
                ..Default::default()
            }),
        }
    }

    /// One round: create, renew or take over the Lease if allowed. Returns whether this
    /// candidate leads afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.lease_name).await?;
        let pp = PostParams::default();
        let result = match &current {
            None => self.api.create(&pp, &self.lease(None, now)).await,
            Some(lease) => {
                let spec = lease.spec.clone().unwrap_or_default();
                let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
                let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
                    (Some(MicroTime(t)), Some(d)) => {
                        let until = t.as_millisecond() + i64::from(d) * 1000;
                        now.as_millisecond() > until
                    }
                    _ => true,
                };
                if !mine && !expired && spec.holder_identity.is_some() {
                    return Ok(false);
                }
                self.api
                    .replace(&self.lease_name, &pp, &self.lease(Some(lease), now))
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            // Someone else wrote first (409) or created it first (409 AlreadyExists).
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Campaigns forever, keeping the leader flag current.
    pub async fn run(self) {
        loop {
            let leads = match self.try_acquire_or_renew().await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "leader election round failed");
                    false
                }
            };
            if self.leader.swap(leads, Ordering::AcqRel) != leads {
                tracing::info!(identity = %self.identity, leader = leads, "leadership changed");
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }
}
