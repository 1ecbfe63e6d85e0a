//! Opening hours: the `schedules:` of a menu file, compiled into [`Schedule`]s the engine asks
//! "open at this instant?" ([`Schedule::is_open`]), and the [`WallClock`] calls read it by.
//!
//! ```yaml
//! schedules:
//!   call_centre:
//!     time_zone: America/New_York                         # an IANA name
//!     open: {mon-fri: "07:00-19:00", sat: "09:00-13:00"}  # days: mon..sun, ranges (fri-mon wraps), lists (sat,sun)
//!     closed_dates: ["2026-12-25", "2027-01-01"]          # whole days closed
//!     open_dates: {"2026-12-24": "07:00-12:00"}           # special hours that day
//! ```
//!
//! Hours are civil times in the schedule's zone, `HH:MM-HH:MM` (the end `24:00` means
//! midnight), several separated by commas (`"07:00-12:00, 13:00-19:00"`); a range that would
//! cross midnight is written as two days. Instants are turned into civil times by the time zone
//! database (jiff's bundled copy of the IANA tzdb), so the change to and from daylight-saving
//! time needs nothing from the admin. A boundary that some day does not exist (02:30 on the
//! night clocks go forward) is refused by [`compile`]: what the admin meant is not clear.
//!
//! Sans-IO: nothing here reads the clock except [`WallClock::now`], which the call driver calls
//! once when a call is answered; the engine works out later instants from its own `now`.

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{SignedDuration, Timestamp};
use std::collections::{BTreeMap, BTreeSet};

use super::schema::ScheduleSpec;

/// Minutes in a day: the end of a range that closes at midnight (`24:00`).
const DAY_MINUTES: u16 = 24 * 60;
/// How far ahead [`compile`] looks for days when a boundary falls in a DST gap.
const GAP_HORIZON_DAYS: i32 = 2 * 366;

/// One open range of a day, in minutes since midnight, `start` included, `end` excluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hours {
    pub start: u16,
    pub end: u16,
}

impl Hours {
    fn contains(&self, minute: u16) -> bool {
        self.start <= minute && minute < self.end
    }
}

/// A compiled schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    tz: TimeZone,
    /// Open ranges per weekday, Monday first, sorted, not overlapping.
    week: [Vec<Hours>; 7],
    closed: BTreeSet<Date>,
    special: BTreeMap<Date, Vec<Hours>>,
}

impl Schedule {
    /// Whether the schedule is open at `at`.
    pub fn is_open(&self, at: Timestamp) -> bool {
        let z = at.to_zoned_datetime(self.tz.clone());
        let (date, time) = (z.date(), z.time());
        let minute = time.hour() as u16 * 60 + time.minute() as u16;
        self.hours_on(date).iter().any(|h| h.contains(minute))
    }

    /// The open ranges of `date` (none on a closed date).
    fn hours_on(&self, date: Date) -> &[Hours] {
        if self.closed.contains(&date) {
            return &[];
        }
        if let Some(h) = self.special.get(&date) {
            return h;
        }
        &self.week[weekday_index(date.weekday())]
    }
}

/// Every schedule of a menu file, by name.
pub type Schedules = BTreeMap<String, Schedule>;

/// Where in a schedule's YAML a problem is, relative to the schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Where {
    TimeZone,
    /// The day key of an `open` entry.
    OpenDays(String),
    /// The hours of an `open` entry.
    OpenHours(String),
    /// An entry of `closed_dates`, by index.
    ClosedDate(usize),
    /// The date key of an `open_dates` entry.
    SpecialDate(String),
    /// The hours of an `open_dates` entry.
    SpecialHours(String),
}

impl Where {
    /// The path below the schedule, as the menu checker names YAML nodes.
    pub fn path(&self) -> Vec<String> {
        match self {
            Where::TimeZone => vec!["time_zone".into()],
            Where::OpenDays(k) | Where::OpenHours(k) => vec!["open".into(), k.clone()],
            Where::ClosedDate(i) => vec!["closed_dates".into(), i.to_string()],
            Where::SpecialDate(k) | Where::SpecialHours(k) => {
                vec!["open_dates".into(), k.clone()]
            }
        }
    }

