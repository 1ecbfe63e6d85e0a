//! What the server's log lines may show of callers: the `log:` section ([`LogConfig`]) and
//! the redaction of callers' numbers (`redact_number`).
//!
//! Used by the SIP UA (outbound targets), the calls and the call-backs; imports nothing from
//! the rest of the crate. Setting up the log output itself is `main.rs`'s.

use serde::Deserialize;

/// What goes into the server's log lines (the `log:` section).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Show callers' numbers in log lines with only their last four digits (`***0123`): the
    /// call's span, call-backs, and the call-back's outbound INVITE. Operations can still
    /// match a line to a caller who gives their number; a leaked log names nobody. The
    /// database, recordings and the admin API keep numbers whole. Default false.
    pub redact_numbers: bool,
}

impl LogConfig {
    /// `number` as log lines show it (see [`redact_number`]).
    pub(crate) fn number(&self, number: &str) -> String {
        if self.redact_numbers {
            redact_number(number)
        } else {
            number.to_owned()
        }
    }

    /// A SIP URI as log lines show it: its user part as [`LogConfig::number`] shows numbers.
    pub(crate) fn uri(&self, uri: &str) -> String {
        if !self.redact_numbers {
            return uri.to_owned();
        }
        match uri.split_once(':').and_then(|(scheme, rest)| {
            let (user, host) = rest.split_once('@')?;
            Some((scheme, user, host))
        }) {
            Some((scheme, user, host)) => format!("{scheme}:{}@{host}", redact_number(user)),
            None => uri.to_owned(),
        }
    }
}

/// A caller's number with all but its last four digits hidden: `+15550001111` → `***1111`.
/// Short codes (four characters or fewer, such as `311`) and `anonymous` are shown as they
/// are; anything else with fewer than four digits (a name) becomes `***`.
pub(crate) fn redact_number(number: &str) -> String {
    if number.chars().count() <= 4 || number.eq_ignore_ascii_case("anonymous") {
        return number.to_owned();
    }
    let digits: Vec<char> = number.chars().filter(char::is_ascii_digit).collect();
    if digits.len() < 4 {
        return "***".to_owned();
    }
    let tail: String = digits[digits.len() - 4..].iter().collect();
    format!("***{tail}")
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_numbers_keep_their_last_four_digits() {
        assert_eq!(redact_number("+15550001111"), "***1111");
        assert_eq!(redact_number("2122000123"), "***0123");
        assert_eq!(redact_number("311"), "311");
        assert_eq!(redact_number("anonymous"), "anonymous");
        assert_eq!(redact_number("alice.smith"), "***");
        let on = LogConfig {
            redact_numbers: true,
        };
        assert_eq!(on.number("+15550001111"), "***1111");
        assert_eq!(
            on.uri("sip:+15550001111@192.0.2.1:5060"),
            "sip:***1111@192.0.2.1:5060"
        );
        assert_eq!(on.uri("sip:192.0.2.1"), "sip:192.0.2.1");
        let off = LogConfig::default();
        assert_eq!(off.number("+15550001111"), "+15550001111");
        assert_eq!(off.uri("sip:+1555@h"), "sip:+1555@h");
    }
}
