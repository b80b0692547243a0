//! Action granularity: what one edge of the search tree is.
//!
//! Every action also ends at a stop token; the granularity decides where it ends otherwise.

use serde::{Deserialize, Serialize};

use crate::token::TokenId;

/// What a granularity can tell a model that generates a whole action in one call (a server):
/// where to stop, so that it need not be asked token by token.
///
/// Hints only bound the work: [`ActionGranularity::is_complete`] still decides where an action
/// ends, and tokens a model generated past that point are dropped before they reach the tree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionHints {
    /// No action of this granularity is longer than this many tokens.
    pub max_tokens: Option<usize>,
    /// An action ends at (or soon after) the first of these strings in its text.
    pub stop_strings: Vec<String>,
}

/// Decides when an action (a tree edge) is complete.
pub trait ActionGranularity {
    /// Whether the action made of `tokens` (decoded: `text`) is complete. Called after each
    /// generated token; stop tokens end an action without asking.
    fn is_complete(&self, tokens: &[TokenId], text: &str) -> bool;

    /// A short description for traces and tables.
    fn describe(&self) -> String;

    /// Limits a whole-action generator may use ([`ActionHints`]). `None` (the default) means
    /// the granularity can only be asked token by token: a remote model then sends one
    /// request per token, which is correct but slow.
    fn hints(&self) -> Option<ActionHints> {
        None
    }
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

    fn hints(&self) -> Option<ActionHints> {
        Some(match self {
            Granularity::Token => ActionHints { max_tokens: Some(1), stop_strings: Vec::new() },
            Granularity::MiniStep(n) => ActionHints { max_tokens: Some((*n).max(1)), stop_strings: Vec::new() },
            Granularity::Step { delimiters, max_tokens } => ActionHints {
                max_tokens: Some((*max_tokens).max(1)),
                stop_strings: delimiters.iter().filter(|d| !d.is_empty()).cloned().collect(),
            },
        })
    }
}

impl<G: ActionGranularity + ?Sized> ActionGranularity for Box<G> {
    fn is_complete(&self, tokens: &[TokenId], text: &str) -> bool {
        (**self).is_complete(tokens, text)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn hints(&self) -> Option<ActionHints> {
        (**self).hints()
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
    fn hints_bound_what_is_complete() {
        assert_eq!(Granularity::MiniStep(32).hints().unwrap().max_tokens, Some(32));
        let step = Granularity::step().hints().unwrap();
        assert_eq!((step.max_tokens, step.stop_strings), (Some(256), vec!["\n\n".to_string()]));
        assert_eq!(Granularity::Token.hints().unwrap().max_tokens, Some(1));
        struct Custom;
        impl ActionGranularity for Custom {
            fn is_complete(&self, tokens: &[TokenId], _: &str) -> bool {
                tokens.len() >= 2
            }
            fn describe(&self) -> String {
                "custom".into()
            }
        }
        assert_eq!(Custom.hints(), None);
        assert_eq!(Box::new(Granularity::MiniStep(4)).hints().unwrap().max_tokens, Some(4));
    }

    #[test]
    fn parse() {
        assert_eq!("mini-step:32".parse::<Granularity>().unwrap(), Granularity::MiniStep(32));
        assert_eq!("token".parse::<Granularity>().unwrap(), Granularity::Token);
        assert!("mini-step:0".parse::<Granularity>().is_err());
        assert!("words".parse::<Granularity>().is_err());
    }
}