    /// Whether the problem is in the key (day or date) rather than the value.
    pub fn is_key(&self) -> bool {
        matches!(self, Where::OpenDays(_) | Where::SpecialDate(_))
    }
}

/// One thing wrong with a schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleProblem {
    pub at: Where,
    pub message: String,
}

/// Compile a schedule as written; `today` starts the window searched for DST gaps.
pub fn compile(spec: &ScheduleSpec, today: Date) -> Result<Schedule, Vec<ScheduleProblem>> {
    let mut problems = Vec::new();
    let mut problem = |at: Where, message: String| problems.push(ScheduleProblem { at, message });
    let tz = match TimeZone::get(&spec.time_zone) {
        Ok(tz) => Some(tz),
        Err(_) => {
            problem(
                Where::TimeZone,
                format!(
                    "unknown time zone \"{}\" (an IANA name such as America/New_York)",
                    spec.time_zone
                ),
            );
            None
        }
    };
    // Which `open` key gave each weekday its hours, to name both when two keys overlap.
    let mut week: [Vec<(Hours, &str)>; 7] = Default::default();
    for (days_text, hours_text) in &spec.open {
        let days = match parse_days(days_text) {
            Ok(d) => d,
            Err(m) => {
                problem(Where::OpenDays(days_text.clone()), m);
                continue;
            }
        };
        let hours = match parse_hours(hours_text) {
            Ok(h) => h,
            Err(m) => {
                problem(Where::OpenHours(days_text.clone()), m);
                continue;
            }
        };
        for d in days {
            for h in &hours {
                if let Some((_, other)) = week[d].iter().find(|(o, _)| overlap(o, h)) {
                    let day = DAY_NAMES[d];
                    let message = if *other == days_text.as_str() {
                        format!("hours {} overlap other hours of the same entry", show(h))
                    } else {
                        format!("{day} {} overlaps the hours of \"{other}\"", show(h))
                    };
                    problem(Where::OpenHours(days_text.clone()), message);
                } else {
                    week[d].push((*h, days_text));
                }
            }
        }
    }
    let mut closed = BTreeSet::new();
    for (i, text) in spec.closed_dates.iter().enumerate() {
        match parse_date(text) {
            Ok(d) if !closed.insert(d) => {
                problem(Where::ClosedDate(i), format!("{text} is listed twice"))
            }
            Ok(_) => {}
            Err(m) => problem(Where::ClosedDate(i), m),
        }
    }
    let mut special = BTreeMap::new();
    for (date_text, hours_text) in &spec.open_dates {
        let date = match parse_date(date_text) {
            Ok(d) => d,
            Err(m) => {
                problem(Where::SpecialDate(date_text.clone()), m);
                continue;
            }
        };
        if closed.contains(&date) {
            problem(
                Where::SpecialDate(date_text.clone()),
                format!("{date_text} is also in closed_dates"),
            );
            continue;
        }
        match parse_hours(hours_text) {
            Ok(h) => {
                if let Some((a, b)) = first_overlap(&h) {
                    problem(
                        Where::SpecialHours(date_text.clone()),
                        format!("hours {} and {} overlap", show(&a), show(&b)),
                    );
                }
                special.insert(date, h);
            }
            Err(m) => problem(Where::SpecialHours(date_text.clone()), m),
        }
    }
    let week: [Vec<Hours>; 7] = week.map(|v| {
        let mut h: Vec<Hours> = v.into_iter().map(|(h, _)| h).collect();
        h.sort();
        h
    });
    if let Some(tz) = &tz {
        for (at, message) in dst_gaps(tz, spec, &week, &special, today) {
            problem(at, message);
        }
    }
    match tz {
        Some(tz) if problems.is_empty() => Ok(Schedule {
            tz,
            week,
            closed,
            special,
        }),
        _ => Err(problems),
    }
}

