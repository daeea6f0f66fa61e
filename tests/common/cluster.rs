//! A real Redis Cluster for tests: three masters started from `redis-server`
//! on loopback, each in its own temporary directory, joined with
//! `redis-cli --cluster create`. Each node runs under a watchdog shell that
//! kills it when our end of its stdin closes: when the handle drops, and when
//! the test process ends for any reason (so a cluster kept in a static for a
//! whole test binary never outlives it).
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, ChildStdin, Command};
use std::time::{Duration, Instant};

pub struct RedisCluster {
    children: Vec<Child>,
    lifelines: Vec<ChildStdin>,
    pub ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

/// A port that is free now, with its cluster bus port (port + 10000) free too.
fn free_port_pair() -> u16 {
    for _ in 0..1000 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = l.local_addr().unwrap().port();
        if port > 55_000 {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl RedisCluster {
    /// Starts `masters` nodes and waits (bounded) until the cluster is ok.
    pub fn start(masters: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("cluster temp dir");
        let mut children = Vec::new();
        let mut lifelines = Vec::new();
        let mut ports = Vec::new();
        for i in 0..masters {
            let port = free_port_pair();
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let script = format!(
                "redis-server --port {port} --bind 127.0.0.1 --cluster-enabled yes \
                 --cluster-config-file nodes.conf --save '' --appendonly no \
                 --protected-mode no --dir '{dir}' >/dev/null 2>&1 & pid=$!; \
                 cat >/dev/null; kill $pid; wait $pid; rm -rf '{dir}'; rmdir '{parent}' 2>/dev/null",
                dir = node_dir.display(),
                parent = dir.path().display()
            );
            let mut child = super::redis::spawn_watched(&script);
            lifelines.push(child.stdin.take().expect("watchdog stdin"));
            children.push(child);
            ports.push(port);
        }
        let cluster = RedisCluster {
            children,
            lifelines,
            ports,
            _dir: dir,
        };
        for &p in &cluster.ports {
            cluster.wait_until(|| cli(p, &["PING"]).trim() == "PONG", "node answers PING");
        }
        let addrs: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let mut args: Vec<&str> = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = Command::new("redis-cli")
            .args(&args)
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for &p in &cluster.ports {
            cluster.wait_until(
                || cli(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"),
                "cluster_state:ok",
            );
        }
        cluster
    }

    /// `redis://` URLs of every node, for a cluster client.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The port of the node serving `key`'s slot.
    pub fn node_for(&self, key: &str) -> u16 {
        let slot: u16 = cli(self.ports[0], &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("keyslot");
        let nodes = cli(self.ports[0], &["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let port: u16 = fields[1]
                .split(['@', ':'])
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            for range in &fields[8..] {
                let (lo, hi) = match range.split_once('-') {
                    Some((a, b)) => (a.parse::<u16>().unwrap_or(1), b.parse::<u16>().unwrap_or(0)),
                    None => (range.parse().unwrap_or(1), range.parse().unwrap_or(0)),
                };
                if (lo..=hi).contains(&slot) {
                    return port;
                }
            }
        }
        panic!("no node serves slot {slot}");
    }

    fn wait_until(&self, mut ready: impl FnMut() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready() {
            assert!(
                Instant::now() < deadline,
                "redis cluster: timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // Closing the lifelines makes each watchdog kill its node.
        self.lifelines.clear();
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}
