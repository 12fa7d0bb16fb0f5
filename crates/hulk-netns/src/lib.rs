//! Network namespaces and netlink work inside them, for hulk-vpc's pod
//! datapath.
//!
//! A netlink socket belongs to the namespace it was created in, and
//! `setns(2)` changes the namespace of the calling *thread*. Entering a pod's
//! namespace from a tokio worker would leak that namespace into every other
//! task scheduled there. So a [`NetlinkWorker`] owns one dedicated OS thread
//! that enters the namespace once, creates its own rtnetlink connection
//! there, and runs the jobs sent to it on a local single-threaded runtime.
//!
//! # Example
//!
//! ```no_run
//! use hulk_netns::{NetlinkWorker, link_by_name};
//!
//! # async fn example() -> Result<(), hulk_netns::NetnsError> {
//! // A fresh, anonymous namespace that lives as long as the worker.
//! let worker = NetlinkWorker::spawn_in_new_namespace()?;
//! let loopback = worker
//!     .run(|handle| async move { link_by_name(&handle, "lo").await })
//!     .await??;
//! assert!(loopback.is_some());
//! # Ok(())
//! # }
//! ```

use std::fs::File;
use std::future::Future;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::thread::JoinHandle;

use futures::TryStreamExt;
use nix::sched::CloneFlags;
use rtnetlink::Handle;
use rtnetlink::packet_route::link::LinkMessage;
use tokio::sync::{mpsc, oneshot};

/// Re-exported so users build requests with the same rtnetlink version.
pub use rtnetlink;

/// Failures of namespace handling and netlink requests.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A namespace file could not be opened.
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `setns(2)` or `unshare(2)` failed.
    #[error("cannot enter a network namespace: {0}")]
    Enter(nix::Error),
    /// The worker thread or its runtime could not be started.
    #[error("cannot start the netlink worker: {0}")]
    Worker(std::io::Error),
    /// The worker thread is gone (it panicked or was shut down).
    #[error("the netlink worker thread has stopped")]
    WorkerGone,
    /// The kernel refused a netlink request.
    #[error("netlink request failed: {0}")]
    Netlink(#[from] rtnetlink::Error),
}

/// An open handle to a network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens the namespace at `path` (`/var/run/netns/NAME`, `/proc/PID/ns/net`, ...).
    pub fn open(path: impl AsRef<Path>) -> Result<Netns, NetnsError> {
        let path = path.as_ref().to_path_buf();
        match File::open(&path) {
            Ok(file) => Ok(Netns { file, path }),
            Err(source) => Err(NetnsError::Open { path, source }),
        }
    }

    /// The namespace of the calling thread.
    pub fn current_thread() -> Result<Netns, NetnsError> {
        Netns::open("/proc/thread-self/ns/net")
    }

    /// A second handle to the same namespace, e.g. for another worker.
    pub fn try_clone(&self) -> Result<Netns, NetnsError> {
        match self.file.try_clone() {
            Ok(file) => Ok(Netns {
                file,
                path: self.path.clone(),
            }),
            Err(source) => Err(NetnsError::Open {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// The path the handle was opened from, for messages. A thread-relative
    /// path such as `/proc/thread-self/ns/net` named the namespace only for
    /// the thread that opened it.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

type Job = Box<dyn FnOnce(Handle) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// Where a new worker thread puts itself before opening its netlink socket.
enum Placement {
    Enter(Netns),
    NewNamespace,
}

/// A thread living in one network namespace, running netlink jobs there.
///
/// Jobs run concurrently on the thread's single-threaded runtime, so a job
/// awaiting the kernel does not hold up the others. Dropping the worker
/// stops the thread after the queued jobs; an anonymous namespace made by
/// [`NetlinkWorker::spawn_in_new_namespace`] disappears with it unless
/// something else holds it open.
#[derive(Debug)]
pub struct NetlinkWorker {
    jobs: Option<mpsc::UnboundedSender<Job>>,
    thread: Option<JoinHandle<()>>,
    netns: Netns,
}

impl NetlinkWorker {
    /// A worker in the namespace `netns`.
    pub fn spawn_in(netns: Netns) -> Result<NetlinkWorker, NetnsError> {
        NetlinkWorker::spawn(Placement::Enter(netns))
    }

    /// A worker in a new, anonymous namespace (for tests and sandboxes).
    pub fn spawn_in_new_namespace() -> Result<NetlinkWorker, NetnsError> {
        NetlinkWorker::spawn(Placement::NewNamespace)
    }

    fn spawn(placement: Placement) -> Result<NetlinkWorker, NetnsError> {
        let (jobs, queue) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("hulk-netlink".into())
            .spawn(move || {
                let setup = enter(placement).and_then(|netns| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(NetnsError::Worker)?;
                    Ok((netns, runtime))
                });
                match setup {
                    Ok((netns, runtime)) => {
                        if ready_tx.send(Ok(netns)).is_ok() {
                            serve(runtime, queue);
                        }
                    }
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                    }
                }
            })
            .map_err(NetnsError::Worker)?;
        let netns = ready_rx.recv().map_err(|_| NetnsError::WorkerGone)??;
        Ok(NetlinkWorker {
            jobs: Some(jobs),
            thread: Some(thread),
            netns,
        })
    }

    /// The namespace this worker lives in.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Runs `job` with a netlink handle inside the namespace and returns its
    /// output. The future is built and polled on the worker thread, so it
    /// need not be `Send`.
    pub async fn run<F, Fut, T>(&self, job: F) -> Result<T, NetnsError>
    where
        F: FnOnce(Handle) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let (done_tx, done_rx) = oneshot::channel();
        let job: Job = Box::new(move |handle| {
            Box::pin(async move {
                let _ = done_tx.send(job(handle).await);
            })
        });
        self.jobs
            .as_ref()
            .ok_or(NetnsError::WorkerGone)?
            .send(job)
            .map_err(|_| NetnsError::WorkerGone)?;
        done_rx.await.map_err(|_| NetnsError::WorkerGone)
    }
}

impl Drop for NetlinkWorker {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop once queued jobs are done.
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn enter(placement: Placement) -> Result<Netns, NetnsError> {
    match placement {
        Placement::Enter(netns) => {
            nix::sched::setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(NetnsError::Enter)?;
            Ok(netns)
        }
        Placement::NewNamespace => {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(NetnsError::Enter)?;
            Netns::current_thread()
        }
    }
}

fn serve(runtime: tokio::runtime::Runtime, mut queue: mpsc::UnboundedReceiver<Job>) {
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let (connection, handle, _) = match rtnetlink::new_connection() {
            Ok(parts) => parts,
            Err(error) => {
                tracing::error!(%error, "cannot open a netlink socket in the worker's namespace");
                return;
            }
        };
        tokio::task::spawn_local(connection);
        let mut running = tokio::task::JoinSet::new();
        while let Some(job) = queue.recv().await {
            running.spawn_local(job(handle.clone()));
        }
        while running.join_next().await.is_some() {}
    });
}

/// The link called `name`, or `None` when there is no such link.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, NetnsError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(message))
            if message.raw_code() == -(nix::errno::Errno::ENODEV as i32) =>
        {
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
}
