//! Callers' personal data: how long it is kept (`retention:`, applied by [`retention`]) and
//! residents' requests about it (`ivr311 privacy export|erase`, [`request`]).
//!
//! | part | owns | must not touch |
//! | --- | --- | --- |
//! | [`RetentionConfig`] | the one place retention periods are set | |
//! | [`retention`] | the daily pass: recordings deleted, numbers removed, history pruned; audited | the 911 audit (kept: see README) |
//! | [`request`] | finding every row and recording that holds one number; exporting and erasing them | counts (rows stay, only the personal fields go) |
//!
//! The admins' log (`ivr311::audit` target) gets what was deleted or cleared and how much,
//! never a number.

pub mod request;
pub mod retention;

use serde::Deserialize;

/// What replaces a number that was removed (by retention or an erasure): the row stays, so
/// counts and reports do not change, and a reader sees the number was there and is gone.
pub const ERASED: &str = "erased";

/// The `retention:` section: how long callers' personal data is kept, in days after it was
/// made. 0 keeps it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Ticket recordings (the caller's spoken description) and operator-call recordings are
    /// deleted this many days after they were made. Default 90.
    pub recordings_days: u32,
    /// Callers' numbers are removed (replaced by `erased`) from tickets, call-backs, outbox
    /// payloads, and call history (where they are already a keyed hash after
    /// `history.hash_numbers_after_days`) this many days after the call or request. The
    /// 911 audit keeps them (see README, "Personal data"). Default 400.
    pub caller_numbers_days: u32,
    /// Call history rows (calls, operators' states, queue events) and the report sums are
    /// deleted after this many days. Default 400 (a year and a month, for year-on-year
    /// reports).
    pub history_days: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            recordings_days: 90,
            caller_numbers_days: 400,
            history_days: 400,
        }
    }
}

/// Why a privacy pass or request failed.
#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    /// The `--phone` argument is not a number we can match.
    #[error("{0:?} is not a phone number (give it as +12125550100 or 2125550100)")]
    BadPhone(String),
    /// The database refused.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Call history could not be pruned.
    #[error("call history: {0}")]
    History(#[from] crate::history::HistoryError),
    /// A recording could not be deleted.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// A resident's number, as a request names it: matched against stored numbers in any of
/// the forms they are kept in (`+12125550100`, `12125550100`, `2125550100`, `212-555-0100`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phone {
    e164: String,
}

impl Phone {
    /// Reads `text` as a number: E.164 (`+...`) or North American national forms.
    pub fn parse(text: &str) -> Result<Phone, PrivacyError> {
        crate::dispatch::numbers::e164(text.trim())
            .map(|e164| Phone { e164 })
            .ok_or_else(|| PrivacyError::BadPhone(text.to_owned()))
    }

    /// The number in E.164.
    pub fn e164(&self) -> &str {
        &self.e164
    }

    /// Whether a stored value is this number (a SIP user part such as `+12125550100` or
    /// `2125550100`, or a number a web client typed).
    pub fn matches(&self, stored: &str) -> bool {
        let user = stored
            .trim()
            .trim_start_matches("sip:")
            .trim_start_matches("tel:");
        let user = user.split(['@', ';']).next().unwrap_or(user);
        crate::dispatch::numbers::e164(user).is_some_and(|n| n == self.e164)
    }

    /// The forms a SIP trunk may have delivered this number in, as call history stored it
    /// before hashing it (the hash is of the number as received).
    pub(crate) fn received_forms(&self) -> Vec<String> {
        let digits = &self.e164[1..];
        let mut forms = vec![self.e164.clone(), digits.to_owned()];
        if let Some(national) = digits.strip_prefix('1').filter(|d| d.len() == 10) {
            forms.push(national.to_owned());
        }
        forms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164_and_national_forms_match() {
        let p = Phone::parse("+1 (212) 555-0100").unwrap();
        assert_eq!(p.e164(), "+12125550100");
        for stored in [
            "+12125550100",
            "12125550100",
            "2125550100",
            "212-555-0100",
            "sip:+12125550100@198.51.100.1",
        ] {
            assert!(p.matches(stored), "{stored}");
        }
        for other in ["+12125550101", "erased", "h:00", "", "anonymous"] {
            assert!(!p.matches(other), "{other}");
        }
        assert_eq!(Phone::parse("2125550100").unwrap(), p);
        assert!(matches!(
            Phone::parse("hello"),
            Err(PrivacyError::BadPhone(_))
        ));
        assert_eq!(
            p.received_forms(),
            ["+12125550100", "12125550100", "2125550100"]
        );
    }
}
