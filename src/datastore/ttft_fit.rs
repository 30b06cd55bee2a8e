//! How the pool's time to first token grows with what epp has queued on an endpoint, learned
//! from its streamed responses.
//!
//! `prefill-cost-scorer` prices an endpoint in prompt tokens: the request's own uncached
//! tokens, the uncached tokens epp already queued there (weight 1) and a price per request in
//! flight there (16 tokens). That is how engines that batch prefill under a per-step token
//! budget behave (vLLM, SGLang): a request waits behind the prefill queued before it, and each
//! decoding sequence slows every step a little. Engines differ. One that runs at most a few
//! sequences at once (`max_num_seqs` of 5, the llm-d inference simulator's default) makes a
//! request wait for a slot: the requests ahead of it that have not started answering cost a
//! slot's turnover each, whatever their length; one that prefills every request in parallel
//! makes the queued tokens cost nothing. A router tuned for one kind keeps piling requests
//! onto the holders of their prefixes on the other.
//!
//! Algorithm: every streamed response that starts with a 2xx status is one observation of
//! `y` = seconds from the routing decision to the first response byte, against
//! `x = [1, u, q, n, w]` taken at the decision on the chosen endpoint: `u` the request's
//! uncached prompt tokens (what the engine computed, where its usage reports `cached_tokens`,
//! since a predicted hit the cache had evicted would read as a slow queue, and the observation
//! is then given when the response ends; else as epp predicted them), `q` the uncached tokens
//! epp had queued there and not yet seen start, `n` its requests in flight, `w` those of them
//! not yet answering (features scaled to thousands of tokens: `n` at the default 16 tokens
//! each, `w` at 1,000). A weighted least-squares fit `y ≈ θ·x` (an observation with `w` requests
//! waiting ahead weighs `1 / (1 + w)`: the wait behind them is a sum of their random turns,
//! whose variance grows with their number) with exponential forgetting (each observation's
//! weight decays by `1 − 1/WINDOW` per later one) and a weak prior towards the default
//! (`(θ_q − θ_u)²`, `(θ_n − θ_u)²` and `θ_w²`, each weighted [`PRIOR`] × the data's own weight
//! on that term, so it only matters where the data cannot separate the terms) gives the
//! scorer three weights, in prompt tokens:
//!
//! * per queued token `θ_q / θ_u'`, clamped to [0, [`MAX_QUEUED_WEIGHT`]];
//! * per request in flight `16 θ_n / θ_u'`, clamped to [0, [`MAX_REQUEST_TOKENS`]];
//! * per request waiting to start `1000 θ_w / θ_u'`, clamped likewise;
//!
//! where `θ_u' = max(θ_u, MIN_T × its standard error)`: the per-token slope taken no smaller
//! than what the data can tell from 0. Where the tokens to compute show no cost (an engine
//! without prefix caching, or one that answers after a fixed delay) the price of a request
//! therefore reaches its clamp, and the scorer spreads requests by load whichever endpoints
//! hold their prefixes; where the slope is clear, `θ_u' = θ_u`.
//!
//! They are given after [`MIN_OBSERVATIONS`] observations once one of the four slopes is
//! [`MIN_T`] standard errors above 0 and above 10 µs per thousand (first-token time grows
//! with something the scorer can steer); until then the scorer uses its configured
//! defaults, and a later fit that is undetermined leaves the last weights in place. The fit
//! is one per pool: its weights are ratios, which a pool of one model on one kind of engine
//! shares even where some endpoints are slower.
//! Observations come only from responses epp routed and timed itself, so a client cannot set
//! them except by the requests it sends, and the clamps bound what those can do.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Observations over which the fit forgets (weight `1 − 1/WINDOW` per later observation).
pub const WINDOW: f64 = 2048.0;
/// Observations (decayed) before the fit is used.
pub const MIN_OBSERVATIONS: f64 = 64.0;
/// Strength of the prior towards the default ratios, as a fraction of the data's own weight
/// on each term.
pub const PRIOR: f64 = 0.002;
/// How many standard errors above 0 a slope must be to count as shown.
pub const MIN_T: f64 = 3.0;
/// …and at least this many seconds per unit of its feature (10 ns per token: no engine
/// prefills 100 million tokens a second, so a smaller slope is rounding, not a trend).
pub const MIN_SLOPE: f64 = 1e-5;
/// The least mean square a term's feature is taken to have (in thousands of tokens), so that
/// a term the data never moved is held at its prior instead of left undetermined.
const MIN_SPREAD: f64 = 1e-3;
/// Largest learned weight of a queued token (twice the request's own).
pub const MAX_QUEUED_WEIGHT: f64 = 2.0;
/// Largest learned price of a request in flight or waiting, in prompt tokens.
pub const MAX_REQUEST_TOKENS: f64 = 16_384.0;
/// First-token times above this (seconds) are not taken: a hung engine is the outlier
/// detector's business, not a point of this line.
pub const MAX_TTFT_SECONDS: f64 = 60.0;
/// Tokens one request in flight stands for in the scaled feature (the scorer's default).
const INFLIGHT_SCALE: f64 = 16.0;
/// Tokens one waiting request stands for in the scaled feature.
const WAITING_SCALE: f64 = 1000.0;
/// Features: constant, uncached, queued, in flight, waiting.
const N: usize = 5;

