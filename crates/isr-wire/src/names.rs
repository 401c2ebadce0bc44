//! The names and ids the API carries, each with one parse rule used by the server and the client alike, so a
//! name the client lets through is never refused (or, worse, reinterpreted) by the server.
//!
//! - A parcel name is 1-64 of `A-Z a-z 0-9 . _ -`, not starting with `.`: a parcel name becomes a URL path
//!   segment and a directory of the client's home, so `.` and `..` (other paths) and `.hidden` (a hidden
//!   directory) are refused. This is the rule the client and the server have both applied since names were
//!   unified; `docs/api.md` used to say `[A-Za-z0-9._-]{1,64}`, which let a leading `.` through: the docs were
//!   wrong, not the code.
//! - A user name is a parcel name that does not start with `-` either (it is an argument of `isr-server`'s
//!   subcommands).
//! - A lock id is 1-64 hex digits (the server issues 32).
//! - A client id is what a client calls itself in lock requests: 1-256 bytes without control characters.
//! - Display text (a lock holder, a breaker's name, a version's client) is at most 256 bytes without
//!   control characters: it is shown to other users and written to logs.

use crate::limits::MAX_DISPLAY_TEXT;
use std::fmt;

/// The longest user or parcel name.
pub const MAX_NAME_LEN: usize = 64;
/// The longest lock id.
pub const MAX_LOCK_ID_LEN: usize = 64;

/// Why a name or id was refused: what it is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {why}")]
pub struct InvalidName {
    /// `parcel name`, `user name`, `lock id`, ...
    pub what: &'static str,
    /// The value as given (escaped when shown).
    pub value: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// What is wrong with `name` as a parcel name, or `None` when it is valid.
pub fn parcel_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Some("it is longer than 64 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Some("only letters, digits, '.', '_' and '-' are allowed");
    }
    if name.starts_with('.') {
        return Some("it must not start with '.'");
    }
    None
}

/// What is wrong with `name` as a user name, or `None` when it is valid.
pub fn user_name_problem(name: &str) -> Option<&'static str> {
    parcel_name_problem(name).or(if name.starts_with('-') {
        Some("it must not start with '-'")
    } else {
        None
    })
}

/// A valid parcel name (see the module documentation).
pub fn valid_parcel_name(name: &str) -> bool {
    parcel_name_problem(name).is_none()
}

/// A valid user name: a valid parcel name that does not start with '-' either.
pub fn valid_user_name(name: &str) -> bool {
    user_name_problem(name).is_none()
}

fn text_problem(value: &str) -> Option<&'static str> {
    if value.len() > MAX_DISPLAY_TEXT {
        return Some("it is longer than 256 bytes");
    }
    if value.chars().any(char::is_control) {
        return Some("it contains control characters");
    }
    None
}

macro_rules! validated {
    ($(#[$doc:meta])* $name:ident, $what:literal, $problem:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The one rule for this kind of value (see the module documentation).
            pub fn parse(value: &str) -> Result<Self, InvalidName> {
                let problem: fn(&str) -> Option<&'static str> = $problem;
                match problem(value) {
                    None => Ok($name(value.to_owned())),
                    Some(why) => Err(InvalidName { what: $what, value: value.to_owned(), why }),
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, InvalidName> {
                Self::parse(s)
            }
        }
    };
}

validated!(
    /// A parcel name: 1-64 of `A-Z a-z 0-9 . _ -`, not starting with `.`.
    ParcelName,
    "parcel name",
    parcel_name_problem
);

validated!(
    /// A user name: a parcel name that does not start with `-` either.
    UserName,
    "user name",
    user_name_problem
);

validated!(
    /// A lock id as the server issues it: 1-64 hex digits.
    LockId,
    "lock id",
    |v| {
        if v.is_empty() || v.len() > MAX_LOCK_ID_LEN {
            Some("it must be 1-64 hex digits")
        } else if !v.bytes().all(|b| b.is_ascii_hexdigit()) {
            Some("only hex digits are allowed")
        } else {
            None
        }
    }
);

validated!(
    /// What a client calls itself in lock requests: 1-256 bytes without control characters.
    ClientId,
    "client id",
    |v| if v.is_empty() { Some("it must not be empty") } else { text_problem(v) }
);

validated!(
    /// A name shown to other users (a lock's holder, who broke a lock, a version's client): at most 256 bytes,
    /// no control characters.
    DisplayText,
    "display name",
    text_problem
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_refuses() {
        for ok in ["a", "desktop", "my-vm_2.0", "-x", "a.", &"x".repeat(64)] {
            assert!(valid_parcel_name(ok), "{ok}");
            assert_eq!(ParcelName::parse(ok).unwrap().as_str(), ok);
        }
        for bad in
            ["", ".", "..", ".hidden", "a/b", "a?", "a#", "victim?force=true", "sp ace", "é", &"x".repeat(65)]
        {
            assert!(!valid_parcel_name(bad), "{bad}");
            let e = ParcelName::parse(bad).unwrap_err();
            assert!(e.to_string().starts_with("invalid parcel name"), "{e}");
        }
        assert!(valid_parcel_name("-x") && !valid_user_name("-x"));
        assert!(UserName::parse("-x").unwrap_err().why.contains("'-'"));
    }

    #[test]
    fn ids_and_text() {
        assert!(LockId::parse("abcd").is_ok());
        assert!(LockId::parse(&"0".repeat(64)).is_ok());
        for bad in ["", "xyz", "ab cd", &"0".repeat(65)] {
            assert!(LockId::parse(bad).is_err(), "{bad}");
        }
        assert!(ClientId::parse("c1").is_ok());
        assert!(ClientId::parse("").is_err());
        assert!(DisplayText::parse("").is_ok());
        assert!(DisplayText::parse("alice's laptop (home)").is_ok());
        assert!(DisplayText::parse("a\nb").is_err());
        assert!(DisplayText::parse(&"x".repeat(257)).is_err());
    }
}
