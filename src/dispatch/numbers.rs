//! Which numbers the city calls back: a caller's number read as E.164, the US and Canadian
//! geographic numbers, and the dial-plan patterns of `callback.allowed_numbers` and
//! `callback.refused_numbers`.
//!
//! Pure functions and types: the config parses its patterns with [`NumberPattern`], the call
//! decides with them (`CallbackConfig::callback_number`, beside the call-backs in
//! `crate::call::callback`), and nothing here touches SIP or a call.

/// A number a trunk can dial: an optional `+`, then 3 to 20 digits.
pub(crate) fn dialable(number: &str) -> bool {
    let digits = number.strip_prefix('+').unwrap_or(number);
    (3..=20).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
}

/// `number` without the visual separators a `tel:` URI may carry (RFC 3966: `-`, `.`,
/// `(`, `)`; and spaces): `+1-212-200-0123` → `+12122000123`.
pub(crate) fn without_separators(number: &str) -> String {
    number
        .chars()
        .filter(|c| !matches!(c, '-' | '.' | '(' | ')' | ' '))
        .collect()
}

/// A caller's number in E.164 form (`+`, country code, number: at most 15 digits), or `None`
/// when it cannot be read as one. A number without `+` is read in the North American
/// numbering plan, the 311 service's: 11 digits starting with 1, or 10 digits starting
/// with 2-9 (`2125550123` → `+12125550123`). Anything else without `+` (an international
/// access code such as `011...`, an extension) is not a number call-backs dial.
pub(crate) fn e164(number: &str) -> Option<String> {
    let cleaned = without_separators(number);
    let (plus, digits) = match cleaned.strip_prefix('+') {
        Some(d) => (true, d),
        None => (false, cleaned.as_str()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match (plus, digits.len(), digits.as_bytes()[0]) {
        (true, 3..=15, _) => Some(format!("+{digits}")),
        (false, 11, b'1') => Some(format!("+{digits}")),
        (false, 10, b'2'..=b'9') => Some(format!("+1{digits}")),
        _ => None,
    }
}

/// NANP area codes that are not a place in the US or Canada: N11 service codes, 456
/// (inbound international), 5XX personal-communications codes, 555, 600 and 622 (Canadian
/// non-geographic), 700, 710 (US government), toll-free (800, 822, 833, 844, 855, 866, 877,
/// 888, and the 88X block), 900 (premium), and the Caribbean and Atlantic countries that
/// share +1 but are international calls (Bahamas 242, Barbados 246, Anguilla 264, Antigua
/// 268, British Virgin Islands 284, Cayman 345, Bermuda 441, Grenada 473, Turks and Caicos
/// 649, Jamaica 658 and 876, Montserrat 664, Sint Maarten 721, St Lucia 758, Dominica 767,
/// St Vincent 784, Dominican Republic 809, 829 and 849, Trinidad 868, St Kitts 869: the
/// area codes of the "one ring" toll-fraud scams). US territories (340, 670, 671, 684, 787,
/// 939) are domestic and stay allowed.
const NANP_NOT_GEOGRAPHIC: &[&str] = &[
    "456", "500", "521", "522", "523", "524", "525", "526", "527", "528", "529", "533", "544",
    "555", "566", "577", "588", "600", "622", "700", "710", "800", "822", "833", "844", "855",
    "866", "877", "880", "881", "882", "883", "884", "885", "886", "887", "888", "889", "900",
    "242", "246", "264", "268", "284", "345", "441", "473", "649", "658", "664", "721", "758",
    "767", "784", "809", "829", "849", "868", "869", "876",
];

/// Exchange codes (the NXX after the area code) that are not a subscriber's line in any
/// area: N11 service codes, 555 (directory assistance and fictional numbers), 950, 958 and
/// 959 (carrier access and test codes) and 976 (premium information services).
const NANP_NOT_SUBSCRIBER: &[&str] = &["555", "950", "958", "959", "976"];

/// Whether an E.164 number is a geographic number in the US or Canada: `+1`, an area code
/// (`NPA`: 2-9, 0-8, any digit) that is not in `NANP_NOT_GEOGRAPHIC`, an exchange (`NXX`:
/// 2-9, then any two) that is neither N11 nor in `NANP_NOT_SUBSCRIBER`, and four digits.
pub(crate) fn nanp_geographic(e164: &str) -> bool {
    let Some(d) = e164.strip_prefix("+1") else {
        return false;
    };
    let b = d.as_bytes();
    if b.len() != 10 || !b.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let (npa, nxx) = (&d[..3], &d[3..6]);
    let n = |c: u8| (b'2'..=b'9').contains(&c);
    n(b[0])
        && b[1] != b'9'
        && &npa[1..] != "11"
        && !NANP_NOT_GEOGRAPHIC.contains(&npa)
        && n(b[3])
        && &nxx[1..] != "11"
        && !NANP_NOT_SUBSCRIBER.contains(&nxx)
}

/// A pattern of numbers for `callback.allowed_numbers` and `callback.refused_numbers`,
/// matched against the caller's number in E.164 form ([`e164`]). Written as a dial plan is
/// (Asterisk's notation):
///
/// - `+` first, then the number, position by position: a digit matches itself, `X` any
///   digit, `N` 2-9, `Z` 1-9, `[...]` one digit of a set (`[2-9]`, `[0-35]`);
/// - `.` at the end: one or more further digits (`+44X.`: any UK number);
/// - spaces and `-` between positions are only for reading (`+1 NXX-NXX-XXXX`);
/// - or the name `nanp-geographic`: a US or Canadian geographic number ([`nanp_geographic`]).
///
/// A pattern that does not parse is refused at start with its line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NumberPattern {
    /// `nanp-geographic`.
    NanpGeographic,
    /// A dial-plan pattern: the digits each position takes (bit `d` for digit `d`), and
    /// whether further digits may follow.
    Digits {
        text: String,
        positions: Vec<u16>,
        open: bool,
    },
}

/// Why a number pattern did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("number pattern {0:?} must start with + (numbers are matched as +<country code><number>) or be nanp-geographic")]
    NoPlus(String),
    #[error("number pattern {0:?}: {1:?} is not a digit, X, N, Z, [set] or a final .")]
    Character(String, char),
    #[error("number pattern {0:?} has an unclosed or empty [set]")]
    Set(String),
    #[error("number pattern {0:?}: . may only end a pattern")]
    Dot(String),
    #[error("number pattern {0:?} has no digits")]
    Empty(String),
}