/// One routed request as the fit sees it, taken at the decision.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation {
    /// The request's uncached prompt tokens on its endpoint, as epp predicted them.
    pub uncached: u64,
    /// Uncached tokens epp had queued on the endpoint before it (still prefilling).
    pub queued: u64,
    /// Requests epp had in flight there before it.
    pub inflight: u64,
    /// Those of them that had not started answering.
    pub waiting: u64,
}

impl Observation {
    fn features(&self) -> [f64; N] {
        [
            1.0,
            self.uncached as f64 / 1000.0,
            self.queued as f64 / 1000.0,
            self.inflight as f64 * INFLIGHT_SCALE / 1000.0,
            self.waiting as f64 * WAITING_SCALE / 1000.0,
        ]
    }
}

/// The weights the scorer prices queued tokens and requests in flight with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostWeights {
    /// Per uncached token already queued on the endpoint (default 1).
    pub queued: f64,
    /// Prompt tokens one request in flight costs (default 16).
    pub inflight_tokens: f64,
    /// Prompt tokens one request that has not started answering costs on top (default 0).
    pub waiting_tokens: f64,
}

/// Decayed sums of `x xᵀ` and `x y` (see the module docs).
#[derive(Debug, Default)]
struct Sums {
    xx: [[f64; N]; N],
    xy: [f64; N],
    yy: f64,
    /// Decayed sum of the observations' weights.
    weight: f64,
    /// Decayed number of observations.
    count: f64,
}

/// The pool's learned first-token cost (see the module docs).
#[derive(Debug, Default)]
pub struct TtftFit {
    sums: Mutex<Sums>,
    /// The weights as `f64` bit patterns (queued, in flight, waiting), read by every
    /// decision without a lock once `ready` is set.
    weights: [AtomicU64; 3],
    ready: AtomicBool,
}

impl TtftFit {
    /// One streamed response started `ttft_seconds` after its routing decision.
    pub fn observe(&self, obs: Observation, ttft_seconds: f64) {
        if !(0.0..=MAX_TTFT_SECONDS).contains(&ttft_seconds) {
            return;
        }
        let x = obs.features();
        let weights = {
            // A panic elsewhere while holding this lock left sums behind: still usable.
            let mut s = self.sums.lock().unwrap_or_else(|e| e.into_inner());
            s.add(&x, ttft_seconds, 1.0 / (1.0 + obs.waiting as f64));
            (s.count >= MIN_OBSERVATIONS).then(|| s.solve()).flatten()
        };
        // An undetermined fit leaves the last weights in place.
        let Some(w) = weights else {
            return;
        };
        let values = [w.queued, w.inflight_tokens, w.waiting_tokens];
        for (slot, v) in self.weights.iter().zip(values) {
            slot.store(v.to_bits(), Ordering::Relaxed);
        }
        // Release: a reader that sees `ready` sees the first weights stored before it.
        self.ready.store(true, Ordering::Release);
    }

