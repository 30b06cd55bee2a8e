//! Who may read `/metrics`.
//!
//! * [`MetricsAuth::Open`]: anyone (the default outside Kubernetes).
//! * [`MetricsAuth::Token`]: `Authorization: Bearer <token>` must equal the contents of
//!   `--metrics-bearer-token-file` (read at each check, so a rotated secret applies at once).
//! * [`MetricsAuth::Kubernetes`] (`--metrics-endpoint-auth`, as the Go EPP): the bearer token
//!   must authenticate (TokenReview) as a subject allowed to `get` the non-resource URL
//!   `/metrics` (SubjectAccessReview). Decisions are cached for a minute, at most 1024 tokens.
//!
//! Missing or bad credentials get 401; an authenticated subject without the permission 403.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use parking_lot::Mutex;

const CACHE_TTL: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 1024;

/// The outcome of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// 401: no token, or one that does not authenticate.
    Unauthenticated,
    /// 403: authenticated, not allowed.
    Forbidden,
}

pub enum MetricsAuth {
    Open,
    Token(PathBuf),
    Kubernetes {
        client: kube::Client,
        cache: Mutex<HashMap<u64, (Decision, Instant)>>,
    },
}

impl std::fmt::Debug for MetricsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MetricsAuth::Open => "Open",
            MetricsAuth::Token(_) => "Token",
            MetricsAuth::Kubernetes { .. } => "Kubernetes",
        })
    }
}

/// Equality that does not stop at the first differing byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(header: Option<&str>) -> Option<&str> {
    let h = header?.trim();
    let token = h
        .strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))?
        .trim();
    (!token.is_empty()).then_some(token)
}

impl MetricsAuth {
    pub fn kubernetes(client: kube::Client) -> Self {
        MetricsAuth::Kubernetes {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Checks the request's `Authorization` header value.
    pub async fn check(&self, authorization: Option<&str>) -> Decision {
        match self {
            MetricsAuth::Open => Decision::Allowed,
            MetricsAuth::Token(path) => {
                let Some(token) = bearer(authorization) else {
                    return Decision::Unauthenticated;
                };
                match std::fs::read_to_string(path) {
                    Ok(want) if same(want.trim().as_bytes(), token.as_bytes()) => Decision::Allowed,
                    Ok(_) => Decision::Unauthenticated,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "metrics token file unreadable; refusing");
                        Decision::Unauthenticated
                    }
                }
            }
            MetricsAuth::Kubernetes { client, cache } => {
                let Some(token) = bearer(authorization) else {
                    return Decision::Unauthenticated;
                };
                let key = xxhash_rust::xxh3::xxh3_64(token.as_bytes());
                let now = Instant::now();
                if let Some((d, at)) = cache.lock().get(&key)
                    && now.duration_since(*at) < CACHE_TTL
                {
                    return *d;
                }
                let d = review(client, token).await;
                let mut c = cache.lock();
                if c.len() >= CACHE_MAX {
                    c.retain(|_, (_, at)| now.duration_since(*at) < CACHE_TTL);
                    if c.len() >= CACHE_MAX {
                        c.clear();
                    }
                }
                c.insert(key, (d, now));
                d
            }
        }
    }
}

/// TokenReview, then SubjectAccessReview for `get /metrics`.
async fn review(client: &kube::Client, token: &str) -> Decision {
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let tr = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    };
    let status = match reviews.create(&PostParams::default(), &tr).await {
        Ok(r) => r.status.unwrap_or_default(),
        Err(e) => {
            tracing::warn!(error = %e, "metrics auth: TokenReview failed");
            return Decision::Unauthenticated;
        }
    };
    if status.authenticated != Some(true) {
        return Decision::Unauthenticated;
    }
    let user = status.user.unwrap_or_default();
    let sar = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username,
            uid: user.uid,
            groups: user.groups,
            extra: user.extra,
            non_resource_attributes: Some(NonResourceAttributes {
                path: Some("/metrics".into()),
                verb: Some("get".into()),
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let access: Api<SubjectAccessReview> = Api::all(client.clone());
    match access.create(&PostParams::default(), &sar).await {
        Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => Decision::Allowed,
        Ok(_) => Decision::Forbidden,
        Err(e) => {
            tracing::warn!(error = %e, "metrics auth: SubjectAccessReview failed");
            Decision::Forbidden
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn token_file_is_compared_and_reread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let auth = MetricsAuth::Token(path.clone());
        assert_eq!(auth.check(None).await, Decision::Unauthenticated);
        assert_eq!(
            auth.check(Some("Bearer nope")).await,
            Decision::Unauthenticated
        );
        assert_eq!(auth.check(Some("Bearer s3cret")).await, Decision::Allowed);
        std::fs::write(&path, "rotated").unwrap();
        assert_eq!(
            auth.check(Some("Bearer s3cret")).await,
            Decision::Unauthenticated
        );
        assert_eq!(MetricsAuth::Open.check(None).await, Decision::Allowed);
    }
}
