//! Checks a semantic candidate must pass before it is served, after the nearest-neighbour
//! search: the embedding alone cannot see them. Pure functions of the two prompts.
//!
//! - **Beyond the window**: an embedder reads a prompt only up to its window (256 tokens for
//!   the local model) and ignores the rest, so two long prompts that share a preamble embed
//!   the same however their endings differ. The text past each prompt's window must match
//!   (after white-space folding), or the candidate is not a hit.
//! - **Numbers**: "What is 17 times 23?" and "…24?" are near-identical vectors. The numbers
//!   of the two prompts must be the same, as a multiset.

use crate::scope::normalize_prompt;

/// Why a candidate above the threshold was not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The prompts differ past the embedder's window, where the vectors cannot see.
    BeyondWindow,
    /// The prompts hold different numbers.
    Numbers,
}

impl Rejection {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BeyondWindow => "beyond_window",
            Self::Numbers => "numbers",
        }
    }
}

/// One side of a comparison: a prompt and where the embedder stopped reading it (a byte
/// offset on a char boundary), `None` when it read all of it.
#[derive(Debug, Clone, Copy)]
pub struct Read<'a> {
    pub prompt: &'a str,
    pub window: Option<usize>,
}

impl<'a> Read<'a> {
    /// The text the embedder did not see, folded like the exact path folds a prompt.
    fn unseen(&self) -> String {
        let rest = self
            .window
            .and_then(|w| self.prompt.get(w..))
            .unwrap_or_default();
        normalize_prompt(rest)
    }
}

/// The first check `candidate` fails against `query`, if any.
pub fn check(query: Read<'_>, candidate: Read<'_>) -> Option<Rejection> {
    if query.unseen() != candidate.unseen() {
        return Some(Rejection::BeyondWindow);
    }
    if numbers(query.prompt) != numbers(candidate.prompt) {
        return Some(Rejection::Numbers);
    }
    None
}

/// The numbers in `text`, sorted: runs of digits with their decimal separators (`1,000`,
/// `3.14`), written without group separators and leading zeros, so `1,000` and `1000` are
/// the same number. Digits inside words (`gpt4`, `h2o`) count too: they name things.
pub fn numbers(text: &str) -> Vec<String> {
    // Digits and separators are ASCII, so bytes are enough (and UTF-8 never puts an ASCII
    // byte inside another character).
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let (mut int, mut frac) = (String::new(), String::new());
        let mut in_frac = false;
        while let Some(&c) = bytes.get(i) {
            let next_digit = bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
            match c {
                b'0'..=b'9' if in_frac => frac.push(char::from(c)),
                b'0'..=b'9' => int.push(char::from(c)),
                b',' if !in_frac && next_digit => {} // a group separator: 1,000
                b'.' if !in_frac && next_digit => in_frac = true,
                _ => break,
            }
            i += 1;
        }
        let int = match int.trim_start_matches('0') {
            "" => "0",
            s => s,
        };
        let frac = frac.trim_end_matches('0');
        out.push(if frac.is_empty() {
            int.to_owned()
        } else {
            format!("{int}.{frac}")
        });
    }
    out.sort();
    out
}

