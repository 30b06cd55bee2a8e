//! Workloads: SGLang's `generated-shared-prefix` shape (the seed's experiment), Poisson
//! arrivals, and JSONL traces for replaying real traffic.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::tokens::CHARS_PER_TOKEN;

/// One request of a workload.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// Seconds from the start of the run.
    pub at: f64,
    pub model: String,
    pub prompt: Arc<[u8]>,
    pub max_tokens: usize,
}

/// Shared-prefix workload parameters: `groups` system prompts of `system_tokens`, each followed
/// by `prompts_per_group` distinct questions of `question_tokens`, `output_tokens` generated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedPrefix {
    pub groups: usize,
    pub prompts_per_group: usize,
    pub system_tokens: usize,
    pub question_tokens: usize,
    pub output_tokens: usize,
}

impl SharedPrefix {
    /// High prefix reuse (the seed's headline case): 64 groups × 16 prompts, system prompt
    /// 3000 tokens, question 128, output 256.
    pub fn high_reuse() -> Self {
        Self {
            groups: 64,
            prompts_per_group: 16,
            system_tokens: 3000,
            question_tokens: 128,
            output_tokens: 256,
        }
    }

    /// Low prefix reuse: system prompt 128 tokens, question 3000.
    pub fn low_reuse() -> Self {
        Self {
            system_tokens: 128,
            question_tokens: 3000,
            ..Self::high_reuse()
        }
    }

    /// A named shape (`high` or `low`) with optional overrides of its sizes.
    pub fn named(
        name: &str,
        groups: Option<usize>,
        prompts_per_group: Option<usize>,
        output_tokens: Option<usize>,
    ) -> Result<Self, String> {
        let mut shape = match name {
            "high" => Self::high_reuse(),
            "low" => Self::low_reuse(),
            other => {
                return Err(format!(
                    "unknown workload {other:?} (high, low, trace:<path>)"
                ));
            }
        };
        shape.groups = groups.unwrap_or(shape.groups);
        shape.prompts_per_group = prompts_per_group.unwrap_or(shape.prompts_per_group);
        shape.output_tokens = output_tokens.unwrap_or(shape.output_tokens);
        Ok(shape)
    }

    /// The prompts, shuffled (groups interleave, as in SGLang's benchmark).
    pub fn prompts(&self, rng: &mut fastrand::Rng) -> Vec<Arc<[u8]>> {
        let mut out = Vec::with_capacity(self.groups * self.prompts_per_group);
        for _ in 0..self.groups {
            let system = text(rng, self.system_tokens * CHARS_PER_TOKEN);
            for _ in 0..self.prompts_per_group {
                let mut p = system.clone();
                p.extend_from_slice(&text(rng, self.question_tokens * CHARS_PER_TOKEN));
                out.push(Arc::from(p));
            }
        }
        rng.shuffle(&mut out);
        out
    }

    /// Requests arriving as a Poisson process of `rate` per second.
    pub fn poisson(&self, rate: f64, model: &str, seed: u64) -> Vec<Arrival> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let prompts = self.prompts(&mut rng);
        let mut t = 0.0;
        prompts
            .into_iter()
            .map(|prompt| {
                t += exponential(&mut rng, rate);
                Arrival {
                    at: t,
                    model: model.to_owned(),
                    prompt,
                    max_tokens: self.output_tokens,
                }
            })
            .collect()
    }
}

/// An exponential inter-arrival gap for `rate` per second.
pub fn exponential(rng: &mut fastrand::Rng, rate: f64) -> f64 {
    -(1.0 - rng.f64()).ln() / rate
}

/// `len` bytes of word-like lowercase text.
pub fn text(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 10);
    while out.len() < len {
        let word = rng.usize(2..9);
        for _ in 0..word {
            out.push(rng.u8(b'a'..=b'z'));
        }
        out.push(b' ');
    }
    out.truncate(len);
    out
}

/// Why a trace could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
}

/// One JSONL trace line. Either `prompt` (text) or `prompt_tokens` (synthetic text of that
/// length; lines with the same `shared_prefix_id` share their first `shared_prefix_tokens`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TraceLine {
    #[serde(alias = "timestamp")]
    arrival: f64,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    prompt_tokens: Option<usize>,
    #[serde(default)]
    shared_prefix_id: Option<u64>,
    #[serde(default)]
    shared_prefix_tokens: Option<usize>,
    #[serde(alias = "max_tokens")]
    output_tokens: usize,
}

