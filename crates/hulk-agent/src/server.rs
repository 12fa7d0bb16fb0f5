//! The framing both agent sockets share: one JSON request line and one
//! JSON reply line per connection. Small on purpose: the plugin is a
//! short-lived process and every exchange is one call.
//!
//! Nothing a client sends is trusted. The server bounds what a client can
//! hold ([`ServeLimits`]): connections open at once (a slot is taken
//! *before* accepting, so a flood waits in the kernel's listen backlog and
//! pins no task, file or memory here), the time to send the request line
//! and to take the reply, the line's length, and requests handled at once.
//! Every line it reads gets exactly one reply line, an error document when
//! the line is not a request (invalid UTF-8 included). Peers are checked
//! by uid ([`AllowedPeers`]), and [`bind`] creates the socket with its
//! mode from the start and refuses to take over a socket that answers.

use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Who may use a socket, by the uid the kernel reports for the peer
/// (`SO_PEERCRED`). The file mode decides who can connect at all; this
/// decides who is served once connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedPeers {
    /// Only these uids; a peer whose uid the kernel did not tell is refused.
    Uids(Vec<u32>),
    /// Whoever the file mode lets connect.
    Anyone,
}

impl AllowedPeers {
    /// Root only: the default of both sockets (the container runtime runs
    /// the plugin as root, and `hulkctl` is an operator's tool).
    pub fn root() -> Self {
        AllowedPeers::Uids(vec![0])
    }

    /// Whether `peer` is served.
    pub fn admits(&self, peer: &Peer) -> bool {
        match self {
            AllowedPeers::Anyone => true,
            AllowedPeers::Uids(uids) => peer.uid.is_some_and(|uid| uids.contains(&uid)),
        }
    }
}

/// Limits of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeLimits {
    /// Requests handled at once; more wait for a slot.
    pub max_in_flight: usize,
    /// Deadline of one request, waiting for a slot included.
    pub request_timeout: Duration,
    /// Connections open at once. The server takes a slot before it
    /// accepts, so further connections wait in the kernel's listen backlog
    /// (then `connect` fails with `EAGAIN`) until a connection ends; each
    /// ends at most `client_timeout` after it was accepted unless it is
    /// being handled. Memory held by requests is at most this many times
    /// `max_request_bytes`.
    pub max_connections: usize,
    /// How long a client has to send its request line, and then to take
    /// the reply. A client that is silent that long is dropped without a
    /// reply.
    pub client_timeout: Duration,
    /// The longest request line, newline excluded; a longer one is answered
    /// with the service's `unreadable` reply.
    pub max_request_bytes: usize,
    /// Who is served.
    pub allowed_peers: AllowedPeers,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_in_flight: 64,
            request_timeout: Duration::from_secs(60),
            max_connections: 256,
            client_timeout: Duration::from_secs(10),
            max_request_bytes: 1024 * 1024,
            allowed_peers: AllowedPeers::root(),
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

    /// The reply to a line that is not a request (not JSON, not UTF-8, too
    /// long, not one of the requests).
    fn unreadable(&self, error: serde_json::Error) -> Self::Reply;

    /// The reply to a request that missed its deadline.
    fn timed_out(&self, after: Duration) -> Self::Reply;

    /// The reply to a peer that [`ServeLimits::allowed_peers`] refuses.
    fn refused(&self, peer: Peer) -> Self::Reply;
}

/// Rate limit for a log line a client can provoke at will: at most one
/// line per second, the next one saying how many were left out.
#[derive(Debug)]
pub(crate) struct Throttle {
    started: Instant,
    /// Milliseconds after `started` of the last line, plus one (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    const PERIOD_MS: u64 = 1000;