/// Boundaries that do not exist on some day they apply to (the hour skipped when clocks go
/// forward), within [`GAP_HORIZON_DAYS`] of `today`, and on every special date.
fn dst_gaps(
    tz: &TimeZone,
    spec: &ScheduleSpec,
    week: &[Vec<Hours>; 7],
    special: &BTreeMap<Date, Vec<Hours>>,
    today: Date,
) -> Vec<(Where, String)> {
    let in_gap = |date: Date, minute: u16| -> bool {
        if minute >= DAY_MINUTES {
            return false;
        }
        let Ok(time) = Time::new((minute / 60) as i8, (minute % 60) as i8, 0, 0) else {
            return false;
        };
        matches!(
            tz.to_ambiguous_timestamp(date.to_datetime(time)).offset(),
            AmbiguousOffset::Gap { .. }
        )
    };
    let mut out = Vec::new();
    let mut reported: BTreeSet<(usize, u16)> = BTreeSet::new();
    let mut date = today;
    for _ in 0..GAP_HORIZON_DAYS {
        let wd = weekday_index(date.weekday());
        for h in &week[wd] {
            for m in [h.start, h.end] {
                if in_gap(date, m) && reported.insert((wd, m)) {
                    // Name the `open` key that gives this weekday these hours.
                    let key = spec
                        .open
                        .keys()
                        .find(|k| {
                            parse_days(k).is_ok_and(|d| d.contains(&wd))
                                && spec.open[*k]
                                    .split(',')
                                    .any(|r| parse_range(r.trim()).ok() == Some(*h))
                        })
                        .cloned()
                        .unwrap_or_default();
                    out.push((
                        Where::OpenHours(key),
                        format!(
                            "{} does not exist on {date} in {} (clocks go forward): start or end the hours outside the skipped hour",
                            show_minute(m),
                            spec.time_zone
                        ),
                    ));
                }
            }
        }
        match date.tomorrow() {
            Ok(d) => date = d,
            Err(_) => break,
        }
    }
    for (d, hours) in special {
        for h in hours {
            for m in [h.start, h.end] {
                if in_gap(*d, m) {
                    out.push((
                        Where::SpecialHours(d.to_string()),
                        format!(
                            "{} does not exist on {d} in {} (clocks go forward)",
                            show_minute(m),
                            spec.time_zone
                        ),
                    ));
                }
            }
        }
    }
    out
}

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn weekday_index(w: Weekday) -> usize {
    (w.to_monday_zero_offset() as usize) % 7
}

/// `mon`, `mon-fri`, `fri-mon` (wraps), `sat,sun`: weekday indices, Monday 0.
fn parse_days(text: &str) -> Result<Vec<usize>, String> {
    let day = |s: &str| {
        DAY_NAMES
            .iter()
            .position(|d| d.eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("\"{}\" is not a day (mon, tue, wed, thu, fri, sat, sun; a range such as mon-fri; or a list such as sat,sun)", s.trim()))
    };
    let mut days = Vec::new();
    for part in text.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    days.push(d);
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days.push(day(part)?),
        }
    }
    let mut seen = BTreeSet::new();
    for d in &days {
        if !seen.insert(*d) {
            return Err(format!("\"{text}\" names {} twice", DAY_NAMES[*d]));
        }
    }
    Ok(days)
}

/// `07:00-19:00` or several separated by commas.
fn parse_hours(text: &str) -> Result<Vec<Hours>, String> {
    let mut v = Vec::new();
    for r in text.split(',') {
        v.push(parse_range(r.trim())?);
    }
    if let Some((a, b)) = first_overlap(&v) {
        return Err(format!("hours {} and {} overlap", show(&a), show(&b)));
    }
    v.sort();
    Ok(v)
}

