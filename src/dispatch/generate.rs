//! Synthetic tickets for benchmarks: `ivr311 tickets generate`.
//!
//! Fills a ticket store with years of made-up 311 service requests shaped like a city's:
//! the shipped menu's services in a skewed mix, requests spread over `years` with yearly
//! growth, a weekly shape (fewer at weekends) and a daily one (most in office hours, New York
//! time), about 85% closed with a status note, ZIP codes, house numbers for the services that
//! ask for one, coordinates for most web requests, and callers' numbers in the fictional
//! `555-0100`..`555-0199` range of every North American area code. Numbers are 8 random
//! digits, unique, by the same rule as [`TicketStore::file`].
//!
//! The store is left as the server keeps it: numbers older than the default
//! `retention.caller_numbers_days` read `erased` (as the retention pass leaves them), and no
//! ticket has a recording (there are no audio files behind a generated store).
//!
//! # A benchmark fixture, not a production store
//!
//! To write ten million rows in minutes, generation commits in large transactions of
//! multi-row `INSERT`s on one connection with `synchronous=OFF`, and on an empty store drops
//! the `tickets` indexes first and builds them again at the end. A power cut during
//! generation can lose or corrupt what was generated; nothing else relaxes durability, and
//! `ivr311 serve` on the result runs with `synchronous=FULL` as always. The SQLite-only
//! parts (pragmas, the index catalogue) are in [`bulk`] below, per database.
//!
//! A generated store refuses to be generated into again unless `append` is set, so that a
//! real store is never mistaken for a fixture.

use crate::dispatch::tickets::{iso, Channel, Status, StoreError, TicketStore, ID_MAX, ID_MIN};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::Connection;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// Rows per multi-row `INSERT` (20 columns each: 10,000 bound values, under SQLite's 32,766).
const ROWS_PER_INSERT: usize = 500;
/// Rows per transaction.
const ROWS_PER_TRANSACTION: u64 = 100_000;
/// Most tickets one store may be generated to hold: half the 8-digit numbers, so that
/// [`TicketStore::file`] still finds a free number at the first or second draw.
pub const MAX_TICKETS: u64 = 45_000_000;
/// Most years of requests.
pub const MAX_YEARS: u32 = 30;
/// Share of tickets left open at random (more stay open because they were filed too
/// recently to be closed).
const OPEN_SHARE: f64 = 0.13;
/// Mean time from filing to closing, seconds (an exponential distribution).
const MEAN_SECONDS_TO_CLOSE: f64 = 3.0 * 86_400.0;
/// Yearly growth of the number of requests.
const YEARLY_GROWTH: f64 = 1.08;
/// Hours from UTC to the city's standard time (New York), for the daily shape.
const CITY_UTC_OFFSET_HOURS: i64 = -5;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratePlan {
    /// How many tickets, 1..=[`MAX_TICKETS`] (with those already there).
    pub count: u64,
    /// The random seed: the same seed, count, years and `now` give the same tickets.
    pub seed: u64,
    /// Requests are spread over this many years (1..=[`MAX_YEARS`]) before `now`.
    pub years: u32,
    /// Add to a store that already has tickets.
    pub append: bool,
    /// The newest a request may be.
    pub now: OffsetDateTime,
}

/// What a generation did.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateReport {
    /// Tickets written.
    pub written: u64,
    /// Tickets in the store before.
    pub existing: u64,
    /// Of them, left open.
    pub open: u64,
    /// Random numbers drawn that were already taken (generated or there before), as
    /// [`TicketStore::file`] would have had to draw again at the same fill.
    pub redraws: u64,
    /// Time taken to write the rows.
    pub insert_time: Duration,
    /// Time taken to build the indexes again (zero when appending).
    pub index_time: Duration,
}

/// Why generation stopped.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The store already holds tickets and `append` was not given.
    #[error(
        "the store already holds {0} ticket(s); give --append to add generated ones to it \
         (a generated store is a benchmark fixture: never append to a real one)"
    )]
    NotEmpty(u64),
    /// `count` is 0 or would fill more than [`MAX_TICKETS`].
    #[error("{count} more ticket(s) on top of {existing}: between 1 and {MAX_TICKETS} in all")]
    BadCount {
        /// Asked for.
        count: u64,
        /// Already there.
        existing: u64,
    },
    /// `years` is 0 or more than [`MAX_YEARS`].
    #[error("--years {0}: between 1 and {MAX_YEARS}")]
    BadYears(u32),
    /// The database refused.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn db(e: sqlx::Error) -> GenerateError {
    GenerateError::Store(crate::dispatch::tickets::fail("generate", e))
}

