//! TLS and AUTH to Redis, as a managed Redis asks for them: a real
//! `redis-server` started by this test with `--tls-port` and a throwaway CA
//! and server certificate made here, requiring a user and password. The
//! engine connects over `rediss://user:password@…` trusting the CA bundle
//! (`redis_ca_file`), and refuses a server it cannot trust or a wrong password.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{amt, catalog};
use creditgate::calendar::Interval;
use creditgate::engine::redis::{RedisEngine, RedisOptions, RedisTarget, Tls};
use creditgate::model::Grant;
use creditgate::{Engine, EngineError};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

struct TlsRedis {
    child: Child,
    port: u16,
    ca_pem: String,
    _dir: tempfile::TempDir,
}

impl Drop for TlsRedis {
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

/// A CA, a server certificate for 127.0.0.1 signed by it, and redis-server
/// on a TLS-only port with user `app` / password `s3cret`.
fn start() -> TlsRedis {
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();
    let write = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let ca_file = write("ca.crt", &ca.pem());
    let cert_file = write("redis.crt", &server_cert.pem());
    let key_file = write("redis.key", &server_key.serialize_pem());
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .arg("--tls-cert-file")
        .arg(&cert_file)
        .arg("--tls-key-file")
        .arg(&key_file)
        .arg("--tls-ca-cert-file")
        .arg(&ca_file)
        .args(["--tls-auth-clients", "no"])
        .args(["--user", "default", "off"])
        .args(["--user", "app", "on", ">s3cret", "~*", "&*", "+@all"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server with TLS");
    let server = TlsRedis {
        child,
        port,
        ca_pem: ca.pem(),
        _dir: dir,
    };
    // Ready once the TLS port accepts connections.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

fn options(url: String, ca: Option<&str>) -> RedisOptions {
    RedisOptions {
        target: RedisTarget::Standalone(url),
        timeout: Duration::from_secs(2),
        tls: Tls {
            ca_bundle: ca.map(|c| c.as_bytes().to_vec()),
        },
        ..RedisOptions::standalone("")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_ca_bundle_and_a_password_serves() {
    let server = start();
    let url = format!("rediss://app:s3cret@127.0.0.1:{}", server.port);
    let engine = RedisEngine::connect(options(url, Some(&server.ca_pem)), catalog(), None)
        .await
        .expect("connect over TLS with the CA bundle");
    let engine: Arc<dyn Engine> = Arc::new(engine);
    engine.create_customer("tls").await.unwrap();
    engine
        .grant("tls", &Grant::new("api_call", amt("10"), Interval::Month))
        .await
        .unwrap();
    let out = engine
        .consume("tls", "api_call", amt("3"), None)
        .await
        .unwrap();
    assert!(out.allowed);
    assert_eq!(out.pool("api_call").unwrap().remaining, amt("7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_server_or_a_wrong_password_is_refused() {
    let server = start();
    // No CA bundle: the throwaway CA is not among the system's roots.
    let url = format!("rediss://app:s3cret@127.0.0.1:{}", server.port);
    let err = RedisEngine::connect(options(url, None), catalog(), None)
        .await
        .err()
        .expect("an untrusted certificate is refused");
    assert!(matches!(err, EngineError::StoreUnavailable(_)), "{err:?}");
    let url = format!("rediss://app:wrong@127.0.0.1:{}", server.port);
    let err = RedisEngine::connect(options(url, Some(&server.ca_pem)), catalog(), None)
        .await
        .err()
        .expect("a wrong password is refused");
    assert!(matches!(err, EngineError::StoreUnavailable(_)), "{err:?}");
    // Plain redis:// on the TLS port never gets an answer it trusts.
    let url = format!("redis://app:s3cret@127.0.0.1:{}", server.port);
    let opts = RedisOptions {
        timeout: Duration::from_millis(500),
        ..options(url, None)
    };
    assert!(RedisEngine::connect(opts, catalog(), None).await.is_err());
}
