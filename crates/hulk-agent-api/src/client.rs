//! The client side of the agent's sockets: one request line, one reply
//! line, within a deadline.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A request one of the agent's sockets answers, and the reply it gets:
/// [`crate::PluginRequest`] on the plugin socket, the rescue API's request
/// (in `hulk-agent`) on the rescue socket.
pub trait Exchange: Serialize {
    /// What the agent answers to this request.
    type Reply: DeserializeOwned;
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
        #[source]
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The request could not be encoded, or the answer is not a reply.
    #[error("unreadable agent reply: {0}")]
    Reply(#[from] serde_json::Error),
}

/// Sends one request to the server at `socket` (the plugin socket with
/// [`crate::PluginRequest`], or the rescue socket) and waits up to
/// `timeout` for the whole exchange: connecting, writing and the reply.
///
/// # Errors
///
/// [`ClientError::Io`] when the socket cannot be reached or the connection
/// breaks before a reply (the agent went away mid-request),
/// [`ClientError::Timeout`] when no reply came in time, and
/// [`ClientError::Reply`] when the reply is not one.
pub async fn call<Request: Exchange>(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Request::Reply, ClientError> {
    let io = |source| ClientError::Io {
        socket: socket.display().to_string(),
        source,
    };
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await.map_err(io)?;
        let mut bytes = serde_json::to_vec(request)?;
        bytes.push(b'\n');
        // A server that refuses the caller answers without reading the
        // request and closes: the write then fails, but the answer waits
        // to be read, and it says more than the broken pipe.
        let written = stream.write_all(&bytes).await;
        let mut line = String::new();
        let read = BufReader::new(stream).read_line(&mut line).await;
        match (written, read) {
            (_, Ok(read)) if read > 0 => {}
            (Err(error), _) => return Err(io(error)),
            (Ok(()), Err(error)) => return Err(io(error)),
            // The connection closed before any answer: the agent went
            // away (killed mid-request), which is not an unreadable answer.
            (Ok(()), Ok(_)) => {
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the agent closed the connection without answering",
                )));
            }
        }
        Ok(serde_json::from_str(&line)?)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}