/// Loads a JSONL trace (one request per line; blank lines and `#` comments skipped):
///
/// ```text
/// {"arrival": 0.00, "model": "m", "prompt": "You are…", "output_tokens": 128}
/// {"arrival": 0.25, "prompt_tokens": 3100, "shared_prefix_id": 7, "shared_prefix_tokens": 3000, "output_tokens": 256}
/// ```
pub fn load_trace(path: &Path, default_model: &str) -> Result<Vec<Arrival>, TraceError> {
    let shown = path.display().to_string();
    let text_in = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
        path: shown.clone(),
        source,
    })?;
    parse_trace(&shown, &text_in, default_model)
}

pub fn parse_trace(
    path: &str,
    input: &str,
    default_model: &str,
) -> Result<Vec<Arrival>, TraceError> {
    let mut prefixes: std::collections::HashMap<u64, Vec<u8>> = Default::default();
    let mut rng = fastrand::Rng::with_seed(0x7ace);
    let mut out = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |reason: String| TraceError::Line {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        let t: TraceLine = serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        if !(t.arrival.is_finite() && t.arrival >= 0.0) {
            return Err(err("arrival must be a number ≥ 0".into()));
        }
        let prompt = match (t.prompt, t.prompt_tokens) {
            (Some(p), None) => p.into_bytes(),
            (None, Some(n)) => {
                let shared = t.shared_prefix_tokens.unwrap_or(0).min(n);
                let mut p = match t.shared_prefix_id {
                    Some(id) => {
                        let prefix = prefixes
                            .entry(id)
                            .or_insert_with(|| text(&mut rng, shared * CHARS_PER_TOKEN));
                        if prefix.len() < shared * CHARS_PER_TOKEN {
                            return Err(err(format!(
                                "shared_prefix_tokens differs from an earlier line of prefix {id}"
                            )));
                        }
                        prefix[..shared * CHARS_PER_TOKEN].to_vec()
                    }
                    None => Vec::new(),
                };
                let rest = n * CHARS_PER_TOKEN - p.len();
                p.extend_from_slice(&text(&mut rng, rest));
                p
            }
            _ => return Err(err("give exactly one of prompt and prompt_tokens".into())),
        };
        out.push(Arrival {
            at: t.arrival,
            model: t.model.unwrap_or_else(|| default_model.to_owned()),
            prompt: Arc::from(prompt),
            max_tokens: t.output_tokens.max(1),
        });
    }
    out.sort_by(|a, b| a.at.total_cmp(&b.at));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefix_shapes() {
        let w = SharedPrefix {
            groups: 3,
            prompts_per_group: 4,
            system_tokens: 100,
            question_tokens: 10,
            output_tokens: 5,
        };
        let a = w.poisson(10.0, "m", 1);
        assert_eq!(a.len(), 12);
        assert!(a.windows(2).all(|p| p[0].at < p[1].at));
        assert!(a.iter().all(|x| x.prompt.len() == 440));
        let heads: std::collections::HashSet<&[u8]> = a.iter().map(|x| &x.prompt[..400]).collect();
        assert_eq!(heads.len(), 3, "one system prompt per group");
        let mean_gap = a.last().unwrap().at / 12.0;
        assert!((0.03..0.3).contains(&mean_gap), "{mean_gap}");
        // Deterministic by seed.
        assert_eq!(w.poisson(10.0, "m", 1)[5].prompt, a[5].prompt);
    }

    #[test]
    fn trace_lines_text_and_synthetic() {
        let t = r#"
# comment
{"arrival": 1.5, "prompt": "hello", "output_tokens": 3}
{"arrival": 0.5, "model": "x", "prompt_tokens": 20, "shared_prefix_id": 1, "shared_prefix_tokens": 10, "max_tokens": 2}
{"arrival": 0.7, "prompt_tokens": 12, "shared_prefix_id": 1, "shared_prefix_tokens": 10, "output_tokens": 2}
"#;
        let a = parse_trace("t", t, "m").unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(a[0].model, "x");
        assert_eq!(a[0].prompt.len(), 80);
        assert_eq!(a[0].prompt[..40], a[1].prompt[..40]);
        assert_eq!(&*a[2].prompt, b"hello");
    }

    #[test]
    fn trace_errors_name_the_line() {
        let e = parse_trace("t", "{\"arrival\": 1}\n", "m")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t:1:"), "{e}");
        let e = parse_trace("t", "\n{\"arrival\": 1, \"output_tokens\": 1}\n", "m")
            .unwrap_err()
            .to_string();
        assert!(e.contains("t:2:") && e.contains("prompt"), "{e}");
    }
}
