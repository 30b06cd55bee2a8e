//! Token usage from model-server responses, for epp's metrics.
//!
//! JSON bodies: only the last 64 KiB are kept (servers put `usage` at the end), and the value
//! of the last `"usage"` key found there is parsed when the body ends. SSE bodies
//! (`text/event-stream`): a chunk without `"usage"` is scanned once and only its unfinished
//! last line kept; in the others, the `data:` lines containing `"usage"` are parsed (the last
//! one wins), `[DONE]` skipped, a line split across chunks reassembled (the only copy,
//! bounded). Counts saturate instead of overflowing.

use std::sync::LazyLock;

use serde::Deserialize;

/// Largest tail of a JSON body, or single SSE line, kept for usage parsing.
const MAX_BUFFERED: usize = 64 << 10;

/// The key searched for, with its searcher built once.
static USAGE_KEY: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));

/// Token counts reported by the model server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// `None` where the server does not report it (vLLM without
    /// `--enable-prompt-tokens-details`).
    pub cached_tokens: Option<u64>,
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

/// Parses the JSON value starting at `json` (trailing bytes ignored) as a usage object.
fn usage_value(json: &[u8]) -> Option<Usage> {
    let mut values = serde_json::Deserializer::from_slice(json).into_iter::<RawUsage>();
    let raw = values.next()?.ok()?;
    let prompt = raw.prompt_tokens.or(raw.input_tokens).unwrap_or(0);
    let completion = raw.completion_tokens.or(raw.output_tokens).unwrap_or(0);
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: raw
            .total_tokens
            .unwrap_or(prompt.saturating_add(completion)),
        cached_tokens: raw
            .prompt_tokens_details
            .or(raw.input_tokens_details)
            .and_then(|d| d.cached_tokens),
    })
}

/// The usage in `json`: the value of its last `"usage"` key.
fn find_usage(json: &[u8]) -> Option<Usage> {
    let at = memchr::memmem::rfind(json, b"\"usage\"")?;
    let rest = &json[at + 7..];
    let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    if rest[colon] != b':' {
        return None;
    }
    usage_value(rest[colon + 1..].trim_ascii_start())
}

/// Whether a response's `content-type` is an event stream (SSE); media types match in any
/// case.
pub fn is_event_stream(content_type: &str) -> bool {
    content_type
        .trim_start()
        .get(..17)
        .is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream"))
}

/// Incremental usage parser for one response body.
#[derive(Debug, Default)]
pub struct UsageParser {
    sse: bool,
    buf: Vec<u8>,
    usage: Option<Usage>,
}

impl UsageParser {
    /// `content_type` of the response decides between SSE and plain JSON.
    pub fn new(content_type: Option<&str>) -> Self {
        Self {
            sse: content_type.is_some_and(is_event_stream),
            ..Self::default()
        }
    }

    /// Feeds one body chunk.
    pub fn push(&mut self, chunk: &[u8]) {
        if !self.sse {
            // Keep the last MAX_BUFFERED..2×MAX_BUFFERED bytes (trimmed in amortized steps).
            let chunk = &chunk[chunk.len().saturating_sub(2 * MAX_BUFFERED)..];
            self.buf.extend_from_slice(chunk);
            if self.buf.len() > 2 * MAX_BUFFERED {
                let cut = self.buf.len() - MAX_BUFFERED;
                self.buf.drain(..cut);
            }
            return;
        }
        self.push_sse(chunk);
    }

    /// SSE: completes the line left over from the last chunk, then parses the lines of this
    /// one only when `"usage"` occurs in it (one scan; most chunks are token events), and
    /// keeps the unfinished last line.
    fn push_sse(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        if !self.buf.is_empty() {
            let Some(nl) = memchr::memchr(b'\n', rest) else {
                self.keep_partial(rest);
                return;
            };
            let mut line = std::mem::take(&mut self.buf);
            line.extend_from_slice(&rest[..nl]);
            self.sse_line(&line);
            line.clear();
            self.buf = line;
            rest = &rest[nl + 1..];
        }
        if USAGE_KEY.find(rest).is_some() {
            while let Some(nl) = memchr::memchr(b'\n', rest) {
                self.sse_line(&rest[..nl]);
                rest = &rest[nl + 1..];
            }
        } else if let Some(nl) = memchr::memrchr(b'\n', rest) {
            rest = &rest[nl + 1..];
        }
        self.keep_partial(rest);
    }

    /// Appends an unfinished line, or drops it (and what was kept) past [`MAX_BUFFERED`].
    fn keep_partial(&mut self, partial: &[u8]) {
        if self.buf.len() + partial.len() <= MAX_BUFFERED {
            self.buf.extend_from_slice(partial);
        } else {
            self.buf.clear();
        }
    }

    /// Ends the body and returns the usage found, if any.
    pub fn finish(&mut self) -> Option<Usage> {
        let buf = std::mem::take(&mut self.buf);
        if self.sse {
            self.sse_line(&buf);
        } else if !buf.is_empty() {
            self.usage = find_usage(&buf).or(self.usage);
        }
        self.usage
    }

    fn sse_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        if USAGE_KEY.find(data).is_none() {
            return;
        }
        if let Some(u) = find_usage(data) {
            self.usage = Some(u);
        }
    }
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
                cached_tokens: Some(8)
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
    fn sse_usage_is_found_wherever_the_chunks_split() {
        let stream: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n\n\
            data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n\
            data: [DONE]\n\n";
        let want = Some((7, 2));
        let usage = |pieces: &[&[u8]]| {
            let mut p = UsageParser::new(Some("text/event-stream"));
            for piece in pieces {
                p.push(piece);
            }
            p.finish().map(|u| (u.prompt_tokens, u.completion_tokens))
        };
        for i in 0..=stream.len() {
            let (a, rest) = stream.split_at(i);
            assert_eq!(usage(&[a, rest]), want, "split at {i}");
            for j in i..=stream.len() {
                let (b, c) = stream[i..].split_at(j - i);
                assert_eq!(usage(&[a, b, c]), want, "split at {i}, {j}");
            }
        }
    }

    #[test]
    fn large_json_bodies_keep_only_their_tail_and_sums_saturate() {
        let mut p = UsageParser::new(Some("application/json"));
        p.push(b"{\"choices\":[{\"text\":\"");
        for _ in 0..100 {
            p.push(&[b'x'; 10_000]);
        }
        p.push(br#""}],"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":5}}"#);
        let u = p.finish().unwrap();
        assert_eq!(u.total_tokens, u64::MAX);
        assert_eq!(u.completion_tokens, 5);
    }

    #[test]
    fn event_streams_are_told_by_their_media_type_in_any_case() {
        assert!(is_event_stream("text/event-stream"));
        assert!(is_event_stream(" Text/Event-Stream; charset=utf-8"));
        assert!(!is_event_stream("application/json"));
        assert!(!is_event_stream("text/event"));
        let mut p = UsageParser::new(Some("TEXT/EVENT-STREAM"));
        p.push(b"data: {\"usage\":{\"prompt_tokens\":3}}\n\ndata: [DONE]\n\n");
        assert_eq!(p.finish().unwrap().prompt_tokens, 3);
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