/// Where the verifier starts reading a query and its candidates: past the leading sentences
/// they all share word for word (a system prompt, a preamble), cut at a line or sentence
/// end, so what it reads is where they differ. A cross-encoder reads a pair only up to its
/// token limit, from the start: two long prompts that share a preamble would show it the
/// preamble twice and little of the questions, and cost it hundreds of tokens. Identical
/// leading sentences cannot tell a paraphrase from another question; the rest can. Never cuts
/// so far that the query or a candidate has nothing left to read. A byte offset, on a char
/// boundary, valid in the query and every candidate.
pub fn shared_context(query: &str, candidates: &[&str]) -> usize {
    if candidates.is_empty() {
        return 0;
    }
    let common = candidates.iter().fold(query.len(), |n, c| {
        n.min(
            query
                .bytes()
                .zip(c.bytes())
                .take_while(|(a, b)| a == b)
                .count(),
        )
    });
    let shared = &query.as_bytes()[..common];
    // Offsets just past a line end, or past a sentence end (or a label's colon) and white space.
    let mut cuts: Vec<usize> = (1..=common)
        .filter(|&i| match shared[i - 1] {
            b'\n' => true,
            b' ' | b'\t' | b'\r' => i >= 2 && matches!(shared[i - 2], b'.' | b'?' | b'!' | b':'),
            _ => false,
        })
        .collect();
    cuts.reverse();
    let has_rest = |text: &str, at: usize| text.get(at..).is_some_and(|r| !r.trim().is_empty());
    cuts.into_iter()
        .find(|&at| has_rest(query, at) && candidates.iter().all(|c| has_rest(c, at)))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(prompt: &str) -> Read<'_> {
        Read {
            prompt,
            window: None,
        }
    }

    #[test]
    fn numbers_are_read_as_numbers() {
        assert_eq!(numbers("What is 17 times 23?"), ["17", "23"]);
        assert_eq!(
            numbers("1,000 or 1000.0 or 01000"),
            ["1000", "1000", "1000"]
        );
        assert_eq!(numbers("pi is 3.14, e is 2.718."), ["2.718", "3.14"]);
        assert_eq!(numbers("gpt4 vs h2o"), ["2", "4"]);
        assert!(numbers("no digits here").is_empty());
    }

    #[test]
    fn different_numbers_reject_and_reordered_ones_pass() {
        assert_eq!(
            check(whole("What is 17 times 23?"), whole("What is 17 times 24?")),
            Some(Rejection::Numbers)
        );
        assert_eq!(
            check(
                whole("What is 17 times 23?"),
                whole("what's 23 multiplied by 17")
            ),
            None
        );
        assert_eq!(
            check(
                whole("How do I learn Rust?"),
                whole("How can I learn Rust?")
            ),
            None
        );
    }

    #[test]
    fn text_past_the_window_must_match() {
        let a = "shared preamble. Question: how do I sort a list?";
        let b = "shared preamble. Question: how do I reverse a list?";
        let window = Some("shared preamble.".len());
        let read = |prompt| Read { prompt, window };
        assert_eq!(check(read(a), read(b)), Some(Rejection::BeyondWindow));
        assert_eq!(check(read(a), read(a)), None);
        // Only one of them was cut: the other had nothing past its window.
        assert_eq!(check(read(a), whole(a)), Some(Rejection::BeyondWindow));
        // White space past the window is folded like the exact path's.
        let spaced = "shared preamble.   Question:  how do I sort a list? ";
        assert_eq!(check(read(a), read(spaced)), None);
    }

    #[test]
    fn the_verifier_reads_past_a_shared_preamble() {
        let system = "You are a helpful assistant. Answer briefly.\nUser: ";
        let q = format!("{system}How can I reset my password?");
        let c = format!("{system}How do I reset my password?");
        let at = shared_context(&q, &[&c]);
        // A label ending in a colon is cut like a sentence.
        assert_eq!(&q[at..], "How can I reset my password?");
        assert_eq!(&c[at..], "How do I reset my password?");
        // Sentences count too, and every candidate must share what is cut.
        let d = "You are a helpful assistant. Answer in French.\nUser: Bonjour?";
        assert_eq!(
            &q[shared_context(&q, &[&c, d])..],
            "Answer briefly.\nUser: How can I reset my password?"
        );
        // Within a sentence nothing is cut: the shared words are part of the question.
        assert_eq!(
            shared_context("How do I learn Java?", &["How do I learn Rust?"]),
            0
        );
        // Nothing left to read on one side: cut less.
        assert_eq!(
            shared_context("Hello.\nBye.", &["Hello.\nBye.\nAnd more."]),
            "Hello.\n".len()
        );
        assert_eq!(shared_context("Hello.", &["Hello. World."]), 0);
        // Multi-byte text is cut on a char boundary.
        let e = "Grüße! Wie geht's?";
        let f = "Grüße! Wie geht es dir?";
        let at = shared_context(e, &[f]);
        assert_eq!((&e[at..], &f[at..]), ("Wie geht's?", "Wie geht es dir?"));
        assert_eq!(shared_context("", &[]), 0);
    }
}