    /// How many observations the fit holds (decayed).
    pub fn observations(&self) -> f64 {
        self.sums.lock().unwrap_or_else(|e| e.into_inner()).count
    }

    /// The learned weights, once there are enough observations for them.
    pub fn weights(&self) -> Option<CostWeights> {
        if !self.ready.load(Ordering::Acquire) {
            return None;
        }
        let [q, n, w] = self
            .weights
            .each_ref()
            .map(|a| f64::from_bits(a.load(Ordering::Relaxed)));
        Some(CostWeights {
            queued: q,
            inflight_tokens: n,
            waiting_tokens: w,
        })
    }
}

impl Sums {
    /// Adds `y` at `x` with weight `wt` (and forgets a little of the rest).
    fn add(&mut self, x: &[f64; N], y: f64, wt: f64) {
        let keep = 1.0 - 1.0 / WINDOW;
        for (i, row) in self.xx.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = *v * keep + wt * x[i] * x[j];
            }
            self.xy[i] = self.xy[i] * keep + wt * x[i] * y;
        }
        self.yy = self.yy * keep + wt * y * y;
        self.weight = self.weight * keep + wt;
        self.count = self.count * keep + 1.0;
    }

    /// The weights of the regularized fit, if it is determined and `θ_u > 0`.
    fn solve(&self) -> Option<CostWeights> {
        let mut a = self.xx;
        // Prior: μ_q (θ_q − θ_u)² + μ_n (θ_n − θ_u)² + μ_w θ_w², i.e. μ v vᵀ for
        // v = e_t − e_u, and a plain ridge on θ_w; each μ is PRIOR × the data's own weight on
        // that term (its decayed Σ x²), with a floor for a term the data never moved.
        let mu = |t: usize| PRIOR * self.xx[t][t].max(MIN_SPREAD * self.weight);
        for t in [2, 3] {
            let m = mu(t);
            a[1][1] += m;
            a[t][t] += m;
            a[1][t] -= m;
            a[t][1] -= m;
        }
        a[4][4] += mu(4);
        // θ, and the columns of a⁻¹ for the four slopes (their variances), in one elimination.
        let unit = |t: usize| std::array::from_fn(|i| if i == t { 1.0 } else { 0.0 });
        let [theta, c_u, c_q, c_n, c_w] = solve(a, [self.xy, unit(1), unit(2), unit(3), unit(4)])?;
        let sigma2 = self.residual_variance(&theta);
        let std_error = |t: usize, column: &[f64; N]| (sigma2 * column[t]).max(0.0).sqrt();
        let errors = [
            std_error(1, &c_u),
            std_error(2, &c_q),
            std_error(3, &c_n),
            std_error(4, &c_w),
        ];
        // A slope the data shows: MIN_T standard errors above 0 and above rounding.
        let shown = |t: usize| theta[t] > (MIN_T * errors[t - 1]).max(MIN_SLOPE);
        if !(1..N).any(shown) {
            return None;
        }
        // Prices in tokens divide by the per-token slope, taken no smaller than what the data
        // can tell from 0: where tokens show no cost, a request's price reaches its clamp.
        let per_token = theta[1].max(MIN_T * errors[0]).max(MIN_SLOPE);
        let tokens = |scale: f64, t: f64| (scale * t / per_token).clamp(0.0, MAX_REQUEST_TOKENS);
        Some(CostWeights {
            queued: (theta[2] / per_token).clamp(0.0, MAX_QUEUED_WEIGHT),
            inflight_tokens: tokens(INFLIGHT_SCALE, theta[3]),
            waiting_tokens: tokens(WAITING_SCALE, theta[4]),
        })
    }

    /// The fit's mean squared residual (weighted), `σ²`.
    fn residual_variance(&self, theta: &[f64; N]) -> f64 {
        let dot = |u: &[f64; N], v: &[f64; N]| u.iter().zip(v).map(|(x, y)| x * y).sum::<f64>();
        let xx_theta: [f64; N] = std::array::from_fn(|i| dot(&self.xx[i], theta));
        let rss = self.yy - 2.0 * dot(&self.xy, theta) + dot(theta, &xx_theta);
        rss.max(0.0) / self.weight
    }
}

