//! The CLIP BPE tokenizer (77-token context): the reference clean-up, then BPE.
//!
//! BPE itself comes from the instant-clip-tokenizer crate (OpenAI's vocabulary compiled in,
//! lower-casing and the contraction-aware pre-tokeniser regex). The reference tokenizer first
//! runs `ftfy.fix_text`, `html.unescape` twice and collapses whitespace; no crate does the
//! ftfy part, so [`clean`] implements the parts of `fix_text` that change CLIP token ids on
//! label and template text: mojibake repair (UTF-8 read as Windows-1252/Latin-1), Latin
//! ligatures, full-width characters, curly quotes, control characters and NFC. ftfy's other
//! heuristics (HTML only when no tag is present, terminal escapes, surrogate pairs) are not
//! reproduced.

use instant_clip_tokenizer::{Token, Tokenizer};
use unicode_normalization::UnicodeNormalization;

pub const START_OF_TEXT: i64 = 49406;
pub const END_OF_TEXT: i64 = 49407;

/// CLIP tokenizer producing fixed-length int64 rows.
pub struct ClipTokenizer {
    bpe: Tokenizer,
    context_length: usize,
    pad_id: i64,
}

impl Default for ClipTokenizer {
    fn default() -> Self {
        ClipTokenizer::new(77, 0)
    }
}

impl ClipTokenizer {
    pub fn new(context_length: usize, pad_id: i64) -> Self {
        ClipTokenizer {
            bpe: Tokenizer::new(),
            context_length: context_length.max(2),
            pad_id,
        }
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Token ids of one text: SOT, BPE tokens, EOT, truncated to the context with EOT kept
    /// last, padded with the pad id.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let mut toks: Vec<Token> = Vec::with_capacity(self.context_length);
        toks.push(self.bpe.start_of_text());
        // The reference pre-tokeniser matches the special tokens literally (after lower-casing).
        let cleaned = clean(text).to_lowercase();
        let mut rest = cleaned.as_str();
        while let Some((pos, marker, id)) = [
            ("<|startoftext|>", self.bpe.start_of_text()),
            ("<|endoftext|>", self.bpe.end_of_text()),
        ]
        .into_iter()
        .filter_map(|(m, id)| rest.find(m).map(|p| (p, m, id)))
        .min_by_key(|(p, ..)| *p)
        {
            self.bpe.encode(&rest[..pos], &mut toks);
            toks.push(id);
            rest = &rest[pos + marker.len()..];
        }
        self.bpe.encode(rest, &mut toks);
        let mut ids: Vec<i64> = toks.into_iter().map(|t| t.to_u16() as i64).collect();
        ids.truncate(self.context_length - 1);
        ids.push(END_OF_TEXT);
        ids.resize(self.context_length, self.pad_id);
        ids
    }

    /// A `[n, context]` batch, row-major.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> ndarray::Array2<i64> {
        let mut out = ndarray::Array2::<i64>::zeros((texts.len(), self.context_length));
        for (mut row, t) in out.rows_mut().into_iter().zip(texts) {
            for (dst, id) in row.iter_mut().zip(self.encode(t.as_ref())) {
                *dst = id;
            }
        }
        out
    }
}

/// The reference clean-up: `whitespace_clean(basic_clean(text))` (lower-casing happens in BPE).
pub fn clean(text: &str) -> String {
    let fixed = fix_text(text);
    let once = html_escape::decode_html_entities(&fixed);
    let twice = html_escape::decode_html_entities(&once);
    twice.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The subset of `ftfy.fix_text` described in the module docs.
fn fix_text(text: &str) -> String {
    let text = fix_mojibake(text).unwrap_or_else(|| text.to_string());
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            // Latin ligatures (ftfy fix_latin_ligatures).
            '\u{FB00}'..='\u{FB06}'
            | '\u{0132}'
            | '\u{0133}'
            | '\u{0149}'
            | '\u{01C4}'..='\u{01CC}'
            | '\u{01F1}'..='\u{01F3}' => out.extend(std::iter::once(c).nfkc()),
            // Full-width ASCII and the ideographic space (ftfy fix_character_width).
            '\u{FF01}'..='\u{FF5E}' => out.push(char::from_u32(c as u32 - 0xFEE0).unwrap_or(c)),
            '\u{3000}' => out.push(' '),
            // Curly quotes (ftfy uncurl_quotes).
            '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}' => out.push('\''),
            '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{201F}' => out.push('"'),
            // Line breaks become newlines; other controls are removed (ftfy fix_line_breaks,
            // remove_control_chars). Whitespace is collapsed later anyway.
            '\r' | '\u{2028}' | '\u{2029}' | '\u{0085}' => out.push('\n'),
            '\t' | '\n' => out.push(c),
            c if c.is_control() => {}
            // The byte-order mark is removed (ftfy remove_bom); a zero-width space is not
            // (ftfy keeps it, and CLIP then gives it a token of its own).
            '\u{FEFF}' => {}
            c => out.push(c),
        }
    }
    out.nfc().collect()
}

