//! The simulator's tokenizer and chat template — its own, unlike epp's byte counting and prompt
//! rendering, so that epp is measured against a model server whose token boundaries it cannot
//! see.
//!
//! **Vocabulary** (fixed, deterministic): the 256 single bytes; four special tokens used only by
//! the chat template; and multi-byte tokens of 2–8 bytes: every lexicon word ([`super::text`])
//! of at most 8 bytes with and without a leading space, every syllable with and without one, and
//! a few punctuation pairs. About 4–5 bytes per token on the simulator's prose; text outside the
//! lexicon falls back to syllables and single bytes, as real BPE does on unusual text.
//!
//! **Tokenizing**: the text is first cut into chunks (an optional space followed by a run of
//! letters and digits, or any other single character), then each chunk greedily takes the
//! longest vocabulary entry at its start. Chunks never merge, so text produced token by token
//! re-tokenizes to the same ids (needed for multi-turn cache hits on generated text).
//!
//! **Chat template** (Llama-3 style):
//! `<|begin_of_text|>` then per message `<|start_header_id|>role<|end_header_id|>` + "\n\n" +
//! content + `<|eot_id|>`, then `<|start_header_id|>assistant<|end_header_id|>` + "\n\n".

use std::collections::HashMap;
use std::sync::{LazyLock, RwLock};

use super::text::LEXICON;

/// A token id.
pub type TokenId = u32;

pub const BEGIN_OF_TEXT: TokenId = 256;
pub const START_HEADER: TokenId = 257;
pub const END_HEADER: TokenId = 258;
pub const END_OF_TURN: TokenId = 259;
const FIRST_MULTI: TokenId = 260;
const MAX_TOKEN_BYTES: usize = 8;
/// Distinct chunks remembered by the chunk cache (prose has a few thousand).
const CHUNK_CACHE_LIMIT: usize = 200_000;

/// The simulator's tokenizer (see the module docs).
pub struct Tokenizer {
    vocab: HashMap<Vec<u8>, TokenId>,
    pieces: Vec<Vec<u8>>,
    cache: RwLock<HashMap<Vec<u8>, Vec<TokenId>>>,
}

static TOKENIZER: LazyLock<Tokenizer> = LazyLock::new(Tokenizer::build);

/// The shared tokenizer.
pub fn tokenizer() -> &'static Tokenizer {
    &TOKENIZER
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b >= 0x80
}

/// Splits text into chunks: `[space] word-run` or one other byte.
fn chunks(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= text.len() {
            return None;
        }
        let start = i;
        if text[i] == b' ' && text.get(i + 1).is_some_and(|b| is_word_byte(*b)) {
            i += 1;
        }
        if is_word_byte(text[i]) {
            while i < text.len() && is_word_byte(text[i]) {
                i += 1;
            }
        } else {
            i += 1;
        }
        Some(&text[start..i])
    })
}

