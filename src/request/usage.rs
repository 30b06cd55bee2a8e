//! Token usage from model-server responses, for epp's metrics.
//!
//! JSON bodies are parsed once complete (bounded); SSE bodies (`text/event-stream`) are scanned
//! line by line for `data: {...}` events carrying `usage` (the last one wins), `[DONE]` skipped,
//! lines split across chunks reassembled.

use serde::Deserialize;

/// Largest response (or single SSE line) buffered for usage parsing; larger ones are skipped.
const MAX_BUFFERED: usize = 4 << 20;

/// Token counts reported by the model server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cached_tokens: u64,
}

#[derive(Deserialize)]
struct Envelope {
    usage: Option<RawUsage>,
}

#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
}

fn parse_usage(json: &[u8]) -> Option<Usage> {
    let raw = serde_json::from_slice::<Envelope>(json).ok()?.usage?;
    let prompt = raw.prompt_tokens.or(raw.input_tokens).unwrap_or(0);
    let completion = raw.completion_tokens.or(raw.output_tokens).unwrap_or(0);
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: raw.total_tokens.unwrap_or(prompt + completion),
        cached_tokens: raw
            .prompt_tokens_details
            .or(raw.input_tokens_details)
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0),
    })
}

/// Incremental usage parser for one response body.
#[derive(Debug, Default)]
pub struct UsageParser {
    sse: bool,
    buf: Vec<u8>,
    overflow: bool,
    usage: Option<Usage>,
}

impl UsageParser {
    /// `content_type` of the response decides between SSE and plain JSON.
    pub fn new(content_type: Option<&str>) -> Self {
        Self {
            sse: content_type.is_some_and(|c| c.starts_with("text/event-stream")),
            ..Self::default()
        }
    }

    /// Feeds one body chunk.
    pub fn push(&mut self, chunk: &[u8]) {
        if !self.sse {
            if self.buf.len() + chunk.len() > MAX_BUFFERED {
                self.overflow = true;
                self.buf = Vec::new();
            }
            if !self.overflow {
                self.buf.extend_from_slice(chunk);
            }
            return;
        }
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
            if self.buf.is_empty() {
                self.sse_line(&rest[..nl]);
            } else {
                let mut line = std::mem::take(&mut self.buf);
                line.extend_from_slice(&rest[..nl]);
                self.sse_line(&line);
            }
            rest = &rest[nl + 1..];
        }
        if self.buf.len() + rest.len() <= MAX_BUFFERED {
            self.buf.extend_from_slice(rest);
        } else {
            self.buf.clear();
        }
    }

    /// Ends the body and returns the usage found, if any.
    pub fn finish(&mut self) -> Option<Usage> {
        let buf = std::mem::take(&mut self.buf);
        if self.sse {
            self.sse_line(&buf);
        } else if !self.overflow && !buf.is_empty() {
            self.usage = parse_usage(&buf).or(self.usage);
        }
        self.usage
    }

    fn sse_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.trim_ascii_start();
        if data == b"[DONE]" || !contains(data, b"\"usage\"") {
            return;
        }
        if let Some(u) = parse_usage(data) {
            self.usage = Some(u);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_usage_with_cached_tokens() {
        let mut p = UsageParser::new(Some("application/json"));
        p.push(br#"{"id":"x","usage":{"prompt_tokens":10,"#);
        p.push(br#""completion_tokens":5,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":8}}}"#);
        assert_eq!(
            p.finish(),
            Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 5,
                total_tokens: 15,
                cached_tokens: 8
            })
        );
    }

    #[test]
    fn responses_api_names() {
        let mut p = UsageParser::new(None);
        p.push(br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#);
        let u = p.finish().unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (3, 4, 7)
        );
    }

    #[test]
    fn sse_lines_split_across_chunks() {
        let mut p = UsageParser::new(Some("text/event-stream; charset=utf-8"));
        p.push(b"data: {\"choices\":[]}\n\ndata: {\"usage\":{\"prompt_");
        p.push(b"tokens\":7,\"completion_tokens\":2}}\r\n\ndata: [DONE]\n\n");
        let u = p.finish().unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (7, 2));
    }

    #[test]
    fn no_usage_is_none() {
        let mut p = UsageParser::new(None);
        p.push(b"not json");
        assert_eq!(p.finish(), None);
        let mut p = UsageParser::new(Some("text/event-stream"));
        p.push(b"data: [DONE]\n");
        assert_eq!(p.finish(), None);
    }
}
