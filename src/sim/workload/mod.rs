//! Workloads: what clients send, when. Open-loop requests ([`Arrival`]) and closed-loop
//! multi-turn conversations ([`Session`]: each turn is sent a think time after the previous
//! answer, with that answer in its history).
//!
//! | name | shape |
//! |---|---|
//! | `high` | SGLang's generated-shared-prefix, high reuse: 64 system prompts of 3,000 tokens, 16 questions of 128 each, 256 output tokens; Poisson arrivals |
//! | `low` | the same with a 128-token system prompt and 3,000-token questions |
//! | `burst` | trains of 10–50 requests within 20 ms sharing one of 16 2,000-token prefixes (Zipf-popular), 100-token questions, 128 output tokens |
//! | `multiturn` | chat sessions over 8 shared 1,500-token system prompts, 4–10 turns of 150–400 user tokens and 200 output tokens, 2 s mean think time: contexts grow past 16 KiB |
//! | `docqa` | chat questions about 128 documents of 1,000–6,000 tokens whose popularity is Zipf(1.1) |
//! | `trace:<path>` | a JSONL trace ([`trace`]) |
//!
//! Token counts are the simulator's own tokens ([`super::tokenizer`]); the text is the
//! simulator's prose ([`super::text`]).

pub mod shapes;
pub mod trace;

use std::sync::Arc;

use serde_json::json;

use super::tokenizer::{TokenId, tokenizer};

pub use shapes::{Bursts, DocQa, MultiTurn, SharedPrefix};
pub use trace::{TraceError, load_trace, parse_trace};

/// One chat message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Arc<str>,
    pub content: Arc<str>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: Arc::from(role),
            content: Arc::from(content),
        }
    }
}

/// What a request asks, as the client phrases it.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// `/v1/completions` with a text prompt.
    Completion(Arc<str>),
    /// `/v1/chat/completions`.
    Chat(Arc<[Message]>),
}

impl Prompt {
    /// The API path.
    pub fn path(&self) -> &'static str {
        match self {
            Prompt::Completion(_) => "/v1/completions",
            Prompt::Chat(_) => "/v1/chat/completions",
        }
    }

    /// The request body a client sends.
    pub fn body(&self, model: &str, max_tokens: usize, stream: bool) -> serde_json::Value {
        let mut v = match self {
            Prompt::Completion(p) => json!({"model": model, "prompt": &**p}),
            Prompt::Chat(m) => json!({
                "model": model,
                "messages": m.iter().map(|m| json!({"role": &*m.role, "content": &*m.content})).collect::<Vec<_>>(),
            }),
        };
        v["max_tokens"] = json!(max_tokens);
        if stream {
            v["stream"] = json!(true);
            v["stream_options"] = json!({"include_usage": true});
        }
        v
    }

    /// The token ids a simulated engine computes for it (its own template and tokenizer).
    pub fn engine_tokens(&self) -> Vec<TokenId> {
        let t = tokenizer();
        match self {
            Prompt::Completion(p) => t.render_completion(p),
            Prompt::Chat(m) => t.render_chat(m.iter().map(|m| (&*m.role, &*m.content))),
        }
    }

    /// The text a text-matching router (e.g. sglang-router over HTTP) looks at: the prompt, or
    /// the messages' contents joined by newlines.
    pub fn routing_text(&self) -> String {
        match self {
            Prompt::Completion(p) => p.to_string(),
            Prompt::Chat(m) => m.iter().map(|m| &*m.content).collect::<Vec<_>>().join("\n"),
        }
    }
}

/// One open-loop request.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// Seconds from the start of the run.
    pub at: f64,
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: usize,
}

/// A closed-loop conversation: turn `k + 1` is sent `think[k]` seconds after turn `k`'s answer
/// arrived, with every earlier question and answer in its messages.
#[derive(Debug, Clone)]
pub struct Session {
    pub start: f64,
    pub model: String,
    pub system: Arc<str>,
    pub user_turns: Vec<Arc<str>>,
    /// Think time after each turn's answer (the last one is unused).
    pub think: Vec<f64>,
    pub max_tokens: usize,
}

