//! The agent's HTTP status endpoint: Prometheus' `/metrics` and
//! `/healthz`.
//!
//! The port may be reachable from the network, so a client holds little:
//! connections open at once are bounded (a slot taken before accepting, as
//! on the agent's sockets), each connection lives a bounded time (a scrape
//! takes milliseconds; Prometheus reconnects for the next one), and accept
//! errors back off instead of spinning.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;
use hulk_pool::PoolManager;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use crate::server::{AcceptBackoff, ConnectionSlots};

/// Limits of the HTTP endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// How long a connection lives, whatever it does: a client sending its
    /// request byte by byte cannot hold a slot, or a graceful shutdown,
    /// longer than this.
    pub connection_lifetime: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 32,
            connection_lifetime: Duration::from_secs(10),
        }
    }
}

/// A TCP listener that takes a connection slot before accepting and backs
/// off after accept errors.
struct BoundedListener {
    listener: TcpListener,
    slots: ConnectionSlots,
    backoff: AcceptBackoff,
    lifetime: Duration,
}

impl axum::serve::Listener for BoundedListener {
    type Io = BoundedStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (BoundedStream, std::net::SocketAddr) {
        let slot = self.slots.take().await;
        loop {
            match self.listener.accept().await {
                Ok((stream, address)) => {
                    self.backoff.succeeded();
                    let stream = BoundedStream {
                        stream,
                        deadline: Box::pin(tokio::time::sleep(self.lifetime)),
                        _slot: slot,
                    };
                    return (stream, address);
                }
                Err(error) => self.backoff.failed(&error, "a metrics").await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

/// A connection that fails its reads and writes once its lifetime is over
/// (hyper then closes it) and gives its slot back when dropped.
struct BoundedStream {
    stream: TcpStream,
    deadline: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl BoundedStream {
    /// `Some(error)` once the lifetime is over; otherwise registers the
    /// task to be woken when it is.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        self.deadline.as_mut().poll(cx).is_ready().then(|| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "metrics connection lifetime over",
            )
        })
    }
}

impl AsyncRead for BoundedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match this.expired(cx) {
            Some(error) => Poll::Ready(Err(error)),
            None => Pin::new(&mut this.stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BoundedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match this.expired(cx) {
            Some(error) => Poll::Ready(Err(error)),
            None => Pin::new(&mut this.stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match this.expired(cx) {
            Some(error) => Poll::Ready(Err(error)),
            None => Pin::new(&mut this.stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// What `/healthz` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// 200 `ok`.
    Ok,
    /// 200 `degraded: ...`: a problem a restart would not cure.
    Degraded(String),
    /// 503 `failing: ...`: a liveness probe should restart the process.
    Failing(String),
}

/// What the endpoint serves besides the registry: gauges to bring up to
/// date before each scrape, and the health `/healthz` reports.
pub trait Status: Send + Sync + 'static {
    /// Brings gauges up to date before a scrape.
    fn refresh(&self) {}

    /// What `/healthz` says.
    fn health(&self) -> Health {
        Health::Ok
    }
}

/// Nothing to refresh, always healthy: a process whose metrics are all
/// counters kept up to date as it works (the cluster controller).
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysHealthy;

impl Status for AlwaysHealthy {}

/// The agent's pools: gauges refreshed per scrape; failing while the pool
/// store cannot write (a liveness probe then restarts an agent that does
/// not recover by itself), degraded when the backend refuses the node's
/// credentials (a restart would not help, and an agent in a restart loop
/// could not serve DEL either; STATUS says 50 meanwhile).
impl Status for PoolManager {
    fn refresh(&self) {
        self.refresh_metrics();
    }

    fn health(&self) -> Health {
        let problems = hulk_node::agent_problems(self);
        if self.store().failing().is_some() {
            Health::Failing(problems.join("; "))
        } else if problems.is_empty() {
            Health::Ok
        } else {
            Health::Degraded(problems.join("; "))
        }
    }
}

fn healthz(health: Health) -> (StatusCode, String) {
    match health {
        Health::Ok => (StatusCode::OK, "ok\n".to_owned()),
        Health::Degraded(problems) => (StatusCode::OK, format!("degraded: {problems}\n")),
        Health::Failing(problems) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("failing: {problems}\n"),
        ),
    }
}

/// Serves Prometheus' `/metrics` (`status` refreshed per scrape) and
/// `/healthz` until `shutdown`, within `limits`.
pub async fn serve<S: Status>(
    listener: TcpListener,
    limits: HttpLimits,
    status: Arc<S>,
    registry: Registry,
    shutdown: CancellationToken,
) {
    let registry = Arc::new(registry);
    let health = status.clone();
    let scrape = move || {
        let (status, registry) = (status.clone(), registry.clone());
        async move {
            status.refresh();
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &registry) {
                Ok(()) => (
                    StatusCode::OK,
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                ),
                Err(error) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, "text/plain")],
                    error.to_string(),
                ),
            }
        }
    };
    let app = Router::new().route("/metrics", get(scrape)).route(
        "/healthz",
        get(move || {
            let health = health.clone();
            async move { healthz(health.health()) }
        }),
    );
    let listener = BoundedListener {
        listener,
        slots: ConnectionSlots::new(limits.max_connections),
        backoff: AcceptBackoff::new(),
        lifetime: limits.connection_lifetime,
    };
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(%error, "the HTTP status endpoint failed");
    }
}
