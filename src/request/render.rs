//! The rendered prompt: the bytes hashed into prefix blocks, assembled from up to three
//! sections (tools, instructions, messages or prompt) in that order whatever the order of the
//! JSON keys, each kept only up to a cap (the most the hasher ever reads), with the full
//! rendered length still counted (it sizes the request in epp's load accounting).

/// A rendered section: the first `cap` bytes, and the length of everything written.
#[derive(Debug, Default, Clone)]
pub struct Section {
    kept: Vec<u8>,
    len: usize,
    cap: usize,
}

impl Section {
    pub fn with_cap(cap: usize) -> Self {
        Self {
            kept: Vec::new(),
            len: 0,
            cap,
        }
    }

    /// Appends `bytes` (kept up to the cap, counted in full).
    #[inline]
    pub fn push(&mut self, bytes: &[u8]) {
        if self.kept.len() < self.cap {
            let room = self.cap - self.kept.len();
            self.kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
        self.len += bytes.len();
    }

    /// Counts `n` more bytes without keeping them (text past the cap).
    #[inline]
    pub fn count(&mut self, n: usize) {
        self.len += n;
    }

    /// Whether more bytes would still be kept.
    #[inline]
    pub fn has_room(&self) -> bool {
        self.kept.len() < self.cap
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn kept(&self) -> &[u8] {
        &self.kept
    }

    /// Appends another section (its kept bytes, and its full length).
    pub fn append(&mut self, other: &Section) {
        self.push(&other.kept);
        self.len += other.len - other.kept.len();
    }

    pub fn clear(&mut self) {
        self.kept.clear();
        self.len = 0;
    }

    pub fn into_kept(self) -> Vec<u8> {
        self.kept
    }
}

/// Which section a piece of the body renders into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Tools,
    Instructions,
    Main,
}

/// The prompt as it is being rendered.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub tools: Section,
    pub instructions: Section,
    pub main: Section,
}

impl Rendered {
    pub fn with_cap(cap: usize) -> Self {
        Self {
            tools: Section::with_cap(cap),
            instructions: Section::with_cap(cap),
            main: Section::with_cap(cap),
        }
    }

    pub fn section(&mut self, p: Part) -> &mut Section {
        match p {
            Part::Tools => &mut self.tools,
            Part::Instructions => &mut self.instructions,
            Part::Main => &mut self.main,
        }
    }

    /// The final prompt bytes (up to `cap`) and the full rendered length:
    /// `<|tools|>\n` + tools + `\n` (when there are tools), instructions + `\n` (when there are
    /// instructions), then the main section.
    pub fn finish(self, cap: usize) -> (Vec<u8>, usize) {
        if self.tools.is_empty() && self.instructions.is_empty() && self.main.cap <= cap {
            // The common case, only the main section: its bytes as they are (no copy).
            let len = self.main.len();
            return (self.main.into_kept(), len);
        }
        let mut out = Section::with_cap(cap);
        if !self.tools.is_empty() {
            out.push(b"<|tools|>\n");
            out.append(&self.tools);
            out.push(b"\n");
        }
        if !self.instructions.is_empty() {
            out.append(&self.instructions);
            out.push(b"\n");
        }
        out.append(&self.main);
        let len = out.len();
        (out.into_kept(), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_keep_a_prefix_and_count_everything() {
        let mut s = Section::with_cap(4);
        s.push(b"abc");
        s.push(b"def");
        s.count(10);
        assert_eq!((s.kept(), s.len()), (&b"abcd"[..], 16));
        let mut r = Rendered::with_cap(8);
        r.main.push(b"main text");
        r.tools.push(b"[]");
        let (kept, len) = r.finish(8);
        assert_eq!(kept, b"<|tools|".to_vec());
        assert_eq!(len, "<|tools|>\n[]\nmain text".len());
    }
}
