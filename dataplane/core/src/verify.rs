//! Checks a semantic candidate must pass before it is served, after the nearest-neighbour
//! search: the embedding alone cannot see them. Pure functions of the two prompts.
//!
//! - **Beyond the window**: an embedder reads a prompt only up to its window (256 tokens for
//!   the local model) and ignores the rest, so two long prompts that share a preamble embed
//!   the same however their endings differ. The text past each prompt's window must match
//!   (after white-space folding), or the candidate is not a hit.
//! - **Numbers**: "What is 17 times 23?" and "…24?" are near-identical vectors. The numbers
//!   of the two prompts must be the same, as a multiset, and so must the names that hold
//!   digits ("iPhone 5" / "iPhone 5S", "GPT-4" / "GPT-4o").
//! - **Negation**: one prompt negated ("not", "never", "can't") and the other not.
//! - **Opposites**: "enable" on one side and "disable" on the other (a short list of such
//!   pairs, [`OPPOSITES`]) make another question, however close the vectors.
//! - **Direction**: the same words with two swapped across "to", "into", "from" or "than"
//!   ("Celsius to Fahrenheit" / "Fahrenheit to Celsius") ask the opposite.

use std::collections::HashSet;

use crate::scope::normalize_prompt;

/// Why a candidate above the threshold was not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The prompts differ past the embedder's window, where the vectors cannot see.
    BeyondWindow,
    /// The prompts hold different numbers.
    Numbers,
    /// One prompt is negated and the other is not ("can" / "cannot").
    Negation,
    /// One prompt holds a word and the other its opposite ("enable" / "disable").
    Opposite,
    /// The same words, two of them swapped across a word that gives a direction
    /// ("Celsius to Fahrenheit" / "Fahrenheit to Celsius").
    Direction,
}

impl Rejection {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BeyondWindow => "beyond_window",
            Self::Numbers => "numbers",
            Self::Negation => "negation",
            Self::Opposite => "opposite",
            Self::Direction => "direction",
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
    let (q, c) = (words(query.prompt), words(candidate.prompt));
    if !named_numbers_found(&q, &c) || !named_numbers_found(&c, &q) {
        return Some(Rejection::Numbers);
    }
    if negated_alone(&q, &c) {
        return Some(Rejection::Negation);
    }
    if opposite(&q, &c) {
        return Some(Rejection::Opposite);
    }
    if swapped_direction(&q, &c) {
        return Some(Rejection::Direction);
    }
    None
}

/// The words of `text`, lower-cased: runs of letters and digits.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Whether every word of `words` that mixes letters and digits ("5s", "4o", "mp3") is in
/// `others` too, as one word or as two or three consecutive words run together ("10am" /
/// "10 am", "gpt4" / "GPT-4"): the same digits with other letters name another thing ("iPhone
/// 5" / "iPhone 5S"). Linear in the words: a long log or code prompt holds thousands of such
/// names, and each lookup checks every candidate.
fn named_numbers_found(words: &[String], others: &[String]) -> bool {
    let named =
        |w: &&String| w.bytes().any(|b| b.is_ascii_digit()) && w.chars().any(char::is_alphabetic);
    let mut missing: HashSet<&str> = words.iter().filter(named).map(String::as_str).collect();
    if missing.is_empty() {
        return true;
    }
    for w in others {
        missing.remove(w.as_str());
    }
    if missing.is_empty() {
        return true;
    }
    // Two and three consecutive words run together; only runs as long as a missing name.
    let longest = missing.iter().map(|n| n.len()).max().unwrap_or(0);
    for start in 0..others.len() {
        let mut run = String::new();
        for w in others[start..].iter().take(3) {
            run.push_str(w);
            if run.len() > longest {
                break;
            }
            missing.remove(run.as_str());
        }
    }
    missing.is_empty()
}

/// Words that negate what they stand in. "can't" splits into "can" and "t"; written without
/// its apostrophe it is one of [`CONTRACTED`].
const NEGATIONS: [&str; 3] = ["not", "never", "no"];

/// Negated forms written without their apostrophe, and what they negate.
const CONTRACTED: [(&str, &str); 11] = [
    ("cannot", "can"),
    ("cant", "can"),
    ("dont", "do"),
    ("doesnt", "does"),
    ("didnt", "did"),
    ("isnt", "is"),
    ("arent", "are"),
    ("wont", "will"),
    ("wasnt", "was"),
    ("shouldnt", "should"),
    ("couldnt", "could"),
];

