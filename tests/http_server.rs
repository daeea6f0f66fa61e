//! The API through a real `server::run` on 127.0.0.1:0, and the binary:
//! its refusal of a bad configuration, its warnings, its plain logs to a
//! pipe, `reset-due` without Redis.

mod common;

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;

use common::http::*;
use serde_json::{json, Value};

struct Running {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start() -> Running {
    let h = harness();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(creditgate::server::run(listener, h.state, async {
        let _ = rx.await;
    }));
    Running {
        base,
        stop: Some(tx),
        task,
    }
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = client.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn seed_flow_over_tcp_and_graceful_shutdown() {
    let mut srv = start().await;
    let c = reqwest::Client::new();
    let b = &srv.base;
    let (s, _) = post(
        &c,
        format!("{b}/v1/customers.get_or_create"),
        json!({"customer_id": "a"}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, v) = post(
        &c,
        format!("{b}/v1/billing.attach"),
        json!({"customer_id": "a", "plan_id": "pro", "redirect_mode": "if_required"}),
    )
    .await;
    assert_eq!(
        (s, v),
        (
            200,
            json!({"success": true, "customer_id": "a", "payment_url": null})
        )
    );
    let (s, v) = post(
        &c,
        format!("{b}/v1/track"),
        json!({"customer_id": "a", "feature_id": "premium_message", "value": 15.0, "async": false}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["balance"]["remaining"], json!(50));
    let (_, v) = post(
        &c,
        format!("{b}/v1/check"),
        json!({"customer_id": "a", "feature_id": "basic_message", "required_balance": 51}),
    )
    .await;
    assert_eq!(v["allowed"], false);
    let r = c.get(format!("{b}/healthz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // 413 on a declared Content-Length over 64 KiB.
    let big = format!(
        r#"{{"customer_id":"a","feature_id":"basic_message","pad":"{}"}}"#,
        "x".repeat(65 * 1024)
    );
    let r = c
        .post(format!("{b}/v1/track"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "payload_too_large");

    // An in-flight request finishes after shutdown starts. `Expect:
    // 100-continue` makes the server say when the handler starts reading the
    // body: from then on the request is in flight.
    let addr = b.trim_start_matches("http://").to_string();
    let body = r#"{"customer_id":"a","feature_id":"basic_message","value":1}"#;
    let head = format!(
        "POST /v1/track HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut conn = tokio::task::spawn_blocking(move || {
        let mut conn = TcpStream::connect(&addr).unwrap();
        conn.write_all(head.as_bytes()).unwrap();
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"\r\n\r\n") {
            conn.read_exact(&mut byte).unwrap();
            seen.push(byte[0]);
        }
        assert!(
            seen.starts_with(b"HTTP/1.1 100"),
            "{}",
            String::from_utf8_lossy(&seen)
        );
        conn
    })
    .await
    .unwrap();
    srv.stop.take().unwrap().send(()).unwrap();
    let answer = tokio::task::spawn_blocking(move || {
        conn.write_all(body.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = conn.read_to_string(&mut out);
        out
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"remaining\":49"), "{answer}");
    srv.task.await.unwrap().unwrap();
    let addr = srv.base.trim_start_matches("http://").to_string();
    assert!(TcpStream::connect(&addr).is_err(), "stopped accepting");
}

#[test]
fn a_bad_configuration_exits_non_zero_naming_the_key_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, format!("redis_url = \"redis://127.0.0.1:6379\"\nredis_cluster = [\"127.0.0.1:7000\"]\n{CONFIG}")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("redis_cluster"), "{err}");

    std::fs::write(
        &path,
        CONFIG.replace("credit_cost = 0.2", "credit_cost = -1"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("CREDITGATE_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("features"), "{err}");

    // A typo inside [[features]] names its path; a syntax error its line
    // and column.
    std::fs::write(&path, CONFIG.replacen("credit_schema", "credit_shema", 1)).unwrap();
    let out = serve_output(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(".credit_shema`: unknown field"), "{err}");
    std::fs::write(&path, format!("{CONFIG}\n[gate\n")).unwrap();
    let out = serve_output(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = CONFIG.lines().count() + 2;
    assert!(
        err.contains(&format!(
            "creditgate: configuration file line {line}, column "
        )),
        "{err}"
    );

    // A ledger database that cannot be opened stops the start, named,
    // before Redis is asked and before any entry could be written.
    std::fs::write(
        &path,
        format!(
            "redis_url = \"redis://127.0.0.1:1\"\n{CONFIG}\n[ledger]\nurl = \"sqlite://{}\"\n",
            dir.path().join("missing-dir").join("l.db").display()
        ),
    )
    .unwrap();
    let out = serve_output(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ledger.url") && err.contains("ledger database"),
        "{err}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(["serve", "--config"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

fn serve_output(path: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(["serve", "--config"])
        .arg(path)
        .env("CREDITGATE_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap()
}

/// Runs `serve` with stderr to a pipe until it logs that it listens, then
/// stops it; returns what it logged.
#[test]
fn logs_to_a_pipe_are_plain_and_name_a_misspelt_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("creditgate.toml");
    std::fs::write(&path, CONFIG).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("CREDITGATE_LISTEN", "127.0.0.1:0")
        .env("CREDITGATE_REDIS_URLL", "redis://127.0.0.1:1")
        .env_remove("CREDITGATE_REDIS_URL")
        .env_remove("CREDITGATE_REDIS_CLUSTER")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut logged = String::new();
    while !logged.contains("creditgate listening") {
        if stderr.read_line(&mut logged).unwrap() == 0 {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(logged.contains("creditgate listening"), "{logged}");
    assert!(!logged.contains('\x1b'), "ANSI codes in a pipe: {logged:?}");
    assert!(
        logged.contains(
            "environment variable CREDITGATE_REDIS_URLL names no configuration key and is \
             ignored; did you mean CREDITGATE_REDIS_URL?"
        ),
        "{logged}"
    );
    assert!(logged.contains("NO REDIS CONFIGURED"), "{logged}");
}

#[test]
fn reset_due_without_redis_says_there_is_nothing_to_sweep_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("creditgate.toml");
    std::fs::write(&path, CONFIG).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .args(["reset-due", "--config"])
        .arg(&path)
        .env_remove("CREDITGATE_REDIS_URL")
        .env_remove("CREDITGATE_REDIS_CLUSTER")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "no \"swept 0 customers\"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing to sweep"), "{err}");
    assert!(err.contains("redis_url"), "{err}");
}

#[test]
fn the_demo_prints_the_seed_example() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .arg("demo")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0 credits left"), "{text}");
    assert!(text.contains("next basic message: denied"), "{text}");
}
