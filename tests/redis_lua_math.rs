//! The Lua library's arithmetic and calendar against the Rust, over the whole
//! documented range: charges and affordable units (rounding included), the
//! exact mul-div, integer formatting, and month arithmetic.

mod common;

use common::redis::RedisServer;
use creditgate::calendar::{add_months, civil_from_ms, Interval, Period, MAX_INSTANT_MS};
use creditgate::engine::redis::LIBRARY;
use creditgate::money::{affordable_units, charge, Cost, MAX_AMOUNT_RAW, MAX_COST_RAW};
use proptest::prelude::*;

const HUGE: i128 = 1 << 53;

fn base36(x: i64) -> String {
    let mut n = x.unsigned_abs();
    let mut d = vec![];
    loop {
        d.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    if x < 0 {
        d.push(b'-');
    }
    d.reverse();
    String::from_utf8(d).unwrap()
}

/// The library's internals as an EVAL chunk: the file without line 1 (the
/// `#!lua` shebang) and its registrations, the standard library bound.
fn library_for_eval() -> String {
    let body = LIBRARY.split_once('\n').unwrap().1;
    let cut = body
        .find("\n-- Registration.")
        .expect("a registration section");
    format!("{}\nbind()\nbind_pairs()\n", &body[..cut])
}

/// Runs `body` (after the library, in a function of its own: a chunk holds
/// at most 200 locals) with `args`; returns the reply as strings.
fn eval(body: &str, args: &[String]) -> Vec<String> {
    let server = RedisServer::shared();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let script = format!("{}\nreturn (function()\n{body}\nend)()", library_for_eval());
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(0).arg(args);
    cmd.query(&mut conn).expect("eval")
}

const MONEY: &str = r#"
local out = {}
for i = 1, #ARGV, 4 do
  local u, c, a, b = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  out[#out + 1] = fmt(charge(u, c))
  out[#out + 1] = fmt(affordable(a, c))
  local took, paid = cover(u, a, c)
  out[#out + 1] = fmt(took) .. ',' .. fmt(paid)
  out[#out + 1] = fmt((muldiv(u, b, a + 1)))
end
return out
"#;

fn rust_money(u: i64, c: i64, a: i64, b: i64) -> Vec<String> {
    let cost = Cost::from_raw(c).unwrap();
    let ch = charge(u, cost).min(HUGE);
    let af = affordable_units(a, cost);
    let af = if af >= HUGE - 16 { HUGE } else { af };
    let took = (u as i128).min(affordable_units(a, cost)).max(0) as i64;
    let paid = charge(took, cost);
    let md = (u as i128 * b as i128) / (a as i128 + 1);
    vec![
        ch.to_string(),
        af.to_string(),
        format!("{took},{paid}"),
        md.min(HUGE).to_string(),
    ]
}

fn raw_units() -> impl Strategy<Value = i64> {
    prop_oneof![
        0i64..=MAX_AMOUNT_RAW,
        0i64..100_000_000,
        prop::sample::select(vec![
            0,
            1,
            9_999,
            10_000,
            999_999,
            1_000_000,
            MAX_AMOUNT_RAW - 1,
            MAX_AMOUNT_RAW
        ]),
    ]
}

fn raw_cost() -> impl Strategy<Value = i64> {
    prop_oneof![
        1i64..=MAX_COST_RAW,
        1i64..2_000_000,
        prop::sample::select(vec![
            1,
            3,
            333_333,
            999_999,
            1_000_000,
            1_000_001,
            MAX_COST_RAW
        ]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn charges_match_rust(rows in prop::collection::vec(
        (raw_units(), raw_cost(), prop_oneof![raw_units(), (0i64..=2 * MAX_AMOUNT_RAW)], raw_units()),
        1..300,
    )) {
        let mut args = vec![];
        let mut want = vec![];
        for &(u, c, a, b) in &rows {
            args.extend([u, c, a, b].map(|x| x.to_string()));
            want.extend(rust_money(u, c, a, b));
        }
        let got = eval(MONEY, &args);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            prop_assert_eq!(g, w, "row {:?} item {}", rows[i / 4], i % 4);
        }
        prop_assert_eq!(got.len(), want.len());
    }

    #[test]
    fn integers_format_exactly(xs in prop::collection::vec(-(1i64 << 53)..=(1i64 << 53), 1..200)) {
        let args: Vec<String> = xs.iter().map(|x| x.to_string()).collect();
        let got = eval("local o = {} for i, a in ipairs(ARGV) do o[i] = fmt(tonumber(a)) end return o", &args);
        prop_assert_eq!(&got, &args);
        // Base 36 as stored: round trip, and the same digits as Rust's.
        let got = eval("local o = {} for i, a in ipairs(ARGV) do local n = tonumber(a) o[i] = e36(n) .. ' ' .. fmt(d36(e36(n))) end return o", &args);
        let want: Vec<String> = xs.iter().map(|&x| format!("{} {x}", base36(x))).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn calendar_matches_rust(rows in prop::collection::vec(
        (0i64..=MAX_INSTANT_MS / 2, 0i64..1200, 0usize..9, 1u32..13, 0i64..=MAX_INSTANT_MS / 2),
        1..200,
    )) {
        let body = r#"
local out = {}
for i = 1, #ARGV, 5 do
  local t, m, code, count, d = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  local y, mo, dd, tod = civil_from_ms(t)
  out[#out + 1] = fmt(add_months(t, m)) .. ' ' .. fmt(y) .. '-' .. fmt(mo) .. '-' .. fmt(dd) .. ' ' .. fmt(tod)
  local p = make_period(code, count)
  if p then
    local i = last_index_at_or_before(p, t, t + d)
    out[#out + 1] = fmt(i) .. ' ' .. fmt(boundary(p, t, i + 1)) .. ' ' .. fmt(nominal_ms(p))
  else
    out[#out + 1] = 'none'
  end
end
return out
"#;
        let mut args = vec![];
        let mut want = vec![];
        for &(t, m, code, count, d) in &rows {
            args.extend([t, m, code as i64, count as i64, d].map(|x| x.to_string()));
            let (y, mo, dd, tod) = civil_from_ms(t);
            want.push(format!("{} {y}-{mo}-{dd} {tod}", add_months(t, m)));
            match Period::new(Interval::from_code(code as u8).unwrap(), count) {
                Some(p) => {
                    let i = p.last_index_at_or_before(t, t + d);
                    want.push(format!("{i} {} {}", p.boundary(t, i + 1), p.nominal_ms()));
                }
                None => want.push("none".into()),
            }
        }
        let got = eval(body, &args);
        prop_assert_eq!(got, want);
    }
}