/// `words` without their negations, and whether there was one: "can't" reads as "can",
/// "won't" as "will", "not" and "never" go. "or not" and "why not" ("should I go or not?",
/// "why or why not?") ask both ways and negate nothing.
fn without_negation(words: &[String]) -> (Vec<String>, bool) {
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    let mut negated = false;
    for (i, w) in words.iter().enumerate() {
        let before = i.checked_sub(1).map(|b| words[b].as_str());
        if NEGATIONS.contains(&w.as_str()) {
            if !(w == "not" && matches!(before, Some("or" | "why"))) {
                negated = true;
            }
            continue;
        }
        if w == "t" && before.is_some_and(|b| b.ends_with('n')) {
            negated = true;
            if let Some(last) = out.pop() {
                out.push(match last.as_str() {
                    "won" => "will".to_owned(),
                    "can" => last,
                    other => other.strip_suffix('n').unwrap_or(other).to_owned(),
                });
            }
            continue;
        }
        if let Some(&(_, plain)) = CONTRACTED.iter().find(|(c, _)| c == w) {
            negated = true;
            out.push(plain.to_owned());
            continue;
        }
        out.push(w.clone());
    }
    (out, negated)
}

/// Whether one prompt is the other with a negation added, word for word otherwise: "What can
/// a robot do?" / "What can't a robot do?". Prompts that differ in other words too are left
/// to the verifier: "Why hasn't X released an API?" asks what "When will X release an API?"
/// asks, and Quora's labels say so.
fn negated_alone(q: &[String], c: &[String]) -> bool {
    // A negation adds at most two words ("not", or "can" "t" for "can"): anything further
    // apart differs in other words too.
    if q.len().abs_diff(c.len()) > 2 {
        return false;
    }
    let ((mut qw, qn), (mut cw, cn)) = (without_negation(q), without_negation(c));
    if qn == cn {
        return false;
    }
    qw.sort();
    cw.sort();
    qw == cw
}

/// Words whose opposite turns a question into another one. Embeddings put such pairs close
/// together, and the local verifier, trained on Quora's questions, accepted "How do I disable
/// two-factor authentication?" for "…enable…" (score 0.78). Both forms of each pair are
/// listed; a prompt that holds both words of a pair says nothing by it.
const OPPOSITES: &[(&str, &str)] = &[
    ("enable", "disable"),
    ("enabled", "disabled"),
    ("enabling", "disabling"),
    ("install", "uninstall"),
    ("installed", "uninstalled"),
    ("installing", "uninstalling"),
    ("safe", "unsafe"),
    ("before", "after"),
    ("within", "after"),
    ("increase", "decrease"),
    ("increasing", "decreasing"),
    ("add", "remove"),
    ("adding", "removing"),
    ("on", "off"),
    ("import", "export"),
    ("upload", "download"),
    ("uploading", "downloading"),
    ("start", "stop"),
    ("lock", "unlock"),
    ("show", "hide"),
    ("allow", "block"),
    ("allow", "deny"),
    ("encrypt", "decrypt"),
    ("encryption", "decryption"),
    ("connect", "disconnect"),
    ("subscribe", "unsubscribe"),
    ("follow", "unfollow"),
    ("block", "unblock"),
    ("mute", "unmute"),
    ("open", "close"),
    ("buy", "sell"),
    ("win", "lose"),
    ("min", "max"),
    ("minimum", "maximum"),
    ("minimize", "maximize"),
    ("upgrade", "downgrade"),
    ("compress", "decompress"),
    ("zip", "unzip"),
    ("legal", "illegal"),
    ("possible", "impossible"),
    ("true", "false"),
    ("positive", "negative"),
    ("advantages", "disadvantages"),
    ("with", "without"),
    ("above", "below"),
    ("best", "worst"),
    ("increase", "reduce"),
    ("encode", "decode"),
    ("long", "short"),
    ("longer", "shorter"),
    ("big", "small"),
    ("large", "small"),
    ("bigger", "smaller"),
    ("high", "low"),
    ("higher", "lower"),
    ("more", "less"),
    ("most", "least"),
    ("first", "last"),
    ("male", "female"),
    ("men", "women"),
    ("man", "woman"),
    ("boy", "girl"),
    ("boys", "girls"),
    ("hot", "cold"),
    ("rich", "poor"),
    ("cheap", "expensive"),
    ("fast", "slow"),
    ("faster", "slower"),
    ("easy", "hard"),
    ("easy", "difficult"),
    ("good", "bad"),
    ("better", "worse"),
    ("love", "hate"),
    ("pros", "cons"),
    ("north", "south"),
    ("east", "west"),
    ("input", "output"),
    ("inside", "outside"),
    ("internal", "external"),
    ("public", "private"),
    ("online", "offline"),
    ("send", "receive"),
    ("push", "pull"),
    ("top", "bottom"),
    ("early", "late"),
    ("ascending", "descending"),
    ("uppercase", "lowercase"),
    ("horizontal", "vertical"),
    ("horizontally", "vertically"),
    ("login", "logout"),
    ("agree", "disagree"),
    ("strengths", "weaknesses"),
    ("success", "failure"),
    ("happy", "sad"),
    ("old", "new"),
    ("old", "young"),
];

