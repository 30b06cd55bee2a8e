//! The named workload shapes (see the table in [`super`]).

use std::sync::Arc;

use super::{Arrival, Message, Prompt, Session, Workload, exponential};
use crate::sim::text::prose;

/// Samples indices `0..n` with probability ∝ 1 / (i + 1)^s.
#[derive(Debug, Clone)]
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let cumulative = (0..n.max(1))
            .map(|i| {
                acc += 1.0 / ((i + 1) as f64).powf(s);
                acc
            })
            .collect();
        Self { cumulative }
    }

    pub fn sample(&self, rng: &mut fastrand::Rng) -> usize {
        let total = *self.cumulative.last().unwrap_or(&1.0);
        let x = rng.f64() * total;
        self.cumulative
            .partition_point(|c| *c < x)
            .min(self.cumulative.len() - 1)
    }
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

    /// The prompts, shuffled (groups interleave, as in SGLang's benchmark).
    pub fn prompts(&self, rng: &mut fastrand::Rng) -> Vec<Arc<str>> {
        let mut out = Vec::with_capacity(self.groups * self.prompts_per_group);
        for _ in 0..self.groups {
            let system = prose(rng, self.system_tokens);
            for _ in 0..self.prompts_per_group {
                let question = prose(rng, self.question_tokens);
                out.push(Arc::from(format!("{system}\n\n{question}")));
            }
        }
        rng.shuffle(&mut out);
        out
    }

    /// Requests arriving as a Poisson process of `rate` per second.
    pub fn poisson(&self, rate: f64, model: &str, seed: u64) -> Workload {
        let mut rng = fastrand::Rng::with_seed(seed);
        let prompts = self.prompts(&mut rng);
        let mut t = 0.0;
        let arrivals = prompts
            .into_iter()
            .map(|prompt| {
                t += exponential(&mut rng, rate);
                Arrival {
                    at: t,
                    model: model.to_owned(),
                    prompt: Prompt::Completion(prompt),
                    max_tokens: self.output_tokens,
                }
            })
            .collect();
        Workload {
            name: if self.system_tokens >= self.question_tokens {
                "high".into()
            } else {
                "low".into()
            },
            rate: Some(rate),
            arrivals,
            sessions: Vec::new(),
        }
    }
}

/// Same-prefix bursts: trains of `min_train..=max_train` requests within `train_window`
/// seconds, each train sharing one of `prefixes` prefixes of `prefix_tokens` (Zipf(1.0)
/// popular), with distinct questions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bursts {
    pub prefixes: usize,
    pub prefix_tokens: usize,
    pub question_tokens: usize,
    pub output_tokens: usize,
    pub min_train: usize,
    pub max_train: usize,
    pub train_window: f64,
}

impl Default for Bursts {
    fn default() -> Self {
        Self {
            prefixes: 16,
            prefix_tokens: 2000,
            question_tokens: 100,
            output_tokens: 128,
            min_train: 10,
            max_train: 50,
            train_window: 0.020,
        }
    }
}

impl Bursts {
    /// About `n` requests at a mean rate of `rate` per second.
    pub fn generate(&self, rate: f64, model: &str, seed: u64, n: usize) -> Workload {
        let mut rng = fastrand::Rng::with_seed(seed);
        let prefixes: Vec<String> = (0..self.prefixes)
            .map(|_| prose(&mut rng, self.prefix_tokens))
            .collect();
        let popularity = Zipf::new(self.prefixes, 1.0);
        let mean_train = (self.min_train + self.max_train) as f64 / 2.0;
        let mut arrivals = Vec::with_capacity(n);
        let mut t = 0.0;
        while arrivals.len() < n {
            t += exponential(&mut rng, rate / mean_train);
            let prefix = &prefixes[popularity.sample(&mut rng)];
            let size = rng.usize(self.min_train..=self.max_train);
            for _ in 0..size {
                let question = prose(&mut rng, self.question_tokens);
                arrivals.push(Arrival {
                    at: t + rng.f64() * self.train_window,
                    model: model.to_owned(),
                    prompt: Prompt::Completion(Arc::from(format!("{prefix}\n\n{question}"))),
                    max_tokens: self.output_tokens,
                });
            }
        }
        arrivals.sort_by(|a, b| a.at.total_cmp(&b.at));
        arrivals.truncate(n);
        Workload {
            name: "burst".into(),
            rate: Some(rate),
            arrivals,
            sessions: Vec::new(),
        }
    }
}

/// Multi-turn chat sessions over shared system prompts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiTurn {
    pub system_prompts: usize,
    pub system_tokens: usize,
    pub min_turns: usize,
    pub max_turns: usize,
    pub min_user_tokens: usize,
    pub max_user_tokens: usize,
    pub output_tokens: usize,
    pub mean_think: f64,
}

impl Default for MultiTurn {
    fn default() -> Self {
        Self {
            system_prompts: 8,
            system_tokens: 1500,
            min_turns: 4,
            max_turns: 10,
            min_user_tokens: 150,
            max_user_tokens: 400,
            output_tokens: 200,
            mean_think: 2.0,
        }
    }
}