/// One service of the shipped menu (`menus/311.yaml`), with its share of requests.
struct ServiceMix {
    code: &'static str,
    name: &'static str,
    agency: &'static str,
    /// Relative frequency.
    weight: f64,
    /// The menu asks phone callers for a house number.
    house_number: bool,
    /// What a closed request's status note says.
    closed_notes: &'static [&'static str],
}

/// The shipped menu's ticket services, most requested first.
const SERVICES: &[ServiceMix] = &[
    ServiceMix {
        code: "noise",
        name: "Noise complaint",
        agency: "Police - Non-Emergency",
        weight: 24.0,
        house_number: false,
        closed_notes: &[
            "Officers responded; the noise had stopped on arrival.",
            "Officers responded and asked the people responsible to lower the noise.",
            "A summons was issued.",
        ],
    },
    ServiceMix {
        code: "missed_pickup",
        name: "Missed trash or recycling pickup",
        agency: "Sanitation",
        weight: 16.0,
        house_number: false,
        closed_notes: &[
            "Collected.",
            "Material was not set out by the collection time; it will be collected on the next collection day.",
        ],
    },
    ServiceMix {
        code: "pothole",
        name: "Pothole",
        agency: "Public Works - Streets",
        weight: 14.0,
        house_number: false,
        closed_notes: &[
            "Repaired.",
            "Inspected; the defect is scheduled for resurfacing.",
            "No defect found at this location.",
        ],
    },
    ServiceMix {
        code: "blocked_driveway",
        name: "Blocked driveway",
        agency: "Parking Enforcement",
        weight: 11.0,
        house_number: true,
        closed_notes: &["A summons was issued.", "The vehicle was gone on arrival."],
    },
    ServiceMix {
        code: "streetlight",
        name: "Streetlight out",
        agency: "Public Works - Street Lighting",
        weight: 8.0,
        house_number: true,
        closed_notes: &["The lamp was replaced.", "Repaired: a wiring fault was fixed."],
    },
    ServiceMix {
        code: "bulky_item",
        name: "Bulky item pickup",
        agency: "Sanitation",
        weight: 8.0,
        house_number: false,
        closed_notes: &["Collected.", "Scheduled and collected on the requested day."],
    },
    ServiceMix {
        code: "graffiti",
        name: "Graffiti",
        agency: "Public Works - Graffiti Abatement",
        weight: 6.0,
        house_number: false,
        closed_notes: &["Removed.", "On private property; the owner was notified."],
    },
    ServiceMix {
        code: "abandoned_vehicle",
        name: "Abandoned vehicle",
        agency: "Parking Enforcement",
        weight: 5.0,
        house_number: true,
        closed_notes: &["The vehicle was towed.", "The vehicle had been moved."],
    },
    ServiceMix {
        code: "fallen_tree",
        name: "Fallen tree or large branch",
        agency: "Parks - Urban Forestry",
        weight: 3.0,
        house_number: true,
        closed_notes: &["Removed and the area cleared.", "The tree was made safe; stump removal is scheduled."],
    },
    ServiceMix {
        code: "dead_animal",
        name: "Dead animal pickup",
        agency: "Sanitation - Dead Animal Collection",
        weight: 2.5,
        house_number: false,
        closed_notes: &["Removed."],
    },
    ServiceMix {
        code: "stray_animal",
        name: "Stray animal",
        agency: "Animal Services",
        weight: 1.5,
        house_number: false,
        closed_notes: &["An officer responded; the animal was taken to the shelter.", "Not found on arrival."],
    },
    ServiceMix {
        code: "call_back",
        name: "Call back after hours",
        agency: "311 Customer Service",
        weight: 1.0,
        house_number: false,
        closed_notes: &["Called back."],
    },
];

/// The service codes the generator files under (all of the shipped menu's ticket services).
pub fn service_codes() -> impl Iterator<Item = &'static str> {
    SERVICES.iter().map(|s| s.code)
}

