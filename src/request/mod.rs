//! OpenAI-style request bodies: which API, which model, and the exact prompt bytes that are
//! hashed into prefix blocks.
//!
//! # Prompt bytes
//!
//! | API (`:path` suffix) | bytes hashed |
//! |---|---|
//! | `/completions` | `prompt` as UTF-8; an array of strings joined by `" "`; token ids (or arrays of them) as little-endian `u32`s |
//! | `/chat/completions` | for `tools` (if any): `<\|tools\|>\n` + the tools' JSON + `\n`; then for each message in order: `<\|role\|>\n` + content + `\n`, where content is the string, or the parts in order (text parts' text, an image part as `<image:URL>`, any other part as its JSON), followed by `tool_calls` JSON if present |
//! | `/responses` | `instructions` + `\n` (if any), then `input` as a string, or its items rendered like chat messages |
//! | `/embeddings` | `input` like a completions prompt |
//!
//! The chat rendering mirrors what a chat template does (role markers, messages in order, tools
//! first), so two conversations that share a system prompt and early turns share leading blocks.
//! Unknown paths are treated as completions.

pub mod usage;

use serde::Deserialize;
use serde_json::Value;

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
    #[error("request body is not valid JSON: {0}")]
    NotJson(String),
    #[error("request body must be a JSON object")]
    NotObject,
    #[error("missing required field \"model\"")]
    MissingModel,
    #[error("field \"model\" must be a string")]
    ModelNotString,
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
    /// Bytes hashed into prefix blocks (see the module docs).
    pub prompt: Vec<u8>,
    pub stream: bool,
    pub cache_salt: Option<String>,
    /// Negative priorities are sheddable; 0 (the default) is critical.
    pub priority: i32,
    /// The client's output cap (`max_tokens`, `max_completion_tokens` or
    /// `max_output_tokens`), when it gave one.
    pub max_tokens: Option<u64>,
}

impl LlmRequest {
    /// Length of the rendered prompt in bytes.
    pub fn prompt_len(&self) -> usize {
        self.prompt.len()
    }
}

#[derive(Deserialize)]
struct Common {
    model: Option<Value>,
    #[serde(default)]
    stream: Option<Value>,
    #[serde(default)]
    cache_salt: Option<Value>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    messages: Option<Value>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    instructions: Option<Value>,
    #[serde(default)]
    max_tokens: Option<Value>,
    #[serde(default)]
    max_completion_tokens: Option<Value>,
    #[serde(default)]
    max_output_tokens: Option<Value>,
}

/// Parses a request body for `api`.
pub fn parse(api: Api, body: &[u8]) -> Result<LlmRequest, RequestError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return match serde_json::from_slice::<Value>(body) {
            Ok(_) => Err(RequestError::NotObject),
            Err(e) => Err(RequestError::NotJson(e.to_string())),
        };
    }
    let c: Common =
        serde_json::from_slice(body).map_err(|e| RequestError::NotJson(e.to_string()))?;
    let model = match c.model {
        None | Some(Value::Null) => return Err(RequestError::MissingModel),
        Some(Value::String(s)) => s,
        Some(_) => return Err(RequestError::ModelNotString),
    };
    let stream = match c.stream {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => {
            return Err(RequestError::InvalidField {
                field: "stream",
                reason: "must be a boolean".into(),
            });
        }
    };
    let cache_salt = match c.cache_salt {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => {
            return Err(RequestError::InvalidField {
                field: "cache_salt",
                reason: "must be a string".into(),
            });
        }
    };
    let mut prompt = Vec::new();
    match api {
        Api::Completions => match &c.prompt {
            None | Some(Value::Null) => return Err(RequestError::MissingPrompt),
            Some(p) => render_prompt(p, "prompt", &mut prompt)?,
        },
        Api::Embeddings => match &c.input {
            None | Some(Value::Null) => {
                return Err(RequestError::InvalidField {
                    field: "input",
                    reason: "embeddings request must have an \"input\"".into(),
                });
            }
            Some(p) => render_prompt(p, "input", &mut prompt)?,
        },
        Api::ChatCompletions => {
            let Some(Value::Array(messages)) = &c.messages else {
                return Err(RequestError::MissingMessages);
            };
            if let Some(tools) = c.tools.as_ref().filter(|t| !t.is_null()) {
                prompt.extend_from_slice(b"<|tools|>\n");
                push_json(tools, &mut prompt);
                prompt.push(b'\n');
            }
            render_messages(messages, "messages", &mut prompt)?;
        }
        Api::Responses => {
            match &c.instructions {
                Some(Value::String(s)) => {
                    prompt.extend_from_slice(s.as_bytes());
                    prompt.push(b'\n');
                }
                None | Some(Value::Null) => {}
                Some(_) => {
                    return Err(RequestError::InvalidField {
                        field: "instructions",
                        reason: "must be a string".into(),
                    });
                }
            }
            match &c.input {
                Some(Value::String(s)) => prompt.extend_from_slice(s.as_bytes()),
                Some(Value::Array(items)) => render_messages(items, "input", &mut prompt)?,
                None | Some(Value::Null) => {}
                Some(_) => {
                    return Err(RequestError::InvalidField {
                        field: "input",
                        reason: "must be a string or an array".into(),
                    });
                }
            }
        }
    }
    let max_tokens = [
        &c.max_tokens,
        &c.max_completion_tokens,
        &c.max_output_tokens,
    ]
    .into_iter()
    .find_map(|v| v.as_ref().and_then(Value::as_u64));
    Ok(LlmRequest {
        request_id: String::new(),
        target_model: model.clone(),
        model,
        prompt,
        stream,
        cache_salt,
        priority: 0,
        max_tokens,
    })
}