    pub(crate) fn new() -> Self {
        Throttle {
            started: Instant::now(),
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one)` if a line may be written now.
    pub(crate) fn admit(&self) -> Option<u64> {
        let now = u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= Self::PERIOD_MS;
        if due
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Back-off after a failed `accept`, as in tokio's mini-redis: at the
/// open-file limit (`EMFILE`, `ENFILE`) accept fails at once every time,
/// and retrying without a pause spins a core and floods the log while
/// nothing is served. 1 ms doubling to 1 s, back to 1 ms after a success;
/// one log line per failure, so at most one per back-off period.
#[derive(Debug)]
pub(crate) struct AcceptBackoff {
    delay: Duration,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(1);
    const MAX: Duration = Duration::from_secs(1);

    pub(crate) fn new() -> Self {
        AcceptBackoff { delay: Self::FIRST }
    }

    pub(crate) fn succeeded(&mut self) {
        self.delay = Self::FIRST;
    }

    /// Logs `error` and sleeps the current delay, which then doubles.
    pub(crate) async fn failed(&mut self, error: &std::io::Error, what: &str) {
        tracing::error!(%error, retry_in = ?self.delay, "cannot accept {what} connection");
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Self::MAX);
    }
}

/// A bound on open connections: a slot is taken before accepting and held
/// by the connection until it ends.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionSlots {
    semaphore: Arc<Semaphore>,
    size: u32,
}

impl ConnectionSlots {
    pub(crate) fn new(size: usize) -> Self {
        let size = u32::try_from(size.max(1)).unwrap_or(u32::MAX);
        ConnectionSlots {
            semaphore: Arc::new(Semaphore::new(size as usize)),
            size,
        }
    }

    pub(crate) async fn take(&self) -> OwnedSemaphorePermit {
        match self.semaphore.clone().acquire_owned().await {
            Ok(slot) => slot,
            // Only a closed semaphore fails, and this one is never closed.
            Err(_) => std::future::pending().await,
        }
    }

    /// Waits until every connection has ended.
    async fn drained(&self) {
        let _ = self.semaphore.acquire_many(self.size).await;
    }
}

/// How a request line ended.
enum Line {
    /// The line (newline excluded), or what came before the client closed.
    Complete(Vec<u8>),
    /// More than the limit without a newline.
    TooLong,
}

async fn read_line(reader: impl AsyncRead + Unpin, max: usize) -> std::io::Result<Line> {
    // A small buffer: an idle connection should cost little, and requests
    // are a few hundred bytes.
    let mut reader = BufReader::with_capacity(2048, reader.take(max as u64 + 1));
    let mut bytes = Vec::new();
    reader.read_until(b'\n', &mut bytes).await?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    } else if bytes.len() > max {
        return Ok(Line::TooLong);
    }
    Ok(Line::Complete(bytes))
}

/// Why a connection ended without its reply.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("no complete request line within {0:?}")]
    Silent(Duration),
    #[error("the client did not take its reply within {0:?}")]
    NotReading(Duration),
    #[error("shutting down before the request line was complete")]
    ShuttingDown,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot encode the reply")]
    Encode(#[source] serde_json::Error),
}

struct Server<S> {
    service: Arc<S>,
    limits: ServeLimits,
    in_flight: Semaphore,
    refusals: Throttle,
}

impl<S: LineService> Server<S> {
    async fn reply_to(&self, line: Line, peer: Peer) -> S::Reply {
        let bytes = match line {
            Line::TooLong => {
                return self.service.unreadable(serde::de::Error::custom(format!(
                    "the request line is longer than {} bytes",
                    self.limits.max_request_bytes
                )));
            }
            Line::Complete(bytes) => bytes,
        };
        // From bytes, not a `String`: invalid UTF-8 is an unreadable
        // request like any other, answered rather than dropped.
        match serde_json::from_slice::<S::Request>(&bytes) {
            Err(error) => self.service.unreadable(error),
            Ok(request) => {
                let work = async {
                    let _slot = self.in_flight.acquire().await;
                    self.service.handle(request, peer).await
                };
                tokio::time::timeout(self.limits.request_timeout, work)
                    .await
                    .unwrap_or_else(|_| self.service.timed_out(self.limits.request_timeout))
            }
        }
    }

    async fn connection(
        &self,
        stream: UnixStream,
        shutdown: CancellationToken,
    ) -> Result<(), ConnectionError> {
        let peer = Peer::of(&stream);
        let (reader, mut writer) = stream.into_split();
        let reply = if self.limits.allowed_peers.admits(&peer) {
            let client_timeout = self.limits.client_timeout;
            let read = tokio::time::timeout(
                client_timeout,
                read_line(reader, self.limits.max_request_bytes),
            );
            // A shutdown cancels only the wait for a request line: a
            // request being handled finishes and gets its reply.
            let line = tokio::select! {
                read = read => read.map_err(|_| ConnectionError::Silent(client_timeout))??,
                () = shutdown.cancelled() => return Err(ConnectionError::ShuttingDown),
            };
            self.reply_to(line, peer).await
        } else {
            if let Some(suppressed) = self.refusals.admit() {
                tracing::warn!(%peer, suppressed, "refused a peer the socket does not serve");
            }
            self.service.refused(peer)
        };
        let mut bytes = serde_json::to_vec(&reply).map_err(ConnectionError::Encode)?;
        bytes.push(b'\n');
        let write = async {
            writer.write_all(&bytes).await?;
            writer.shutdown().await
        };
        tokio::time::timeout(self.limits.client_timeout, write)
            .await
            .map_err(|_| ConnectionError::NotReading(self.limits.client_timeout))??;
        Ok(())
    }
}

/// Serves `service` on `listener` until `shutdown` is cancelled; requests
/// being handled then finish, and connections still waiting for their
/// request line are closed, before this returns.
pub async fn serve<S: LineService>(
    service: Arc<S>,
    listener: UnixListener,
    limits: ServeLimits,
    shutdown: CancellationToken,
) {
    let connections = ConnectionSlots::new(limits.max_connections);
    let server = Arc::new(Server {
        service,
        in_flight: Semaphore::new(limits.max_in_flight.max(1)),
        limits,
        refusals: Throttle::new(),
    });
    let mut backoff = AcceptBackoff::new();
    loop {
        let slot = tokio::select! {
            slot = connections.take() => slot,
            () = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff.succeeded();
                    stream
                }
                Err(error) => {
                    tokio::select! {
                        () = backoff.failed(&error, "an agent") => continue,
                        () = shutdown.cancelled() => break,
                    }
                }
            },
            () = shutdown.cancelled() => break,
        };
        let (server, shutdown) = (server.clone(), shutdown.clone());
        tokio::spawn(async move {
            // Per connection failures are the client's business (it hung
            // up, stalled or sent garbage): debug, so a flood of them
            // cannot flood the log.
            if let Err(error) = server.connection(stream, shutdown).await {
                tracing::debug!(%error, "agent connection ended without a reply");
            }
            drop(slot);
        });
    }
    connections.drained().await;
}

/// Failures to bind a server's socket.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Something answers on the socket: another agent is serving it.
    #[error("{path}: another process is serving this socket; not taking it over")]
    Live {
        /// The socket path.
        path: PathBuf,
    },
    /// The path exists and is not a socket: not ours to replace.
    #[error("{path}: exists and is not a socket")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A filesystem or socket call failed.
    #[error("{path}: cannot {action}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io_error(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> BindError {
    let path = path.to_path_buf();
    move |source| BindError::Io {
        path,
        action,
        source,
    }
}

/// The socket file a server bound. Dropping it removes the file if it is
/// still the one bound here (same inode): after a takeover the path is
/// another server's, and removing it would make that one unreachable.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    device: u64,
    inode: u64,
}

impl SocketFile {
    fn remove_if_ours(&self) -> std::io::Result<bool> {
        match std::fs::symlink_metadata(&self.path) {
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(false),
            Err(error) => Err(error),
            Ok(meta) if (meta.dev(), meta.ino()) != (self.device, self.inode) => Ok(false),
            Ok(_) => std::fs::remove_file(&self.path).map(|()| true),
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let socket = self.path.display();
        match self.remove_if_ours() {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(%socket, "the socket is gone or not ours any more; left alone")
            }
            Err(error) => tracing::warn!(%socket, %error, "cannot remove the socket"),
        }
    }
}

/// A directory only root can enter, removed with what is left in it when
/// dropped (the socket after a failure, nothing after the rename).
struct PrivateDir(PathBuf);

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0.join("s"));
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Whether something accepts connections on `path`. A connection attempt
/// that is neither accepted nor refused within a second (a full backlog
/// fails at once with `EAGAIN`) counts as live: a server is there.
async fn answers(path: &Path) -> Result<bool, BindError> {
    let connect = tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(path));
    match connect.await {
        Err(_) | Ok(Ok(_)) => Ok(true),
        Ok(Err(error)) if error.kind() == ErrorKind::WouldBlock => Ok(true),
        Ok(Err(error)) if error.kind() == ErrorKind::ConnectionRefused => Ok(false),
        Ok(Err(error)) => Err(io_error(path, "probe the existing socket")(error)),
    }
}

/// Binds a Unix socket at `path` with `mode`, creating its directory
/// (0755) if needed.
///
/// The socket never exists with a wider mode: it is bound inside a fresh
/// 0700 directory next to `path`, given `mode` there and renamed into
/// place, whatever the umask. A socket that answers is refused
/// ([`BindError::Live`]): another agent is serving it, and taking it over
/// would leave that one running unreachable. A stale socket (nothing
/// listening) is replaced.
pub async fn bind(path: &Path, mode: u32) -> Result<(UnixListener, SocketFile), BindError> {
    let directory = path
        .parent()
        .filter(|directory| !directory.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(directory)
        .map_err(io_error(directory, "create the directory"))?;
    match std::fs::symlink_metadata(path) {
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => return Err(io_error(path, "inspect")(error)),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(BindError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Ok(_) => {
            if answers(path).await? {
                return Err(BindError::Live {
                    path: path.to_path_buf(),
                });
            }
        }
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let private = PrivateDir(directory.join(format!(".{name}.{}", std::process::id())));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private.0)
        .map_err(io_error(&private.0, "create the private directory"))?;
    let temporary = private.0.join("s");
    let listener = UnixListener::bind(&temporary).map_err(io_error(path, "bind"))?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode))
        .map_err(io_error(&temporary, "set the mode of"))?;
    let meta = std::fs::symlink_metadata(&temporary).map_err(io_error(&temporary, "inspect"))?;
    std::fs::rename(&temporary, path).map_err(io_error(path, "move the socket into place"))?;
    drop(private);
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            device: meta.dev(),
            inode: meta.ino(),
        },
    ))
}