/// Relative volume of requests on each weekday, Monday first.
const WEEKDAY_SHAPE: [f64; 7] = [1.15, 1.05, 1.0, 1.0, 0.95, 0.6, 0.5];
/// Relative volume of requests in each hour of the city's day.
const HOUR_SHAPE: [f64; 24] = [
    0.25, 0.15, 0.1, 0.08, 0.08, 0.15, 0.4, 0.9, 1.5, 1.9, 2.0, 1.9, 1.8, 1.85, 1.8, 1.7, 1.5,
    1.25, 1.05, 0.95, 0.85, 0.7, 0.5, 0.35,
];

/// Draws from a list of relative weights.
struct Weighted {
    cumulative: Vec<f64>,
}

impl Weighted {
    fn new(weights: impl IntoIterator<Item = f64>) -> Weighted {
        let mut total = 0.0;
        let cumulative = weights
            .into_iter()
            .map(|w| {
                total += w;
                total
            })
            .collect();
        Weighted { cumulative }
    }

    fn pick(&self, rng: &mut impl Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let x = rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|&c| c <= x)
            .min(self.cumulative.len().saturating_sub(1))
    }
}

/// One generated ticket, as its row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    pub(crate) id: u64,
    service: usize,
    pub(crate) status: Status,
    status_notes: Option<&'static str>,
    description: Option<String>,
    pub(crate) requested: OffsetDateTime,
    pub(crate) updated: OffsetDateTime,
    pub(crate) zipcode: String,
    house_number: Option<String>,
    address: Option<String>,
    lat: Option<f64>,
    long: Option<f64>,
    pub(crate) phone: Option<String>,
    pub(crate) channel: Channel,
    language: &'static str,
    agent_id: Option<String>,
    callback_requested: bool,
}

/// The pure part: the shape of a city's requests, drawn from a seeded generator.
pub(crate) struct Shape {
    rng: StdRng,
    services: Weighted,
    days: Weighted,
    hours: Weighted,
    /// Midnight UTC of the first day.
    first_day: OffsetDateTime,
    now: OffsetDateTime,
    /// Numbers filed before this read `erased`.
    numbers_kept_from: OffsetDateTime,
}

impl Shape {
    pub(crate) fn new(seed: u64, years: u32, now: OffsetDateTime) -> Shape {
        let now = crate::dispatch::tickets::whole_second_utc(now);
        let days = i64::from(years.max(1)) * 365;
        let today = now.replace_time(time::Time::MIDNIGHT);
        let first_day = today - time::Duration::days(days - 1);
        let day_weights = (0..days).map(|d| {
            let date = first_day + time::Duration::days(d);
            let weekday = usize::from(date.weekday().number_days_from_monday());
            YEARLY_GROWTH.powf(d as f64 / 365.0) * WEEKDAY_SHAPE[weekday]
        });
        let keep = crate::privacy::RetentionConfig::default().caller_numbers_days;
        Shape {
            rng: StdRng::seed_from_u64(seed),
            services: Weighted::new(SERVICES.iter().map(|s| s.weight)),
            days: Weighted::new(day_weights),
            hours: Weighted::new(HOUR_SHAPE),
            first_day,
            now,
            numbers_kept_from: now - time::Duration::days(i64::from(keep)),
        }
    }

    /// A fresh random ticket number (not checked against taken ones).
    fn draw_id(&mut self) -> u64 {
        self.rng.random_range(ID_MIN..=ID_MAX)
    }

    fn requested(&mut self) -> OffsetDateTime {
        let day = self.days.pick(&mut self.rng) as i64;
        let hour = self.hours.pick(&mut self.rng) as i64;
        let second = self.rng.random_range(0..3600);
        let t = self.first_day
            + time::Duration::days(day)
            + time::Duration::hours(hour - CITY_UTC_OFFSET_HOURS)
            + time::Duration::seconds(second);
        if t > self.now {
            // Late today: earlier today instead.
            let today = self.now.replace_time(time::Time::MIDNIGHT);
            let span = (self.now - today).whole_seconds().max(1);
            today + time::Duration::seconds(self.rng.random_range(0..span))
        } else {
            t
        }
    }

