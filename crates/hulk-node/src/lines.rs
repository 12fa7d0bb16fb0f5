//! The framing both agent sockets share: one JSON request line and one
//! JSON reply line per connection, a size limit on the request, a deadline
//! per request and a bound on requests handled at once. Small on purpose:
//! the plugin is a short-lived process and every exchange is one call.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};

/// The longest request line a server reads.
pub const MAX_REQUEST_BYTES: u64 = 1024 * 1024;

/// Limits of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Requests handled at once; more wait for a slot.
    pub max_in_flight: usize,
    /// Deadline of one request, waiting for a slot included.
    pub request_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_in_flight: 64,
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// Who is on the other end of a connection (for audit lines).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Peer {
    /// The peer's user id, when the kernel told.
    pub uid: Option<u32>,
    /// The peer's process id, when the kernel told.
    pub pid: Option<i32>,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.uid, self.pid) {
            (Some(uid), Some(pid)) => write!(f, "uid {uid} pid {pid}"),
            (Some(uid), None) => write!(f, "uid {uid}"),
            _ => f.write_str("unknown"),
        }
    }
}

impl Peer {
    fn of(stream: &UnixStream) -> Peer {
        stream.peer_cred().map_or_else(
            |_| Peer::default(),
            |credentials| Peer {
                uid: Some(credentials.uid()),
                pid: credentials.pid(),
            },
        )
    }
}

/// What a socket serves: a request type, a reply type and the handler.
pub trait LineService: Send + Sync + 'static {
    /// One request line.
    type Request: DeserializeOwned + Send;
    /// One reply line.
    type Reply: Serialize + Send;

    /// Handles one request from `peer`.
    fn handle(
        &self,
        request: Self::Request,
        peer: Peer,
    ) -> impl Future<Output = Self::Reply> + Send;

    /// The reply to a line that is not a request.
    fn unreadable(&self, error: serde_json::Error) -> Self::Reply;

    /// The reply to a request that missed its deadline.
    fn timed_out(&self, after: Duration) -> Self::Reply;
}

async fn serve_connection<S: LineService>(
    service: Arc<S>,
    slots: Arc<Semaphore>,
    limits: ServeLimits,
    stream: UnixStream,
) -> std::io::Result<()> {
    let peer = Peer::of(&stream);
    let (reader, mut writer) = stream.into_split();
    let mut line = String::new();
    BufReader::new(reader)
        .take(MAX_REQUEST_BYTES)
        .read_line(&mut line)
        .await?;
    let reply = match serde_json::from_str::<S::Request>(&line) {
        Err(error) => service.unreadable(error),
        Ok(request) => {
            let work = async {
                let _slot = slots.acquire().await;
                service.handle(request, peer).await
            };
            tokio::time::timeout(limits.request_timeout, work)
                .await
                .unwrap_or_else(|_| service.timed_out(limits.request_timeout))
        }
    };
    let mut bytes = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    writer.write_all(&bytes).await?;
    writer.shutdown().await
}

/// Serves `service` on `listener` until `shutdown` turns true; requests in
/// progress then finish before this returns.
pub async fn serve<S: LineService>(
    service: Arc<S>,
    listener: UnixListener,
    limits: ServeLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_in_flight.max(1)));
    let mut connections = tokio::task::JoinSet::new();
    while !*shutdown.borrow_and_update() {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (service, slots) = (service.clone(), slots.clone());
                    connections.spawn(async move {
                        if let Err(error) = serve_connection(service, slots, limits, stream).await {
                            tracing::warn!(%error, "agent connection failed");
                        }
                    });
                }
                Err(error) => tracing::error!(%error, "cannot accept an agent connection"),
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    while connections.join_next().await.is_some() {}
}

/// Failures to reach a server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, writing or reading failed.
    #[error("agent socket {socket}: {source}")]
    Io {
        /// The socket path.
        socket: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The answer is not a reply.
    #[error("unreadable agent reply: {0}")]
    Reply(#[from] serde_json::Error),
}

/// Sends one request to the server at `socket` and waits up to `timeout`.
pub async fn call<Request: Serialize, Reply: DeserializeOwned>(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Reply, ClientError> {
    let io = |source| ClientError::Io {
        socket: socket.display().to_string(),
        source,
    };
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await.map_err(io)?;
        let mut bytes = serde_json::to_vec(request)?;
        bytes.push(b'\n');
        stream.write_all(&bytes).await.map_err(io)?;
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .await
            .map_err(io)?;
        Ok(serde_json::from_str(&line)?)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}
