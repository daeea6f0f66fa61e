//! Key layout `cg2` (lua/README.md § 4). Every key of one customer carries
//! the same hash tag, derived from the customer id by an injective escaping,
//! so a function touches one Redis Cluster slot and no id can reach another
//! customer's keys.
//!
//! - `<ns>cg2:{<tag>}`: hash: the customer record (field `\x1f`) and one
//!   field per pool holding that pool's buckets;
//! - `<ns>cg2:{<tag>}:l`: hash: pending locks, field `<lock id>`;
//! - `<ns>cg2:{<tag>}:f:<lock id>`: a finalized lock's receipt (PX retention);
//! - `<ns>cg2:due:{<slot tag>}`: sorted set, one per cluster slot: member the
//!   customer's tag, score the earliest instant something of it is due;
//! - `<ns>cg2:due:{<slot tag>}:i:<window>`: the slot's idempotency records
//!   written in one retention window (hash, PX);
//! - `<ns>cg2:due:{<slot tag>}:ledger`: stream, the slot's ledger entries
//!   not yet in the database (issue 14; lua/README.md § 12);
//! - `<ns>cg:layout`: the layout marker (`cg2`).

use std::sync::OnceLock;

/// The layout, part of every key (the library's, read from its name).
pub const LAYOUT: &str = "cg2:";

/// The previous layout, which `creditgate migrate` reads.
pub const PREVIOUS_LAYOUT: &str = "cg1:";

/// The key holding the layout of the data, under a namespace.
pub fn layout_key(ns: &str) -> String {
    format!("{ns}cg:layout")
}

/// Number of Redis Cluster slots.
pub const SLOTS: usize = 16384;

/// Percent-encodes `{`, `}`, `%`, `:`, space, control and non-ASCII bytes.
/// Injective: `%` itself is escaped, and every escape is `%` + two hex digits.
pub fn escape(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for &b in id.as_bytes() {
        if b.is_ascii_graphic() && !matches!(b, b'{' | b'}' | b'%' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Inverts [`escape`]; `None` for a string `escape` cannot produce.
pub fn unescape(tag: &str) -> Option<String> {
    let b = tag.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            if hex.bytes().any(|c| c.is_ascii_lowercase()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let id = String::from_utf8(out).ok()?;
    (escape(&id) == tag).then_some(id)
}

/// The slot Redis Cluster assigns a whole key (its hash tag if it has one).
pub fn key_slot(key: &str) -> usize {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return slot(&key[open + 1..open + 1 + len]);
            }
        }
    }
    slot(key)
}

/// CRC16-CCITT (XMODEM), as Redis Cluster hashes keys.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The cluster slot of a hash tag's content.
pub fn slot(tag: &str) -> usize {
    crc16(tag.as_bytes()) as usize % SLOTS
}

/// For every slot, a short string whose slot is that one (the due index's tag).
pub fn slot_tags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); SLOTS];
        let mut left = SLOTS;
        let mut n: u64 = 0;
        while left > 0 {
            let s = base36(n);
            let t = &mut tags[slot(&s)];
            if t.is_empty() {
                *t = s;
                left -= 1;
            }
            n += 1;
        }
        tags
    })
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![];
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// The ledger stream of the slot whose due index is `due_key`.
pub fn ledger_stream(due_key: &str) -> String {
    format!("{due_key}:ledger")
}

/// Every slot's ledger stream under namespace `ns`, in slot order.
pub fn ledger_streams(ns: &str) -> Vec<String> {
    slot_tags()
        .iter()
        .map(|t| ledger_stream(&format!("{ns}{LAYOUT}due:{{{t}}}")))
        .collect()
}

/// The keys of one customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerKeys {
    /// The customer hash: `KEYS[1]` of every function on a customer.
    pub customer: String,
    /// The pending locks (`<customer>:l`; the library derives it).
    pub locks: String,
    /// The due index of the customer's slot: `KEYS[2]`.
    pub due: String,
    /// The hash tag: the escaped id, the due index's member.
    pub tag: String,
}

/// Builds the keys of `customer_id` under namespace `ns` (empty in production).
pub fn customer_keys(ns: &str, customer_id: &str) -> CustomerKeys {
    layout_keys(ns, LAYOUT, customer_id)
}

/// The customer hash of a hash tag (a due index's member).
pub fn customer_key_of_tag(ns: &str, layout: &str, tag: &str) -> String {
    format!("{ns}{layout}{{{tag}}}")
}

/// The keys of `customer_id` in `layout` (`cg2:`, or `cg1:` to migrate).
pub fn layout_keys(ns: &str, layout: &str, customer_id: &str) -> CustomerKeys {
    let tag = escape(customer_id);
    let customer = customer_key_of_tag(ns, layout, &tag);
    let due = format!("{ns}{layout}due:{{{}}}", slot_tags()[slot(&tag)]);
    CustomerKeys {
        locks: format!("{customer}:l"),
        customer,
        due,
        tag,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_injective_and_tag_safe() {
        assert_eq!(escape("cus_123"), "cus_123");
        assert_eq!(escape("a{b}:c d%"), "a%7Bb%7D%3Ac%20d%25");
        assert_eq!(escape("é"), "%C3%A9");
        assert_ne!(escape("%7B"), escape("{"));
        let k = customer_keys("", "x}:{y");
        assert_eq!(k.customer, "cg2:{x%7D%3A%7By}");
        for id in ["cus_1", "a{b}:c d%", "é", "%7B", "x}:{y"] {
            assert_eq!(unescape(&escape(id)).as_deref(), Some(id));
        }
        assert_eq!(unescape("%7b"), None);
        assert_eq!(unescape("%C3"), None);
        assert_eq!(unescape("a%2"), None);
        assert_eq!(key_slot("cg2:{cus_1}:l"), slot("cus_1"));
    }

    #[test]
    fn crc16_matches_redis() {
        // Redis Cluster spec test vector.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot("foo"), 12182);
    }

    #[test]
    fn every_slot_has_a_tag() {
        let tags = slot_tags();
        for (i, t) in tags.iter().enumerate() {
            assert_eq!(slot(t), i);
            assert!(t.len() <= 4);
        }
        let k = customer_keys("", "cus_1");
        let due_tag = k.due.split('{').nth(1).unwrap().trim_end_matches('}');
        assert_eq!(slot(due_tag), slot("cus_1"));
    }
}