impl Tokenizer {
    fn build() -> Self {
        let mut pieces: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for special in [
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ] {
            pieces.push(special.as_bytes().to_vec());
        }
        let mut vocab = HashMap::new();
        let mut add = |p: String, pieces: &mut Vec<Vec<u8>>| {
            let b = p.into_bytes();
            if (2..=MAX_TOKEN_BYTES).contains(&b.len()) && !vocab.contains_key(&b) {
                vocab.insert(b.clone(), pieces.len() as TokenId);
                pieces.push(b);
            }
        };
        for w in LEXICON.iter() {
            add(w.clone(), &mut pieces);
            add(format!(" {w}"), &mut pieces);
        }
        for s in super::text::LEXICON.iter().flat_map(|w| syllables_of(w)) {
            add(s.to_owned(), &mut pieces);
            add(format!(" {s}"), &mut pieces);
        }
        for p in [". ", ".\n", ", ", "\n\n", "?\n", ": "] {
            add(p.to_owned(), &mut pieces);
        }
        for b in 0..=255u8 {
            vocab.insert(vec![b], TokenId::from(b));
        }
        debug_assert!(pieces.len() > FIRST_MULTI as usize);
        Self {
            vocab,
            pieces,
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// Vocabulary size (bytes, specials and multi-byte tokens).
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    fn tokenize_chunk(&self, chunk: &[u8], out: &mut Vec<TokenId>) {
        if let Some(ids) = self.cache.read().ok().and_then(|c| c.get(chunk).cloned()) {
            out.extend_from_slice(&ids);
            return;
        }
        let mut ids = Vec::new();
        let mut i = 0;
        while i < chunk.len() {
            let longest = (1..=MAX_TOKEN_BYTES.min(chunk.len() - i))
                .rev()
                .find_map(|n| self.vocab.get(&chunk[i..i + n]).map(|id| (n, *id)));
            let (n, id) = longest.unwrap_or((1, TokenId::from(chunk[i])));
            ids.push(id);
            i += n;
        }
        out.extend_from_slice(&ids);
        if let Ok(mut c) = self.cache.write()
            && c.len() < CHUNK_CACHE_LIMIT
        {
            c.insert(chunk.to_vec(), ids);
        }
    }

    /// Appends the tokens of `text` to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<TokenId>) {
        for c in chunks(text.as_bytes()) {
            self.tokenize_chunk(c, out);
        }
    }

    pub fn encode(&self, text: &str) -> Vec<TokenId> {
        let mut out = Vec::new();
        self.encode_into(text, &mut out);
        out
    }

    /// Number of tokens in `text`.
    pub fn count(&self, text: &str) -> usize {
        let mut out = Vec::new();
        self.encode_into(text, &mut out);
        out.len()
    }

    /// The bytes of one token.
    pub fn piece(&self, id: TokenId) -> &[u8] {
        self.pieces.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Text of `ids` (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[TokenId]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|id| self.piece(*id).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// A completions prompt: `<|begin_of_text|>` + the text.
    pub fn render_completion(&self, prompt: &str) -> Vec<TokenId> {
        let mut out = vec![BEGIN_OF_TEXT];
        self.encode_into(prompt, &mut out);
        out
    }

    /// A chat conversation through the template (see the module docs), ending with the
    /// assistant's header so that generation continues it.
    pub fn render_chat<'m>(
        &self,
        messages: impl IntoIterator<Item = (&'m str, &'m str)>,
    ) -> Vec<TokenId> {
        let mut out = vec![BEGIN_OF_TEXT];
        for (role, content) in messages {
            self.header(role, &mut out);
            self.encode_into("\n\n", &mut out);
            self.encode_into(content, &mut out);
            out.push(END_OF_TURN);
        }
        self.header("assistant", &mut out);
        self.encode_into("\n\n", &mut out);
        out
    }

    fn header(&self, role: &str, out: &mut Vec<TokenId>) {
        out.push(START_HEADER);
        self.encode_into(role, out);
        out.push(END_HEADER);
    }
}

/// Splits a lexicon word back into the syllables it was built from (greedy, longest first).
fn syllables_of(word: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = word;
    'outer: while !rest.is_empty() {
        for n in (2..=4).rev() {
            if rest.len() >= n && rest.is_char_boundary(n) {
                out.push(&rest[..n]);
                rest = &rest[n..];
                continue 'outer;
            }
        }
        break;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_has_variable_token_lengths() {
        let t = tokenizer();
        let text = "the presystem of kato, 42 ünïcode\nexcroserber qqqzzz.";
        let ids = t.encode(text);
        assert_eq!(t.decode(&ids), text);
        let lens: std::collections::HashSet<usize> =
            ids.iter().map(|id| t.piece(*id).len()).collect();
        assert!(lens.len() >= 3, "token lengths {lens:?}");
        assert!(ids.iter().all(|id| t.piece(*id).len() <= MAX_TOKEN_BYTES));
    }

    #[test]
    fn generated_chunks_retokenize_identically() {
        let t = tokenizer();
        let mut generated = Vec::new();
        for w in ["system", " of", " the", " kamen"] {
            t.encode_into(w, &mut generated);
        }
        assert_eq!(t.encode(&t.decode(&generated)), generated);
    }

    #[test]
    fn chat_template_shares_prefixes_across_turns() {
        let t = tokenizer();
        let one = t.render_chat([("system", "be brief"), ("user", "hello there")]);
        let mut two_turns = one.clone();
        t.encode_into("general kenobi", &mut two_turns);
        let two = t.render_chat([
            ("system", "be brief"),
            ("user", "hello there"),
            ("assistant", "general kenobi"),
            ("user", "next"),
        ]);
        assert!(
            two.starts_with(&two_turns),
            "turn 2 extends turn 1 plus its answer"
        );
        assert_eq!(one[0], BEGIN_OF_TEXT);
    }
}
