//! The ledger's database: SQLite (one sidecar) or PostgreSQL (several),
//! through `sqlx`, opened from `[ledger] url` with its migrations
//! (`migrations/sqlite/`, `migrations/postgres/`) applied at open.
//!
//! One table, `ledger_entries`, keyed by `(customer_id, id_ms, id_seq)`:
//! the stream entry id `<ms>-<seq>` as two integers (so ids order as Redis
//! orders them), behind the customer because ids are unique per stream and
//! there is one stream per cluster slot: a customer's entries all come from
//! its slot's stream, so the pair is unique everywhere. Writing an entry
//! twice (a drain killed between commit and acknowledgement, two drains
//! racing on a claimed entry) is a no-op: `INSERT … ON CONFLICT DO NOTHING`.
//! The balance and limit deltas are kept as the codec's compact fields 6 and
//! 7 (`balances`, `limits`; plan ids inside): the usage queries aggregate
//! fetched entries in Rust, so SQL never looks inside them, and one row per
//! entry keeps the drain's writes at one row each.
//!
//! Two typed pools behind one enum rather than `sqlx::Any`: each backend
//! gets its own embedded migrations (`sqlx::migrate!` takes one directory
//! per database), its own connection options (SQLite: create if missing,
//! WAL, `synchronous = FULL` so an acknowledged entry survives power loss),
//! and native types; `Any` would erase the options and map integers
//! through its own value type. The queries are written once (a macro runs
//! the same body on either pool; `QueryBuilder` writes each backend's
//! placeholders).

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row};

use crate::ledger::codec::{self, CodecError};
use crate::ledger::{LedgerEntry, LedgerOp, UsageSum};
use crate::money::Amount;

/// Rows per `INSERT` statement (12 parameters each: well inside SQLite's
/// 32766 and PostgreSQL's 65535 bound parameters).
const ROWS_PER_STATEMENT: usize = 1000;

/// The ops that are usage ([`LedgerOp::is_usage`]), as SQL.
const USAGE_OPS: &str = " AND op IN ('consume', 'track', 'refund', 'finalize')";

/// Which entries a query reads.
struct Filter<'a> {
    customer_id: Option<&'a str>,
    features: &'a [String],
    start_ms: i64,
    end_ms: i64,
    usage_only: bool,
}

/// How long a call waits for a connection (a database that is down answers
/// within this, as an error the drain retries).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a ledger store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("ledger url must start with sqlite:// or postgres:// (or postgresql://), not {0:?}")]
    Url(String),
    #[error("ledger database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("ledger database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("ledger entry {id}: {source}")]
    Entry {
        id: String,
        #[source]
        source: CodecError,
    },
}

/// Which database a store is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// The ledger's database. Cloning shares the pool.
#[derive(Debug, Clone)]
pub struct LedgerStore {
    pool: Pool,
}

