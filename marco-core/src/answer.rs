//! Answer extraction: the final answer inside a reasoning text, for votes and evaluation.

/// Finds the final answer in a generated text.
pub trait AnswerExtractor {
    /// The answer, normalised, or `None` if the text holds none.
    fn extract(&self, text: &str) -> Option<String>;
}

impl<A: AnswerExtractor + ?Sized> AnswerExtractor for &A {
    fn extract(&self, text: &str) -> Option<String> {
        (**self).extract(text)
    }
}

impl<A: AnswerExtractor + ?Sized> AnswerExtractor for Box<A> {
    fn extract(&self, text: &str) -> Option<String> {
        (**self).extract(text)
    }
}

/// Normalises a number as written in a text: drops `$`, thousands separators, a trailing
/// period and trailing fractional zeros (`1,234.50` → `1234.5`, `8.0` → `8`).
pub fn normalize_number(raw: &str) -> Option<String> {
    let s: String = raw.chars().filter(|c| *c != ',' && *c != '$').collect();
    let s = s.trim().trim_end_matches('.');
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit() || c == '.') || digits.matches('.').count() > 1 {
        return None;
    }
    let mut out = digits.to_string();
    if out.contains('.') {
        out = out.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    let out = out.trim_start_matches('0');
    let out = if out.is_empty() || out.starts_with('.') { format!("0{out}") } else { out.to_string() };
    if !out.chars().any(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(if neg && out != "0" { format!("-{out}") } else { out })
}

/// The last number in the text (GSM8K style).
#[derive(Debug, Clone, Copy, Default)]
pub struct LastNumber;

impl AnswerExtractor for LastNumber {
    fn extract(&self, text: &str) -> Option<String> {
        let chars: Vec<char> = text.chars().collect();
        let mut last = None;
        let mut i = 0;
        while i < chars.len() {
            let starts_number = chars[i].is_ascii_digit()
                || (chars[i] == '-'
                    && chars.get(i + 1).is_some_and(|c| c.is_ascii_digit())
                    && (i == 0 || !chars[i - 1].is_ascii_alphanumeric()));
            if starts_number {
                let start = i;
                i += 1;
                while i < chars.len()
                    && (chars[i].is_ascii_digit()
                        || ((chars[i] == ',' || chars[i] == '.')
                            && chars.get(i + 1).is_some_and(|c| c.is_ascii_digit())))
                {
                    i += 1;
                }
                let raw: String = chars[start..i].iter().collect();
                if let Some(n) = normalize_number(&raw) {
                    last = Some(n);
                }
            } else {
                i += 1;
            }
        }
        last
    }
}

/// The content of the last `\boxed{...}` (braces may nest); a number inside is normalised.
#[derive(Debug, Clone, Copy, Default)]
pub struct Boxed;

impl AnswerExtractor for Boxed {
    fn extract(&self, text: &str) -> Option<String> {
        let start = text.rfind("\\boxed{")? + "\\boxed{".len();
        let mut depth = 1usize;
        for (offset, c) in text[start..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        let inner = text[start..start + offset].trim();
                        return Some(normalize_number(inner).unwrap_or_else(|| inner.to_string()));
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// Marco-o1's `<Output>…</Output>` block; the last number inside it when there is one,
/// else its trimmed text. An unclosed block runs to the end of the text.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutputTag;

impl AnswerExtractor for OutputTag {
    fn extract(&self, text: &str) -> Option<String> {
        let start = text.rfind("<Output>")? + "<Output>".len();
        let inner = match text[start..].find("</Output>") {
            Some(end) => &text[start..start + end],
            None => &text[start..],
        };
        let inner = inner.trim();
        if inner.is_empty() {
            return None;
        }
        Some(Boxed.extract(inner).or_else(|| LastNumber.extract(inner)).unwrap_or_else(|| inner.to_string()))
    }
}

/// Tries extractors in order and returns the first answer found.
pub struct FirstOf(pub Vec<Box<dyn AnswerExtractor + Send + Sync>>);

impl AnswerExtractor for FirstOf {
    fn extract(&self, text: &str) -> Option<String> {
        self.0.iter().find_map(|e| e.extract(text))
    }
}

/// The default extractor: `<Output>`, then `\boxed{}`, then the last number.
pub fn default_extractor() -> FirstOf {
    FirstOf(vec![Box::new(OutputTag), Box::new(Boxed), Box::new(LastNumber)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_number() {
        assert_eq!(LastNumber.extract("3 + 5 = 8 apples."), Some("8".into()));
        assert_eq!(LastNumber.extract("costs $1,234.50 in total"), Some("1234.5".into()));
        assert_eq!(LastNumber.extract("It is -7."), Some("-7".into()));
        assert_eq!(LastNumber.extract("x-3 is not negative"), Some("3".into()));
        assert_eq!(LastNumber.extract("no digits"), None);
        assert_eq!(LastNumber.extract("8.0"), Some("8".into()));
    }

    #[test]
    fn boxed_and_output() {
        assert_eq!(Boxed.extract("so \\boxed{42}."), Some("42".into()));
        assert_eq!(Boxed.extract("\\boxed{\\frac{1}{2}}"), Some("\\frac{1}{2}".into()));
        assert_eq!(Boxed.extract("\\boxed{unclosed"), None);
        assert_eq!(OutputTag.extract("<Thought>1</Thought><Output>The answer is 18.</Output>"), Some("18".into()));
        assert_eq!(OutputTag.extract("<Output>Paris"), Some("Paris".into()));
        assert_eq!(default_extractor().extract("I think 5. <Output>6</Output>"), Some("6".into()));
        assert_eq!(default_extractor().extract("I think 5, then 9"), Some("9".into()));
    }
}