/// Solves `a x = b` for each of the right-hand sides `bs` by Gaussian elimination with
/// partial pivoting; `None` when `a` is singular.
fn solve<const K: usize>(mut a: [[f64; N]; N], mut bs: [[f64; N]; K]) -> Option<[[f64; N]; K]> {
    let scale = a.iter().flatten().fold(0.0_f64, |m, v| m.max(v.abs()));
    if !(scale > 0.0 && scale.is_finite()) {
        return None;
    }
    for col in 0..N {
        let pivot = (col..N).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() <= scale * 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        for b in &mut bs {
            b.swap(col, pivot);
        }
        let pivot_row = a[col];
        for row in col + 1..N {
            let f = a[row][col] / pivot_row[col];
            for (v, p) in a[row].iter_mut().zip(&pivot_row).skip(col) {
                *v -= f * p;
            }
            for b in &mut bs {
                b[row] -= f * b[col];
            }
        }
    }
    let mut xs = [[0.0; N]; K];
    for (x, b) in xs.iter_mut().zip(&bs) {
        for row in (0..N).rev() {
            let rest: f64 = (row + 1..N).map(|k| a[row][k] * x[k]).sum();
            x[row] = (b[row] - rest) / a[row][row];
        }
    }
    xs.iter().flatten().all(|v| v.is_finite()).then_some(xs)
}