    pub(crate) fn row(&mut self, id: u64) -> Row {
        let rng = &mut self.rng;
        let service = self.services.pick(rng);
        let s = &SERVICES[service];
        let channel = match rng.random_range(0..100) {
            0..60 => Channel::Phone,
            60..90 => Channel::Web,
            _ => Channel::Operator,
        };
        let requested = self.requested();
        let rng = &mut self.rng;
        let close_after = -(1.0 - rng.random::<f64>()).ln() * MEAN_SECONDS_TO_CLOSE;
        let closed_at = requested + time::Duration::seconds(close_after.max(600.0) as i64);
        let open = rng.random_bool(OPEN_SHARE) || closed_at > self.now;
        let (status, status_notes, updated) = if open {
            (Status::Open, None, requested)
        } else {
            let notes = s.closed_notes[rng.random_range(0..s.closed_notes.len())];
            (Status::Closed, Some(notes), closed_at)
        };
        // ZIP codes of one city, a few much busier than the rest.
        let zip = 10001 + (40.0 * rng.random::<f64>().powf(1.6)) as u32;
        let zipcode = format!("{zip:05}");
        let house_number = (s.house_number && channel != Channel::Web && rng.random_bool(0.8))
            .then(|| rng.random_range(1..3000u32).to_string());
        let address = match (&house_number, channel) {
            (Some(h), _) => Some(format!("{h}, ZIP {zipcode}")),
            (None, Channel::Web) => Some(format!(
                "{} {} St",
                rng.random_range(1..3000u32),
                rng.random_range(1..230u32)
            )),
            (None, _) => None,
        };
        let (lat, long) = if channel == Channel::Web && rng.random_bool(0.7) {
            (
                Some(40.70 + rng.random::<f64>() * 0.18),
                Some(-74.02 + rng.random::<f64>() * 0.12),
            )
        } else {
            (None, None)
        };
        let has_phone = match channel {
            Channel::Phone => rng.random_bool(0.9),
            Channel::Web => rng.random_bool(0.2),
            Channel::Operator => rng.random_bool(0.7),
        };
        let phone = has_phone.then(|| {
            if requested < self.numbers_kept_from {
                crate::privacy::ERASED.to_owned()
            } else {
                fictional_number(rng)
            }
        });
        let description = (channel == Channel::Web).then(|| {
            format!(
                "{} reported near {}.",
                s.name,
                address.as_deref().unwrap_or(&zipcode)
            )
        });
        let language = if rng.random_bool(0.15) { "es" } else { "en" };
        let agent_id =
            (channel == Channel::Operator).then(|| format!("10{:02}", rng.random_range(1..=24u32)));
        let callback_requested = s.code == "call_back";
        Row {
            id,
            service,
            status,
            status_notes,
            description,
            requested,
            updated,
            zipcode,
            house_number,
            address,
            lat,
            long,
            phone,
            channel,
            language,
            agent_id,
            callback_requested,
        }
    }
}

/// A number in the fictional `NXX-555-0100`..`0199` range of a North American area code
/// (first digit 2–9, not `N11`), E.164.
pub(crate) fn fictional_number(rng: &mut impl Rng) -> String {
    loop {
        let npa = rng.random_range(200..1000u32);
        if npa % 100 == 11 || (npa / 10) % 10 == 9 {
            continue;
        }
        return format!("+1{npa}5550{}", rng.random_range(100..200u32));
    }
}

/// The ticket numbers taken: one bit per 8-digit number.
struct Taken {
    bits: Vec<u64>,
}

impl Taken {
    fn new() -> Taken {
        Taken {
            bits: vec![0; ((ID_MAX - ID_MIN + 1) as usize).div_ceil(64)],
        }
    }

    /// Marks `id` taken; false if it already was.
    fn take(&mut self, id: u64) -> bool {
        let i = (id - ID_MIN) as usize;
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        let fresh = self.bits[word] & bit == 0;
        self.bits[word] |= bit;
        fresh
    }

    fn ascending(self) -> impl Iterator<Item = u64> {
        self.bits.into_iter().enumerate().flat_map(|(w, word)| {
            (0..64)
                .filter(move |b| word & (1u64 << b) != 0)
                .map(move |b| ID_MIN + (w * 64 + b) as u64)
        })
    }
}