/// Runs `$body` with `$p` bound to whichever pool the store has.
macro_rules! on_pool {
    ($self:expr, $p:ident => $body:expr) => {
        match &$self.pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

const COLUMNS: &str = "customer_id, id_ms, id_seq, at, feature_id, op, units, idempotency_key, \
                       lock_id, subject, balances, limits";

impl LedgerStore {
    /// Opens `url` (`sqlite://path`: the file is created if missing, in WAL
    /// mode; `postgres://…`) and applies the migrations.
    pub async fn open(url: &str) -> Result<LedgerStore, StoreError> {
        let pool = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(5));
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options)
                .await?;
            sqlx::migrate!("migrations/sqlite").run(&pool).await?;
            Pool::Sqlite(pool)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect(url)
                .await?;
            sqlx::migrate!("migrations/postgres").run(&pool).await?;
            Pool::Postgres(pool)
        } else {
            return Err(StoreError::Url(url.to_string()));
        };
        Ok(LedgerStore { pool })
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// Writes `entries` in one transaction; an entry already stored (same
    /// customer and id) is skipped. Returns how many rows were new.
    pub async fn insert_batch(&self, entries: &[LedgerEntry]) -> Result<u64, StoreError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let mut rows = Vec::with_capacity(entries.len());
        for e in entries {
            let (ms, seq) = codec::parse_id(&e.id).map_err(|source| StoreError::Entry {
                id: e.id.clone(),
                source,
            })?;
            rows.push((e, ms, seq));
        }
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let mut inserted = 0;
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let mut q = QueryBuilder::new(format!("INSERT INTO ledger_entries ({COLUMNS}) "));
                q.push_values(chunk, |mut b, (e, ms, seq)| {
                    b.push_bind(e.customer_id.clone())
                        .push_bind(*ms)
                        .push_bind(*seq)
                        .push_bind(e.at)
                        .push_bind(e.feature_id.clone())
                        .push_bind(e.op.as_str())
                        .push_bind(e.units.raw())
                        .push_bind(e.idempotency_key.clone())
                        .push_bind(e.lock_id.clone())
                        .push_bind(e.subject.clone())
                        .push_bind(codec::encode_balances(&e.balances))
                        .push_bind(codec::encode_limits(&e.limits));
                });
                q.push(" ON CONFLICT DO NOTHING");
                inserted += q.build().execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
            Ok(inserted)
        })
    }

    /// A customer's entries of `features` (all features when empty) with
    /// `start_ms <= at < end_ms`, newest first (by id), strictly older than
    /// `before_id` when given (the cursor: the last id of the previous
    /// page), at most `limit`.
    pub async fn fetch(
        &self,
        customer_id: &str,
        features: &[String],
        start_ms: i64,
        end_ms: i64,
        before_id: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let filter = Filter {
            customer_id: Some(customer_id),
            features,
            start_ms,
            end_ms,
            usage_only: false,
        };
        self.select(&filter, before_id, limit).await
    }

    /// `events.list` from the database: the page of usage entries
    /// ([`LedgerOp::is_usage`]) `q` asks for, newest first, read with one
    /// indexed query of at most `limit + 1` rows (the extra row says
    /// whether a next page exists).
    pub async fn events(
        &self,
        q: &crate::ledger::EventsListQuery,
    ) -> Result<crate::ledger::EventsPage, StoreError> {
        let filter = Filter {
            customer_id: q.customer_id.as_deref(),
            features: &q.feature_ids,
            start_ms: q.start.unwrap_or(i64::MIN),
            end_ms: q.end.unwrap_or(i64::MAX),
            usage_only: true,
        };
        let cursor = q.cursor.as_deref().filter(|c| !c.is_empty());
        let mut entries = self.select(&filter, cursor, Some(q.limit + 1)).await?;
        let more = entries.len() > q.limit;
        entries.truncate(q.limit);
        Ok(crate::ledger::EventsPage {
            next_cursor: if more {
                entries.last().map(|e| e.id.clone())
            } else {
                None
            },
            entries,
        })
    }

    async fn select(
        &self,
        f: &Filter<'_>,
        before_id: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let before = before_id
            .map(|id| {
                codec::parse_id(id).map_err(|source| StoreError::Entry {
                    id: id.to_string(),
                    source,
                })
            })
            .transpose()?;
        on_pool!(self, p => {
            let mut q = QueryBuilder::new(format!("SELECT {COLUMNS} FROM ledger_entries WHERE at >= "));
            q.push_bind(f.start_ms);
            q.push(" AND at < ").push_bind(f.end_ms);
            if let Some(c) = f.customer_id {
                q.push(" AND customer_id = ").push_bind(c.to_string());
            }
            if f.usage_only {
                q.push(USAGE_OPS);
            }
            if !f.features.is_empty() {
                q.push(" AND feature_id IN (");
                let mut list = q.separated(", ");
                for feature in f.features {
                    list.push_bind(feature.clone());
                }
                list.push_unseparated(")");
            }
            if let Some((ms, seq)) = before {
                q.push(" AND (id_ms < ").push_bind(ms);
                q.push(" OR (id_ms = ").push_bind(ms);
                q.push(" AND id_seq < ").push_bind(seq);
                q.push("))");
            }
            q.push(" ORDER BY id_ms DESC, id_seq DESC");
            if let Some(limit) = limit {
                q.push(" LIMIT ").push_bind(i64::try_from(limit).unwrap_or(i64::MAX));
            }
            let rows = q.build().fetch_all(p).await?;
            rows.iter().map(entry_from_row).collect()
        })
    }

    /// What `events.aggregate` reads: a customer's (`None`: every customer's) usage entries
    /// ([`LedgerOp::is_usage`]) of `features` with `start_ms <= at <
    /// end_ms`, in no particular order, with only the columns an aggregate
    /// uses (the balances only when `with_balances`, for `group_by
    /// $plan_id`; no keys, no limits). Reading whole entries and decoding
    /// their limits costs several times as much.
    pub async fn usage(
        &self,
        customer_id: Option<&str>,
        features: &[String],
        start_ms: i64,
        end_ms: i64,
        with_balances: bool,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let balances = if with_balances { "balances" } else { "''" };
        on_pool!(self, p => {
            let mut q = QueryBuilder::new(format!(
                "SELECT customer_id, id_ms, id_seq, at, feature_id, op, units, {balances} \
                 FROM ledger_entries WHERE at >= "
            ));
            q.push_bind(start_ms);
            if let Some(c) = customer_id {
                q.push(" AND customer_id = ").push_bind(c.to_string());
            }
            q.push(" AND at < ").push_bind(end_ms);
            q.push(USAGE_OPS);
            if !features.is_empty() {
                q.push(" AND feature_id IN (");
                let mut list = q.separated(", ");
                for f in features {
                    list.push_bind(f.clone());
                }
                list.push_unseparated(")");
            }
            let rows = q.build().fetch_all(p).await?;
            rows.iter().map(usage_from_row).collect()
        })
    }

    /// A customer's usage of `features` in `[start_ms, end_ms)` summed per
    /// feature and `grain_ms` (UTC hours or days: [`crate::ledger::BinSize::grain_ms`]) by
    /// the database, for [`crate::ledger::aggregate_sums`]: a few rows per
    /// day instead of one per entry. Instants are non-negative (the
    /// grain is `at / grain_ms`); each sum's `at` is its grain's start, or
    /// `start_ms` for the first.
    pub async fn usage_sums(
        &self,
        customer_id: Option<&str>,
        features: &[String],
        start_ms: i64,
        end_ms: i64,
        grain_ms: i64,
    ) -> Result<Vec<UsageSum>, StoreError> {
        let grain = grain_ms.max(1);
        on_pool!(self, p => {
            let mut q = QueryBuilder::new(
                "SELECT feature_id, at / ",
            );
            q.push_bind(grain);
            q.push(
                " AS grain, CAST(SUM(units) AS BIGINT), COUNT(*) FROM ledger_entries WHERE at >= ",
            );
            q.push_bind(start_ms);
            if let Some(c) = customer_id {
                q.push(" AND customer_id = ").push_bind(c.to_string());
            }
            q.push(" AND at < ").push_bind(end_ms);
            q.push(USAGE_OPS);
            q.push(" AND feature_id IS NOT NULL");
            if !features.is_empty() {
                q.push(" AND feature_id IN (");
                let mut list = q.separated(", ");
                for f in features {
                    list.push_bind(f.clone());
                }
                list.push_unseparated(")");
            }
            q.push(" GROUP BY feature_id, grain");
            let rows = q.build().fetch_all(p).await?;
            rows.iter()
                .map(|r| {
                    let g: i64 = r.try_get(1)?;
                    let sum: i64 = r.try_get(2)?;
                    let count: i64 = r.try_get(3)?;
                    Ok(UsageSum {
                        feature_id: r.try_get(0)?,
                        at: (g * grain).max(start_ms),
                        sum: sum as i128,
                        count: count.max(0) as u64,
                    })
                })
                .collect()
        })
    }

    /// Every entry of `customer_id`, oldest first (tests, replays).
    pub async fn entries_of(&self, customer_id: &str) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut all = self
            .fetch(customer_id, &[], i64::MIN, i64::MAX, None, None)
            .await?;
        all.reverse();
        Ok(all)
    }

    /// How many entries are stored.
    pub async fn count(&self) -> Result<u64, StoreError> {
        on_pool!(self, p => {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ledger_entries")
                .fetch_one(p)
                .await?;
            Ok(n as u64)
        })
    }

    /// Closes the pool (waits for connections in use to return).
    pub async fn close(&self) {
        on_pool!(self, p => p.close().await)
    }
}

