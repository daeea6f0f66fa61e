//! Serving the router on a TCP listener so that no client can hold the
//! server: a header read timeout (a client sending its headers a byte at a
//! time is closed), an idle timeout (a keep-alive connection with nothing
//! to do is closed), and a cap on open connections below the open-file
//! limit. At the cap a new connection closes the connection that has been
//! idle longest (never one with a request in flight), so a new client is
//! still served; if every connection is busy, the new one is closed at once.
//! An accept error (the process ran out of file descriptors anyway) also
//! sheds idle connections instead of spinning.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tower::ServiceExt;

/// What a connection may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// A client must send a request's whole header within this (from the
    /// moment the server waits for it).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and nothing read for this long
    /// is closed.
    pub idle_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
}

/// File descriptors kept free of client connections: Redis connections,
/// the listener, logs, the files a process opens anyway.
pub const RESERVED_FDS: u64 = 128;

impl ConnLimits {
    /// The defaults: a 10 s header timeout, a 75 s idle timeout (longer than
    /// nginx's 60 s upstream keep-alive, so a gateway closes its idle
    /// connections before creditgate does and never races a close), and a
    /// connection cap of the open-file limit less [`RESERVED_FDS`].
    pub fn for_open_files(open_files: u64) -> ConnLimits {
        ConnLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_connections: open_files.saturating_sub(RESERVED_FDS).max(16) as usize,
        }
    }
}

/// Raises the soft open-file limit to the hard one (a service should use
/// what it is allowed); returns the soft limit now in effect.
pub fn raise_open_file_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024)
}

/// One open connection, as the cap sees it.
struct Tracked {
    /// Milliseconds since the registry's epoch at the last byte read or the
    /// last response finished.
    last_active_ms: AtomicU64,
    /// Requests in flight.
    busy: AtomicUsize,
    close: Notify,
}

struct Registry {
    epoch: Instant,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Tracked>>>,
}

impl Registry {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn len(&self) -> usize {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn add(&self) -> (u64, Arc<Tracked>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let t = Arc::new(Tracked {
            last_active_ms: AtomicU64::new(self.now_ms()),
            busy: AtomicUsize::new(0),
            close: Notify::new(),
        });
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, t.clone());
        (id, t)
    }

    fn remove(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Closes the connection idle longest; `false` when every one is busy.
    fn evict_idle(&self) -> bool {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let victim = conns
            .iter()
            .filter(|(_, t)| t.busy.load(Ordering::Acquire) == 0)
            .min_by_key(|(_, t)| t.last_active_ms.load(Ordering::Relaxed));
        match victim {
            Some((_, t)) => {
                // notify_one stores a permit: the close happens even if the
                // connection's task is not waiting yet.
                t.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// A socket that records when it last read something.
struct ActivityIo {
    inner: TcpStream,
    tracked: Arc<Tracked>,
    registry: Arc<Registry>,
}

impl AsyncRead for ActivityIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let now = self.registry.now_ms();
            self.tracked.last_active_ms.store(now, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for ActivityIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Marks a request in flight on its connection while alive.
struct InFlight {
    tracked: Arc<Tracked>,
    registry: Arc<Registry>,
}

impl InFlight {
    fn new(tracked: Arc<Tracked>, registry: Arc<Registry>) -> InFlight {
        tracked.busy.fetch_add(1, Ordering::AcqRel);
        InFlight { tracked, registry }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.registry.now_ms();
        self.tracked.last_active_ms.store(now, Ordering::Relaxed);
        self.tracked.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Resolves once the connection has been idle (nothing in flight, nothing
/// read) for `idle`.
async fn idle_for(tracked: &Tracked, registry: &Registry, idle: Duration) {
    let idle_ms = idle.as_millis() as u64;
    loop {
        let since = registry
            .now_ms()
            .saturating_sub(tracked.last_active_ms.load(Ordering::Relaxed));
        if tracked.busy.load(Ordering::Acquire) == 0 && since >= idle_ms {
            return;
        }
        let wait = if since >= idle_ms {
            idle_ms
        } else {
            idle_ms - since
        };
        tokio::time::sleep(Duration::from_millis(wait.max(1))).await;
    }
}

/// Serves `router` on `listener` under `limits` until `shutdown` resolves,
/// then stops accepting and lets in-flight requests finish (at most 30 s).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let registry = Arc::new(Registry {
        epoch: Instant::now(),
        next_id: AtomicU64::new(0),
        conns: Mutex::new(HashMap::new()),
    });
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    let mut last_accept_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (or another transient failure): shed an
                // idle connection, pause briefly, and say so at most once a
                // few seconds.
                registry.evict_idle();
                if last_accept_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::warn!(error = %e, open = registry.len(), "accept failed; closing idle connections");
                    last_accept_warning = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        if registry.len() >= limits.max_connections && !registry.evict_idle() {
            // Every connection is busy: refuse this one rather than exceed the cap.
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let (id, tracked) = registry.add();
        let io = ActivityIo {
            inner: stream,
            tracked: tracked.clone(),
            registry: registry.clone(),
        };
        let service = {
            let (tracked, registry, router) = (tracked.clone(), registry.clone(), router.clone());
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let guard = InFlight::new(tracked.clone(), registry.clone());
                let call = router.clone().oneshot(req.map(axum::body::Body::new));
                async move {
                    let resp = call.await;
                    drop(guard);
                    resp
                }
            })
        };
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let registry = registry.clone();
        let idle = limits.idle_timeout;
        tokio::spawn(async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let conn = watcher.watch(conn);
            tokio::select! {
                _ = conn => {}
                _ = tracked.close.notified() => {}
                _ = idle_for(&tracked, &registry, idle) => {}
            }
            registry.remove(id);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(30)) => {
            tracing::warn!("shutdown: connections still open after 30 s; closing them");
        }
    }
    Ok(())
}
