//! OpenAI-style request bodies: which API, which model, and the exact prompt bytes that are
//! hashed into prefix blocks.
//!
//! Bodies are read by a streaming scanner ([`scan`]) that validates the JSON and keeps only
//! what routing needs; the prompt is rendered only as far as the hasher reads
//! ([`scan::ScanLimits::prompt_cap`]), its full length counted.
//!
//! # Prompt bytes
//!
//! | API (`:path` suffix) | bytes hashed |
//! |---|---|
//! | `/completions` | `prompt` as UTF-8; an array of strings joined by `" "`; token ids (or arrays of them) as little-endian `u32`s |
//! | `/chat/completions` | for `tools` (if any): `<\|tools\|>\n` + the tools' JSON + `\n`; then for each message in order: `<\|role\|>\n` + content + `\n`, where content is the string, or the parts in order (text parts' text, a string part itself, an image part as `<image:URL>`; other parts add nothing), or any other value's JSON; followed by `tool_calls` JSON if present |
//! | `/responses` | `instructions` + `\n` (if any), then `input` as a string, or its items rendered like chat messages (an item without a role as `user`) |
//! | `/embeddings` | `input` like a completions prompt |
//!
//! "JSON" above is the value as sent with the whitespace between tokens removed. String content
//! is the decoded string (escapes resolved). The chat rendering mirrors what a chat template
//! does (role markers, messages in order, tools first), so two conversations that share a
//! system prompt and early turns share leading blocks. Unknown paths are treated as
//! completions.

pub mod render;
pub mod scan;
pub mod usage;

pub use scan::{BodyScanner, ScanLimits, Scanned};

use crate::index::BlockDigests;

/// The OpenAI API a request targets, from the `:path` suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Completions,
    ChatCompletions,
    Responses,
    Embeddings,
}

impl Api {
    pub fn from_path(path: &str) -> Api {
        let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Api::ChatCompletions
        } else if path.ends_with("/responses") {
            Api::Responses
        } else if path.ends_with("/embeddings") {
            Api::Embeddings
        } else {
            Api::Completions
        }
    }
}

/// Why a body cannot be scheduled; each maps to a 400 with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request body is empty")]
    EmptyBody,
    #[error("request body is not valid JSON: {0}")]
    NotJson(String),
    #[error("request body is not valid UTF-8 (at byte {0})")]
    InvalidUtf8(usize),
    #[error("request body must be a JSON object")]
    NotObject,
    #[error("request body nests deeper than {0} levels (at byte {1})")]
    TooDeep(usize, usize),
    #[error("duplicate key \"{0}\"")]
    DuplicateKey(&'static str),
    #[error("missing required field \"model\"")]
    MissingModel,
    #[error("field \"model\" must be a string")]
    ModelNotString,
    #[error("field \"model\" must not be empty")]
    ModelEmpty,
    #[error("field \"model\" is longer than {0} bytes")]
    ModelTooLong(usize),
    #[error("chat completions request must have a \"messages\" array")]
    MissingMessages,
    #[error("completions request must have a \"prompt\"")]
    MissingPrompt,
    #[error("field \"{field}\" is invalid: {reason}")]
    InvalidField { field: &'static str, reason: String },
}

/// A parsed LLM request: what the scheduler needs to know.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LlmRequest {
    pub request_id: String,
    /// The model named in the body.
    pub model: String,
    /// The model the request is served as (the body's, unless a rewrite header overrides it).
    pub target_model: String,
    /// Bytes hashed into prefix blocks (see the module docs), up to the hasher's limit.
    pub prompt: Vec<u8>,
    /// The full rendered prompt's length (≥ `prompt.len()`); 0 means `prompt.len()`.
    pub prompt_total: usize,
    pub stream: bool,
    pub cache_salt: Option<String>,
    /// Negative priorities are sheddable; 0 (the default) is critical.
    pub priority: i32,
    /// The client's output cap (`max_tokens`, `max_completion_tokens` or
    /// `max_output_tokens`), when it gave one.
    pub max_tokens: Option<u64>,
    /// The prompt's block digests, computed while the body arrived (`None`: the decision
    /// hashes `prompt` itself).
    pub digests: Option<BlockDigests>,
}

impl LlmRequest {
    /// Length of the rendered prompt in bytes (all of it, not only what is kept).
    pub fn prompt_len(&self) -> usize {
        self.prompt_total.max(self.prompt.len())
    }