fn parse_range(text: &str) -> Result<Hours, String> {
    let bad = || format!("\"{text}\" is not a range of hours such as \"07:00-19:00\"");
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let (start, end) = (parse_minute(a.trim(), false), parse_minute(b.trim(), true));
    let (Some(start), Some(end)) = (start, end) else {
        return Err(bad());
    };
    if end <= start {
        return Err(format!(
            "\"{text}\" ends before it starts (a range past midnight is written as two days, ending at 24:00)"
        ));
    }
    Ok(Hours { start, end })
}

/// `HH:MM`, 00:00 to 23:59, and 24:00 when `end`.
fn parse_minute(text: &str, end: bool) -> Option<u16> {
    let (h, m) = text.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    match (h, m) {
        (24, 0) if end => Some(DAY_MINUTES),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

fn parse_date(text: &str) -> Result<Date, String> {
    let ok_shape = text.len() == 10 && text.as_bytes()[4] == b'-' && text.as_bytes()[7] == b'-';
    match text.parse::<Date>() {
        Ok(d) if ok_shape => Ok(d),
        _ => Err(format!(
            "\"{text}\" is not a date such as \"2026-12-25\" (year-month-day)"
        )),
    }
}

fn overlap(a: &Hours, b: &Hours) -> bool {
    a.start < b.end && b.start < a.end
}

fn first_overlap(v: &[Hours]) -> Option<(Hours, Hours)> {
    for (i, a) in v.iter().enumerate() {
        for b in &v[i + 1..] {
            if overlap(a, b) {
                return Some((*a, *b));
            }
        }
    }
    None
}

fn show_minute(m: u16) -> String {
    format!("{:02}:{:02}", m / 60, m % 60)
}

fn show(h: &Hours) -> String {
    format!("{}-{}", show_minute(h.start), show_minute(h.end))
}

/// The civil clock calls are run by: the system's, or (for tests, through the server's
/// builder) one set to another time that runs on from there. A call reads it once, when it
/// is answered; the engine adds the time elapsed since then from its own monotonic `now`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WallClock {
    /// Added to the system's time.
    offset: SignedDuration,
}

impl WallClock {
    /// The system's clock.
    pub fn system() -> WallClock {
        WallClock::default()
    }

    /// A clock that reads `at` now and runs on from there.
    pub fn starting_at(at: Timestamp) -> WallClock {
        WallClock {
            offset: at.duration_since(Timestamp::now()),
        }
    }

    pub fn now(&self) -> Timestamp {
        Timestamp::now()
            .checked_add(self.offset)
            .unwrap_or_else(|_| Timestamp::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn spec(yaml: &str) -> ScheduleSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn centre() -> Schedule {
        compile(
            &spec(
                "time_zone: America/New_York\nopen: {mon-fri: \"07:00-19:00\", sat: \"09:00-13:00\"}\nclosed_dates: [\"2026-12-25\", \"2027-01-01\"]\nopen_dates: {\"2026-12-24\": \"07:00-12:00\"}\n",
            ),
            date(2026, 12, 1),
        )
        .unwrap()
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn weekday_hours_in_the_zone_not_in_utc() {
        let s = centre();
        // Monday 2026-12-07: 07:00 EST is 12:00Z, 19:00 EST is 00:00Z the next day.
        assert!(!s.is_open(at("2026-12-07T11:59:59Z")));
        assert!(s.is_open(at("2026-12-07T12:00:00Z")));
        assert!(s.is_open(at("2026-12-07T23:59:59Z")));
        assert!(!s.is_open(at("2026-12-08T00:00:00Z")));
        // Saturday 09:00-13:00, Sunday closed.
        assert!(s.is_open(at("2026-12-12T14:30:00Z")));
        assert!(!s.is_open(at("2026-12-12T18:00:00Z")));
        assert!(!s.is_open(at("2026-12-13T15:00:00Z")));
    }

    #[test]
    fn holidays_close_and_special_dates_replace_the_week() {
        let s = centre();
        // Friday 2026-12-25 at noon New York time: a holiday.
        assert!(!s.is_open(at("2026-12-25T17:00:00Z")));
        // Thursday 2026-12-24: open 07:00-12:00 only.
        assert!(s.is_open(at("2026-12-24T16:59:00Z")));
        assert!(!s.is_open(at("2026-12-24T17:00:00Z")));
        // The Monday after is a normal day.
        assert!(s.is_open(at("2026-12-28T17:00:00Z")));
    }

    #[test]
    fn opening_follows_the_dst_change() {
        let s = centre();
        // Monday 2027-03-15, after clocks went forward on 2027-03-14: 07:00 EDT is 11:00Z.
        assert!(!s.is_open(at("2027-03-15T10:59:00Z")));
        assert!(s.is_open(at("2027-03-15T11:00:00Z")));
        // The Friday before, still standard time: 11:00Z is 06:00 EST, closed.
        assert!(!s.is_open(at("2027-03-12T11:00:00Z")));
        assert!(s.is_open(at("2027-03-12T12:00:00Z")));
        // November: back to standard time on 2027-11-07; Monday 2027-11-08 opens at 12:00Z.
        assert!(!s.is_open(at("2027-11-08T11:30:00Z")));
        assert!(s.is_open(at("2027-11-08T12:00:00Z")));
    }

    #[test]
    fn bad_schedules_are_refused_with_where() {
        let today = date(2026, 12, 1);
        let e = compile(&spec("time_zone: America/Springfield\n"), today).unwrap_err();
        assert_eq!(e[0].at, Where::TimeZone);
        let e = compile(
            &spec("time_zone: UTC\nopen: {mon-fri: \"07:00-19:00\", fri: \"18:00-20:00\"}\n"),
            today,
        )
        .unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].message.contains("overlaps"), "{e:?}");
        let e = compile(&spec("time_zone: UTC\nopen: {mon: \"7:00-19:00\", tues: \"09:00-10:00\", wed: \"19:00-07:00\"}\nclosed_dates: [\"2026-13-01\"]\nopen_dates: {\"2026-12-24\": \"09:00-12:00, 11:00-13:00\"}\n"), today).unwrap_err();
        let wheres: Vec<_> = e.iter().map(|p| p.at.clone()).collect();
        assert_eq!(
            wheres,
            vec![
                Where::OpenHours("mon".into()),
                Where::OpenDays("tues".into()),
                Where::OpenHours("wed".into()),
                Where::ClosedDate(0),
                Where::SpecialHours("2026-12-24".into()),
            ]
        );
    }

    #[test]
    fn a_boundary_in_the_skipped_hour_is_refused() {
        let e = compile(
            &spec("time_zone: America/New_York\nopen: {sun: \"02:30-12:00\"}\n"),
            date(2026, 12, 1),
        )
        .unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].at, Where::OpenHours("sun".into()));
        assert!(e[0].message.contains("2027-03-14"), "{}", e[0].message);
        // The same hours in a zone without DST are fine.
        compile(
            &spec("time_zone: America/Phoenix\nopen: {sun: \"02:30-12:00\"}\n"),
            date(2026, 12, 1),
        )
        .unwrap();
    }

    #[test]
    fn days_wrap_and_list() {
        assert_eq!(parse_days("fri-mon").unwrap(), vec![4, 5, 6, 0]);
        assert_eq!(parse_days("sat,sun").unwrap(), vec![5, 6]);
        assert!(parse_days("mon,mon-tue").is_err());
        assert_eq!(parse_hours("13:00-24:00, 07:00-12:00").unwrap().len(), 2);
    }

    #[test]
    fn a_clock_set_elsewhere_runs_on() {
        let c = WallClock::starting_at(at("2026-12-07T23:30:00Z"));
        let d = c.now().duration_since(at("2026-12-07T23:30:00Z"));
        assert!(d >= SignedDuration::ZERO && d < SignedDuration::from_secs(5));
    }
}
