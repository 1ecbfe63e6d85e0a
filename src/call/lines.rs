//! Several lines on one server: which number the caller dialled, and which line (menu) that is.
//!
//! Owns: the `lines:` settings, reading the dialled number from an INVITE as carriers send it,
//! and matching numbers written in different forms. Sans-IO: an INVITE's parts go in, a line
//! comes out. The menus themselves live in [`super::menu_holder`].
//!
//! # Which number wins
//!
//! An INVITE can name the called party in four places. They are read in this order, and the
//! first that is a configured line's number chooses the line (none: the default line, the
//! `--menu`):
//!
//! 1. `P-Called-Party-ID` (RFC 3455), only from a trusted trunk (`trunks.allow`): the number
//!    the caller dialled, set by the carrier when it rewrites the Request-URI to the trunk's
//!    contact. From anyone else it is ignored, like `P-Asserted-Identity`.
//! 2. `Diversion` (RFC 5806), only from a trusted trunk: the call was forwarded (the city
//!    forwards a published number to this server's number); the number the caller dialled is
//!    the original one, in the last `Diversion` entry (each forwarding adds one on top).
//! 3. The Request-URI user: what the SIP edge routes on, and all a direct peer sends.
//! 4. `To`: left as the caller's phone wrote it by most carriers, so after a rewrite of the
//!    Request-URI it often still holds the dialled number.
//!
//! # Number forms
//!
//! Numbers match after [`normalise`]: visual separators (`-`, `.`, spaces, parentheses) and URI
//! parameters dropped, and the country code (`numbering.country_code`, default `1`) removed
//! from an E.164 number (`+12125550311`), from one dialled with the international prefix
//! (`01112125550311`, `001...`) and from a national number written with it (`12125550311`, when
//! `numbering.national_digits` follow it). `+12125550311`, `12125550311` and `2125550311` are
//! one line; short codes (`311`) match as they are.

use serde::Deserialize;
use std::path::PathBuf;

/// One entry of `lines:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LineConfig {
    /// The number callers dial (`311`, `+12125550311`, `3115550199`).
    pub number: String,
    /// The menu file the line answers with (relative paths from the working directory, like
    /// `--menu`). The prompts are the server's (`--prompts`).
    pub menu: PathBuf,
}

/// `numbering:` settings: how numbers written in different forms are matched.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NumberingConfig {
    /// The country calling code of the lines' numbers. Default `1` (North America).
    pub country_code: String,
    /// Digits of a national number after the country code. Default 10.
    pub national_digits: usize,
}

impl Default for NumberingConfig {
    fn default() -> Self {
        NumberingConfig {
            country_code: "1".to_owned(),
            national_digits: 10,
        }
    }
}

/// Where the dialled number was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalledFrom {
    PCalledPartyId,
    Diversion,
    RequestUri,
    To,
}

impl CalledFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            CalledFrom::PCalledPartyId => "P-Called-Party-ID",
            CalledFrom::Diversion => "Diversion",
            CalledFrom::RequestUri => "Request-URI",
            CalledFrom::To => "To",
        }
    }
}

/// `number` in the form lines are matched in (see the module docs).
pub fn normalise(number: &str, n: &NumberingConfig) -> String {
    let number = number.split(';').next().unwrap_or(number).trim();
    let plus = number.starts_with('+');
    let digits: String = number.chars().filter(char::is_ascii_digit).collect();
    let cc = n.country_code.as_str();
    if cc.is_empty() {
        return digits;
    }
    if plus {
        return match digits.strip_prefix(cc) {
            Some(national) => national.to_owned(),
            None => format!("+{digits}"),
        };
    }
    for intl in ["011", "00"] {
        if let Some(rest) = digits.strip_prefix(intl) {
            return match rest.strip_prefix(cc) {
                Some(national) => national.to_owned(),
                None => format!("+{rest}"),
            };
        }
    }
    if digits.len() == cc.len() + n.national_digits {
        if let Some(national) = digits.strip_prefix(cc) {
            return national.to_owned();
        }
    }
    digits
}

