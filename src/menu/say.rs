//! Numbers as prompt sequences, per language: quantities read as words ("twelve", "doce"),
//! identifiers read digit by digit in groups. Sans-IO: a number goes in, prompt names come out.
//!
//! The composition follows Asterisk's `SayNumber()` (`main/say.c`): a small set of recorded
//! words per language, joined by the language's rules, with a grammatical gender where the
//! language has one. Where Asterisk records only the masculine "un" and feminine "una" for
//! Spanish one, this module also apocopates the compounds before a noun ("veintiún minutos",
//! "treinta y un días"), as Spanish requires.
//!
//! Every language uses the same prompt names (a menu's prompts must exist in every language),
//! so a name a language has no use for (Spanish `num_and` "y" in English) is still recorded
//! there: the texts are in `prompts/prompts.yaml`.
//!
//! | language | rules |
//! | --- | --- |
//! | English (`en`, and any language without rules of its own) | 0-29 one word each; tens then units (`num_40 num_2`); `num_300` ("three hundred") then the rest, no "and" (US usage); thousands and millions as multipliers |
//! | Spanish (`es`, `es-*`) | 0-29 one word each (`num_21` "veintiuno", `num_21_m` "veintiún", `num_21_f` "veintiuna"); tens `y` units ("treinta y uno"); 100 "cien", 101-199 "ciento ..."; "doscientos"/"doscientas"; "mil", "dos mil"; "un millón", "dos millones" |

/// How a number agrees with what it counts. Only Spanish tells the three apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gender {
    /// The number on its own ("caller number twenty-one": "el número veintiuno").
    Counting,
    /// Before a masculine noun ("veintiún minutos", "un día").
    Masculine,
    /// Before a feminine noun ("veintiuna semanas", "doscientas").
    Feminine,
}

/// The prefix of a placeholder the call fills with speech rendered for it (never a file name).
pub(crate) const SPOKEN: &str = "@";
/// Placeholder: the date a looked-up request was filed, spoken.
pub(crate) const SPOKEN_FILED: &str = "@filed";
/// Placeholder: a looked-up request's status notes, spoken.
pub(crate) const SPOKEN_NOTES: &str = "@notes";

/// The silence between digit groups of an identifier (`scripts/render-prompts.sh` makes it).
pub(crate) const PAUSE: &str = "pause";

/// Every prompt name this module can produce: they must exist in every language.
pub(crate) const PROMPTS: &[&str] = &[
    "num_0",
    "num_1",
    "num_2",
    "num_3",
    "num_4",
    "num_5",
    "num_6",
    "num_7",
    "num_8",
    "num_9",
    "num_10",
    "num_11",
    "num_12",
    "num_13",
    "num_14",
    "num_15",
    "num_16",
    "num_17",
    "num_18",
    "num_19",
    "num_20",
    "num_21",
    "num_22",
    "num_23",
    "num_24",
    "num_25",
    "num_26",
    "num_27",
    "num_28",
    "num_29",
    "num_30",
    "num_40",
    "num_50",
    "num_60",
    "num_70",
    "num_80",
    "num_90",
    "num_1_m",
    "num_1_f",
    "num_21_m",
    "num_21_f",
    "num_and",
    "num_100",
    "num_100_plus",
    "num_200",
    "num_300",
    "num_400",
    "num_500",
    "num_600",
    "num_700",
    "num_800",
    "num_900",
    "num_200_f",
    "num_300_f",
    "num_400_f",
    "num_500_f",
    "num_600_f",
    "num_700_f",
    "num_800_f",
    "num_900_f",
    "num_thousand",
    "num_million",
    "num_millions",
    "digit_0",
    "digit_1",
    "digit_2",
    "digit_3",
    "digit_4",
    "digit_5",
    "digit_6",
    "digit_7",
    "digit_8",
    "digit_9",
    PAUSE,
];

/// The largest number read as words; larger ones are read digit by digit.
pub(crate) const MAX_WORDS: u64 = 999_999_999;

/// Which rules a language code follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rules {
    English,
    Spanish,
}

fn rules(lang: &str) -> Rules {
    let base = lang.split(['-', '_']).next().unwrap_or(lang);
    if base.eq_ignore_ascii_case("es") {
        Rules::Spanish
    } else {
        Rules::English
    }
}

/// `n` as words in `lang`, agreeing with `gender` (see the module docs). Numbers above
/// [`MAX_WORDS`] are read digit by digit.
pub(crate) fn number(lang: &str, n: u64, gender: Gender) -> Vec<String> {
    if n > MAX_WORDS {
        return digits(&n.to_string());
    }
    let mut out = Vec::new();
    match rules(lang) {
        Rules::English => english(n, &mut out),
        Rules::Spanish => spanish(n, gender, &mut out),
    }
    out
}