const COLUMNS: &str = "service_request_id, service_code, service_name, status, status_notes, \
    description, agency_responsible, requested_datetime, updated_datetime, zipcode, address, \
    house_number, lat, long, phone, channel, language, agent_id, callback_requested";
const COLUMN_COUNT: usize = 19;

/// Generates `plan.count` tickets into `store` (see the module docs).
pub async fn generate(
    store: &TicketStore,
    plan: &GeneratePlan,
) -> Result<GenerateReport, GenerateError> {
    if plan.years == 0 || plan.years > MAX_YEARS {
        return Err(GenerateError::BadYears(plan.years));
    }
    let pool = store.pool();
    let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM tickets")
        .fetch_one(pool)
        .await
        .map_err(db)?;
    let existing = u64::try_from(existing).unwrap_or(0);
    if existing > 0 && !plan.append {
        return Err(GenerateError::NotEmpty(existing));
    }
    if plan.count == 0 || existing.saturating_add(plan.count) > MAX_TICKETS {
        return Err(GenerateError::BadCount {
            count: plan.count,
            existing,
        });
    }

    let mut shape = Shape::new(plan.seed, plan.years, plan.now);
    // Numbers first: every one drawn as `file` draws them, redrawn when taken. Rows are then
    // written in number order, the table's own order, which is far faster than at random.
    let mut taken = Taken::new();
    if existing > 0 {
        let ids: Vec<i64> = sqlx::query_scalar("SELECT service_request_id FROM tickets")
            .fetch_all(pool)
            .await
            .map_err(db)?;
        for id in ids {
            if let Ok(id) = u64::try_from(id) {
                if (ID_MIN..=ID_MAX).contains(&id) {
                    taken.take(id);
                }
            }
        }
    }
    let mut redraws = 0;
    let mut fresh = Taken::new();
    for _ in 0..plan.count {
        loop {
            let id = shape.draw_id();
            if taken.take(id) {
                fresh.take(id);
                break;
            }
            redraws += 1;
        }
    }
    drop(taken);

    // One connection of its own, closed at the end: its relaxed settings never return to
    // the pool.
    let mut conn = pool.acquire().await.map_err(db)?.detach();
    bulk::relax(&mut conn).await.map_err(db)?;
    let dropped = if existing == 0 {
        bulk::drop_indexes(&mut conn).await.map_err(db)?
    } else {
        Vec::new()
    };

    let started = Instant::now();
    let loaded = load(&mut conn, &mut shape, fresh, plan.count).await;
    let insert_time = started.elapsed();

    // The indexes are built again even when the load failed part way: the store keeps its
    // schema whatever happens.
    let started = Instant::now();
    for (name, sql) in &dropped {
        tracing::info!(index = %name, "building index");
        sqlx::query(sql).execute(&mut conn).await.map_err(db)?;
    }
    let index_time = started.elapsed();
    let (written, open) = loaded?;
    bulk::finish(&mut conn).await.map_err(db)?;
    conn.close().await.map_err(db)?;
    Ok(GenerateReport {
        written,
        existing,
        open,
        redraws,
        insert_time,
        index_time,
    })
}

/// Writes a row for each of `ids`, in transactions of [`ROWS_PER_TRANSACTION`]; returns the
/// rows written and how many of them are open.
async fn load(
    conn: &mut sqlx::AnyConnection,
    shape: &mut Shape,
    ids: Taken,
    total: u64,
) -> Result<(u64, u64), GenerateError> {
    let mut written = 0u64;
    let mut open = 0u64;
    let mut ids = ids.ascending();
    let mut batch: Vec<Row> = Vec::with_capacity(ROWS_PER_INSERT);
    let mut tx = conn.begin().await.map_err(db)?;
    let mut in_tx = 0u64;
    loop {
        batch.clear();
        for id in ids.by_ref().take(ROWS_PER_INSERT) {
            batch.push(shape.row(id));
        }
        if batch.is_empty() {
            break;
        }
        open += batch.iter().filter(|r| r.status == Status::Open).count() as u64;
        insert(&mut tx, &batch).await?;
        written += batch.len() as u64;
        in_tx += batch.len() as u64;
        if in_tx >= ROWS_PER_TRANSACTION {
            tx.commit().await.map_err(db)?;
            tx = conn.begin().await.map_err(db)?;
            in_tx = 0;
            if written % 1_000_000 < ROWS_PER_TRANSACTION {
                tracing::info!(written, total, "generating tickets");
            }
        }
    }
    tx.commit().await.map_err(db)?;
    Ok((written, open))
}