/// Whether one side holds a word of a pair without its opposite, and the other side the
/// opposite without the word.
fn opposite(q: &[String], c: &[String]) -> bool {
    let (q, c) = (word_set(q), word_set(c));
    OPPOSITES.iter().any(|&(a, b)| {
        let one_way = |x: &HashSet<&str>, y: &HashSet<&str>| {
            x.contains(a) && !x.contains(b) && y.contains(b) && !y.contains(a)
        };
        one_way(&q, &c) || one_way(&c, &q)
    })
}

fn word_set(words: &[String]) -> HashSet<&str> {
    words.iter().map(String::as_str).collect()
}

/// Words that give what follows them a direction: "A to B" is not "B to A".
const DIRECTION_WORDS: [&str; 4] = ["to", "into", "from", "than"];

/// Longer prompts are left to the verifier: the check compares every pair of words.
const DIRECTION_MAX_WORDS: usize = 64;

/// Whether the two prompts hold the same words, two of which (each once on both sides) stand
/// in the opposite order with a direction word between them on one side: "convert Celsius to
/// Fahrenheit" / "convert Fahrenheit to Celsius", "is Rust faster than Go" / "is Go faster
/// than Rust". "between A and B" / "between B and A" passes: "and" gives no direction.
fn swapped_direction(q: &[String], c: &[String]) -> bool {
    if q == c || q.len() != c.len() || q.len() > DIRECTION_MAX_WORDS {
        return false;
    }
    let (mut qs, mut cs) = (q.to_vec(), c.to_vec());
    qs.sort();
    cs.sort();
    if qs != cs {
        return false;
    }
    let once = |ws: &[String], w: &String| ws.iter().filter(|x| *x == w).count() == 1;
    let position = |ws: &[String], w: &String| ws.iter().position(|x| x == w);
    let directed = |ws: &[String], from: usize, to: usize| {
        ws[from.min(to) + 1..from.max(to)]
            .iter()
            .any(|w| DIRECTION_WORDS.contains(&w.as_str()))
    };
    for (i, a) in q.iter().enumerate() {
        if DIRECTION_WORDS.contains(&a.as_str()) || !once(q, a) || !once(c, a) {
            continue;
        }
        for b in &q[i + 1..] {
            if b == a || DIRECTION_WORDS.contains(&b.as_str()) || !once(q, b) || !once(c, b) {
                continue;
            }
            let (Some(qb), Some(ca), Some(cb)) = (position(q, b), position(c, a), position(c, b))
            else {
                continue;
            };
            if ca > cb && (directed(q, i, qb) || directed(c, ca, cb)) {
                return true;
            }
        }
    }
    false
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
    fn names_with_digits_must_match_however_they_are_spelled() {
        let reject = |a, b| check(whole(a), whole(b));
        assert_eq!(
            reject("Should I buy an iPhone 5?", "Should I buy an iPhone 5S?"),
            Some(Rejection::Numbers)
        );
        assert_eq!(
            reject("Is GPT-4o better at maths?", "Is GPT-4 better at maths?"),
            Some(Rejection::Numbers)
        );
        // The same name written together, apart or hyphenated passes; so does a name in
        // another case.
        assert_eq!(
            reject("Is GPT4 good at maths?", "Is GPT-4 good at maths?"),
            None
        );
        assert_eq!(reject("Meet at 10am?", "Meet at 10 am?"), None);
        assert_eq!(reject("Is GPT4o good?", "Is GPT-4-o good?"), None);
        assert_eq!(reject("Convert to MP3?", "convert to mp3"), None);
        // A name is matched by whole words, not inside a longer one.
        assert_eq!(
            reject("Is the 5s fast?", "Is the 5sx fast?"),
            Some(Rejection::Numbers)
        );
    }

    #[test]
    fn a_negated_question_is_another_question() {
        let reject = |a, b| check(whole(a), whole(b));
        assert_eq!(
            reject("What can a robot do?", "What can't a robot do?"),
            Some(Rejection::Negation)
        );
        assert_eq!(
            reject("What can a robot do?", "What cannot a robot do?"),
            Some(Rejection::Negation)
        );
        assert_eq!(
            reject("Why do cats purr?", "Why don’t cats purr?"),
            Some(Rejection::Negation)
        );
        assert_eq!(
            reject("Is it safe to never sleep?", "Is it safe to sleep?"),
            Some(Rejection::Negation)
        );
        // Negated on both sides, however it is written, passes.
        assert_eq!(
            reject("Why can't I sleep?", "Why am I not able to sleep?"),
            None
        );
        assert_eq!(reject("Why cant I sleep?", "Why can't I sleep?"), None);
        assert_eq!(
            reject("Should I learn Go or not?", "Should I learn Go?"),
            None
        );
        assert_eq!(
            reject(
                "Is Daniel Tosh funny? Why or why not?",
                "Is Daniel Tosh funny?"
            ),
            None
        );
        // A negation with other words changed too is left to the verifier: Quora asks the
        // same question both ways.
        assert_eq!(
            reject(
                "Why hasn't Dribbble released a write API?",
                "When will Dribbble release a write API?"
            ),
            None
        );
        // Words, not substrings: "note" and "known" negate nothing.
        assert_eq!(reject("Can I take a note?", "Can I take known note?"), None);
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

    #[test]
    fn opposites_reject_and_shared_or_absent_ones_pass() {
        let reject = |a, b| check(whole(a), whole(b));
        assert_eq!(
            reject(
                "How do I disable two-factor authentication?",
                "How do I enable two-factor authentication?"
            ),
            Some(Rejection::Opposite)
        );
        assert_eq!(
            reject(
                "Can I return an item within 30 days?",
                "Can I return an item after 30 days?"
            ),
            Some(Rejection::Opposite)
        );
        assert_eq!(
            reject("Coffee with milk?", "Coffee without milk?"),
            Some(Rejection::Opposite)
        );
        // Both words on one side say nothing; no opposite at all passes.
        assert_eq!(reject("Turn it off and on again?", "Turn it on?"), None);
        assert_eq!(
            reject("How do I learn Rust?", "How can I learn Rust?"),
            None
        );
        // Words, not substrings: "only" is not "on", "disabled" not "enable".
        assert_eq!(reject("Is it only me?", "Is it off?"), None);
        // One word apart on a pair from the list: another question.
        assert_eq!(
            reject(
                "Why do long-finned pilot whales strand?",
                "Why do short-finned pilot whales strand?"
            ),
            Some(Rejection::Opposite)
        );
        assert_eq!(
            reject("What are the pros of Rust?", "What are the cons of Rust?"),
            Some(Rejection::Opposite)
        );
    }

    #[test]
    fn a_direction_swapped_rejects_and_a_symmetric_one_passes() {
        let reject = |a, b| check(whole(a), whole(b));
        assert_eq!(
            reject(
                "How do I convert Fahrenheit to Celsius?",
                "How do I convert Celsius to Fahrenheit?"
            ),
            Some(Rejection::Direction)
        );
        assert_eq!(
            reject("Is Rust faster than Go?", "Is Go faster than Rust?"),
            Some(Rejection::Direction)
        );
        assert_eq!(
            reject(
                "What is the difference between Rust and Go?",
                "What is the difference between Go and Rust?"
            ),
            None
        );
        // Reordered without a direction word between the swapped words: the verifier decides.
        assert_eq!(
            reject("Rust tips for beginners", "beginners tips for Rust"),
            None
        );
        assert_eq!(
            reject("How do I go to Paris?", "How do I go to Paris?"),
            None
        );
    }
}