/// Completions `prompt` / embeddings `input`: string, strings, token ids, or batches of ids.
fn render_prompt(p: &Value, field: &'static str, out: &mut Vec<u8>) -> Result<(), RequestError> {
    let invalid = || RequestError::InvalidField {
        field,
        reason: "must be a string, an array of strings, or an array of token ids".into(),
    };
    match p {
        Value::String(s) => out.extend_from_slice(s.as_bytes()),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => {
                        if i > 0 {
                            out.push(b' ');
                        }
                        out.extend_from_slice(s.as_bytes());
                    }
                    Value::Number(_) => push_token(item, out).ok_or_else(invalid)?,
                    Value::Array(ids) => {
                        for id in ids {
                            push_token(id, out).ok_or_else(invalid)?;
                        }
                    }
                    _ => return Err(invalid()),
                }
            }
        }
        _ => return Err(invalid()),
    }
    Ok(())
}

fn push_token(v: &Value, out: &mut Vec<u8>) -> Option<()> {
    let id = u32::try_from(v.as_u64()?).ok()?;
    out.extend_from_slice(&id.to_le_bytes());
    Some(())
}

fn push_json(v: &Value, out: &mut Vec<u8>) {
    // Serializing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
}

/// Chat `messages` (or Responses `input` items): `<|role|>\n` + content + `\n` each.
fn render_messages(
    messages: &[Value],
    field: &'static str,
    out: &mut Vec<u8>,
) -> Result<(), RequestError> {
    for m in messages {
        let Value::Object(m) = m else {
            return Err(RequestError::InvalidField {
                field,
                reason: "every message must be an object".into(),
            });
        };
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        out.extend_from_slice(b"<|");
        out.extend_from_slice(role.as_bytes());
        out.extend_from_slice(b"|>\n");
        match m.get("content") {
            Some(Value::String(s)) => out.extend_from_slice(s.as_bytes()),
            Some(Value::Array(parts)) => {
                for part in parts {
                    render_part(part, out);
                }
            }
            None | Some(Value::Null) => {}
            Some(other) => push_json(other, out),
        }
        if let Some(calls) = m.get("tool_calls").filter(|v| !v.is_null()) {
            push_json(calls, out);
        }
        out.push(b'\n');
    }
    Ok(())
}

fn render_part(part: &Value, out: &mut Vec<u8>) {
    if let Some(text) = part.get("text").and_then(Value::as_str) {
        out.extend_from_slice(text.as_bytes());
    } else if let Some(url) = part
        .get("image_url")
        .and_then(|u| u.get("url").or(Some(u)))
        .and_then(Value::as_str)
    {
        out.extend_from_slice(b"<image:");
        out.extend_from_slice(url.as_bytes());
        out.push(b'>');
    } else if let Value::String(s) = part {
        out.extend_from_slice(s.as_bytes());
    } else {
        push_json(part, out);
    }
}

/// Replaces the top-level `"model"` of a JSON body (used when a rewrite header names another
/// target model). Other fields keep their values; key order may change.
pub fn rewrite_model(body: &[u8], model: &str) -> Result<Vec<u8>, RequestError> {
    let mut v: serde_json::Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| RequestError::NotJson(e.to_string()))?;
    v.insert("model".into(), Value::String(model.to_owned()));
    serde_json::to_vec(&v).map_err(|e| RequestError::NotJson(e.to_string()))
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
    fn rewrite_model_replaces_only_model() {
        let out = rewrite_model(br#"{"model":"a","prompt":"p"}"#, "b").unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "b");
        assert_eq!(v["prompt"], "p");
    }
}
