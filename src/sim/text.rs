//! The simulator's language: a fixed lexicon of pseudo-words and a generator of text drawn from
//! it with Zipf-like word frequencies, so that prompts look like prose to a tokenizer (about
//! 4–5 bytes per token with [`super::tokenizer`], varying with the words drawn) without being
//! the byte-aligned 4-characters-per-token text epp assumes.

use std::sync::LazyLock;

/// Number of words in the lexicon.
pub const LEXICON_SIZE: usize = 4096;

const SYLLABLES: [&str; 48] = [
    "ka", "to", "ri", "men", "sa", "lo", "ver", "tion", "al", "de", "pre", "con", "ing", "ed",
    "ar", "mo", "pa", "st", "ne", "vi", "qu", "ex", "ber", "ly", "ow", "th", "er", "in", "on",
    "an", "or", "es", "is", "ent", "at", "ul", "im", "po", "ra", "gen", "sys", "tem", "da", "ta",
    "mi", "cro", "ser", "vo",
];

/// The lexicon, most frequent word first: 1–4 syllables each, deterministic.
pub static LEXICON: LazyLock<Vec<String>> = LazyLock::new(|| {
    let mut rng = fastrand::Rng::with_seed(0x1e71c0);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(LEXICON_SIZE);
    // Short function words first, as in real text.
    for w in [
        "the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "with", "was", "on",
        "be", "by", "this", "are", "or", "from",
    ] {
        seen.insert(w.to_owned());
        out.push(w.to_owned());
    }
    while out.len() < LEXICON_SIZE {
        let n = 1 + rng.usize(..4).min(rng.usize(..4));
        let w: String = (0..n)
            .map(|_| SYLLABLES[rng.usize(..SYLLABLES.len())])
            .collect();
        if seen.insert(w.clone()) {
            out.push(w);
        }
    }
    out
});

/// Draws word ranks with probability ∝ 1 / (rank + 10) (a flattened Zipf law).
#[derive(Debug)]
pub struct WordSampler {
    cumulative: Vec<f64>,
}

impl Default for WordSampler {
    fn default() -> Self {
        let mut acc = 0.0;
        let cumulative = (0..LEXICON_SIZE)
            .map(|r| {
                acc += 1.0 / (r as f64 + 10.0);
                acc
            })
            .collect();
        Self { cumulative }
    }
}

impl WordSampler {
    pub fn word<'a>(&self, rng: &mut fastrand::Rng) -> &'a str {
        let total = *self.cumulative.last().unwrap_or(&1.0);
        let x = rng.f64() * total;
        let i = self.cumulative.partition_point(|c| *c < x);
        &LEXICON[i.min(LEXICON_SIZE - 1)]
    }
}

static SAMPLER: LazyLock<WordSampler> = LazyLock::new(WordSampler::default);

/// Prose of about `tokens` tokens of [`super::tokenizer::Tokenizer`]: sentences of 6–18 words,
/// paragraphs of 3–6 sentences. Stops at the first word boundary past the count.
pub fn prose(rng: &mut fastrand::Rng, tokens: usize) -> String {
    let tok = super::tokenizer::tokenizer();
    let mut out = String::with_capacity(tokens * 5);
    let mut count = 0;
    let mut sentence_left = 0;
    let mut sentences_left = rng.usize(3..7);
    while count < tokens {
        if sentence_left == 0 {
            if !out.is_empty() {
                out.push('.');
                count += 1;
                sentences_left -= 1;
                if sentences_left == 0 {
                    out.push('\n');
                    count += 1;
                    sentences_left = rng.usize(3..7);
                }
            }
            sentence_left = rng.usize(6..19);
        }
        let w = SAMPLER.word(rng);
        let chunk = if out.is_empty() || out.ends_with('\n') {
            w.to_owned()
        } else {
            format!(" {w}")
        };
        count += tok.count(&chunk);
        out.push_str(&chunk);
        sentence_left -= 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexicon_is_deterministic_and_distinct() {
        assert_eq!(LEXICON.len(), LEXICON_SIZE);
        let set: std::collections::HashSet<_> = LEXICON.iter().collect();
        assert_eq!(set.len(), LEXICON_SIZE);
        assert_eq!(LEXICON[0], "the");
    }

    #[test]
    fn prose_hits_its_token_count_and_is_seeded() {
        let mut a = fastrand::Rng::with_seed(3);
        let mut b = fastrand::Rng::with_seed(3);
        let t = prose(&mut a, 500);
        assert_eq!(t, prose(&mut b, 500));
        let n = super::super::tokenizer::tokenizer().count(&t);
        assert!((500..520).contains(&n), "{n}");
        let bytes_per_token = t.len() as f64 / n as f64;
        assert!(
            (3.0..6.5).contains(&bytes_per_token),
            "{bytes_per_token} bytes per token"
        );
    }
}
