//! Values that must never be printed or left in memory: passwords, password
//! verifiers, DSNs with a password.
//!
//! Takes a `String`; gives [`SecretString`], which reads as `&str`, prints as
//! `<redacted>` through `Debug` (so no `{:?}` of a struct holding one, no
//! tracing field, no panic message shows it) and is zeroized when dropped.
//! No I/O.

use std::fmt;

use zeroize::Zeroizing;

/// A string that is zeroized on drop and redacted in `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The value, for the one place that needs it (a statement, a Secret).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl From<&str> for SecretString {
    fn from(value: &str) -> Self {
        Self::new(value.to_owned())
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = SecretString::from("hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(vec![s.clone()])), "Some([<redacted>])");
        assert_eq!(s.expose(), "hunter2");
    }
}