impl std::str::FromStr for NumberPattern {
    type Err = PatternError;

    fn from_str(text: &str) -> Result<Self, PatternError> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("nanp-geographic") {
            return Ok(NumberPattern::NanpGeographic);
        }
        let err_char = |c| PatternError::Character(text.to_owned(), c);
        let rest = text
            .strip_prefix('+')
            .ok_or_else(|| PatternError::NoPlus(text.to_owned()))?;
        let mut positions = Vec::new();
        let mut open = false;
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            if open && !matches!(c, ' ' | '-') {
                return Err(PatternError::Dot(text.to_owned()));
            }
            let set = match c {
                ' ' | '-' => continue,
                '.' => {
                    open = true;
                    continue;
                }
                '0'..='9' => 1u16 << (c as u8 - b'0'),
                'X' | 'x' => 0x3ff,
                'N' | 'n' => 0x3fc,
                'Z' | 'z' => 0x3fe,
                '[' => {
                    let mut set = 0u16;
                    let mut prev: Option<u8> = None;
                    let mut range = false;
                    let mut closed = false;
                    for c in chars.by_ref() {
                        match c {
                            ']' => {
                                closed = true;
                                break;
                            }
                            '-' if prev.is_some() && !range => range = true,
                            '0'..='9' => {
                                let d = c as u8 - b'0';
                                if range {
                                    let lo = prev.unwrap_or(d);
                                    if lo > d {
                                        return Err(PatternError::Set(text.to_owned()));
                                    }
                                    for x in lo..=d {
                                        set |= 1 << x;
                                    }
                                    range = false;
                                    prev = None;
                                } else {
                                    set |= 1 << d;
                                    prev = Some(d);
                                }
                            }
                            _ => return Err(err_char(c)),
                        }
                    }
                    if !closed || range || set == 0 {
                        return Err(PatternError::Set(text.to_owned()));
                    }
                    set
                }
                c => return Err(err_char(c)),
            };
            positions.push(set);
        }
        if positions.is_empty() {
            return Err(PatternError::Empty(text.to_owned()));
        }
        Ok(NumberPattern::Digits {
            text: text.to_owned(),
            positions,
            open,
        })
    }
}

impl<'de> serde::Deserialize<'de> for NumberPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for NumberPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NumberPattern::NanpGeographic => f.write_str("nanp-geographic"),
            NumberPattern::Digits { text, .. } => f.write_str(text),
        }
    }
}

impl NumberPattern {
    /// Whether `e164` (`+` and digits, as [`e164`] gives) is one of this pattern's numbers.
    pub(crate) fn matches(&self, e164: &str) -> bool {
        match self {
            NumberPattern::NanpGeographic => nanp_geographic(e164),
            NumberPattern::Digits {
                positions, open, ..
            } => {
                let Some(digits) = e164.strip_prefix('+') else {
                    return false;
                };
                let fits = if *open {
                    digits.len() > positions.len()
                } else {
                    digits.len() == positions.len()
                };
                fits && digits.bytes().all(|b| b.is_ascii_digit())
                    && digits
                        .bytes()
                        .zip(positions)
                        .all(|(b, set)| set & (1 << (b - b'0')) != 0)
            }
        }
    }
}

