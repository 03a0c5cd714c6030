//! What computing the tables says about an object it could use only in part: the tables
//! ([`crate::tables`]) and NetworkPolicy ([`crate::policy`]) both skip that part and say
//! why, and the programmer logs it.

use std::fmt;

/// Part of an object that could not be used; the rest of the tables is still computed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// Which object (`Service default/web`).
    pub object: String,
    /// What was skipped and why.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}
