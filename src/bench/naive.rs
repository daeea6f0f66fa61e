//! The baseline sidecar `creditgate bench` serves itself (in a child
//! process, as a real sidecar would run): `POST /hello` parses the consuming
//! check's body and answers; `POST /check_cm` parses it and makes one EVALSHA
//! of the minimal script through one multiplexed `ConnectionManager`. The
//! equivalent of the shared `naive-sidecar`, so the two agree within noise.
//!
//! Also here: starting child sidecars that die with the bench.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use super::redis_side;

#[derive(Deserialize)]
struct CheckReq {
    customer_id: String,
    #[allow(dead_code)]
    feature_id: String,
    required_balance: i64,
}

#[derive(Serialize)]
struct CheckResp {
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining: Option<i64>,
}

struct Naive {
    cm: ConnectionManager,
    sha: String,
}

async fn hello(Json(_req): Json<CheckReq>) -> Json<CheckResp> {
    Json(CheckResp {
        allowed: true,
        remaining: None,
    })
}

async fn check_cm(
    State(st): State<Arc<Naive>>,
    Json(req): Json<CheckReq>,
) -> Result<Json<CheckResp>, StatusCode> {
    let mut cm = st.cm.clone();
    let (allowed, remaining): (i64, i64) = redis::cmd("EVALSHA")
        .arg(&st.sha)
        .arg(2)
        .arg(format!("{{{}}}:monthly", req.customer_id))
        .arg(format!("{{{}}}:oneoff", req.customer_id))
        .arg(req.required_balance)
        .query_async(&mut cm)
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    Ok(Json(CheckResp {
        allowed: allowed == 1,
        remaining: Some(remaining),
    }))
}

/// `creditgate bench naive-sidecar`: serves until SIGINT / SIGTERM (the
/// bench runs it under a shell that kills it when the bench ends).
pub async fn serve(listen: SocketAddr, redis_url: &str) -> Result<(), String> {
    let cm = redis_side::connect(redis_url).await?;
    let sha = redis_side::load_minimal(&cm).await?;
    let app = Router::new()
        .route("/hello", post(hello))
        .route("/check_cm", post(check_cm))
        .with_state(Arc::new(Naive { cm, sha }));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    axum::serve(listener, app)
        .with_graceful_shutdown(crate::server::shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

/// A sidecar process the bench started: killed when dropped, and (being
/// run under a shell that waits for our end of its stdin to close) also when
/// the bench dies any other way.
pub struct Sidecar {
    pub name: String,
    pub url: String,
    pub pid: u32,
    child: Child,
    log: std::path::PathBuf,
}

/// A free loopback port (bound, then released).
pub fn free_addr() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Sidecar {
    /// Runs `exe args…` with `env`, waits until `ready_path` answers 200.
    pub async fn start(
        name: &str,
        args: &[String],
        env: &[(String, String)],
        addr: SocketAddr,
        ready_path: &str,
        dir: &Path,
    ) -> Result<Sidecar, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let log = dir.join(format!("{name}.log"));
        let cmdline = std::iter::once(exe.display().to_string())
            .chain(args.iter().cloned())
            .map(|a| quote(&a))
            .collect::<Vec<_>>()
            .join(" ");
        // The shell starts the sidecar, prints its pid, then waits for EOF on
        // stdin: whenever the bench ends, the pipe closes and it is killed.
        let script = format!(
            "{cmdline} </dev/null >>{log} 2>&1 & pid=$!; echo $pid; cat >/dev/null; kill $pid 2>/dev/null; wait $pid",
            log = quote(&log.display().to_string())
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let pid: u32 = line
            .trim()
            .parse()
            .map_err(|_| format!("{name}: no pid from the shell"))?;
        let s = Sidecar {
            name: name.to_string(),
            url: format!("http://{addr}"),
            pid,
            child,
            log,
        };
        let client = super::http::Client::new(&s.url).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ready_path.is_empty() {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    return Ok(s);
                }
            } else if let Ok(200) = client.get_status(ready_path).await {
                return Ok(s);
            }
            if Instant::now() > deadline || !Path::new(&format!("/proc/{}", s.pid)).exists() {
                let log = std::fs::read_to_string(&s.log).unwrap_or_default();
                return Err(format!("{name} did not become ready; its log:\n{log}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        // Closing stdin makes the shell kill the sidecar and exit.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // USER_HZ is 100 on Linux.
    Some((utime + stime) / 100.0)
}
