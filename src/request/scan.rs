//! A streaming JSON scanner for request bodies: it validates the whole body, extracts only what
//! routing needs — `model`, `stream`, `cache_salt`, the output cap, and the prompt rendered
//! into the bytes that are hashed (see [`super`]'s table) — and keeps nothing else.
//!
//! Why not a JSON tree: a body may be up to the configured limit (32 MiB by default), and a
//! tree costs 10–16× the body for arrays such as `[[],[],…]`. The scanner consumes the body
//! chunk by chunk as it arrives, in O(nesting depth) state plus the rendered prompt, which is
//! kept only up to a cap (the most the prefix hasher reads) while its full length is counted.
//! String content is located with `memchr`, so the cost per byte is a few passes over the
//! prompt text.
//!
//! Rules beyond plain JSON validity (each an error naming the field): nesting deeper than
//! `max_depth`; a duplicate key among those epp reads; `model` missing, not a string, empty or
//! longer than 256 bytes; chat without a non-empty `messages` array, a message that is not an
//! object, without a `role`, or with a role other than system/user/assistant/tool/developer/
//! function; completions without a non-empty `prompt`; a prompt or content of the wrong type;
//! token ids that are not 32-bit unsigned integers.

use super::render::{Part, Rendered, Section};
use super::{Api, RequestError};
use crate::index::{BlockDigests, BlockHasher};

/// Longest model name accepted (it labels metrics and is echoed in headers).
pub const MAX_MODEL_LEN: usize = 256;
/// Keys longer than this cannot be one epp reads; they are skipped, not kept.
const MAX_KEY: usize = 32;
const ROLES: [&str; 6] = [
    "system",
    "user",
    "assistant",
    "tool",
    "developer",
    "function",
];

/// Bounds on what the scanner keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanLimits {
    /// Deepest nesting of arrays and objects accepted.
    pub max_depth: usize,
    /// Rendered prompt bytes kept (the prefix hasher's limit).
    pub prompt_cap: usize,
    /// Block layout whose digests are computed as the prompt renders (the first prefix
    /// plugin's; see [`BlockDigests`]); `None`: the decision hashes the whole prompt.
    pub digests: Option<BlockHasher>,
}

impl Default for ScanLimits {
    fn default() -> Self {
        Self {
            max_depth: 64,
            prompt_cap: BlockHasher::default().hashed_limit(),
            digests: Some(BlockHasher::default()),
        }
    }
}

/// What the scanner extracted from a complete body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scanned {
    pub model: String,
    pub stream: bool,
    pub cache_salt: Option<String>,
    pub max_tokens: Option<u64>,
    /// The rendered prompt, up to the cap.
    pub prompt: Vec<u8>,
    /// The rendered prompt's full length.
    pub prompt_len: usize,
    /// Byte range of the top-level `model` value (quotes included) in the body, for rewriting.
    pub model_span: Option<(usize, usize)>,
    /// The prompt's block digests, when computed while it rendered.
    pub digests: Option<BlockDigests>,
}

/// What a value means, from where it sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Ignore,
    Root,
    Model,
    Stream,
    CacheSalt,
    MaxTokens,
    /// Completions `prompt` / embeddings `input`.
    Prompt,
    PromptItem,
    TokenId,
    /// Chat `messages` (`responses` is true for the Responses API's `input`).
    Messages {
        responses: bool,
    },
    /// Responses `input`: a string or an array of items.
    ResponsesInput,
    Instructions,
    Tools,
    Message,
    MessageRoleName,
    Content,
    ToolCalls,
    ContentPart,
    PartText,
    PartImage,
    ImageUrl,
}

/// Where a string's decoded text goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    Discard,
    /// A short string kept whole (`model`, `role`, a key…), at most this many bytes.
    Capture(usize),
    Section(Part),
    /// The current message's content.
    Content,
}

/// Where a raw (minified JSON) value goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawSink {
    Tools,
    Content,
    ToolCalls,
}

#[derive(Debug)]
struct Message {
    role: Option<String>,
    /// Content that arrived before the message could be rendered in place.
    content: Section,
    tool_calls: Section,
    responses: bool,
    index: usize,
    /// The header is rendered and the content goes straight into the prompt.
    direct: bool,
}

impl Message {
    /// Appends content text. When the role came first and no tool calls came before it (how
    /// clients write messages), the header is rendered at once and the content goes straight
    /// into the prompt: one copy of a long prompt instead of two. Otherwise it waits in
    /// `content` until the message ends, since the role decides the header.
    fn push_content(&mut self, main: &mut Section, bytes: &[u8]) {
        if !self.direct
            && self.content.is_empty()
            && self.tool_calls.is_empty()
            && let Some(role) = &self.role
        {
            render_header(main, role);
            self.direct = true;
        }
        if self.direct {
            main.push(bytes);
        } else {
            self.content.push(bytes);
        }
    }
}

/// `<|role|>\n`, which opens a rendered message.
fn render_header(main: &mut Section, role: &str) {
    main.push(b"<|");
    main.push(role.as_bytes());
    main.push(b"|>\n");
}

