//! A real `redis-server` for tests: one per test binary, started on first
//! use on a unix socket in its own temporary directory with
//! `--save '' --appendonly no`, and killed when the test process ends (even
//! on panic or abort: it runs under a shell that kills it when our end of its
//! stdin pipe closes). Each engine gets its own key namespace, so tests share
//! the server without sharing customers.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use creditgate::engine::redis::{RedisEngine, RedisOptions};
use creditgate::model::Retention;
use creditgate::{Clock, ManualClock};

pub struct RedisServer {
    pub socket: PathBuf,
    _child: Mutex<Child>,
    /// Holding it keeps the server alive; closing it (process exit) kills it.
    _lifeline: Mutex<Option<ChildStdin>>,
    _dir: tempfile::TempDir,
}

/// Runs `script` (which starts a server in the background, then waits for EOF
/// on stdin and kills it) under `sh`, with its stdin piped from us: when the
/// returned child's stdin closes (drop, or this process ending for any
/// reason), the server dies. `setsid` takes the watchdog out of our process
/// group, so a signal to the group (Ctrl-C, `timeout`) cannot kill it before
/// it kills the server.
pub fn spawn_watched(script: &str) -> Child {
    let (program, args) = if Path::new("/usr/bin/setsid").exists() {
        ("/usr/bin/setsid", vec!["sh", "-c"])
    } else {
        ("sh", vec!["-c"])
    };
    Command::new(program)
        .args(args)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server (is it installed? see README)")
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let socket = dir.path().join("redis.sock");
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        // The shell starts redis-server, then waits for EOF on its stdin: when
        // this process ends for any reason, the pipe closes and it kills redis.
        let script = format!(
            "'{bin}' --port 0 --unixsocket '{sock}' --unixsocketperm 700 --save '' \
             --appendonly no --dir '{dir}' --maxmemory-policy noeviction \
             >'{dir}/log' 2>&1 & pid=$!; cat >/dev/null; kill $pid; wait $pid; rm -rf '{dir}'",
            sock = socket.display(),
            dir = dir.path().display(),
        );
        let mut child = spawn_watched(&script);
        let lifeline = child.stdin.take();
        let server = RedisServer {
            socket,
            _child: Mutex::new(child),
            _lifeline: Mutex::new(lifeline),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.cli(&["PING"]).trim() != "PONG" {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING in 20 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    /// The shared server of this test binary.
    pub fn shared() -> &'static RedisServer {
        static SERVER: OnceLock<RedisServer> = OnceLock::new();
        SERVER.get_or_init(RedisServer::start)
    }

    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Runs `redis-cli` against this server; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a shell command with `$CLI` set to redis-cli on this server.
    pub fn sh(&self, cwd: &std::path::Path, command: &str) -> String {
        let out = Command::new("sh")
            .arg("-c")
            .arg(command)
            .env(
                "CLI",
                format!("redis-cli -s {} --no-raw", self.socket.display()),
            )
            .current_dir(cwd)
            .stdin(Stdio::null())
            .output()
            .expect("run sh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the server and waits until it has exited.
    pub fn stop_now(&self) {
        if let Some(mut s) = self._lifeline.lock().unwrap().take() {
            let _ = s.flush();
        }
        let _ = self._child.lock().unwrap().wait();
    }
}

/// A fresh namespace on the shared server.
pub fn namespace() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("t{}:", NEXT.fetch_add(1, Ordering::SeqCst))
}

/// A Redis engine on the shared server, in its own namespace, reading `clock`.
pub async fn engine(
    catalog: Arc<creditgate::model::Catalog>,
    clock: Arc<ManualClock>,
    retention: Retention,
) -> RedisEngine {
    let server = RedisServer::shared();
    let opts = RedisOptions {
        namespace: namespace(),
        retention,
        ..RedisOptions::standalone(&server.url())
    };
    let clock: Arc<dyn Clock> = clock;
    RedisEngine::connect(opts, catalog, Some(clock))
        .await
        .expect("connect the redis engine")
}

/// A Redis engine on the shared server, in its own namespace, on Redis's
/// own clock (`TIME`), as in production.
pub async fn engine_on_redis_time(
    catalog: Arc<creditgate::model::Catalog>,
    retention: Retention,
) -> RedisEngine {
    let server = RedisServer::shared();
    let opts = RedisOptions {
        namespace: namespace(),
        retention,
        ..RedisOptions::standalone(&server.url())
    };
    RedisEngine::connect(opts, catalog, None)
        .await
        .expect("connect the redis engine")
}
