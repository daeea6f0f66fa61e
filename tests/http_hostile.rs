//! Hostile clients cannot hold the server: a real `creditgate serve` whose
//! open-file limit is 1,024, held by 500 clients sending their headers a
//! byte at a time and 2,000 idle connections, still answers a normal request
//! within a second; the slow clients are closed by the header timeout, and
//! an idle keep-alive connection by the idle timeout.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `creditgate serve` (in-process engine) under `ulimit -n 1024`.
fn start(header_timeout_ms: u64, idle_timeout_ms: u64) -> Server {
    start_with(
        header_timeout_ms,
        idle_timeout_ms,
        "",
        Stdio::null(),
        "warn",
    )
}

fn start_with(
    header_timeout_ms: u64,
    idle_timeout_ms: u64,
    extra: &str,
    stderr: Stdio,
    log: &str,
) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("creditgate.toml");
    let mut f = std::fs::File::create(&config).unwrap();
    writeln!(
        f,
        "listen = \"127.0.0.1:{port}\"\nhttp_header_timeout_ms = {header_timeout_ms}\nhttp_idle_timeout_ms = {idle_timeout_ms}\n{extra}\n[[features]]\nid = \"api_call\""
    )
    .unwrap();
    let child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 1024 && exec \"$0\" serve --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_creditgate"))
        .arg(&config)
        .env("RUST_LOG", log)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start creditgate");
    Server {
        child,
        port,
        _dir: dir,
    }
}

async fn healthz(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

async fn wait_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(answer) = healthz(port).await {
            if answer.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "creditgate did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resolves when the server closes `s` (EOF or reset).
async fn closed(mut s: TcpStream) {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_cannot_hold_the_server() {
    // This test holds 2,500 sockets of its own.
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let server = start(4_000, 60_000);
    let port = server.port;
    wait_ready(port).await;

    // 500 clients sending a request's headers a byte at a time.
    let mut slow = Vec::new();
    for _ in 0..500 {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        slow.push(tokio::spawn(async move {
            let (mut r, mut w) = s.into_split();
            let dribble = async {
                for b in b"GET /healthz HTTP/1.1\r\nhost: x\r\n".iter().cycle() {
                    if w.write_all(&[*b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            };
            let started = Instant::now();
            let mut buf = [0u8; 64];
            tokio::select! {
                _ = dribble => {}
                _ = async { loop { match r.read(&mut buf).await { Ok(0) | Err(_) => break, Ok(_) => {} } } } => {}
            }
            started.elapsed()
        }));
    }
    // 2,000 idle connections: more, with the slow ones, than the server's
    // open-file limit allows.
    let mut idle = Vec::new();
    for _ in 0..2000 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)).await {
            idle.push(s);
        }
    }
    assert!(idle.len() >= 1900, "only {} idle connections", idle.len());

    // A normal request is still answered, within a second.
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(1), healthz(port))
        .await
        .expect("answered within a second")
        .expect("answered");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // The slow clients are closed by the header timeout (4 s), none lives on.
    for h in slow {
        let lived = tokio::time::timeout(Duration::from_secs(15), h)
            .await
            .expect("a slow client was closed")
            .unwrap();
        assert!(lived < Duration::from_secs(10), "lived {lived:?}");
    }
    // Still serving afterwards.
    assert!(healthz(port).await.unwrap().starts_with("HTTP/1.1 200"));
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed() {
    let server = start(10_000, 1_000);
    let port = server.port;
    wait_ready(port).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // Kept alive, then closed once idle for the idle timeout (1 s).
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), closed(s))
        .await
        .expect("the idle connection was closed");
    assert!(started.elapsed() >= Duration::from_millis(900));
}

/// Refusals anyone can cause (no key, a wrong key, an unknown route) are not
/// logged one line each at the default level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_do_not_flood_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let server = start_with(
        10_000,
        60_000,
        "api_keys = [\"sk_app\"]",
        Stdio::from(log),
        "info",
    );
    let port = server.port;
    wait_ready(port).await;
    let before = std::fs::read_to_string(&log_path).unwrap().lines().count();
    for i in 0..300 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let req = match i % 3 {
            0 => "POST /v1/check HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}".to_string(),
            1 => "POST /v1/check HTTP/1.1\r\nhost: x\r\nauthorization: Bearer nope\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}".to_string(),
            _ => "GET /nowhere HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_string(),
        };
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 4"), "{out}");
    }
    let after = std::fs::read_to_string(&log_path).unwrap().lines().count();
    assert!(
        after - before < 5,
        "{} log lines for 300 refusals",
        after - before
    );
}