/// The called numbers of an INVITE, in the order they are tried (see the module docs). The
/// trunk-set headers count only when `trusted`.
pub fn called_numbers(
    request_uri: &str,
    to: Option<&str>,
    headers: &[crate::sip::message::Header],
    trusted: bool,
) -> Vec<(CalledFrom, String)> {
    use crate::sip::message::{uri_user, NameAddr};
    let user_of = |value: &str| {
        NameAddr::parse(value)
            .ok()
            .and_then(|n| n.user().map(str::to_owned))
    };
    let named = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .flat_map(|h| split_entries(&h.value))
    };
    let mut v = Vec::new();
    if trusted {
        if let Some(n) = named("P-Called-Party-ID").find_map(|e| user_of(&e)) {
            v.push((CalledFrom::PCalledPartyId, n));
        }
        if let Some(n) = named("Diversion").filter_map(|e| user_of(&e)).next_back() {
            v.push((CalledFrom::Diversion, n));
        }
    }
    if let Some(n) = uri_user(request_uri) {
        v.push((CalledFrom::RequestUri, n.to_owned()));
    }
    if let Some(n) = to {
        v.push((CalledFrom::To, n.to_owned()));
    }
    v
}

/// The comma-separated entries of a header value (commas inside `<...>` or quotes kept).
fn split_entries(value: &str) -> Vec<String> {
    let (mut out, mut cur) = (Vec::new(), String::new());
    let (mut angle, mut quote) = (false, false);
    for c in value.chars() {
        match c {
            '"' if !angle => quote = !quote,
            '<' if !quote => angle = true,
            '>' if !quote => angle = false,
            ',' if !angle && !quote => {
                out.push(std::mem::take(&mut cur).trim().to_owned());
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur.trim().to_owned());
    out.retain(|e| !e.is_empty());
    out
}

/// The first of `called` that is one of `lines` (normalised numbers, in their order): the
/// line's index, where its number was read, and the number as sent.
pub fn choose<'a>(
    lines: &[String],
    called: &'a [(CalledFrom, String)],
    n: &NumberingConfig,
) -> Option<(usize, CalledFrom, &'a str)> {
    called.iter().find_map(|(from, number)| {
        let norm = normalise(number, n);
        let i = lines.iter().position(|l| *l == norm)?;
        Some((i, *from, number.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::Header;

    fn h(name: &str, value: &str) -> Header {
        Header {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn numbers_in_e164_and_national_forms_match() {
        let n = NumberingConfig::default();
        for form in [
            "+12125550311",
            "12125550311",
            "2125550311",
            "(212) 555-0311",
            "+1-212-555-0311;npdi",
            "01112125550311",
        ] {
            assert_eq!(normalise(form, &n), "2125550311", "{form}");
        }
        assert_eq!(normalise("311", &n), "311");
        assert_eq!(normalise("+442071234567", &n), "+442071234567");
        assert_eq!(normalise("00442071234567", &n), "+442071234567");
        // Eleven digits starting with 1 are national with the country code; others stay.
        assert_eq!(normalise("1311", &n), "1311");
    }

    #[test]
    fn precedence_trusted_headers_then_request_uri_then_to() {
        let headers = [
            h(
                "Diversion",
                "<sip:3115550199@carrier.example>;reason=unconditional",
            ),
            h("P-Called-Party-ID", "<sip:+12125550311@carrier.example>"),
        ];
        let v = called_numbers("sip:+15555550100@ivr.example", Some("311"), &headers, true);
        let from: Vec<CalledFrom> = v.iter().map(|(f, _)| *f).collect();
        assert_eq!(
            from,
            [
                CalledFrom::PCalledPartyId,
                CalledFrom::Diversion,
                CalledFrom::RequestUri,
                CalledFrom::To
            ]
        );
        let n = NumberingConfig::default();
        let lines = [
            "311".to_owned(),
            "2125550311".to_owned(),
            "3115550199".to_owned(),
        ];
        assert_eq!(
            choose(&lines, &v, &n),
            Some((1, CalledFrom::PCalledPartyId, "+12125550311"))
        );
        // From an untrusted source the trunk headers are ignored.
        let v = called_numbers("sip:+15555550100@ivr.example", Some("311"), &headers, false);
        assert_eq!(choose(&lines, &v, &n), Some((0, CalledFrom::To, "311")));
        // The original number of a call forwarded twice is the last Diversion entry.
        let headers = [
            h("Diversion", "<sip:5550001@a.example>;reason=no-answer"),
            h(
                "Diversion",
                "\"Main, line\" <sip:5550002@b.example>, <sip:3115550199@c.example>",
            ),
        ];
        let v = called_numbers("sip:5550000@ivr.example", None, &headers, true);
        assert_eq!(
            choose(&lines, &v, &n),
            Some((2, CalledFrom::Diversion, "3115550199"))
        );
        // No line matches: none (the default line).
        let v = called_numbers("sip:999@ivr.example", Some("998"), &[], true);
        assert_eq!(choose(&lines, &v, &n), None);
    }
}