impl Session {
    /// The request for turn `k` after the answers in `answers` (one per earlier turn).
    pub fn turn(&self, k: usize, answers: &[String]) -> Prompt {
        let mut m = Vec::with_capacity(2 * k + 2);
        m.push(Message::new("system", &self.system));
        for (i, a) in answers.iter().enumerate().take(k) {
            m.push(Message::new("user", &self.user_turns[i]));
            m.push(Message::new("assistant", a));
        }
        m.push(Message::new("user", &self.user_turns[k]));
        Prompt::Chat(Arc::from(m))
    }
}

/// A workload: open-loop arrivals and closed-loop sessions.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    pub name: String,
    /// Nominal request rate (req/s), `None` for traces.
    pub rate: Option<f64>,
    /// Sorted by time.
    pub arrivals: Vec<Arrival>,
    pub sessions: Vec<Session>,
}

impl Workload {
    /// Requests in all (every session turn counted).
    pub fn len(&self) -> usize {
        self.arrivals.len()
            + self
                .sessions
                .iter()
                .map(|s| s.user_turns.len())
                .sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps at most `n` requests: the earliest arrivals and sessions.
    pub fn truncate(&mut self, n: usize) {
        self.arrivals.truncate(n);
        let mut left = n.saturating_sub(self.arrivals.len());
        self.sessions.retain(|s| {
            let keep = left >= s.user_turns.len();
            left = left.saturating_sub(s.user_turns.len());
            keep
        });
    }
}

/// Sizes a named workload may override.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    pub groups: Option<usize>,
    pub prompts_per_group: Option<usize>,
    pub output_tokens: Option<usize>,
    pub requests: Option<usize>,
}

/// Builds the workload `name` (see the module docs) at `rate` requests per second.
pub fn named(
    name: &str,
    rate: f64,
    model: &str,
    seed: u64,
    o: Overrides,
) -> Result<Workload, String> {
    let mut w = match name {
        "high" | "low" => {
            let mut shape = if name == "high" {
                SharedPrefix::high_reuse()
            } else {
                SharedPrefix::low_reuse()
            };
            shape.groups = o.groups.unwrap_or(shape.groups);
            shape.prompts_per_group = o.prompts_per_group.unwrap_or(shape.prompts_per_group);
            shape.output_tokens = o.output_tokens.unwrap_or(shape.output_tokens);
            shape.poisson(rate, model, seed)
        }
        "burst" => Bursts::default().generate(rate, model, seed, o.requests.unwrap_or(1024)),
        "multiturn" => MultiTurn::default().generate(rate, model, seed, o.requests.unwrap_or(1024)),
        "docqa" => DocQa::default().generate(rate, model, seed, o.requests.unwrap_or(1024)),
        other => {
            if let Some(path) = other.strip_prefix("trace:") {
                return load_trace(path.as_ref(), model).map_err(|e| e.to_string());
            }
            return Err(format!(
                "unknown workload {other:?} (high, low, burst, multiturn, docqa, trace:<path>)"
            ));
        }
    };
    if let Some(n) = o.requests {
        w.truncate(n);
    }
    Ok(w)
}

/// An exponential inter-arrival gap for `rate` per second.
pub fn exponential(rng: &mut fastrand::Rng, rate: f64) -> f64 {
    -(1.0 - rng.f64()).ln() / rate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_turns_carry_history() {
        let s = Session {
            start: 0.0,
            model: "m".into(),
            system: Arc::from("sys"),
            user_turns: vec![Arc::from("q1"), Arc::from("q2")],
            think: vec![1.0, 1.0],
            max_tokens: 4,
        };
        let Prompt::Chat(m) = s.turn(1, &["a1".to_owned()]) else {
            panic!("chat expected")
        };
        let roles: Vec<&str> = m.iter().map(|m| &*m.role).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(&*m[2].content, "a1");
        let body = s.turn(0, &[]).body("m", 4, true);
        assert_eq!(body["messages"][1]["content"], "q1");
        assert_eq!(body["stream_options"]["include_usage"], true);
    }

    #[test]
    fn every_named_workload_builds() {
        for name in ["high", "low", "burst", "multiturn", "docqa"] {
            let w = named(
                name,
                8.0,
                "m",
                1,
                Overrides {
                    requests: Some(64),
                    groups: Some(4),
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(!w.is_empty() && w.len() <= 64, "{name}: {}", w.len());
            assert!(w.arrivals.windows(2).all(|p| p[0].at <= p[1].at), "{name}");
        }
        assert!(named("nope", 1.0, "m", 1, Overrides::default()).is_err());
    }
}