    /// The request described by a scanned body.
    pub fn from_scanned(s: Scanned) -> Self {
        LlmRequest {
            request_id: String::new(),
            target_model: s.model.clone(),
            model: s.model,
            prompt: s.prompt,
            prompt_total: s.prompt_len,
            stream: s.stream,
            cache_salt: s.cache_salt,
            priority: 0,
            max_tokens: s.max_tokens,
            digests: s.digests,
        }
    }
}

/// Parses a complete request body for `api` with the default limits.
pub fn parse(api: Api, body: &[u8]) -> Result<LlmRequest, RequestError> {
    parse_with(api, body, ScanLimits::default())
}

/// Parses a complete request body for `api`.
pub fn parse_with(api: Api, body: &[u8], limits: ScanLimits) -> Result<LlmRequest, RequestError> {
    let mut scanner = BodyScanner::new(api, limits);
    scanner.feed(body)?;
    scanner.finish().map(LlmRequest::from_scanned)
}

/// The body with its top-level `model` value (at `span`, quotes included, as found by the
/// scanner) replaced by `model`, from the body's chunks. Nothing else changes.
pub fn rewrite_model(chunks: &[impl AsRef<[u8]>], span: (usize, usize), model: &str) -> Vec<u8> {
    let total: usize = chunks.iter().map(|c| c.as_ref().len()).sum();
    let quoted = serde_json::to_string(model).unwrap_or_else(|_| "\"\"".to_owned());
    let mut out = Vec::with_capacity(total + quoted.len());
    let mut pos = 0;
    let mut inserted = false;
    for c in chunks {
        let c = c.as_ref();
        let (start, end) = (pos, pos + c.len());
        let before = span.0.clamp(start, end) - start;
        let after = (span.1.clamp(start, end) - start).max(before);
        out.extend_from_slice(&c[..before]);
        if !inserted && start + before == span.0 {
            out.extend_from_slice(quoted.as_bytes());
            inserted = true;
        }
        out.extend_from_slice(&c[after..]);
        pos = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(api: Api, body: &str) -> Result<LlmRequest, RequestError> {
        parse(api, body.as_bytes())
    }

    #[test]
    fn api_from_path() {
        assert_eq!(Api::from_path("/v1/chat/completions"), Api::ChatCompletions);
        assert_eq!(Api::from_path("/v1/completions?x=1"), Api::Completions);
        assert_eq!(Api::from_path("/v1/responses/"), Api::Responses);
        assert_eq!(Api::from_path("/v1/embeddings"), Api::Embeddings);
        assert_eq!(Api::from_path("/whatever"), Api::Completions);
    }

    #[test]
    fn completions_string_array_and_tokens() {
        let r = p(
            Api::Completions,
            r#"{"model":"m","prompt":"hello","stream":true}"#,
        )
        .unwrap();
        assert_eq!(r.prompt, b"hello");
        assert!(r.stream);
        assert_eq!(r.target_model, "m");
        let r = p(Api::Completions, r#"{"model":"m","prompt":["a","b"]}"#).unwrap();
        assert_eq!(r.prompt, b"a b");
        let r = p(Api::Completions, r#"{"model":"m","prompt":[1,256]}"#).unwrap();
        assert_eq!(r.prompt, [1, 0, 0, 0, 0, 1, 0, 0]);
        let r = p(Api::Completions, r#"{"model":"m","prompt":[[1],[2]]}"#).unwrap();
        assert_eq!(r.prompt, [1, 0, 0, 0, 2, 0, 0, 0]);
        assert!(matches!(
            p(Api::Completions, r#"{"model":"m","prompt":[-1]}"#),
            Err(RequestError::InvalidField {
                field: "prompt",
                ..
            })
        ));
    }

    #[test]
    fn chat_rendering_is_documented_form() {
        let r = p(
            Api::ChatCompletions,
            r#"{"model":"m","cache_salt":"s","messages":[
                {"role":"system","content":"sys"},
                {"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"u"}}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(r.prompt).unwrap(),
            "<|system|>\nsys\n<|user|>\nhi<image:u>\n"
        );
        assert_eq!(r.cache_salt.as_deref(), Some("s"));
    }

    #[test]
    fn a_message_renders_the_same_whatever_its_key_order() {
        // Role first renders content in place; role or tool calls first make it wait.
        let calls = r#""tool_calls":[{"id":"c"}]"#;
        let bodies = [
            format!(r#"{{"role":"assistant","content":"ab",{calls}}}"#),
            format!(r#"{{"content":"ab","role":"assistant",{calls}}}"#),
            format!(r#"{{{calls},"role":"assistant","content":"ab"}}"#),
            format!(r#"{{"role":"assistant",{calls},"content":"ab"}}"#),
            format!(r#"{{"content":"ab",{calls},"role":"assistant"}}"#),
        ];
        for m in &bodies {
            let body =
                format!(r#"{{"model":"m","messages":[{{"role":"user","content":"q"}},{m}]}}"#);
            let r = p(Api::ChatCompletions, &body).unwrap();
            let rendered = "<|user|>\nq\n<|assistant|>\nab[{\"id\":\"c\"}]\n";
            assert_eq!(String::from_utf8(r.prompt).unwrap(), rendered, "{m}");
            let capped = ScanLimits {
                max_depth: 8,
                prompt_cap: 20,
                ..ScanLimits::default()
            };
            let r = parse_with(Api::ChatCompletions, body.as_bytes(), capped).unwrap();
            assert_eq!(
                (&r.prompt[..], r.prompt_len()),
                (&rendered.as_bytes()[..20], rendered.len())
            );
        }
        let unknown = r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#;
        assert!(p(Api::ChatCompletions, unknown).is_err());
    }

    #[test]
    fn chat_tools_come_first() {
        let r = p(
            Api::ChatCompletions,
            r#"{"model":"m","tools":[{"a":1}],"messages":[{"role":"user","content":"q"}]}"#,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(r.prompt).unwrap(),
            "<|tools|>\n[{\"a\":1}]\n<|user|>\nq\n"
        );
    }

    #[test]
    fn responses_and_embeddings() {
        let r = p(
            Api::Responses,
            r#"{"model":"m","instructions":"be nice","input":"hi"}"#,
        )
        .unwrap();
        assert_eq!(r.prompt, b"be nice\nhi");
        let r = p(
            Api::Responses,
            r#"{"model":"m","input":[{"role":"user","content":"x"}]}"#,
        )
        .unwrap();
        assert_eq!(r.prompt, b"<|user|>\nx\n");
        let r = p(Api::Embeddings, r#"{"model":"m","input":["a","b"]}"#).unwrap();
        assert_eq!(r.prompt, b"a b");
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(matches!(
            p(Api::Completions, "{"),
            Err(RequestError::NotJson(_))
        ));
        assert!(matches!(
            p(Api::Completions, "not json"),
            Err(RequestError::NotJson(_))
        ));
        assert_eq!(p(Api::Completions, "[1]"), Err(RequestError::NotObject));
        assert_eq!(
            p(Api::Completions, r#"{"prompt":"x"}"#),
            Err(RequestError::MissingModel)
        );
        assert_eq!(
            p(Api::Completions, r#"{"model":3,"prompt":"x"}"#),
            Err(RequestError::ModelNotString)
        );
        assert_eq!(
            p(Api::ChatCompletions, r#"{"model":"m"}"#),
            Err(RequestError::MissingMessages)
        );
        assert_eq!(
            p(Api::Completions, r#"{"model":"m"}"#),
            Err(RequestError::MissingPrompt)
        );
        assert!(matches!(
            p(
                Api::Completions,
                r#"{"model":"m","prompt":"x","stream":"yes"}"#
            ),
            Err(RequestError::InvalidField {
                field: "stream",
                ..
            })
        ));
        let msg = p(Api::Completions, r#"{"prompt":"x"}"#)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("model"), "{msg}");
    }

    #[test]
    fn rewrite_model_replaces_only_model_across_chunks() {
        let body = br#"{"prompt":"p","model":"a-model","x":1}"#;
        let mut scanner = BodyScanner::new(Api::Completions, ScanLimits::default());
        scanner.feed(body).unwrap();
        let span = scanner.finish().unwrap().model_span.unwrap();
        for split in 0..body.len() {
            let chunks = [&body[..split], &body[split..]];
            let out = rewrite_model(&chunks, span, "b\"q");
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["model"], "b\"q", "split at {split}");
            assert_eq!(v["prompt"], "p");
            assert_eq!(v["x"], 1);
        }
    }

    fn chunked(api: Api, body: &[u8], size: usize) -> Result<LlmRequest, RequestError> {
        let mut scanner = BodyScanner::new(api, ScanLimits::default());
        for c in body.chunks(size.max(1)) {
            scanner.feed(c)?;
        }
        scanner.finish().map(LlmRequest::from_scanned)
    }

    const BODIES: &[(Api, &str)] = &[
        (
            Api::ChatCompletions,
            r#"{ "messages" : [ {"content":"caf\u00e9 \ud83d\ude00 \"q\"\n","role":"system"},
               {"role":"user","content":[{"type":"text","text":"h\u0069"},"raw",
               {"type":"image_url","image_url":"http://x/y.png"}],"tool_calls":[{"id":"c1","f":{"a":[1,2.5e3,true,null]}}]},
               {"role":"assistant","content":{"k":"v w"}} ],
               "tools":[ {"type": "function", "name":"f"} ], "model" : "m\u00fc", "stream":true,
               "max_tokens": 99, "cache_salt":"s" }"#,
        ),
        (
            Api::Completions,
            r#"{"model":"m","prompt":["a","b",[1,2],300],"max_completion_tokens":5,"extra":{"deep":[[[]]]}}"#,
        ),
        (
            Api::Responses,
            r#"{"input":[{"type":"message","content":[{"type":"input_text","text":"x"}]}],"model":"m","instructions":"be nice"}"#,
        ),
    ];

    #[test]
    fn any_chunking_gives_the_same_result() {
        for (api, body) in BODIES {
            let whole = parse(*api, body.as_bytes()).unwrap();
            for size in [1, 2, 3, 7, 64] {
                assert_eq!(
                    chunked(*api, body.as_bytes(), size).unwrap(),
                    whole,
                    "{size}"
                );
            }
        }
        let chat = parse(BODIES[0].0, BODIES[0].1.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(chat.prompt).unwrap(),
            "<|tools|>\n[{\"type\":\"function\",\"name\":\"f\"}]\n\
             <|system|>\ncafé 😀 \"q\"\n\n\
             <|user|>\nhiraw<image:http://x/y.png>[{\"id\":\"c1\",\"f\":{\"a\":[1,2.5e3,true,null]}}]\n\
             <|assistant|>\n{\"k\":\"v w\"}\n"
        );
        assert_eq!(chat.model, "mü");
        assert!(chat.stream);
        assert_eq!(chat.max_tokens, Some(99));
        let c = parse(BODIES[1].0, BODIES[1].1.as_bytes()).unwrap();
        let mut want = b"a b".to_vec();
        for id in [1u32, 2, 300] {
            want.extend_from_slice(&id.to_le_bytes());
        }
        assert_eq!(c.prompt, want);
        assert_eq!(c.max_tokens, Some(5));
        let r = parse(BODIES[2].0, BODIES[2].1.as_bytes()).unwrap();
        assert_eq!(r.prompt, b"be nice\n<|user|>\nx\n");
    }

    /// Digests are taken while the body arrives; they stand for the prompt only when nothing
    /// renders before the main section (tools and instructions do).
    #[test]
    fn digests_come_with_prompts_that_are_their_main_section() {
        let chained = |r: &LlmRequest| {
            let d = r.digests.as_ref().expect("digests");
            let mut out = Vec::new();
            d.chain_into(3, &mut out);
            assert_eq!(out, d.hasher().hash(3, &r.prompt));
            out.len()
        };
        let long = "z".repeat(20_000);
        let r = p(
            Api::Completions,
            &format!(r#"{{"model":"m","prompt":"{long}"}}"#),
        )
        .unwrap();
        assert_eq!(chained(&r), 256 + 4, "16 KiB dense, then 4 coarse blocks");
        let chat = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{long}"}}]}}"#);
        assert!(chained(&p(Api::ChatCompletions, &chat).unwrap()) > 256);
        let tools = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"q"}}],"tools":[{{"n":"{long}"}}]}}"#
        );
        let r = p(Api::ChatCompletions, &tools).unwrap();
        assert!(r.digests.is_none(), "the tools render first");
        let off = ScanLimits {
            digests: None,
            ..ScanLimits::default()
        };
        let body = format!(r#"{{"model":"m","prompt":"{long}"}}"#);
        assert!(
            parse_with(Api::Completions, body.as_bytes(), off)
                .unwrap()
                .digests
                .is_none()
        );
    }

    #[test]
    fn the_prompt_is_kept_up_to_the_cap_and_counted_in_full() {
        let text = "y".repeat(100_000);
        let body = format!(r#"{{"model":"m","prompt":"{text}"}}"#);
        let limits = ScanLimits {
            max_depth: 8,
            prompt_cap: 1000,
            ..ScanLimits::default()
        };
        let r = parse_with(Api::Completions, body.as_bytes(), limits).unwrap();
        assert_eq!((r.prompt.len(), r.prompt_len()), (1000, 100_000));
    }

    #[test]
    fn bad_bodies_are_named() {
        let cases: &[(Api, &str, &str)] = &[
            (Api::Completions, "", "empty"),
            (
                Api::Completions,
                r#"{"model":"m","prompt":"x"} extra"#,
                "trailing",
            ),
            (
                Api::Completions,
                r#"{"model":"m","prompt":"x","#,
                "not valid JSON",
            ),
            (
                Api::Completions,
                r#"{"model":"m","model":"n","prompt":"x"}"#,
                "duplicate key \"model\"",
            ),
            (
                Api::Completions,
                r#"{"model":"","prompt":"x"}"#,
                "must not be empty",
            ),
            (
                Api::Completions,
                r#"{"model":"m","prompt":""}"#,
                "must not be empty",
            ),
            (
                Api::Completions,
                r#"{"model":"m","prompt":{"a":1}}"#,
                "prompt",
            ),
            (
                Api::Completions,
                r#"{"model":"m","prompt":[4294967296]}"#,
                "token ids",
            ),
            (
                Api::Completions,
                r#"{"model":"m","prompt":"x","n":01}"#,
                "invalid number",
            ),
            (
                Api::Completions,
                r#"{"model":"m","prompt":"a\qb"}"#,
                "invalid escape",
            ),
            (
                Api::Completions,
                r#"{"model":"m","prompt":"\ud800x"}"#,
                "surrogate",
            ),
            (
                Api::Completions,
                "{\"model\":\"m\",\"prompt\":\"a\tb\"}",
                "control character",
            ),
            (
                Api::Completions,
                r#"{"model":"m","prompt":"x","b":tru}"#,
                "invalid literal",
            ),
            (
                Api::ChatCompletions,
                r#"{"model":"m","messages":[]}"#,
                "must not be empty",
            ),
            (
                Api::ChatCompletions,
                r#"{"model":"m","messages":{}}"#,
                "messages",
            ),
            (
                Api::ChatCompletions,
                r#"{"model":"m","messages":["x"]}"#,
                "must be an object",
            ),
            (
                Api::ChatCompletions,
                r#"{"model":"m","messages":[{"content":"x"}]}"#,
                "no \"role\"",
            ),
            (
                Api::ChatCompletions,
                r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
                "unknown role",
            ),
            (
                Api::ChatCompletions,
                r#"{"model":"m","messages":[{"role":"user","role":"user"}]}"#,
                "duplicate key \"role\"",
            ),
        ];
        for (api, body, want) in cases {
            let e = p(*api, body).unwrap_err().to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
        let long = format!(r#"{{"model":"{}","prompt":"x"}}"#, "m".repeat(300));
        assert_eq!(
            p(Api::Completions, &long),
            Err(RequestError::ModelTooLong(256))
        );
        let deep = format!(
            r#"{{"model":"m","prompt":"x","d":{}{}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        assert!(matches!(
            p(Api::Completions, &deep),
            Err(RequestError::TooDeep(64, _))
        ));
        let mut bad = br#"{"model":"m","prompt":"ab"#.to_vec();
        bad.extend_from_slice(&[0xff, 0xfe]);
        bad.extend_from_slice(br#""}"#);
        assert!(matches!(
            parse(Api::Completions, &bad),
            Err(RequestError::InvalidUtf8(_))
        ));
        // A multi-byte character split across chunks is fine.
        let ok = r#"{"model":"m","prompt":"é€😀"}"#.as_bytes();
        assert_eq!(
            chunked(Api::Completions, ok, 1).unwrap().prompt,
            "é€😀".as_bytes()
        );
    }
}
