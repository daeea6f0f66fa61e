//! A real Redis Cluster for tests: masters (and optionally one replica
//! each) started from `redis-server` on loopback, each in its own temporary
//! directory, joined with `redis-cli --cluster create`. Each node runs under a watchdog shell that
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
    dir: tempfile::TempDir,
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

/// Starts a node on `port` in `dir` under a watchdog that kills it when our
/// end of its stdin closes; its pid in `dir/pid`. The directory (and the
/// node's cluster configuration) outlives a `kill -9`, so the node can be
/// started again and rejoin.
fn launch(port: u16, dir: &std::path::Path, node_timeout: u64) -> Child {
    let script = format!(
        "redis-server --port {port} --bind 127.0.0.1 --cluster-enabled yes \
         --cluster-config-file nodes.conf --cluster-node-timeout {node_timeout} \
         --cluster-require-full-coverage no \
         --save '' --appendonly no --repl-diskless-sync-delay 0 \
         --protected-mode no --dir '{dir}' >>'{dir}/log' 2>&1 & pid=$!; echo $pid >'{dir}/pid'; \
         cat >/dev/null; kill -9 $pid 2>/dev/null; wait $pid",
        dir = dir.display(),
    );
    super::redis::spawn_watched(&script)
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
        RedisCluster::start_with_replicas(masters, 0)
    }

    /// `masters` primaries with `replicas` replicas each; with replicas the
    /// node timeout is 1 s, so a replica takes over a failed primary within
    /// a few seconds.
    pub fn start_with_replicas(masters: usize, replicas: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("cluster temp dir");
        let mut children = Vec::new();
        let mut lifelines = Vec::new();
        let mut ports = Vec::new();
        let node_timeout = if replicas > 0 { 1000 } else { 15000 };
        for i in 0..masters * (1 + replicas) {
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            // A free port can be taken by another test between the pick
            // and the bind: a node that does not answer in 10 s is stopped
            // and started again on another port.
            let mut attempt = 0;
            let (child, lifeline, port) = loop {
                let port = free_port_pair();
                let mut child = launch(port, &node_dir, node_timeout);
                let lifeline = child.stdin.take().expect("watchdog stdin");
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline && cli(port, &["PING"]).trim() != "PONG" {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if cli(port, &["PING"]).trim() == "PONG" {
                    break (child, lifeline, port);
                }
                attempt += 1;
                assert!(attempt < 5, "redis cluster: node {i} never answered PING");
                drop(lifeline); // the watchdog kills the node
                let _ = child.wait();
                let _ = std::fs::remove_file(node_dir.join("nodes.conf"));
            };
            lifelines.push(lifeline);
            children.push(child);
            ports.push(port);
        }
        let cluster = RedisCluster {
            children,
            lifelines,
            ports,
            dir,
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
        let per_master = replicas.to_string();
        args.extend(["--cluster-replicas", per_master.as_str(), "--cluster-yes"]);
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
        if replicas > 0 {
            for &p in &cluster.ports {
                cluster.wait_until(
                    || {
                        let info = cli(p, &["INFO", "replication"]);
                        info.contains("role:master")
                            && info.contains(&format!("connected_slaves:{replicas}"))
                            || info.contains("master_link_status:up")
                    },
                    "replicas in sync",
                );
            }
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
        let live = self.live();
        let slot: u16 = cli(live, &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("keyslot");
        let nodes = cli(live, &["CLUSTER", "NODES"]);
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

    /// A node that answers.
    fn live(&self) -> u16 {
        self.ports
            .iter()
            .copied()
            .find(|&p| cli(p, &["PING"]).trim() == "PONG")
            .unwrap_or(self.ports[0])
    }

    /// The ports of the nodes that are primaries now.
    pub fn primaries(&self) -> Vec<u16> {
        let nodes = cli(self.live(), &["CLUSTER", "NODES"]);
        nodes
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .filter_map(|l| l.split(' ').nth(1)?.split(['@', ':']).nth(1)?.parse().ok())
            .collect()
    }

    /// `kill -9` of the node on `port` (its watchdog then finds it gone).
    pub fn kill_node(&self, port: u16) {
        let i = self
            .ports
            .iter()
            .position(|&p| p == port)
            .expect("a node's port");
        let pid = std::fs::read_to_string(self.dir.path().join(format!("node{i}/pid")))
            .expect("node pid");
        let ok = Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -9 {pid}");
    }

    /// Starts a killed node again (same port, directory and cluster
    /// configuration): a failed-over primary rejoins as a replica.
    pub fn restart_node(&mut self, port: u16) {
        let i = self
            .ports
            .iter()
            .position(|&p| p == port)
            .expect("a node's port");
        let node_timeout = 1000;
        let mut child = launch(
            port,
            &self.dir.path().join(format!("node{i}")),
            node_timeout,
        );
        self.lifelines
            .push(child.stdin.take().expect("watchdog stdin"));
        self.children.push(child);
        self.wait_until(
            || cli(port, &["PING"]).trim() == "PONG",
            "restarted node answers",
        );
    }

    /// Waits (bounded: 60 s, for a loaded shared machine) until `ready` holds.
    pub fn wait_until(&self, mut ready: impl FnMut() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
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
