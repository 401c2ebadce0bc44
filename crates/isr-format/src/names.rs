//! The names a deployment accepts for users and parcels: one rule, used by the server and the client alike,
//! so a name the client lets through is never refused (or, worse, reinterpreted) by the server.
//!
//! A name is 1-64 of `A-Z a-z 0-9 . _ -`, not starting with `.` (no `.`/`..` path segments, no hidden
//! directories in the client's home) and, for users, not starting with `-` either.

/// The longest user or parcel name.
pub const MAX_NAME_LEN: usize = 64;

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

/// A valid parcel name (see the module documentation).
pub fn valid_parcel_name(name: &str) -> bool {
    parcel_name_problem(name).is_none()
}

/// A valid user name: a valid parcel name that does not start with '-' either.
pub fn valid_user_name(name: &str) -> bool {
    valid_parcel_name(name) && !name.starts_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_refuses() {
        for ok in ["a", "desktop", "my-vm_2.0", &"x".repeat(64)] {
            assert!(valid_parcel_name(ok), "{ok}");
        }
        for bad in
            ["", ".", "..", ".hidden", "a/b", "a?", "a#", "victim?force=true", "sp ace", "é", &"x".repeat(65)]
        {
            assert!(!valid_parcel_name(bad), "{bad}");
        }
        assert!(valid_parcel_name("-x") && !valid_user_name("-x"));
    }
}