/// Feeds `count` observations whose first-token time is `ttft(obs)`, over a spread of
/// uncached (0–4,000), queued (0–8,000), in-flight (0–11) and waiting values (test support,
/// also for the scorer's tests).
#[cfg(test)]
pub(crate) fn feed(fit: &TtftFit, count: u64, mut ttft: impl FnMut(&Observation) -> f64) {
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..count {
        let inflight = rng.u64(0..12);
        let obs = Observation {
            uncached: rng.u64(0..4000),
            queued: rng.u64(0..8000),
            inflight,
            waiting: rng.u64(0..=inflight),
        };
        fit.observe(obs, ttft(&obs));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_until_enough_observations() {
        let fit = TtftFit::default();
        feed(&fit, 40, |o| 0.01 + 25e-6 * (o.uncached + o.queued) as f64);
        assert_eq!(fit.weights(), None);
        feed(&fit, 40, |o| 0.01 + 25e-6 * (o.uncached + o.queued) as f64);
        assert!(fit.weights().is_some());
    }

    #[test]
    fn a_token_budget_engine_gives_the_default_weights() {
        // Prefill queued ahead costs what the request's own does; a decoding request 16 tokens.
        let fit = TtftFit::default();
        feed(&fit, 2000, |o| {
            0.005 + 25e-6 * (o.uncached + o.queued) as f64 + 25e-6 * 16.0 * o.inflight as f64
        });
        let w = fit.weights().unwrap();
        assert!((w.queued - 1.0).abs() < 0.01, "{w:?}");
        assert!((w.inflight_tokens - 16.0).abs() < 0.5, "{w:?}");
        assert!(w.waiting_tokens < 1.0, "{w:?}");
    }

    #[test]
    fn a_slot_bound_engine_prices_waiting_requests_not_queued_tokens() {
        // Every request prefills at once; each one waiting ahead adds 50 ms (a slot's turn).
        let fit = TtftFit::default();
        feed(&fit, 2000, |o| {
            0.005 + 25e-6 * o.uncached as f64 + 0.05 * o.waiting as f64
        });
        let w = fit.weights().unwrap();
        // The prior keeps a little of the default's 1 and 16.
        assert!(w.queued < 0.02 && w.inflight_tokens < 16.0, "{w:?}");
        // 50 ms / 25 µs = 2,000 tokens per waiting request.
        assert!((w.waiting_tokens - 2000.0).abs() < 100.0, "{w:?}");
    }

    #[test]
    fn where_tokens_cost_nothing_requests_are_priced_at_the_clamp() {
        // No prefix caching or a fixed first-token delay: only the slot wait varies (50 ms for
        // each request waiting ahead), with a little noise.
        let fit = TtftFit::default();
        let mut rng = fastrand::Rng::with_seed(11);
        feed(&fit, 2000, |o| {
            0.1 + 0.05 * o.waiting as f64 + 0.01 * rng.f64()
        });
        let w = fit.weights().expect("the slot wait is shown");
        assert_eq!(w.waiting_tokens, MAX_REQUEST_TOKENS, "{w:?}");
        // Whatever a holder saves in tokens, one request more waiting outweighs it.
        assert!(w.queued < 0.5, "{w:?}");
    }

    #[test]
    fn no_growth_at_all_means_no_weights_and_outliers_are_ignored() {
        let fit = TtftFit::default();
        feed(&fit, 2000, |_| 0.05);
        assert_eq!(fit.weights(), None);
        // A hung engine's first bytes (or a clock gone backwards) are not observations.
        let before = fit.sums.lock().unwrap().count;
        fit.observe(Observation::default(), 3600.0);
        fit.observe(Observation::default(), -1.0);
        fit.observe(Observation::default(), f64::NAN);
        assert_eq!(fit.sums.lock().unwrap().count, before);
    }

    #[test]
    fn noise_gives_no_weights_and_keeps_the_last_ones() {
        // First-token times that vary only at random (uniform, or skewed as queueing is):
        // nothing shown, in any of several runs.
        let mut rng = fastrand::Rng::with_seed(5);
        for _ in 0..5 {
            let uniform = TtftFit::default();
            feed(&uniform, 2000, |_| 0.05 + 0.02 * rng.f64());
            assert_eq!(uniform.weights(), None);
            let skewed = TtftFit::default();
            feed(&skewed, 2000, |_| 0.05 - 0.02 * (1.0 - rng.f64()).ln());
            assert_eq!(skewed.weights(), None);
        }
        // Learned first, then the trend disappears: learned weights stay.
        let fit = TtftFit::default();
        feed(&fit, 2000, |o| 25e-6 * (o.uncached + o.queued) as f64);
        assert!(fit.weights().is_some());
        feed(&fit, 20_000, |_| 0.05 + 0.02 * rng.f64());
        assert!(fit.weights().is_some(), "not back to the defaults");
    }

    #[test]
    fn the_weights_are_clamped() {
        let fit = TtftFit::default();
        feed(&fit, 2000, |o| {
            1e-6 * o.uncached as f64 + 0.5 * o.inflight as f64
        });
        assert_eq!(fit.weights().unwrap().inflight_tokens, MAX_REQUEST_TOKENS);
    }

    #[test]
    fn collinear_queued_and_inflight_fall_back_to_the_prior_ratio() {
        // Every request in flight queued exactly 1,000 tokens: only their sum is determined.
        let fit = TtftFit::default();
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..2000 {
            let n = rng.u64(0..10);
            let obs = Observation {
                uncached: rng.u64(0..4000),
                queued: 1000 * n,
                inflight: n,
                waiting: 0,
            };
            fit.observe(obs, 25e-6 * (obs.uncached + obs.queued) as f64);
        }
        let w = fit.weights().unwrap();
        // The fit splits the 1,016 tokens per request between the terms; their sum holds.
        let per_request = 1000.0 * w.queued + w.inflight_tokens;
        assert!((per_request - 1000.0).abs() < 30.0, "{w:?}");
    }
}
