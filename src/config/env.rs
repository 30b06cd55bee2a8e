//! Scheduler selection and tuning through the Go EPP's environment variables.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `EXPERIMENTAL_USE_SCHEDULER_V2` | false | V2 (scorers + max-score picker) instead of the V1 tree |
//! | `ENABLE_PREFIX_CACHE_SCHEDULING` | false | add the prefix-cache scorer to V2 |
//! | `QUEUE_SCORE_WEIGHT` | 1 | weight of the queue scorer |
//! | `KV_CACHE_SCORE_WEIGHT` | 1 | weight of the KV-cache scorer |
//! | `PREFIX_CACHE_SCORE_WEIGHT` | 1 | weight of the prefix scorer |
//! | `PREFIX_CACHE_HASH_BLOCK_SIZE` | 64 | block size in bytes |
//! | `PREFIX_CACHE_MAX_PREFIX_BLOCKS` | 256 | blocks matched per request |
//! | `PREFIX_CACHE_LRU_CAPACITY` | 31250 | blocks remembered per endpoint |
//! | `KV_CACHE_THRESHOLD` | 0.8 | V1 / saturation: KV use above which an endpoint is full |
//! | `QUEUE_THRESHOLD_CRITICAL` | 5 | V1 / saturation: queue above which an endpoint is full |
//! | `QUEUING_THRESHOLD_LORA` | 128 | V1: queue below which LoRA affinity is preferred |
//! | `LORA_AFFINITY_THRESHOLD` | 0.999 | V1: probability of keeping LoRA affinity |

use std::str::FromStr;
use std::sync::Arc;

use super::ConfigError;
use crate::index::BlockHasher;
use crate::scheduling::Scheduler;
use crate::scheduling::framework::Profile;
use crate::scheduling::plugins::has_capacity::HasCapacityFilter;
use crate::scheduling::plugins::kv_cache::KvCacheScorer;
use crate::scheduling::plugins::max_score::MaxScorePicker;
use crate::scheduling::plugins::prefix::{PrefixCachePlugin, PrefixConfig, PrefixObserver};
use crate::scheduling::plugins::queue::QueueScorer;
use crate::scheduling::v1::{self, V1Thresholds};

/// Scheduler settings read from the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerEnv {
    pub use_v2: bool,
    pub enable_prefix: bool,
    pub queue_weight: f64,
    pub kv_cache_weight: f64,
    pub prefix_weight: f64,
    pub prefix: PrefixConfig,
    pub v1: V1Thresholds,
}

impl Default for SchedulerEnv {
    fn default() -> Self {
        Self {
            use_v2: false,
            enable_prefix: false,
            queue_weight: 1.0,
            kv_cache_weight: 1.0,
            prefix_weight: 1.0,
            prefix: PrefixConfig::default(),
            v1: V1Thresholds::default(),
        }
    }
}

fn read<T: FromStr>(
    lookup: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
    default: T,
) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match lookup(name) {
        None => Ok(default),
        Some(v) if v.trim().is_empty() => Ok(default),
        Some(v) => v.trim().parse().map_err(|e: T::Err| ConfigError::Env {
            name,
            value: v.clone(),
            reason: e.to_string(),
        }),
    }
}

fn read_bool(
    lookup: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<bool, ConfigError> {
    match lookup(name).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(false),
        Some(v) => match v.as_str() {
            "" | "false" | "0" | "no" => Ok(false),
            "true" | "1" | "yes" => Ok(true),
            _ => Err(ConfigError::Env {
                name,
                value: v,
                reason: "expected true or false".into(),
            }),
        },
    }
}

fn positive<T: PartialOrd + Default>(
    name: &'static str,
    v: T,
    raw: impl std::fmt::Display,
) -> Result<T, ConfigError> {
    if v > T::default() {
        Ok(v)
    } else {
        Err(ConfigError::Env {
            name,
            value: raw.to_string(),
            reason: "must be greater than 0".into(),
        })
    }
}