async fn insert(conn: &mut sqlx::AnyConnection, rows: &[Row]) -> Result<(), GenerateError> {
    let one = format!("({})", vec!["?"; COLUMN_COUNT].join(", "));
    let sql = format!(
        "INSERT INTO tickets ({COLUMNS}) VALUES {}",
        vec![one.as_str(); rows.len()].join(", ")
    );
    let dialect = crate::dispatch::db::HasDialect::dialect(&*conn);
    let sql = crate::dispatch::db::sql(dialect, &sql);
    // Not kept prepared on PostgreSQL (see `TicketStore::file`: a NULL f64 is declared float4).
    let mut q = sqlx::query(&sql).persistent(dialect == crate::dispatch::db::Dialect::Sqlite);
    for r in rows {
        let s = &SERVICES[r.service];
        q = q
            .bind(i64::try_from(r.id).unwrap_or(0))
            .bind(s.code)
            .bind(s.name)
            .bind(r.status.as_str())
            .bind(r.status_notes)
            .bind(r.description.clone())
            .bind(s.agency)
            .bind(iso(r.requested)?)
            .bind(iso(r.updated)?)
            .bind(r.zipcode.clone())
            .bind(r.address.clone())
            .bind(r.house_number.clone())
            .bind(r.lat)
            .bind(r.long)
            .bind(r.phone.clone())
            .bind(r.channel.as_str())
            .bind(r.language)
            .bind(r.agent_id.clone())
            .bind(i64::from(r.callback_requested));
    }
    q.execute(&mut *conn).await.map_err(db)?;
    Ok(())
}

/// Bulk loading per database: relaxed sync on the generating connection, and the `tickets`
/// indexes dropped before loading an empty store and built again after.
mod bulk {
    use crate::dispatch::db::{Dialect, HasDialect};
    use sqlx::AnyConnection;

    /// SQLite: no fsync per commit, a 256 MiB page cache, and temporary B-trees (index
    /// builds) in memory. PostgreSQL: no wait for the WAL flush at commit, and memory for
    /// index builds. On this connection only.
    pub(super) async fn relax(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
        let settings: &[&str] = match conn.dialect() {
            Dialect::Sqlite => &[
                "PRAGMA synchronous = OFF",
                "PRAGMA cache_size = -262144",
                "PRAGMA temp_store = MEMORY",
            ],
            Dialect::Postgres => &[
                "SET synchronous_commit = off",
                "SET maintenance_work_mem = '256MB'",
                // An index build over millions of rows outlasts the pool's statement timeout.
                "SET statement_timeout = 0",
            ],
        };
        for set in settings {
            sqlx::query(set).execute(&mut *conn).await?;
        }
        Ok(())
    }

    /// Drops the indexes of `tickets` (not its primary key) and returns their names and
    /// `CREATE INDEX` statements, to run again after the load.
    pub(super) async fn drop_indexes(
        conn: &mut AnyConnection,
    ) -> Result<Vec<(String, String)>, sqlx::Error> {
        let catalogue = match conn.dialect() {
            Dialect::Sqlite => {
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' \
                 AND tbl_name = 'tickets' AND sql IS NOT NULL ORDER BY name"
            }
            Dialect::Postgres => {
                "SELECT CAST(i.indexname AS TEXT), CAST(i.indexdef AS TEXT) FROM pg_indexes i \
                 WHERE i.schemaname = current_schema() AND i.tablename = 'tickets' \
                 AND i.indexname NOT IN (SELECT CAST(conname AS TEXT) FROM pg_constraint) \
                 ORDER BY 1"
            }
        };
        let indexes: Vec<(String, String)> =
            sqlx::query_as(catalogue).fetch_all(&mut *conn).await?;
        for (name, _) in &indexes {
            // Names come from the schema, never from input; quoted all the same.
            let quoted = name.replace('"', "\"\"");
            sqlx::query(&format!("DROP INDEX \"{quoted}\""))
                .execute(&mut *conn)
                .await?;
        }
        Ok(indexes)
    }