#[derive(Debug)]
enum Frame {
    Object {
        role: Role,
        /// The role of the value under the current key.
        value_role: Role,
        expect_key: bool,
        first: bool,
        seen: u16,
    },
    Array {
        role: Role,
        first: bool,
        items: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// A value (or, at the root, the body) starts next.
    Value,
    /// After a value: `,` or a closing bracket.
    AfterValue,
    /// In an object: a key or `}` (`}` allowed only right after `{`).
    Key,
    Colon,
    Str,
    Number,
    Literal,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Esc {
    None,
    Backslash,
    Unicode { digits: u8, code: u32 },
}

/// The streaming scanner. Feed it the body in chunks, then [`BodyScanner::finish`].
#[derive(Debug)]
pub struct BodyScanner {
    api: Api,
    limits: ScanLimits,
    lex: Lex,
    stack: Vec<Frame>,
    /// Absolute offset of the current chunk's first byte.
    base: usize,
    started: bool,
    // The string being read.
    sink: Sink,
    role_of_str: Role,
    is_key: bool,
    esc: Esc,
    high_surrogate: Option<u32>,
    utf8_carry: Vec<u8>,
    /// Offset of the first byte in `utf8_carry`.
    utf8_carry_at: usize,
    captured: Vec<u8>,
    str_start: usize,
    // The number or literal being read.
    token: Vec<u8>,
    literal: &'static [u8],
    role_of_token: Role,
    // Raw capture of a value, minified: the sink and the stack depth it ends at.
    raw: Option<(RawSink, usize)>,
    // Results.
    rendered: Rendered,
    /// Digests of `rendered.main`'s complete blocks, taken after every chunk.
    digests: Option<BlockDigests>,
    model: Option<Result<String, RequestError>>,
    model_span: Option<(usize, usize)>,
    stream: bool,
    cache_salt: Option<String>,
    max_tokens: Option<u64>,
    prompt_seen: bool,
    messages_seen: Option<usize>,
    message: Option<Message>,
    prompt_items: usize,
    root_is_object: bool,
}

fn not_json(offset: usize, reason: impl Into<String>) -> RequestError {
    RequestError::NotJson(format!("{} at byte {offset}", reason.into()))
}

fn invalid(field: &'static str, reason: impl Into<String>) -> RequestError {
    RequestError::InvalidField {
        field,
        reason: reason.into(),
    }
}

/// The role of the value under `key` in an object of role `parent`, for `api`.
fn key_role(api: Api, parent: Role, key: &[u8]) -> (Role, u16) {
    let top = |r: Role, bit: u16| (r, bit);
    match parent {
        Role::Root => match (key, api) {
            (b"model", _) => top(Role::Model, 1),
            (b"stream", _) => top(Role::Stream, 2),
            (b"cache_salt", _) => top(Role::CacheSalt, 4),
            (b"max_tokens" | b"max_completion_tokens" | b"max_output_tokens", _) => {
                top(Role::MaxTokens, 0)
            }
            (b"prompt", Api::Completions) => top(Role::Prompt, 8),
            (b"input", Api::Embeddings) => top(Role::Prompt, 8),
            (b"messages", Api::ChatCompletions) => top(Role::Messages { responses: false }, 16),
            (b"tools", Api::ChatCompletions) => top(Role::Tools, 32),
            (b"input", Api::Responses) => top(Role::ResponsesInput, 16),
            (b"instructions", Api::Responses) => top(Role::Instructions, 64),
            _ => top(Role::Ignore, 0),
        },
        Role::Message => match key {
            b"role" => (Role::MessageRoleName, 1),
            b"content" => (Role::Content, 2),
            b"tool_calls" => (Role::ToolCalls, 4),
            _ => (Role::Ignore, 0),
        },
        Role::ContentPart => match key {
            b"text" => (Role::PartText, 0),
            b"image_url" => (Role::PartImage, 0),
            _ => (Role::Ignore, 0),
        },
        Role::PartImage => match key {
            b"url" => (Role::ImageUrl, 0),
            _ => (Role::Ignore, 0),
        },
        _ => (Role::Ignore, 0),
    }
}

fn key_name(key: &[u8]) -> &'static str {
    match key {
        b"model" => "model",
        b"stream" => "stream",
        b"cache_salt" => "cache_salt",
        b"prompt" => "prompt",
        b"messages" => "messages",
        b"tools" => "tools",
        b"input" => "input",
        b"instructions" => "instructions",
        b"role" => "role",
        b"content" => "content",
        b"tool_calls" => "tool_calls",
        _ => "(key)",
    }
}

impl BodyScanner {
    pub fn new(api: Api, limits: ScanLimits) -> Self {
        Self {
            api,
            limits,
            lex: Lex::Value,
            stack: Vec::new(),
            base: 0,
            started: false,
            sink: Sink::Discard,
            role_of_str: Role::Ignore,
            is_key: false,
            esc: Esc::None,
            high_surrogate: None,
            utf8_carry: Vec::new(),
            utf8_carry_at: 0,
            captured: Vec::new(),
            str_start: 0,
            token: Vec::new(),
            literal: b"",
            role_of_token: Role::Ignore,
            raw: None,
            rendered: Rendered::with_cap(limits.prompt_cap),
            digests: limits.digests.map(BlockDigests::new),
            model: None,
            model_span: None,
            stream: false,
            cache_salt: None,
            max_tokens: None,
            prompt_seen: false,
            messages_seen: None,
            message: None,
            prompt_items: 0,
            root_is_object: false,
        }
    }