/// Repairs text that was UTF-8 decoded as Windows-1252 ("cafÃ©" → "café"). Applied only when
/// the text contains a typical mojibake lead character and re-encoding yields valid UTF-8.
fn fix_mojibake(text: &str) -> Option<String> {
    let suspicious = text.chars().zip(text.chars().skip(1)).any(|(a, b)| {
        matches!(a, '\u{00C2}'..='\u{00F4}')
            && cp1252_byte(b).is_some_and(|x| (0x80..0xC0).contains(&x))
    });
    if !suspicious {
        return None;
    }
    let bytes: Option<Vec<u8>> = text.chars().map(cp1252_byte).collect();
    let fixed = String::from_utf8(bytes?).ok()?;
    (fixed != text).then_some(fixed)
}

/// The Windows-1252 byte of a character, if it has one (Latin-1 for the rest).
fn cp1252_byte(c: char) -> Option<u8> {
    const HIGH: [(char, u8); 27] = [
        ('€', 0x80),
        ('‚', 0x82),
        ('ƒ', 0x83),
        ('„', 0x84),
        ('…', 0x85),
        ('†', 0x86),
        ('‡', 0x87),
        ('ˆ', 0x88),
        ('‰', 0x89),
        ('Š', 0x8A),
        ('‹', 0x8B),
        ('Œ', 0x8C),
        ('Ž', 0x8E),
        ('‘', 0x91),
        ('’', 0x92),
        ('“', 0x93),
        ('”', 0x94),
        ('•', 0x95),
        ('–', 0x96),
        ('—', 0x97),
        ('˜', 0x98),
        ('™', 0x99),
        ('š', 0x9A),
        ('›', 0x9B),
        ('œ', 0x9C),
        ('ž', 0x9E),
        ('Ÿ', 0x9F),
    ];
    let u = c as u32;
    if u < 0x100 {
        return Some(u as u8);
    }
    HIGH.iter().find(|(ch, _)| *ch == c).map(|(_, b)| *b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn photo_of_a_cat() {
        let t = ClipTokenizer::default();
        let ids = t.encode("a photo of a cat.");
        assert_eq!(&ids[..8], &[49406, 320, 1125, 539, 320, 2368, 269, 49407]);
        assert!(ids[8..].iter().all(|&i| i == 0));
        assert_eq!(ids.len(), 77);
    }

    #[test]
    fn truncation_keeps_end_token_last() {
        let t = ClipTokenizer::default();
        let long = "cat ".repeat(200);
        let ids = t.encode(&long);
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], START_OF_TEXT);
        assert_eq!(ids[76], END_OF_TEXT);
        assert!(ids[1..76].iter().all(|&i| i != END_OF_TEXT && i != 0));
    }

    #[test]
    fn hugging_face_padding() {
        let t = ClipTokenizer::new(77, 49407);
        let ids = t.encode("dog");
        assert_eq!(ids[2], END_OF_TEXT);
        assert!(ids[3..].iter().all(|&i| i == 49407));
    }

    #[test]
    fn clean_up_matches_reference_rules() {
        assert_eq!(
            clean("  many   spaces\tand\nnewlines  "),
            "many spaces and newlines"
        );
        assert_eq!(clean("fish &amp;amp; chips"), "fish & chips");
        assert_eq!(clean("cafÃ©"), "café");
        assert_eq!(clean("\u{FB01}sh"), "fish");
        assert_eq!(clean("\u{2018}quoted\u{2019}"), "'quoted'");
        assert_eq!(clean("cafe\u{301}"), "café");
    }
}