impl SchedulerEnv {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }

    /// Reads settings through `lookup` (tests pass a map).
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let d = Self::default();
        let block_size: usize = read(
            lookup,
            "PREFIX_CACHE_HASH_BLOCK_SIZE",
            d.prefix.hasher.block_size,
        )?;
        let max_blocks: usize = read(
            lookup,
            "PREFIX_CACHE_MAX_PREFIX_BLOCKS",
            d.prefix.hasher.max_blocks,
        )?;
        let lru: usize = read(
            lookup,
            "PREFIX_CACHE_LRU_CAPACITY",
            d.prefix.lru_capacity_per_server,
        )?;
        let weight = |name, default| -> Result<f64, ConfigError> {
            let w: f64 = read(lookup, name, default)?;
            if w.is_finite() && w >= 0.0 {
                Ok(w)
            } else {
                Err(ConfigError::Env {
                    name,
                    value: w.to_string(),
                    reason: "must be a finite number ≥ 0".into(),
                })
            }
        };
        Ok(Self {
            use_v2: read_bool(lookup, "EXPERIMENTAL_USE_SCHEDULER_V2")?,
            enable_prefix: read_bool(lookup, "ENABLE_PREFIX_CACHE_SCHEDULING")?,
            queue_weight: weight("QUEUE_SCORE_WEIGHT", d.queue_weight)?,
            kv_cache_weight: weight("KV_CACHE_SCORE_WEIGHT", d.kv_cache_weight)?,
            prefix_weight: weight("PREFIX_CACHE_SCORE_WEIGHT", d.prefix_weight)?,
            prefix: PrefixConfig {
                hasher: BlockHasher {
                    block_size: positive("PREFIX_CACHE_HASH_BLOCK_SIZE", block_size, block_size)?,
                    max_blocks: positive("PREFIX_CACHE_MAX_PREFIX_BLOCKS", max_blocks, max_blocks)?,
                    max_bytes: d.prefix.hasher.max_bytes,
                },
                lru_capacity_per_server: positive("PREFIX_CACHE_LRU_CAPACITY", lru, lru)?,
                auto_tune: d.prefix.auto_tune,
                respect_enable_prefix_caching: d.prefix.respect_enable_prefix_caching,
                learn_capacity: d.prefix.learn_capacity,
            },
            v1: V1Thresholds {
                kv_cache_threshold: read(lookup, "KV_CACHE_THRESHOLD", d.v1.kv_cache_threshold)?,
                queue_threshold_critical: read(
                    lookup,
                    "QUEUE_THRESHOLD_CRITICAL",
                    d.v1.queue_threshold_critical,
                )?,
                queueing_threshold_lora: read(
                    lookup,
                    "QUEUING_THRESHOLD_LORA",
                    d.v1.queueing_threshold_lora,
                )?,
                lora_affinity_threshold: read(
                    lookup,
                    "LORA_AFFINITY_THRESHOLD",
                    d.v1.lora_affinity_threshold,
                )?,
            },
        })
    }

    /// Saturation thresholds (for shedding sheddable requests).
    pub fn saturation(&self) -> HasCapacityFilter {
        HasCapacityFilter {
            queue_threshold: self.v1.queue_threshold_critical,
            kv_cache_threshold: self.v1.kv_cache_threshold,
        }
    }

    /// Builds the scheduler these settings select.
    pub fn build(&self) -> Scheduler {
        self.build_observed(None)
    }

    /// Like [`SchedulerEnv::build`], reporting prefix matches to `observer`.
    pub fn build_observed(&self, observer: Option<Arc<dyn PrefixObserver>>) -> Scheduler {
        let saturation: Arc<dyn crate::scheduling::plugins::utilization::SaturationDetector> =
            Arc::new(self.saturation());
        if !self.use_v2 {
            return Scheduler::new(v1::profile(self.v1), Vec::new()).with_saturation(saturation);
        }
        let mut profile = Profile::new("default", Arc::new(MaxScorePicker::default()));
        profile
            .scorers
            .push((Arc::new(QueueScorer), self.queue_weight));
        profile
            .scorers
            .push((Arc::new(KvCacheScorer), self.kv_cache_weight));
        let mut prefix = None;
        if self.enable_prefix {
            let mut plugin = PrefixCachePlugin::new(self.prefix);
            if let Some(o) = observer {
                plugin = plugin.with_observer(o);
            }
            let plugin = Arc::new(plugin);
            profile.pre_schedule.push(plugin.clone());
            profile.scorers.push((plugin.clone(), self.prefix_weight));
            profile.post_schedule.push(plugin.clone());
            prefix = Some(plugin);
        }
        Scheduler::new(profile, prefix.into_iter().collect()).with_saturation(saturation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<SchedulerEnv, ConfigError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        SchedulerEnv::from_lookup(&move |k| m.get(k).cloned())
    }

    #[test]
    fn defaults_select_v1() {
        let e = env(&[]).unwrap();
        assert_eq!(e, SchedulerEnv::default());
        assert_eq!(e.build().profile().name, "v1");
    }

    #[test]
    fn v2_with_prefix_and_weights() {
        let e = env(&[
            ("EXPERIMENTAL_USE_SCHEDULER_V2", "true"),
            ("ENABLE_PREFIX_CACHE_SCHEDULING", "true"),
            ("PREFIX_CACHE_SCORE_WEIGHT", "3"),
            ("PREFIX_CACHE_HASH_BLOCK_SIZE", "128"),
            ("QUEUE_THRESHOLD_CRITICAL", "9"),
        ])
        .unwrap();
        assert_eq!(e.prefix.hasher.block_size, 128);
        assert_eq!(e.v1.queue_threshold_critical, 9);
        let s = e.build();
        let names: Vec<(&str, f64)> = s
            .profile()
            .scorers
            .iter()
            .map(|(p, w)| (p.name(), *w))
            .collect();
        assert_eq!(
            names,
            vec![
                ("queue-scorer", 1.0),
                ("kv-cache-utilization-scorer", 1.0),
                ("prefix-cache-scorer", 3.0)
            ]
        );
        assert!(s.prefix_plugin().is_some());
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = env(&[("QUEUE_SCORE_WEIGHT", "heavy")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("QUEUE_SCORE_WEIGHT"), "{err}");
        let err = env(&[("PREFIX_CACHE_HASH_BLOCK_SIZE", "0")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("PREFIX_CACHE_HASH_BLOCK_SIZE"), "{err}");
        let err = env(&[("ENABLE_PREFIX_CACHE_SCHEDULING", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("ENABLE_PREFIX_CACHE_SCHEDULING"), "{err}");
        let err = env(&[("KV_CACHE_SCORE_WEIGHT", "-1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("KV_CACHE_SCORE_WEIGHT"), "{err}");
    }
}