    /// Makes the load durable now (SQLite: and folds the WAL into the database file;
    /// PostgreSQL: and gathers the statistics the planner needs).
    pub(super) async fn finish(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
        let steps: &[&str] = match conn.dialect() {
            Dialect::Sqlite => &[
                "PRAGMA synchronous = FULL",
                "PRAGMA wal_checkpoint(TRUNCATE)",
            ],
            Dialect::Postgres => &["SET synchronous_commit = on", "ANALYZE tickets"],
        };
        for step in steps {
            sqlx::query(step).execute(&mut *conn).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        time::macros::datetime!(2026-12-07 15:00 UTC)
    }

    #[test]
    fn the_mix_is_skewed_mostly_closed_and_spread_over_the_years() {
        let mut shape = Shape::new(7, 5, now());
        let rows: Vec<Row> = (0..20_000).map(|i| shape.row(ID_MIN + i)).collect();
        let closed = rows.iter().filter(|r| r.status == Status::Closed).count();
        let share = closed as f64 / rows.len() as f64;
        assert!((0.80..0.90).contains(&share), "closed share {share}");
        assert!(rows
            .iter()
            .filter(|r| r.status == Status::Closed)
            .all(|r| r.updated >= r.requested && r.updated <= now()));
        let first = now() - time::Duration::days(5 * 365);
        assert!(rows
            .iter()
            .all(|r| r.requested >= first && r.requested <= now()));
        // Growth: the last year has more than the first.
        let year = time::Duration::days(365);
        let first_year = rows.iter().filter(|r| r.requested < first + year).count();
        let last_year = rows.iter().filter(|r| r.requested >= now() - year).count();
        assert!(
            last_year > first_year * 5 / 4,
            "{first_year} then {last_year}"
        );
        // Weekends are quieter than weekdays, nights than days (New York time).
        let on = |d: time::Weekday| rows.iter().filter(|r| r.requested.weekday() == d).count();
        assert!(on(time::Weekday::Sunday) * 3 < on(time::Weekday::Monday) * 2);
        let at = |h: u8| rows.iter().filter(|r| r.requested.hour() == h).count();
        assert!(at(8) < at(15), "4 am vs 10 am New York");
        // Skewed services: the busiest at least ten times the quietest.
        let of = |code: &str| {
            rows.iter()
                .filter(|r| SERVICES[r.service].code == code)
                .count()
        };
        assert!(of("noise") > 10 * of("call_back"));
        // Numbers: fictional 555-01xx, or erased past the retention period.
        for r in rows.iter().filter_map(|r| r.phone.as_ref().map(|p| (r, p))) {
            let (r, p) = r;
            if r.requested < shape.numbers_kept_from {
                assert_eq!(p, crate::privacy::ERASED);
            } else {
                assert!(
                    p.len() == 12 && p.starts_with("+1") && &p[5..10] == "55501",
                    "{p}"
                );
            }
        }
        for c in [Channel::Phone, Channel::Web, Channel::Operator] {
            assert!(rows.iter().any(|r| r.channel == c));
        }
        assert!(rows.iter().any(|r| r.house_number.is_some()));
        assert!(rows.iter().any(|r| r.lat.is_some()));
    }

    #[test]
    fn the_same_seed_gives_the_same_tickets() {
        let a: Vec<Row> = {
            let mut s = Shape::new(42, 3, now());
            (0..100).map(|i| s.row(ID_MIN + i)).collect()
        };
        let b: Vec<Row> = {
            let mut s = Shape::new(42, 3, now());
            (0..100).map(|i| s.row(ID_MIN + i)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn the_services_are_the_shipped_menus() {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("menus/311.yaml"),
        )
        .unwrap();
        for code in service_codes() {
            assert!(
                text.contains(&format!("service: {code}")),
                "{code} is not a service of menus/311.yaml"
            );
        }
    }

    #[test]
    fn taken_numbers_come_back_in_order_once() {
        let mut t = Taken::new();
        for id in [ID_MAX, ID_MIN, 55_555_555, ID_MIN + 63, ID_MIN + 64] {
            assert!(t.take(id));
        }
        assert!(!t.take(55_555_555));
        let ids: Vec<u64> = t.ascending().collect();
        assert_eq!(ids, [ID_MIN, ID_MIN + 63, ID_MIN + 64, 55_555_555, ID_MAX]);
    }
}
