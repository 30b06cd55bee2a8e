//! JSONL traces for replaying real traffic, one request per line (blank lines and `#` comments
//! skipped):
//!
//! ```text
//! {"arrival": 0.00, "model": "m", "prompt": "You are…", "output_tokens": 128}
//! {"arrival": 0.10, "messages": [{"role": "user", "content": "hi"}], "output_tokens": 64}
//! {"arrival": 0.25, "prompt_tokens": 3100, "shared_prefix_id": 7, "shared_prefix_tokens": 3000, "output_tokens": 256}
//! ```
//!
//! A line gives exactly one of `prompt` (completions text), `messages` (chat) or
//! `prompt_tokens` (synthetic prose of that many simulator tokens; lines with the same
//! `shared_prefix_id` share their first `shared_prefix_tokens`). `timestamp` is an alias of
//! `arrival` (seconds), `max_tokens` of `output_tokens`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::{Arrival, Message, Prompt, Workload};
use crate::sim::text::prose;

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

#[derive(Debug, Deserialize)]
struct TraceMessage {
    role: String,
    content: String,
}

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
    messages: Option<Vec<TraceMessage>>,
    #[serde(default)]
    prompt_tokens: Option<usize>,
    #[serde(default)]
    shared_prefix_id: Option<u64>,
    #[serde(default)]
    shared_prefix_tokens: Option<usize>,
    #[serde(alias = "max_tokens")]
    output_tokens: usize,
}

/// Loads a JSONL trace (see the module docs).
pub fn load_trace(path: &Path, default_model: &str) -> Result<Workload, TraceError> {
    let shown = path.display().to_string();
    let text_in = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
        path: shown.clone(),
        source,
    })?;
    parse_trace(&shown, &text_in, default_model)
}

/// Synthetic prompts: shared prefixes by id, the rest fresh prose.
struct Synth {
    prefixes: HashMap<u64, (usize, String)>,
    rng: fastrand::Rng,
}

impl Synth {
    fn prompt(&mut self, tokens: usize, id: Option<u64>, shared: usize) -> Result<String, String> {
        let shared = shared.min(tokens);
        let head = match id {
            Some(id) => {
                let rng = &mut self.rng;
                let (n, text) = self
                    .prefixes
                    .entry(id)
                    .or_insert_with(|| (shared, prose(rng, shared)));
                if *n != shared {
                    return Err(format!(
                        "shared_prefix_tokens {shared} differs from an earlier line of prefix {id} ({n})"
                    ));
                }
                text.clone()
            }
            None => String::new(),
        };
        let tail = prose(&mut self.rng, tokens - shared);
        Ok(if head.is_empty() {
            tail
        } else {
            format!("{head} {tail}")
        })
    }
}

fn prompt_of(t: TraceLine, synth: &mut Synth) -> Result<Prompt, String> {
    match (t.prompt, t.messages, t.prompt_tokens) {
        (Some(p), None, None) => Ok(Prompt::Completion(Arc::from(p))),
        (None, Some(m), None) => Ok(Prompt::Chat(Arc::from(
            m.iter()
                .map(|m| Message::new(&m.role, &m.content))
                .collect::<Vec<_>>(),
        ))),
        (None, None, Some(n)) => synth
            .prompt(n, t.shared_prefix_id, t.shared_prefix_tokens.unwrap_or(0))
            .map(|p| Prompt::Completion(Arc::from(p))),
        _ => Err("give exactly one of prompt, messages and prompt_tokens".into()),
    }
}

/// Parses trace text; `path` names it in errors.
pub fn parse_trace(path: &str, input: &str, default_model: &str) -> Result<Workload, TraceError> {
    let mut synth = Synth {
        prefixes: HashMap::new(),
        rng: fastrand::Rng::with_seed(0x7ace),
    };
    let mut arrivals = Vec::new();
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
        let (at, max_tokens) = (t.arrival, t.output_tokens.max(1));
        let model = t.model.clone().unwrap_or_else(|| default_model.to_owned());
        let prompt = prompt_of(t, &mut synth).map_err(err)?;
        arrivals.push(Arrival {
            at,
            model,
            prompt,
            max_tokens,
        });
    }
    arrivals.sort_by(|a, b| a.at.total_cmp(&b.at));
    Ok(Workload {
        name: format!("trace {path}"),
        rate: None,
        arrivals,
        sessions: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lines_text_chat_and_synthetic() {
        let t = r#"
# comment
{"arrival": 1.5, "prompt": "hello", "output_tokens": 3}
{"arrival": 0.5, "model": "x", "prompt_tokens": 20, "shared_prefix_id": 1, "shared_prefix_tokens": 10, "max_tokens": 2}
{"arrival": 0.7, "prompt_tokens": 12, "shared_prefix_id": 1, "shared_prefix_tokens": 10, "output_tokens": 2}
{"arrival": 0.9, "messages": [{"role": "user", "content": "hi"}], "output_tokens": 2}
"#;
        let w = parse_trace("t", t, "m").unwrap();
        let a = &w.arrivals;
        assert_eq!(a.len(), 4);
        assert_eq!(a[0].model, "x");
        let (p0, p1) = (a[0].prompt.routing_text(), a[1].prompt.routing_text());
        let shared = p0
            .chars()
            .zip(p1.chars())
            .take_while(|(x, y)| x == y)
            .count();
        assert!(shared >= 20, "lines of one prefix id share their head");
        assert!(matches!(&a[2].prompt, Prompt::Chat(m) if &*m[0].content == "hi"));
        assert_eq!(a[3].prompt, Prompt::Completion(Arc::from("hello")));
        assert!(w.rate.is_none());
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
