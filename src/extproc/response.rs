//! The response side of one stream: what the model server sent back, echoed chunk by chunk
//! (each chunk's buffer moved into the reply, not copied), with the usage parsed for metrics
//! and, when the request's model was rewritten, the served model's name swapped back.

use std::time::Instant;

use bytes::Bytes;

use crate::request::usage::{Usage, UsageParser, is_event_stream};

/// One response chunk as it is to be sent on.
#[derive(Debug)]
pub struct Chunk {
    /// The bytes for the client: the received buffer itself unless the model name was swapped.
    pub body: Bytes,
    /// The model name was swapped in this chunk (the bytes differ from what was received).
    pub rewritten: bool,
    /// These are the response's first bytes.
    pub first: bool,
}

/// What epp learns from a response as it passes.
#[derive(Debug, Default)]
pub struct ResponseState {
    usage: Option<UsageParser>,
    pub bytes: usize,
    pub first_byte: Option<Instant>,
    pub complete: bool,
    /// Whether the response is an event stream (`None` until its headers arrive).
    pub event_stream: Option<bool>,
    /// `("model":"target")` → `("model":"original")` when the model was rewritten.
    model_swap: Option<(Vec<u8>, Vec<u8>)>,
}

impl ResponseState {
    /// Response headers arrived.
    pub fn headers(&mut self, content_type: Option<&str>) {
        self.event_stream = Some(content_type.is_some_and(is_event_stream));
        self.usage = Some(UsageParser::new(content_type));
    }

    /// The client asked for `original` and the server is answering as `target`.
    pub fn swap_model(&mut self, target: &str, original: &str) {
        let quoted = |m: &str| serde_json::to_string(m).unwrap_or_default();
        self.model_swap = Some((
            format!("\"model\":{}", quoted(target)).into_bytes(),
            format!("\"model\":{}", quoted(original)).into_bytes(),
        ));
    }

    /// One body chunk: counts it, feeds the usage parser, and returns the bytes to send on.
    pub fn chunk(&mut self, body: Bytes) -> Chunk {
        let first = self.first_byte.is_none() && !body.is_empty();
        if first {
            self.first_byte = Some(Instant::now());
        }
        self.bytes += body.len();
        self.usage
            .get_or_insert_with(|| UsageParser::new(None))
            .push(&body);
        let swapped = self
            .model_swap
            .as_ref()
            .and_then(|(from, to)| replace_all(&body, from, to));
        Chunk {
            rewritten: swapped.is_some(),
            body: swapped.map_or(body, Bytes::from),
            first,
        }
    }

    /// The usage the response reported, if any (call once, at the end).
    pub fn usage(&mut self) -> Option<Usage> {
        self.usage.as_mut().and_then(UsageParser::finish)
    }
}

/// `haystack` with every `from` replaced by `to`; `None` when `from` does not occur.
pub fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    let finder = memchr::memmem::Finder::new(from);
    let first = finder.find(haystack)?;
    let mut out = Vec::with_capacity(haystack.len() + to.len());
    out.extend_from_slice(&haystack[..first]);
    let mut rest = &haystack[first..];
    while let Some(i) = finder.find(rest) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(to);
        rest = &rest[i + from.len()..];
    }
    out.extend_from_slice(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_swap_replaces_every_occurrence() {
        assert_eq!(
            replace_all(
                b"a\"model\":\"x\"b\"model\":\"x\"",
                b"\"model\":\"x\"",
                b"\"model\":\"yy\""
            )
            .unwrap(),
            b"a\"model\":\"yy\"b\"model\":\"yy\"".to_vec()
        );
        assert_eq!(replace_all(b"nothing", b"zz", b"y"), None);
    }

    #[test]
    fn chunks_pass_through_and_first_bytes_are_noticed() {
        let mut r = ResponseState::default();
        assert_eq!(r.event_stream, None);
        r.headers(Some("Text/Event-Stream; charset=utf-8"));
        assert_eq!(r.event_stream, Some(true));
        r.swap_model("served", "asked");
        let out = r.chunk(Bytes::from_static(b"data: {\"model\":\"served\"}\n\n"));
        assert!(out.first && out.rewritten);
        assert_eq!(&out.body[..], b"data: {\"model\":\"asked\"}\n\n");
        let received = Bytes::from_static(b"data: {\"usage\":{\"prompt_tokens\":3}}\n\n");
        let out = r.chunk(received.clone());
        assert!(!out.first && !out.rewritten);
        // Unchanged bytes are the received buffer itself, not a copy.
        assert_eq!(out.body.as_ptr(), received.as_ptr());
        assert_eq!(r.usage().unwrap().prompt_tokens, 3);
    }
}