impl MultiTurn {
    /// Sessions totalling about `n` requests; sessions start as a Poisson process whose rate
    /// makes the mean request rate `rate` once the run is under way.
    pub fn generate(&self, rate: f64, model: &str, seed: u64, n: usize) -> Workload {
        let mut rng = fastrand::Rng::with_seed(seed);
        let systems: Vec<Arc<str>> = (0..self.system_prompts)
            .map(|_| Arc::from(prose(&mut rng, self.system_tokens)))
            .collect();
        let mean_turns = (self.min_turns + self.max_turns) as f64 / 2.0;
        let mut sessions = Vec::new();
        let (mut t, mut total) = (0.0, 0);
        while total < n {
            t += exponential(&mut rng, rate / mean_turns);
            let turns = rng
                .usize(self.min_turns..=self.max_turns)
                .min(n - total)
                .max(1);
            total += turns;
            sessions.push(Session {
                start: t,
                model: model.to_owned(),
                system: systems[rng.usize(..systems.len())].clone(),
                user_turns: (0..turns)
                    .map(|_| {
                        let len = rng.usize(self.min_user_tokens..=self.max_user_tokens);
                        Arc::from(prose(&mut rng, len))
                    })
                    .collect(),
                think: (0..turns)
                    .map(|_| exponential(&mut rng, 1.0 / self.mean_think))
                    .collect(),
                max_tokens: self.output_tokens,
            });
        }
        Workload {
            name: "multiturn".into(),
            rate: Some(rate),
            arrivals: Vec::new(),
            sessions,
        }
    }
}

/// Questions about documents whose popularity is Zipf-distributed (document QA / RAG over a
/// hot set).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DocQa {
    pub documents: usize,
    pub min_doc_tokens: usize,
    pub max_doc_tokens: usize,
    pub zipf_s: f64,
    pub min_question_tokens: usize,
    pub max_question_tokens: usize,
    pub output_tokens: usize,
}

impl Default for DocQa {
    fn default() -> Self {
        Self {
            documents: 128,
            min_doc_tokens: 1000,
            max_doc_tokens: 6000,
            zipf_s: 1.1,
            min_question_tokens: 50,
            max_question_tokens: 150,
            output_tokens: 100,
        }
    }
}

impl DocQa {
    /// `n` Poisson arrivals at `rate` per second.
    pub fn generate(&self, rate: f64, model: &str, seed: u64, n: usize) -> Workload {
        let mut rng = fastrand::Rng::with_seed(seed);
        let docs: Vec<String> = (0..self.documents)
            .map(|_| {
                let len = rng.usize(self.min_doc_tokens..=self.max_doc_tokens);
                prose(&mut rng, len)
            })
            .collect();
        let popularity = Zipf::new(self.documents, self.zipf_s);
        let mut t = 0.0;
        let arrivals = (0..n)
            .map(|_| {
                t += exponential(&mut rng, rate);
                let doc = &docs[popularity.sample(&mut rng)];
                let len = rng.usize(self.min_question_tokens..=self.max_question_tokens);
                let question = prose(&mut rng, len);
                let messages = [
                    Message::new("system", "Answer the question from the document."),
                    Message::new("user", &format!("Document:\n{doc}\n\nQuestion: {question}")),
                ];
                Arrival {
                    at: t,
                    model: model.to_owned(),
                    prompt: Prompt::Chat(Arc::from(messages)),
                    max_tokens: self.output_tokens,
                }
            })
            .collect();
        Workload {
            name: "docqa".into(),
            rate: Some(rate),
            arrivals,
            sessions: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::tokenizer::tokenizer;

    #[test]
    fn shared_prefix_shapes() {
        let w = SharedPrefix {
            groups: 3,
            prompts_per_group: 4,
            system_tokens: 100,
            question_tokens: 10,
            output_tokens: 5,
        }
        .poisson(10.0, "m", 1);
        assert_eq!(w.arrivals.len(), 12);
        assert!(w.arrivals.windows(2).all(|p| p[0].at < p[1].at));
        let heads: std::collections::HashSet<String> = w
            .arrivals
            .iter()
            .map(|a| {
                a.prompt
                    .routing_text()
                    .split("\n\n")
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(heads.len(), 3, "one system prompt per group");
        let tokens = w.arrivals[0].prompt.engine_tokens().len();
        assert!((110..130).contains(&tokens), "{tokens}");
    }

    #[test]
    fn bursts_come_in_trains_within_the_window() {
        let w = Bursts::default().generate(40.0, "m", 2, 200);
        assert_eq!(w.arrivals.len(), 200);
        // Within 20 ms of one another, requests share their prefix.
        let close = w
            .arrivals
            .windows(2)
            .filter(|p| p[1].at - p[0].at < 0.001)
            .count();
        assert!(close > 100, "{close}");
    }

    #[test]
    fn multiturn_contexts_grow_past_16_kib() {
        let w = MultiTurn::default().generate(8.0, "m", 3, 100);
        let s = w
            .sessions
            .iter()
            .max_by_key(|s| s.user_turns.len())
            .unwrap();
        let answers: Vec<String> = (0..s.user_turns.len()).map(|_| "x ".repeat(700)).collect();
        let last = s.turn(s.user_turns.len() - 1, &answers);
        assert!(last.routing_text().len() > 16 * 1024);
        assert_eq!(w.len(), 100);
    }

    #[test]
    fn docqa_popularity_is_skewed() {
        let w = DocQa::default().generate(8.0, "m", 4, 400);
        let mut counts = std::collections::HashMap::new();
        for a in &w.arrivals {
            let t = a.prompt.routing_text();
            *counts.entry(t[..200].to_owned()).or_insert(0) += 1;
        }
        let max = counts.values().max().unwrap();
        assert!(*max > 400 / 128 * 5, "the hottest document gets {max}");
        assert!(tokenizer().count(&w.arrivals[0].prompt.routing_text()) > 1000);
    }
}