/// Each digit of `s` (other characters are skipped): `digit_N` prompts.
pub(crate) fn digits(s: &str) -> Vec<String> {
    s.chars()
        .filter(char::is_ascii_digit)
        .map(|c| format!("digit_{c}"))
        .collect()
}

/// An identifier read digit by digit in groups of `group` from the left, with a [`PAUSE`]
/// between groups (a service request number `1234 5678`).
pub(crate) fn digits_grouped(s: &str, group: usize) -> Vec<String> {
    let ds = digits(s);
    let mut out = Vec::with_capacity(ds.len() + ds.len() / group.max(1));
    for (i, d) in ds.into_iter().enumerate() {
        if i > 0 && group > 0 && i % group == 0 {
            out.push(PAUSE.to_owned());
        }
        out.push(d);
    }
    out
}

fn word(out: &mut Vec<String>, name: impl Into<String>) {
    out.push(name.into());
}

fn english(n: u64, out: &mut Vec<String>) {
    match n {
        0..=29 => word(out, format!("num_{n}")),
        30..=99 => {
            word(out, format!("num_{}", n / 10 * 10));
            if !n.is_multiple_of(10) {
                word(out, format!("num_{}", n % 10));
            }
        }
        100..=999 => {
            word(out, format!("num_{}", n / 100 * 100));
            if !n.is_multiple_of(100) {
                english(n % 100, out);
            }
        }
        1_000..=999_999 => {
            english(n / 1_000, out);
            word(out, "num_thousand");
            if !n.is_multiple_of(1_000) {
                english(n % 1_000, out);
            }
        }
        _ => {
            english(n / 1_000_000, out);
            word(out, "num_million");
            if !n.is_multiple_of(1_000_000) {
                english(n % 1_000_000, out);
            }
        }
    }
}

