//! Action granularity: what one edge of the search tree is.
//!
//! Every action also ends at a stop token; the granularity decides where it ends otherwise.

use serde::{Deserialize, Serialize};

use crate::token::TokenId;

/// Decides when an action (a tree edge) is complete.
pub trait ActionGranularity {
    /// Whether the action made of `tokens` (decoded: `text`) is complete. Called after each
    /// generated token; stop tokens end an action without asking.
    fn is_complete(&self, tokens: &[TokenId], text: &str) -> bool;

    /// A short description for traces and tables.
    fn describe(&self) -> String;
}

/// The granularities of the Marco-o1 paper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Granularity {
    /// One token per edge.
    Token,
    /// A fixed number of tokens per edge (the paper uses 64 and 32).
    MiniStep(usize),
    /// A reasoning step: ends once the text after its leading whitespace contains a delimiter,
    /// or after `max_tokens` tokens.
    Step {
        /// Delimiters such as `"\n\n"` or `"\n"`.
        delimiters: Vec<String>,
        /// Upper bound on a step's length, so one run-on step cannot eat the budget.
        max_tokens: usize,
    },
}

impl Granularity {
    /// Steps ending at a blank line (at most 256 tokens).
    pub fn step() -> Self {
        Granularity::Step { delimiters: vec!["\n\n".into()], max_tokens: 256 }
    }

    /// Steps ending at a line break (at most 256 tokens).
    pub fn line() -> Self {
        Granularity::Step { delimiters: vec!["\n".into()], max_tokens: 256 }
    }
}

impl std::str::FromStr for Granularity {
    type Err = String;

    /// Parses `token`, `step`, `line` or `mini-step:N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "token" => Ok(Granularity::Token),
            "step" => Ok(Granularity::step()),
            "line" => Ok(Granularity::line()),
            _ => match s.strip_prefix("mini-step:") {
                Some(n) => match n.parse::<usize>() {
                    Ok(n) if n > 0 => Ok(Granularity::MiniStep(n)),
                    _ => Err(format!("mini-step needs a positive token count, got {n:?}")),
                },
                None => Err(format!("unknown granularity {s:?} (token, step, line, mini-step:N)")),
            },
        }
    }
}

impl ActionGranularity for Granularity {
    fn is_complete(&self, tokens: &[TokenId], text: &str) -> bool {
        match self {
            Granularity::Token => !tokens.is_empty(),
            Granularity::MiniStep(n) => tokens.len() >= (*n).max(1),
            Granularity::Step { delimiters, max_tokens } => {
                if tokens.len() >= (*max_tokens).max(1) {
                    return true;
                }
                let body = text.trim_start();
                !body.is_empty() && delimiters.iter().any(|d| !d.is_empty() && body.contains(d.as_str()))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Granularity::Token => "token".into(),
            Granularity::MiniStep(n) => format!("mini-step:{n}"),
            Granularity::Step { delimiters, .. } => format!("step{delimiters:?}"),
        }
    }
}

impl<G: ActionGranularity + ?Sized> ActionGranularity for Box<G> {
    fn is_complete(&self, tokens: &[TokenId], text: &str) -> bool {
        (**self).is_complete(tokens, text)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries() {
        assert!(!Granularity::Token.is_complete(&[], ""));
        assert!(Granularity::Token.is_complete(&[1], "a"));
        let m = Granularity::MiniStep(3);
        assert!(!m.is_complete(&[1, 2], "ab"));
        assert!(m.is_complete(&[1, 2, 3], "abc"));
        let s = Granularity::step();
        assert!(!s.is_complete(&[1], "First"));
        assert!(!s.is_complete(&[1, 2], "First line\n"));
        assert!(s.is_complete(&[1, 2, 3], "First line\n\n"));
        // Leading blank lines do not end a step on their own.
        assert!(!s.is_complete(&[1], "\n\n"));
        assert!(s.is_complete(&[1, 2, 3], "\n\nx\n\n"));
        let capped = Granularity::Step { delimiters: vec!["\n".into()], max_tokens: 2 };
        assert!(capped.is_complete(&[1, 2], "no newline"));
        assert!(Granularity::line().is_complete(&[1, 2], "a\n"));
    }

    #[test]
    fn parse() {
        assert_eq!("mini-step:32".parse::<Granularity>().unwrap(), Granularity::MiniStep(32));
        assert_eq!("token".parse::<Granularity>().unwrap(), Granularity::Token);
        assert!("mini-step:0".parse::<Granularity>().is_err());
        assert!("words".parse::<Granularity>().is_err());
    }
}