/// Why a caller cannot be called back (they hear that a call-back is not available for
/// their line, and may leave a request instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// The number is only claimed (From, or P-Asserted-Identity from a source outside
    /// `trunks.allow`): anyone can write any number there.
    #[error("the caller's number is not asserted by a trusted trunk")]
    Unverified,
    /// Anonymous, a name, or not a number the server can read as E.164.
    #[error("the caller's number cannot be dialled")]
    NotDialable,
    /// Outside `callback.allowed_numbers`, or inside `callback.refused_numbers`.
    #[error("the caller's number is not one call-backs may dial")]
    NotAllowed,
    /// `callback.per_number_per_day` call-backs in the last 24 hours already.
    #[error("the caller's number had its call-backs for today")]
    DailyLimit,
}

/// A number the server may call back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackNumber {
    /// As the trunk asserted it, without visual separators: what the call-back dials (the
    /// trunk's own format).
    pub dial: String,
    /// Its E.164 form: what the patterns match and the daily count keys on.
    pub(crate) e164: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialable_numbers() {
        for ok in ["+15550001111", "5551234", "311"] {
            assert!(dialable(ok), "{ok}");
        }
        for bad in [
            "anonymous",
            "",
            "+",
            "12",
            "555 1234",
            "+1555x",
            "123456789012345678901",
        ] {
            assert!(!dialable(bad), "{bad}");
        }
    }

    #[test]
    fn numbers_are_read_as_e164() {
        for (raw, e) in [
            ("+12122000123", Some("+12122000123")),
            ("+1-212-200-0123", Some("+12122000123")),
            ("12122000123", Some("+12122000123")),
            ("2122000123", Some("+12122000123")),
            ("(212) 200.0123", Some("+12122000123")),
            ("+442079460000", Some("+442079460000")),
            ("0114420794600", None),
            ("1125550123", None),
            ("5550123", None),
            ("anonymous", None),
            ("+", None),
            ("+1234567890123456", None),
        ] {
            assert_eq!(e164(raw).as_deref(), e, "{raw}");
        }
    }

    #[test]
    fn nanp_geographic_is_us_and_canada_lines_only() {
        for ok in [
            "+12122000123", // New York
            "+14162000123", // Toronto
            "+17872000123", // Puerto Rico (US)
            "+13402000123", // US Virgin Islands
            "+15102000123", // a 5XX area code that is a place (Oakland)
        ] {
            assert!(nanp_geographic(ok), "{ok}");
        }
        for bad in [
            "+19002000123", // premium
            "+12129760123", // 976 exchange: premium
            "+18002000123", // toll-free
            "+18882000123",
            "+18762000123",  // Jamaica
            "+18092000123",  // Dominican Republic
            "+12842000123",  // British Virgin Islands
            "+15002000123",  // personal communications
            "+14562000123",  // inbound international
            "+13112000123",  // N11 area code
            "+12124110123",  // N11 exchange
            "+12120550123",  // exchange starting 0
            "+12125550123",  // 555: directory assistance and fictional numbers
            "+11122000123",  // area code starting 1
            "+19922000123",  // area code with 9 in the middle
            "+882345678901", // international network
            "+442079460000", // UK
            "+1212200012",   // too short
        ] {
            assert!(!nanp_geographic(bad), "{bad}");
        }
    }

    #[test]
    fn dial_plan_patterns() {
        let p = |t: &str| t.parse::<NumberPattern>().unwrap();
        assert!(p("+1 NXX-NXX-XXXX").matches("+12122000123"));
        assert!(!p("+1NXXNXXXXXX").matches("+11125550123"));
        assert!(!p("+1NXXNXXXXXX").matches("+121220001234"));
        assert!(p("+44X.").matches("+442079460000"));
        assert!(!p("+44X.").matches("+44"));
        assert!(!p("+44X.").matches("+4"));
        assert!(p("+1[2-46]12ZXXXXXX").matches("+16121555012"));
        assert!(!p("+1[2-46]12ZXXXXXX").matches("+15121555012"));
        assert!(!p("+1[2-46]12ZXXXXXX").matches("+16120555012"));
        assert!(p("nanp-geographic").matches("+12122000123"));
        assert_eq!(p("NANP-Geographic"), NumberPattern::NanpGeographic);
        assert_eq!(p("+1NXX").to_string(), "+1NXX");
        for bad in [
            "1NXXNXXXXXX",
            "+1NXQ",
            "+1[2-",
            "+1[]",
            "+1[9-2]",
            "+1.X",
            "+",
            "+--",
        ] {
            assert!(bad.parse::<NumberPattern>().is_err(), "{bad}");
        }
    }
}