    /// Feeds the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), RequestError> {
        let mut i = 0;
        while i < chunk.len() {
            i = match self.lex {
                Lex::Str => self.string_bytes(chunk, i)?,
                Lex::Number => self.number_bytes(chunk, i)?,
                Lex::Literal => self.literal_bytes(chunk, i)?,
                _ => {
                    let b = chunk[i];
                    if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                        self.structural(b, self.base + i)?;
                    }
                    i + 1
                }
            };
        }
        self.base += chunk.len();
        if let Some(d) = &mut self.digests {
            d.advance(self.rendered.main.kept());
        }
        Ok(())
    }

    /// One byte outside strings, numbers and literals, at absolute offset `pos`.
    fn structural(&mut self, b: u8, pos: usize) -> Result<(), RequestError> {
        if self.raw.is_some() && !matches!(b, b'"') {
            self.raw_push(&[b]);
        }
        match self.lex {
            Lex::Value => self.value_start(b, pos),
            Lex::Key => match b {
                b'"' => {
                    self.begin_string(pos, Role::Ignore, Sink::Capture(MAX_KEY), true);
                    Ok(())
                }
                b'}' if self.object_first() => self.close(b'}', pos),
                _ => Err(not_json(pos, "expected a key")),
            },
            Lex::Colon if b == b':' => {
                self.lex = Lex::Value;
                Ok(())
            }
            Lex::Colon => Err(not_json(pos, "expected ':'")),
            Lex::AfterValue => match b {
                b',' => self.comma(pos),
                b'}' | b']' => self.close(b, pos),
                _ => Err(not_json(pos, "expected ',' or a closing bracket")),
            },
            Lex::Done => Err(not_json(pos, "trailing characters after the JSON value")),
            Lex::Str | Lex::Number | Lex::Literal => unreachable!("handled by feed"),
        }
    }

    fn object_first(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Object { first: true, .. }))
    }

    /// The role of the value starting now, from its parent.
    fn next_role(&self) -> Role {
        match self.stack.last() {
            None => Role::Root,
            Some(Frame::Object { value_role, .. }) => *value_role,
            Some(Frame::Array { role, .. }) => match role {
                Role::Prompt => Role::PromptItem,
                Role::PromptItem => Role::TokenId,
                Role::Messages { .. } => Role::Message,
                Role::Content => Role::ContentPart,
                _ => Role::Ignore,
            },
        }
    }

    fn value_start(&mut self, b: u8, pos: usize) -> Result<(), RequestError> {
        if !self.started {
            self.started = true;
            // Any JSON value is scanned to the end (a non-object is then refused as such,
            // anything invalid as invalid).
            self.root_is_object = b == b'{';
        }
        let role = match self.next_role() {
            Role::Root if !self.root_is_object => Role::Ignore,
            r => r,
        };
        if let Some(Frame::Array { first, items, .. }) = self.stack.last_mut() {
            if b == b']' && *first {
                return self.close(b']', pos);
            }
            *first = false;
            *items += 1;
        }
        match b {
            b'{' => self.open_object(role, pos),
            b'[' => self.open_array(role, pos),
            b'"' => {
                self.string_value(role, pos)?;
                Ok(())
            }
            b'-' | b'0'..=b'9' => {
                let was_raw = self.raw.is_some();
                self.value_kind_check(role, "a number")?;
                if !was_raw && self.raw.is_some() {
                    self.raw_push(&[b]);
                }
                self.token.clear();
                self.token.push(b);
                self.role_of_token = role;
                self.lex = Lex::Number;
                Ok(())
            }
            b't' | b'f' | b'n' => {
                self.literal = match b {
                    b't' => b"true",
                    b'f' => b"false",
                    _ => b"null",
                };
                self.token.clear();
                self.token.push(b);
                self.role_of_token = role;
                self.lex = Lex::Literal;
                Ok(())
            }
            _ => Err(not_json(pos, "expected a value")),
        }
    }

    /// Rejects a number or a literal where epp needs something else (null is checked later).
    fn value_kind_check(&mut self, role: Role, what: &str) -> Result<(), RequestError> {
        match role {
            Role::Model => Err(RequestError::ModelNotString),
            Role::Prompt => Err(invalid(
                "prompt",
                "must be a string, an array of strings, or an array of token ids",
            )),
            Role::Messages { .. } => Err(RequestError::MissingMessages),
            Role::Message => Err(invalid("messages", "every message must be an object")),
            Role::MessageRoleName => Err(invalid("messages", "a message role must be a string")),
            Role::CacheSalt => Err(invalid("cache_salt", "must be a string")),
            Role::Content | Role::ContentPart | Role::ToolCalls | Role::Tools => {
                if what == "a number" {
                    self.start_raw(role);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn raw_sink_for(&self, role: Role) -> Option<RawSink> {
        match role {
            Role::Tools => Some(RawSink::Tools),
            Role::ToolCalls => Some(RawSink::ToolCalls),
            Role::Content | Role::ContentPart => Some(RawSink::Content),
            _ => None,
        }
    }

    /// Starts copying the value beginning now, minified, into its sink (unless one is active).
    fn start_raw(&mut self, role: Role) {
        if self.raw.is_none()
            && let Some(sink) = self.raw_sink_for(role)
        {
            self.raw = Some((sink, self.stack.len()));
        }
    }

    fn raw_push(&mut self, bytes: &[u8]) {
        let Some((sink, _)) = self.raw else { return };
        match sink {
            RawSink::Tools => self.rendered.tools.push(bytes),
            RawSink::Content => {
                if let Some(m) = self.message.as_mut() {
                    m.push_content(&mut self.rendered.main, bytes)
                }
            }
            RawSink::ToolCalls => {
                if let Some(m) = self.message.as_mut() {
                    m.tool_calls.push(bytes)
                }
            }
        }
    }

    /// A value just ended at the current depth: stop a raw capture that began there.
    fn value_done(&mut self) {
        if let Some((_, depth)) = self.raw
            && depth == self.stack.len()
        {
            self.raw = None;
        }
        self.lex = if self.stack.is_empty() {
            Lex::Done
        } else {
            Lex::AfterValue
        };
    }

    fn push_frame(&mut self, f: Frame, pos: usize) -> Result<(), RequestError> {
        if self.stack.len() >= self.limits.max_depth {
            return Err(RequestError::TooDeep(self.limits.max_depth, pos));
        }
        self.stack.push(f);
        Ok(())
    }

    fn open_object(&mut self, role: Role, pos: usize) -> Result<(), RequestError> {
        let role = match role {
            Role::Model => return Err(RequestError::ModelNotString),
            Role::Stream => return Err(invalid("stream", "must be a boolean")),
            Role::CacheSalt => return Err(invalid("cache_salt", "must be a string")),
            Role::Prompt => {
                return Err(invalid(
                    "prompt",
                    "must be a string, an array of strings, or an array of token ids",
                ));
            }
            Role::Messages { .. } => return Err(RequestError::MissingMessages),
            Role::ResponsesInput => return Err(invalid("input", "must be a string or an array")),
            Role::MessageRoleName => {
                return Err(invalid("messages", "a message role must be a string"));
            }
            Role::Message => {
                let (responses, index) = match self.stack.last() {
                    Some(Frame::Array {
                        role: Role::Messages { responses },
                        items,
                        ..
                    }) => (*responses, items.saturating_sub(1)),
                    _ => (false, 0),
                };
                let cap = self.limits.prompt_cap;
                self.message = Some(Message {
                    role: None,
                    content: Section::with_cap(cap),
                    tool_calls: Section::with_cap(cap),
                    responses,
                    index,
                    direct: false,
                });
                Role::Message
            }
            Role::Tools | Role::ToolCalls | Role::Content => {
                if self.raw.is_none() {
                    // The '{' was not pushed yet: capture begins with it.
                    self.start_raw(role);
                    self.raw_push(b"{");
                }
                Role::Ignore
            }
            Role::ContentPart | Role::PartImage | Role::Root => role,
            _ => Role::Ignore,
        };
        self.push_frame(
            Frame::Object {
                role,
                value_role: Role::Ignore,
                expect_key: true,
                first: true,
                seen: 0,
            },
            pos,
        )?;
        self.lex = Lex::Key;
        Ok(())
    }

    fn open_array(&mut self, role: Role, pos: usize) -> Result<(), RequestError> {
        let role = match role {
            Role::Model => return Err(RequestError::ModelNotString),
            Role::Stream => return Err(invalid("stream", "must be a boolean")),
            Role::CacheSalt => return Err(invalid("cache_salt", "must be a string")),
            Role::Message => return Err(invalid("messages", "every message must be an object")),
            Role::MessageRoleName => {
                return Err(invalid("messages", "a message role must be a string"));
            }
            Role::Instructions => return Err(invalid("instructions", "must be a string")),
            Role::TokenId => {
                return Err(invalid(
                    "prompt",
                    "must be a string, an array of strings, or an array of token ids",
                ));
            }
            Role::Prompt => {
                self.prompt_seen = true;
                Role::Prompt
            }
            Role::PromptItem => Role::PromptItem,
            Role::Messages { responses } => {
                self.messages_seen = Some(0);
                Role::Messages { responses }
            }
            Role::ResponsesInput => {
                self.messages_seen = Some(0);
                Role::Messages { responses: true }
            }
            Role::Content => {
                if self.raw.is_some() {
                    Role::Ignore
                } else {
                    Role::Content
                }
            }
            Role::Tools | Role::ToolCalls | Role::ContentPart => {
                if self.raw.is_none() {
                    self.start_raw(role);
                    self.raw_push(b"[");
                }
                Role::Ignore
            }
            _ => Role::Ignore,
        };
        self.push_frame(
            Frame::Array {
                role,
                first: true,
                items: 0,
            },
            pos,
        )?;
        self.lex = Lex::Value;
        Ok(())
    }

    fn comma(&mut self, pos: usize) -> Result<(), RequestError> {
        match self.stack.last_mut() {
            Some(Frame::Object { expect_key, .. }) => {
                *expect_key = true;
                self.lex = Lex::Key;
                if let Some(Frame::Object { first, .. }) = self.stack.last_mut() {
                    *first = false;
                }
                Ok(())
            }
            Some(Frame::Array { .. }) => {
                self.lex = Lex::Value;
                Ok(())
            }
            None => Err(not_json(pos, "unexpected ','")),
        }
    }

    fn close(&mut self, b: u8, pos: usize) -> Result<(), RequestError> {
        let frame = self
            .stack
            .pop()
            .ok_or_else(|| not_json(pos, "unbalanced bracket"))?;
        let role = match (&frame, b) {
            (Frame::Object { role, .. }, b'}') => *role,
            (Frame::Array { role, .. }, b']') => *role,
            _ => return Err(not_json(pos, "mismatched bracket")),
        };
        if role == Role::Message {
            self.end_message()?;
        }
        if let Frame::Array {
            role: Role::Messages { .. },
            items,
            ..
        } = frame
        {
            self.messages_seen = Some(items);
        }
        if self.raw.is_some() && matches!(frame, Frame::Object { .. }) {
            // A raw '{' … '}' was pushed by structural(); nothing more to do.
        }
        self.value_done();
        Ok(())
    }

    fn end_message(&mut self) -> Result<(), RequestError> {
        let Some(m) = self.message.take() else {
            return Ok(());
        };
        let role = match (m.role, m.responses) {
            (Some(r), _) => r,
            (None, true) => "user".to_owned(),
            (None, false) => {
                return Err(invalid(
                    "messages",
                    format!("message {} has no \"role\"", m.index),
                ));
            }
        };
        if !m.responses && !ROLES.contains(&role.as_str()) {
            return Err(invalid(
                "messages",
                format!("message {} has an unknown role {role:?}", m.index),
            ));
        }
        let main = &mut self.rendered.main;
        if !m.direct {
            render_header(main, &role);
            main.append(&m.content);
        }
        main.append(&m.tool_calls);
        main.push(b"\n");
        Ok(())
    }

    /// A string value of role `role` begins (its opening quote is at `pos`).
    fn string_value(&mut self, role: Role, pos: usize) -> Result<Sink, RequestError> {
        let sink = match role {
            Role::Model => Sink::Capture(MAX_MODEL_LEN + 1),
            Role::Stream => return Err(invalid("stream", "must be a boolean")),
            Role::CacheSalt => Sink::Capture(1024),
            Role::MessageRoleName => Sink::Capture(64),
            Role::Prompt => {
                self.prompt_seen = true;
                Sink::Section(Part::Main)
            }
            Role::PromptItem => {
                if self.prompt_items > 0 {
                    self.rendered.main.push(b" ");
                }
                self.prompt_items += 1;
                Sink::Section(Part::Main)
            }
            Role::TokenId => {
                return Err(invalid(
                    "prompt",
                    "must be a string, an array of strings, or an array of token ids",
                ));
            }
            Role::Messages { .. } => return Err(RequestError::MissingMessages),
            Role::Message => return Err(invalid("messages", "every message must be an object")),
            Role::ResponsesInput => {
                self.prompt_seen = true;
                Sink::Section(Part::Main)
            }
            Role::Instructions => Sink::Section(Part::Instructions),
            Role::Content | Role::ContentPart | Role::PartText => Sink::Content,
            Role::PartImage | Role::ImageUrl => {
                if let Some(m) = self.message.as_mut() {
                    m.push_content(&mut self.rendered.main, b"<image:");
                }
                Sink::Content
            }
            _ => Sink::Discard,
        };
        // Inside a raw capture the string is copied as it is written instead.
        let sink = if self.raw.is_some() {
            Sink::Discard
        } else {
            sink
        };
        self.begin_string(pos, role, sink, false);
        if self.raw.is_some() {
            self.raw_push(b"\"");
        }
        Ok(sink)
    }

    fn begin_string(&mut self, pos: usize, role: Role, sink: Sink, is_key: bool) {
        if is_key && self.raw.is_some() {
            self.raw_push(b"\"");
        }
        self.sink = if is_key && self.raw.is_none() {
            Sink::Capture(MAX_KEY)
        } else if is_key {
            Sink::Discard
        } else {
            sink
        };
        self.role_of_str = role;
        self.is_key = is_key;
        self.esc = Esc::None;
        self.high_surrogate = None;
        self.captured.clear();
        self.str_start = pos;
        self.lex = Lex::Str;
    }

    /// Appends decoded text to the string's sink.
    fn emit(&mut self, text: &[u8]) {
        match self.sink {
            Sink::Discard => {}
            Sink::Capture(max) => {
                if self.captured.len() <= max {
                    let room = max + 1 - self.captured.len();
                    self.captured
                        .extend_from_slice(&text[..text.len().min(room)]);
                }
            }
            Sink::Section(p) => self.rendered.section(p).push(text),
            Sink::Content => {
                if let Some(m) = self.message.as_mut() {
                    m.push_content(&mut self.rendered.main, text);
                }
            }
        }
    }

    /// Validates UTF-8 of a run of plain string bytes (carrying an incomplete sequence over).
    fn check_utf8(&mut self, run: &[u8], at: usize) -> Result<(), RequestError> {
        // Errors name the offset of the first byte of the bad sequence, wherever the chunks
        // were cut.
        let mut run = run;
        let mut at = at;
        if !self.utf8_carry.is_empty() {
            let bad = RequestError::InvalidUtf8(self.utf8_carry_at);
            let need = utf8_len(self.utf8_carry[0]).ok_or(bad.clone())?;
            let take = (need - self.utf8_carry.len()).min(run.len());
            self.utf8_carry.extend_from_slice(&run[..take]);
            run = &run[take..];
            at += take;
            // Invalid as soon as no completion could make it valid (as a whole-run check
            // would see it).
            match std::str::from_utf8(&self.utf8_carry) {
                Ok(_) => self.utf8_carry.clear(),
                Err(e) if e.error_len().is_none() => return Ok(()),
                Err(_) => return Err(bad),
            }
        }
        match std::str::from_utf8(run) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                self.utf8_carry.extend_from_slice(&run[e.valid_up_to()..]);
                self.utf8_carry_at = at + e.valid_up_to();
                Ok(())
            }
            Err(e) => Err(RequestError::InvalidUtf8(at + e.valid_up_to())),
        }
    }

    /// Consumes string bytes of `chunk` from `i`; returns the index after them.
    fn string_bytes(&mut self, chunk: &[u8], mut i: usize) -> Result<usize, RequestError> {
        while i < chunk.len() {
            if self.esc != Esc::None {
                self.escape_byte(chunk[i], self.base + i)?;
                i += 1;
                continue;
            }
            let end = memchr::memchr2(b'"', b'\\', &chunk[i..]).map_or(chunk.len(), |k| i + k);
            let run = &chunk[i..end];
            if !run.is_empty() && self.high_surrogate.is_some() {
                return Err(not_json(self.base + i, "lone surrogate in a \\u escape"));
            }
            // The earlier of a bad UTF-8 sequence and a control character is reported.
            let control = first_control(run);
            self.check_utf8(&run[..control.unwrap_or(run.len())], self.base + i)?;
            if let Some(k) = control {
                if !self.utf8_carry.is_empty() {
                    return Err(RequestError::InvalidUtf8(self.utf8_carry_at));
                }
                return Err(not_json(self.base + i + k, "control character in a string"));
            }
            if self.raw.is_some() {
                self.raw_push(run);
            }
            self.emit(run);
            i = end;
            if i == chunk.len() {
                break;
            }
            if !self.utf8_carry.is_empty() {
                return Err(RequestError::InvalidUtf8(self.utf8_carry_at));
            }
            if chunk[i] == b'\\' {
                if self.raw.is_some() {
                    self.raw_push(b"\\");
                }
                self.esc = Esc::Backslash;
                i += 1;
            } else {
                if self.high_surrogate.is_some() {
                    return Err(not_json(self.base + i, "lone surrogate in a \\u escape"));
                }
                if self.raw.is_some() {
                    self.raw_push(b"\"");
                }
                self.end_string(self.base + i + 1)?;
                return Ok(i + 1);
            }
        }
        Ok(i)
    }

    /// One byte of an escape sequence.
    fn escape_byte(&mut self, b: u8, at: usize) -> Result<(), RequestError> {
        if self.raw.is_some() {
            self.raw_push(&[b]);
        }
        match self.esc {
            Esc::Backslash => {
                let decoded = match b {
                    b'"' => b'"',
                    b'\\' => b'\\',
                    b'/' => b'/',
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'u' => {
                        self.esc = Esc::Unicode { digits: 0, code: 0 };
                        return Ok(());
                    }
                    _ => return Err(not_json(at, "invalid escape")),
                };
                if self.high_surrogate.is_some() {
                    return Err(not_json(at, "lone surrogate in a \\u escape"));
                }
                self.esc = Esc::None;
                self.emit(&[decoded]);
            }
            Esc::Unicode { digits, code } => {
                let d = (b as char)
                    .to_digit(16)
                    .ok_or_else(|| not_json(at, "invalid \\u escape"))?;
                let code = code * 16 + d;
                if digits < 3 {
                    self.esc = Esc::Unicode {
                        digits: digits + 1,
                        code,
                    };
                    return Ok(());
                }
                self.esc = Esc::None;
                self.code_point(code, at)?;
            }
            Esc::None => unreachable!("escape_byte outside an escape"),
        }
        Ok(())
    }

    fn code_point(&mut self, code: u32, at: usize) -> Result<(), RequestError> {
        let scalar = match (self.high_surrogate.take(), code) {
            (None, 0xD800..=0xDBFF) => {
                self.high_surrogate = Some(code);
                return Ok(());
            }
            (Some(hi), 0xDC00..=0xDFFF) => 0x10000 + ((hi - 0xD800) << 10) + (code - 0xDC00),
            (None, 0xDC00..=0xDFFF) | (Some(_), _) => {
                return Err(not_json(at, "lone surrogate in a \\u escape"));
            }
            (None, c) => c,
        };
        let c = char::from_u32(scalar).ok_or_else(|| not_json(at, "invalid \\u escape"))?;
        let mut buf = [0u8; 4];
        self.emit(c.encode_utf8(&mut buf).as_bytes());
        Ok(())
    }

    /// The closing quote was consumed (`end` is the offset after it): hand the string to its
    /// role.
    fn end_string(&mut self, end: usize) -> Result<(), RequestError> {
        if self.is_key {
            self.lex = Lex::Colon;
            return self.key_done();
        }
        let text = std::mem::take(&mut self.captured);
        match self.role_of_str {
            Role::Model => {
                let depth_ok = self.stack.len() == 1;
                if depth_ok {
                    self.model_span = Some((self.str_start, end));
                }
                self.model = Some(model_of(&text));
            }
            Role::CacheSalt => {
                self.cache_salt = Some(String::from_utf8_lossy(&text).into_owned());
            }
            Role::MessageRoleName => {
                if let Some(m) = self.message.as_mut() {
                    m.role = Some(String::from_utf8_lossy(&text).into_owned());
                }
            }
            Role::PartImage | Role::ImageUrl if self.raw.is_none() => {
                if let Some(m) = self.message.as_mut() {
                    m.push_content(&mut self.rendered.main, b">");
                }
            }
            _ => {}
        }
        self.captured = text;
        self.captured.clear();
        self.value_done();
        Ok(())
    }

    /// A key was read: find the role of its value, reject duplicates of keys epp reads.
    fn key_done(&mut self) -> Result<(), RequestError> {
        let key = std::mem::take(&mut self.captured);
        let api = self.api;
        let raw = self.raw.is_some();
        let Some(Frame::Object {
            role,
            value_role,
            seen,
            expect_key,
            ..
        }) = self.stack.last_mut()
        else {
            return Err(not_json(self.base, "a key outside an object"));
        };
        *expect_key = false;
        let (r, bit) = if raw || key.len() > MAX_KEY {
            (Role::Ignore, 0)
        } else {
            key_role(api, *role, &key)
        };
        if bit != 0 {
            if *seen & bit != 0 {
                return Err(RequestError::DuplicateKey(key_name(&key)));
            }
            *seen |= bit;
        }
        *value_role = r;
        self.captured = key;
        self.captured.clear();
        Ok(())
    }

    fn number_bytes(&mut self, chunk: &[u8], i: usize) -> Result<usize, RequestError> {
        let data = &chunk[i..];
        let n = data
            .iter()
            .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
            .unwrap_or(data.len());
        if self.token.len() < 64 {
            let room = 64 - self.token.len();
            self.token.extend_from_slice(&data[..n.min(room)]);
        }
        if self.raw.is_some() {
            self.raw_push(&data[..n]);
        }
        if n < data.len() {
            self.end_number(self.base + i + n)?;
        }
        Ok(i + n)
    }

    fn end_number(&mut self, at: usize) -> Result<(), RequestError> {
        let text = std::str::from_utf8(&self.token).unwrap_or("");
        if !valid_number(text) {
            return Err(not_json(at, "invalid number"));
        }
        match self.role_of_token {
            Role::MaxTokens => self.max_tokens = text.parse::<u64>().ok(),
            Role::PromptItem | Role::TokenId => {
                let id: u32 = text.parse().map_err(|_| {
                    invalid(
                        "prompt",
                        "token ids must be integers between 0 and 4294967295",
                    )
                })?;
                self.prompt_seen = true;
                self.rendered.main.push(&id.to_le_bytes());
            }
            Role::Prompt => {
                return Err(invalid(
                    "prompt",
                    "must be a string, an array of strings, or an array of token ids",
                ));
            }
            Role::Stream => return Err(invalid("stream", "must be a boolean")),
            Role::Instructions => return Err(invalid("instructions", "must be a string")),
            Role::ResponsesInput => return Err(invalid("input", "must be a string or an array")),
            _ => {}
        }
        self.value_done();
        Ok(())
    }

    fn literal_bytes(&mut self, chunk: &[u8], mut i: usize) -> Result<usize, RequestError> {
        let start = i;
        while i < chunk.len() && self.token.len() < self.literal.len() {
            if chunk[i] != self.literal[self.token.len()] {
                return Err(not_json(self.base + i, "invalid literal"));
            }
            self.token.push(chunk[i]);
            i += 1;
        }
        if self.raw.is_some() {
            self.raw_push(&chunk[start..i]);
        }
        if self.token.len() == self.literal.len() {
            self.end_literal()?;
        }
        Ok(i)
    }

    fn end_literal(&mut self) -> Result<(), RequestError> {
        let lit = self.literal;
        match (self.role_of_token, lit) {
            (Role::Stream, b"true") => self.stream = true,
            (Role::Stream, b"false" | b"null") => self.stream = false,
            (Role::Stream, _) => return Err(invalid("stream", "must be a boolean")),
            (Role::Model, b"null") => {}
            (Role::Model, _) => return Err(RequestError::ModelNotString),
            (Role::CacheSalt, b"null") => {}
            (Role::CacheSalt, _) => return Err(invalid("cache_salt", "must be a string")),
            (Role::Prompt, b"null") => {}
            (Role::Prompt | Role::PromptItem | Role::TokenId, _) => {
                return Err(invalid(
                    "prompt",
                    "must be a string, an array of strings, or an array of token ids",
                ));
            }
            (Role::Messages { .. }, _) => return Err(RequestError::MissingMessages),
            (Role::Message, _) => {
                return Err(invalid("messages", "every message must be an object"));
            }
            (Role::MessageRoleName, _) => {
                return Err(invalid("messages", "a message role must be a string"));
            }
            (Role::Instructions, b"null") | (Role::ResponsesInput, b"null") => {}
            (Role::Instructions, _) => return Err(invalid("instructions", "must be a string")),
            (Role::ResponsesInput, _) => {
                return Err(invalid("input", "must be a string or an array"));
            }
            (Role::Content | Role::ToolCalls | Role::Tools, b"null") => {}
            (Role::Content | Role::ContentPart, _) if self.raw.is_none() => {
                self.start_raw(Role::Content);
                self.raw_push(lit);
            }
            _ => {}
        }
        self.value_done();
        Ok(())
    }

    /// The body is complete: checks it and returns what routing needs.
    pub fn finish(mut self) -> Result<Scanned, RequestError> {
        if self.lex == Lex::Number {
            self.end_number(self.base)?;
        }
        if !self.started {
            return Err(RequestError::EmptyBody);
        }
        if self.lex != Lex::Done {
            return Err(not_json(self.base, "unexpected end of the body"));
        }
        if !self.root_is_object {
            return Err(RequestError::NotObject);
        }
        let model = match self.model.take() {
            None => return Err(RequestError::MissingModel),
            Some(m) => m?,
        };
        self.check_prompt()?;
        // Digests of the main section are the prompt's only when nothing renders before it.
        let main_only = self.rendered.tools.is_empty() && self.rendered.instructions.is_empty();
        let (prompt, prompt_len) = self.rendered.finish(self.limits.prompt_cap);
        let digests = self.digests.take().filter(|_| main_only).map(|mut d| {
            d.finish(&prompt);
            d
        });
        Ok(Scanned {
            model,
            stream: self.stream,
            cache_salt: self.cache_salt,
            max_tokens: self.max_tokens,
            prompt,
            prompt_len,
            model_span: self.model_span,
            digests,
        })
    }

    fn check_prompt(&self) -> Result<(), RequestError> {
        match self.api {
            Api::ChatCompletions => match self.messages_seen {
                None => Err(RequestError::MissingMessages),
                Some(0) => Err(invalid("messages", "must not be empty")),
                Some(_) => Ok(()),
            },
            Api::Completions if !self.prompt_seen => Err(RequestError::MissingPrompt),
            Api::Completions if self.rendered.main.is_empty() => {
                Err(invalid("prompt", "must not be empty"))
            }
            Api::Embeddings if !self.prompt_seen => Err(invalid(
                "input",
                "embeddings request must have an \"input\"",
            )),
            _ => Ok(()),
        }
    }
}

/// A `model` value: a non-empty string of at most [`MAX_MODEL_LEN`] bytes.
fn model_of(text: &[u8]) -> Result<String, RequestError> {
    if text.is_empty() {
        return Err(RequestError::ModelEmpty);
    }
    if text.len() > MAX_MODEL_LEN {
        return Err(RequestError::ModelTooLong(MAX_MODEL_LEN));
    }
    String::from_utf8(text.to_vec()).map_err(|_| RequestError::InvalidUtf8(0))
}

/// Length of the UTF-8 sequence starting with `b`.
/// Index of the first byte below 0x20 (raw control characters are not allowed in JSON
/// strings). Whole 64-byte blocks are tested with a branch-free fold the compiler vectorizes;
/// a byte-at-a-time search ran at about 1.7 GB/s and was the scanner's main cost.
fn first_control(run: &[u8]) -> Option<usize> {
    let mut base = 0;
    for block in run.chunks(64) {
        if block.iter().fold(false, |any, &b| any | (b < 0x20)) {
            return block.iter().position(|&b| b < 0x20).map(|k| base + k);
        }
        base += block.len();
    }
    None
}

fn utf8_len(b: u8) -> Option<usize> {
    match b {
        0xC2..=0xDF => Some(2),
        0xE0..=0xEF => Some(3),
        0xF0..=0xF4 => Some(4),
        _ => None,
    }
}

/// JSON number grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn valid_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_control_finds_the_first_control_byte_in_any_block() {
        let text = vec![b'a'; 300];
        assert_eq!(first_control(&text), None);
        assert_eq!(first_control(&[]), None);
        for at in [0, 1, 63, 64, 65, 127, 128, 299] {
            let mut t = text.clone();
            t[at] = b'\n';
            if at + 5 < t.len() {
                t[at + 5] = 0x01;
            }
            assert_eq!(first_control(&t), Some(at), "control byte at {at}");
        }
        // 0x20 and above, including UTF-8 continuation bytes, are not control characters.
        assert_eq!(first_control(" ~\u{7f}é日本".as_bytes()), None);
    }
}
