//! A real PostgreSQL for tests, in its own temporary directory on its own
//! loopback port, trust auth, stopped on drop (and when the test process
//! ends: it runs under the same watchdog shell as redis-server). As root it
//! runs as the `postgres` user (PostgreSQL refuses root). `None` (with the
//! reason printed) when no PostgreSQL is installed.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command};
use std::time::{Duration, Instant};

pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    as_postgres: bool,
    child: Option<(Child, ChildStdin)>,
}

/// The newest `/usr/lib/postgresql/<v>/bin` with `initdb`, or `PG_BIN`.
fn find_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PG_BIN") {
        return Some(PathBuf::from(p));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Postgres {
    pub fn start() -> Option<Postgres> {
        let Some(bin) = find_bin() else {
            eprintln!(
                "SKIPPED: PostgreSQL not found (no /usr/lib/postgresql/*/bin/initdb, no PG_BIN); \
                 Debian: apt-get install postgresql"
            );
            return None;
        };
        let as_postgres = is_root();
        let dir = tempfile::tempdir().expect("temp dir for postgres");
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                eprintln!("SKIPPED: running as root and cannot chown the data dir to `postgres`");
                return None;
            }
        }
        let mut pg = Postgres {
            port: free_port(),
            bin,
            dir,
            as_postgres,
            child: None,
        };
        let out = pg
            .command("initdb")
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "-D"])
            .arg(pg.data())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.resume();
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn prefix(&self) -> String {
        if self.as_postgres {
            "runuser -u postgres -- ".into()
        } else {
            String::new()
        }
    }

    /// Starts (again) on the same port and data; waits until it accepts.
    pub fn resume(&mut self) {
        let d = self.data();
        let script = format!(
            "{pre}'{bin}/postgres' -D '{d}' -p {port} -k '{dir}' -c listen_addresses=127.0.0.1 \
             -c fsync=off >>'{dir}/log' 2>&1 & cat >/dev/null; \
             {pre}'{bin}/pg_ctl' -D '{d}' -m immediate stop >/dev/null 2>&1",
            pre = self.prefix(),
            bin = self.bin.display(),
            d = d.display(),
            port = self.port,
            dir = self.dir.path().display(),
        );
        let mut child = super::redis::spawn_watched(&script);
        let stdin = child.stdin.take().unwrap();
        self.child = Some((child, stdin));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self
                .command("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start in 30 s: {}",
                std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it at once (`pg_ctl stop -m immediate`) and waits.
    pub fn stop(&mut self) {
        if let Some((mut child, mut stdin)) = self.child.take() {
            let _ = stdin.flush();
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// A fresh database on this server; its URL.
    pub fn database(&self, name: &str) -> String {
        let out = self
            .command("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-c"])
            .arg(format!("CREATE DATABASE {name}"))
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "create database: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
