//! The storage layout of the data: the `<ns>cg:layout` marker a sidecar
//! checks at startup (refusing data of another layout), and `creditgate
//! migrate`, which converts layout `cg1` (per-operation EVAL scripts) into
//! `cg2` (the Functions library): stop every sidecar, migrate, start.
//!
//! The migration is per key and idempotent: every customer moves in one
//! atomic function call (`migrate`), every idempotency record and lock
//! receipt in another (`migrate_key`), so a crash midway is resumed by
//! running it again. On a cluster it scans every primary.

use redis::Value;

use super::conn::{self, unavailable, RedisOptions};
use super::keys::{self, layout_key, LAYOUT, PREVIOUS_LAYOUT};
use super::library::{Library, Node};
use super::reply::{array, int};
use crate::error::{Cause, EngineError};
use crate::model::Catalog;

fn layout_name(prefix: &str) -> &str {
    prefix.trim_end_matches(':')
}

fn refuse(found: &str) -> EngineError {
    let want = layout_name(LAYOUT);
    EngineError::StoreUnavailable(Cause::msg(format!(
        "the data in this Redis is layout {found}, this build needs layout {want}: stop every \
         sidecar, run `creditgate migrate --config FILE`, then start this build"
    )))
}

/// Keys matching `pattern` on one node, SCANned until `limit` are found or
/// the cursor returns to 0.
async fn scan(
    library: &Library,
    node: &Node,
    pattern: &str,
    count: usize,
    limit: usize,
) -> Result<Vec<String>, EngineError> {
    let mut cursor = 0u64;
    let mut out = vec![];
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        let v = library.query(node, cmd).await.map_err(unavailable)?;
        let mut items = array(v)?.into_iter();
        cursor = match items.next() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(&b).parse().unwrap_or(0),
            Some(Value::Int(i)) => i as u64,
            _ => 0,
        };
        if let Some(Value::Array(ks)) = items.next() {
            for k in ks {
                if let Value::BulkString(b) = k {
                    out.push(String::from_utf8_lossy(&b).into_owned());
                }
            }
        }
        if cursor == 0 || out.len() >= limit {
            return Ok(out);
        }
    }
}