/// A row of [`LedgerStore::usage`]: the entry with only those columns.
fn usage_from_row<'r, R: Row>(r: &'r R) -> Result<LedgerEntry, StoreError>
where
    usize: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let id = codec::format_id(r.try_get(1)?, r.try_get(2)?);
    let corrupt = |source| StoreError::Entry {
        id: id.clone(),
        source,
    };
    let op: String = r.try_get(5)?;
    let op = LedgerOp::parse(&op).ok_or_else(|| corrupt(CodecError::UnknownOp(op)))?;
    let units: i64 = r.try_get(6)?;
    let units = Amount::from_raw(units).ok_or_else(|| {
        corrupt(CodecError::AmountOutOfRange {
            field: "units",
            value: units,
        })
    })?;
    let balances: String = r.try_get(7)?;
    Ok(LedgerEntry {
        customer_id: r.try_get(0)?,
        at: r.try_get(3)?,
        feature_id: r.try_get(4)?,
        op,
        units,
        idempotency_key: None,
        lock_id: None,
        subject: None,
        balances: codec::decode_balances(&balances).map_err(corrupt)?,
        limits: vec![],
        id,
    })
}

fn entry_from_row<'r, R: Row>(r: &'r R) -> Result<LedgerEntry, StoreError>
where
    usize: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let customer_id: String = r.try_get(0)?;
    let id = codec::format_id(r.try_get(1)?, r.try_get(2)?);
    let corrupt = |source| StoreError::Entry {
        id: id.clone(),
        source,
    };
    let op: String = r.try_get(5)?;
    let op = LedgerOp::parse(&op).ok_or_else(|| corrupt(CodecError::UnknownOp(op)))?;
    let units: i64 = r.try_get(6)?;
    let units = Amount::from_raw(units).ok_or_else(|| {
        corrupt(CodecError::AmountOutOfRange {
            field: "units",
            value: units,
        })
    })?;
    let balances: String = r.try_get(10)?;
    let limits: String = r.try_get(11)?;
    Ok(LedgerEntry {
        customer_id,
        at: r.try_get(3)?,
        feature_id: r.try_get(4)?,
        op,
        units,
        idempotency_key: r.try_get(7)?,
        lock_id: r.try_get(8)?,
        subject: r.try_get(9)?,
        balances: codec::decode_balances(&balances).map_err(corrupt)?,
        limits: codec::decode_limits(&limits).map_err(corrupt)?,
        id,
    })
}