fn spanish(n: u64, g: Gender, out: &mut Vec<String>) {
    // A multiplier's count is masculine ("veintiún mil", "un millón") unless the thing
    // counted is feminine ("doscientas mil personas").
    let multiplier = if g == Gender::Feminine {
        Gender::Feminine
    } else {
        Gender::Masculine
    };
    match n {
        1 | 21 => word(
            out,
            match g {
                Gender::Counting => format!("num_{n}"),
                Gender::Masculine => format!("num_{n}_m"),
                Gender::Feminine => format!("num_{n}_f"),
            },
        ),
        0..=29 => word(out, format!("num_{n}")),
        30..=99 => {
            word(out, format!("num_{}", n / 10 * 10));
            if !n.is_multiple_of(10) {
                word(out, "num_and");
                spanish(n % 10, g, out);
            }
        }
        100 => word(out, "num_100"),
        101..=199 => {
            word(out, "num_100_plus");
            spanish(n - 100, g, out);
        }
        200..=999 => {
            let h = n / 100 * 100;
            word(
                out,
                if g == Gender::Feminine {
                    format!("num_{h}_f")
                } else {
                    format!("num_{h}")
                },
            );
            if !n.is_multiple_of(100) {
                spanish(n % 100, g, out);
            }
        }
        1_000..=999_999 => {
            // "mil", not "un mil".
            if n / 1_000 > 1 {
                spanish(n / 1_000, multiplier, out);
            }
            word(out, "num_thousand");
            if !n.is_multiple_of(1_000) {
                spanish(n % 1_000, g, out);
            }
        }
        _ => {
            let m = n / 1_000_000;
            if m == 1 {
                word(out, "num_1_m");
                word(out, "num_million");
            } else {
                spanish(m, Gender::Masculine, out);
                word(out, "num_millions");
            }
            if !n.is_multiple_of(1_000_000) {
                spanish(n % 1_000_000, g, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn say(lang: &str, n: u64, g: Gender) -> String {
        number(lang, n, g)
            .iter()
            .map(|p| p.strip_prefix("num_").unwrap_or(p))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn english_reads_quantities_as_words() {
        let en = |n| say("en", n, Gender::Counting);
        assert_eq!(en(0), "0");
        assert_eq!(en(7), "7");
        assert_eq!(en(12), "12");
        assert_eq!(en(19), "19");
        assert_eq!(en(21), "21");
        assert_eq!(en(30), "30");
        assert_eq!(en(42), "40 2");
        assert_eq!(en(99), "90 9");
        assert_eq!(en(100), "100");
        assert_eq!(en(105), "100 5");
        assert_eq!(en(121), "100 21");
        assert_eq!(en(350), "300 50");
        assert_eq!(en(1_000), "1 thousand");
        assert_eq!(en(2_019), "2 thousand 19");
        assert_eq!(en(12_345), "12 thousand 300 40 5");
        assert_eq!(en(1_000_001), "1 million 1");
        assert_eq!(
            en(999_999_999),
            "900 90 9 million 900 90 9 thousand 900 90 9"
        );
        // English has no gender: the same words either way.
        assert_eq!(
            number("en", 21, Gender::Masculine),
            number("en", 21, Gender::Counting)
        );
    }

    #[test]
    fn spanish_agrees_one_and_its_compounds_with_the_noun() {
        let es = |n, g| say("es", n, g);
        use Gender::*;
        // "el número uno", "un minuto", "una semana".
        assert_eq!(es(1, Counting), "1");
        assert_eq!(es(1, Masculine), "1_m");
        assert_eq!(es(1, Feminine), "1_f");
        // "veintiuno", "veintiún minutos", "veintiuna semanas".
        assert_eq!(es(21, Counting), "21");
        assert_eq!(es(21, Masculine), "21_m");
        assert_eq!(es(21, Feminine), "21_f");
        // "treinta y uno", "treinta y un días".
        assert_eq!(es(31, Counting), "30 and 1");
        assert_eq!(es(31, Masculine), "30 and 1_m");
        assert_eq!(es(45, Counting), "40 and 5");
        assert_eq!(es(16, Counting), "16");
        assert_eq!(es(12, Counting), "12");
    }

    #[test]
    fn spanish_hundreds_thousands_and_millions() {
        let es = |n, g| say("es", n, g);
        use Gender::*;
        assert_eq!(es(100, Counting), "100"); // cien
        assert_eq!(es(101, Counting), "100_plus 1"); // ciento uno
        assert_eq!(es(121, Masculine), "100_plus 21_m"); // ciento veintiún
        assert_eq!(es(200, Counting), "200"); // doscientos
        assert_eq!(es(200, Feminine), "200_f"); // doscientas
        assert_eq!(es(532, Counting), "500 30 and 2"); // quinientos treinta y dos
        assert_eq!(es(1_000, Counting), "thousand"); // mil, not "un mil"
        assert_eq!(es(1_001, Counting), "thousand 1"); // mil uno
        assert_eq!(es(2_000, Counting), "2 thousand"); // dos mil
        assert_eq!(es(21_000, Counting), "21_m thousand"); // veintiún mil
        assert_eq!(es(21_000, Feminine), "21_f thousand"); // veintiuna mil
        assert_eq!(es(200_000, Feminine), "200_f thousand"); // doscientas mil
        assert_eq!(es(1_000_000, Counting), "1_m million"); // un millón
        assert_eq!(es(3_000_021, Counting), "3 millions 21"); // tres millones veintiuno
        assert_eq!(es(21_000_000, Feminine), "21_m millions"); // veintiún millones
    }

    #[test]
    fn other_languages_use_the_english_rules_and_regional_codes_their_base() {
        assert_eq!(say("fr", 42, Gender::Counting), "40 2");
        assert_eq!(say("es-MX", 31, Gender::Masculine), "30 and 1_m");
        assert_eq!(say("ES", 1, Gender::Masculine), "1_m");
    }

    #[test]
    fn huge_numbers_fall_back_to_digits() {
        assert_eq!(
            number("en", 1_000_000_000, Gender::Counting),
            digits("1000000000")
        );
    }

    #[test]
    fn identifiers_are_read_digit_by_digit_in_groups() {
        assert_eq!(digits("104 58"), digits("10458"));
        assert_eq!(
            digits_grouped("12345678", 4),
            [
                "digit_1", "digit_2", "digit_3", "digit_4", PAUSE, "digit_5", "digit_6", "digit_7",
                "digit_8"
            ]
        );
        assert_eq!(digits_grouped("123", 4), ["digit_1", "digit_2", "digit_3"]);
    }

    #[test]
    fn every_name_produced_is_listed() {
        for lang in ["en", "es"] {
            for g in [Gender::Counting, Gender::Masculine, Gender::Feminine] {
                for n in (0..=2_100).chain([21_000, 1_000_000, 2_000_000, 1_000_000_000]) {
                    for p in number(lang, n, g) {
                        assert!(PROMPTS.contains(&p.as_str()), "{lang} {n}: {p}");
                    }
                }
            }
        }
        for p in digits_grouped("0123456789", 4) {
            assert!(PROMPTS.contains(&p.as_str()), "{p}");
        }
        for p in PROMPTS {
            assert!(
                crate::menu::validate::engine_prompts().any(|e| e == *p),
                "{p} must be required of every menu's prompts"
            );
        }
    }
}