/// Whether any primary holds a key of the previous layout.
async fn has_previous(library: &Library, ns: &str) -> Result<bool, EngineError> {
    let pattern = format!("{ns}{PREVIOUS_LAYOUT}*");
    for node in library.primaries().await? {
        if !scan(library, &node, &pattern, 10_000, 1).await?.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn get(library: &Library, key: &str) -> Result<Option<String>, EngineError> {
    let mut c = library.conn.clone();
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .map_err(unavailable)
}

/// At startup: the marker says this build's layout, or (absent) the
/// database holds no data of the previous layout and the marker is set now;
/// anything else is refused with what to do.
pub async fn check(library: &Library, ns: &str) -> Result<(), EngineError> {
    let want = layout_name(LAYOUT);
    let key = layout_key(ns);
    match get(library, &key).await? {
        Some(l) if l == want => return Ok(()),
        Some(other) => return Err(refuse(&other)),
        None => {}
    }
    if has_previous(library, ns).await? {
        return Err(refuse(layout_name(PREVIOUS_LAYOUT)));
    }
    let mut c = library.conn.clone();
    redis::cmd("SET")
        .arg(&key)
        .arg(want)
        .arg("NX")
        .query_async::<()>(&mut c)
        .await
        .map_err(unavailable)?;
    match get(library, &key).await? {
        Some(l) if l == want => Ok(()),
        other => Err(refuse(other.as_deref().unwrap_or("unknown"))),
    }
}

/// What a migration moved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    pub customers: u64,
    pub idempotency_records: u64,
    pub receipts: u64,
    pub lock_ids: u64,
    /// Due indexes and sweep leases of the previous layout, deleted.
    pub removed: u64,
}

/// The first element of a msgpack array (a cg1 idempotency record is
/// `[fingerprint, expires_at, outcome]`) when it is a string.
fn msgpack_first_string(b: &[u8]) -> Option<String> {
    let rest = match *b.first()? {
        0x90..=0x9f => &b[1..],
        0xdc => b.get(3..)?,
        0xdd => b.get(5..)?,
        _ => return None,
    };
    let (len, at) = match *rest.first()? {
        t @ 0xa0..=0xbf => ((t & 0x1f) as usize, 1),
        0xd9 => (*rest.get(1)? as usize, 2),
        0xda => (
            u16::from_be_bytes([*rest.get(1)?, *rest.get(2)?]) as usize,
            3,
        ),
        0xdb => (
            u32::from_be_bytes([*rest.get(1)?, *rest.get(2)?, *rest.get(3)?, *rest.get(4)?])
                as usize,
            5,
        ),
        _ => return None,
    };
    String::from_utf8(rest.get(at..at + len)?.to_vec()).ok()
}

/// The feature an `Op::fingerprint` names (finalize names none).
fn fingerprint_feature(fp: &str) -> Option<&str> {
    let mut f = fp.split('\x1f');
    match f.next()? {
        "consume" | "track" => f.next(),
        "reserve" => f.nth(1),
        _ => None,
    }
}

/// `creditgate migrate`: converts every key of layout `cg1` under the
/// options' namespace into `cg2`, then writes the marker. Run it with every
/// sidecar stopped; running it again resumes or finds nothing to do.
pub async fn migrate(opts: RedisOptions, catalog: &Catalog) -> Result<MigrateReport, EngineError> {
    let c = conn::open(&opts.target, opts.timeout, &opts.tls).await?;
    let library = Library::new(c, opts.timeout, opts.accept_eviction);
    library.load().await?;
    let ns = &opts.namespace;
    let want = layout_name(LAYOUT);
    match get(&library, &layout_key(ns)).await? {
        Some(l) if l != want && l != layout_name(PREVIOUS_LAYOUT) => {
            return Err(EngineError::StoreUnavailable(Cause::msg(format!(
                "the data is layout {l}, which this build cannot migrate from"
            ))))
        }
        _ => {}
    }
    let retention = super::args::retention(opts.retention);
    let old = format!("{ns}{PREVIOUS_LAYOUT}");
    let mut all = vec![];
    for node in library.primaries().await? {
        all.extend(scan(&library, &node, &format!("{old}*"), 1000, usize::MAX).await?);
    }
    all.sort();
    all.dedup();
    let f = library.functions.clone();
    let mut report = MigrateReport::default();
    let mut later = vec![];
    let fcall = |function: String, ks: Vec<String>, args: Vec<String>| {
        let library = library.clone();
        async move {
            let refs: Vec<&str> = ks.iter().map(String::as_str).collect();
            let v = library
                .fcall(&function, &refs, &args)
                .await
                .map_err(|e| EngineError::Internal(Cause::new(e)))?;
            let first = array(v)?.into_iter().next().unwrap_or(Value::Nil);
            Ok::<bool, EngineError>(int(&first)? == 1)
        }
    };
    // Customers first (their records and receipts are separate keys).
    let mut records = vec![];
    for k in &all {
        let rest = &k[old.len()..];
        let Some(tag_and_tail) = rest.strip_prefix('{') else {
            later.push(k.clone());
            continue;
        };
        let Some((tag, tail)) = tag_and_tail.split_once('}') else {
            continue;
        };
        let Some(customer) = keys::unescape(tag) else {
            continue;
        };
        if tail.is_empty() {
            let from = keys::layout_keys(ns, PREVIOUS_LAYOUT, &customer);
            let to = keys::customer_keys(ns, &customer);
            let moved = fcall(
                f.migrate.clone(),
                vec![from.customer, from.due, to.customer, to.due],
                vec![String::new(), retention.clone(), customer.clone()],
            )
            .await?;
            report.customers += u64::from(moved);
        } else {
            records.push((k.clone(), customer, tail.to_string()));
        }
    }
    for (k, customer, tail) in records {
        let to = keys::customer_keys(ns, &customer);
        if let Some(key) = tail.strip_prefix(":i:") {
            let mut c = library.conn.clone();
            let raw: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&k)
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            let Some(raw) = raw else { continue };
            let mut args = vec![
                String::new(),
                retention.clone(),
                key.to_string(),
                "i".into(),
            ];
            let feature = msgpack_first_string(&raw);
            if let Some(pools) = feature
                .as_deref()
                .and_then(fingerprint_feature)
                .and_then(|f| catalog.pools_for(f).ok())
            {
                for p in pools {
                    args.push(p.pool);
                    args.push(p.cost.raw().to_string());
                }
            }
            let moved = fcall(
                f.migrate_key.clone(),
                vec![k.clone(), to.customer, to.due],
                args,
            )
            .await?;
            report.idempotency_records += u64::from(moved);
        } else if let Some(lock_id) = tail.strip_prefix(":f:") {
            let moved = fcall(
                f.migrate_key.clone(),
                vec![k.clone(), to.customer, to.due],
                vec![
                    String::new(),
                    retention.clone(),
                    lock_id.to_string(),
                    "f".into(),
                ],
            )
            .await?;
            report.receipts += u64::from(moved);
        }
        // `:l` (pending locks) moved with its customer.
    }
    // The lock-id index, then what only the old layout used.
    for k in later {
        let rest = &k[old.len()..];
        let mut c = library.conn.clone();
        if let Some(id) = rest.strip_prefix("lock:") {
            let to = format!("{ns}{LAYOUT}lock:{id}");
            let r: Result<(), _> = redis::cmd("RENAME")
                .arg(&k)
                .arg(&to)
                .query_async(&mut c)
                .await;
            if r.is_ok() {
                report.lock_ids += 1;
            }
        } else if rest.starts_with("due:") || rest.starts_with("sweep:") {
            let n: i64 = redis::cmd("DEL")
                .arg(&k)
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            report.removed += n as u64;
        }
    }
    let mut c = library.conn.clone();
    redis::cmd("SET")
        .arg(layout_key(ns))
        .arg(want)
        .query_async::<()>(&mut c)
        .await
        .map_err(unavailable)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_records_feature_comes_from_its_fingerprint() {
        // [ "consume\x1fapi_call\x1f30000", 1, [] ] as cmsgpack packs it.
        let mut b = vec![0x93, 0xa0 | 20];
        b.extend_from_slice(b"consume\x1fapi_call\x1f30000");
        b.extend_from_slice(&[0x01, 0x90]);
        let fp = msgpack_first_string(&b).unwrap();
        assert_eq!(fingerprint_feature(&fp), Some("api_call"));
        assert_eq!(
            fingerprint_feature("reserve\x1fL1\x1faction1\x1f10000\x1f"),
            Some("action1")
        );
        assert_eq!(fingerprint_feature("finalize\x1fL1\x1f1\x1f"), None);
    }
}
