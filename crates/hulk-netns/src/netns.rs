//! Namespace handles and the per-namespace netlink worker thread.

use std::fs::File;
use std::future::Future;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::thread::JoinHandle;

use futures::TryStreamExt;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;
use nix::sys::statfs::NSFS_MAGIC;
use rtnetlink::Handle;
use rtnetlink::packet_route::link::LinkMessage;
use tokio::sync::{mpsc, oneshot};

use crate::kernel::NsId;

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
    /// Something exists at the path, but it is not a network namespace.
    #[error("{path} is not a network namespace: {reason}")]
    NotANamespace {
        /// The path given.
        path: PathBuf,
        /// What was found there instead.
        reason: String,
    },
    /// `setns(2)` or `unshare(2)` failed.
    #[error("cannot enter a network namespace: {0}")]
    Enter(#[source] nix::Error),
    /// The worker thread or its runtime could not be started.
    #[error("cannot start the netlink worker: {0}")]
    Worker(#[source] std::io::Error),
    /// The worker thread is gone (it panicked or was shut down).
    #[error("the netlink worker thread has stopped")]
    WorkerGone,
    /// The kernel refused a netlink request.
    #[error("netlink request failed: {0}")]
    Netlink(#[from] rtnetlink::Error),
}

impl NetnsError {
    /// The errno behind the failure, when there is one: the system's
    /// answer to an open, `setns(2)`, `unshare(2)` or thread start, or the
    /// kernel's answer to a netlink request.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetnsError::Open { source, .. } | NetnsError::Worker(source) => source.raw_os_error(),
            NetnsError::Enter(errno) => Some(*errno as i32),
            NetnsError::Netlink(rtnetlink::Error::NetlinkError(message)) => {
                Some(-message.raw_code())
            }
            NetnsError::NotANamespace { .. } | NetnsError::WorkerGone | NetnsError::Netlink(_) => {
                None
            }
        }
    }
}

/// An open handle to a network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    id: NsId,
}

impl Netns {
    /// Opens the namespace at `path` (`/var/run/netns/NAME`,
    /// `/proc/PID/ns/net`, ...). Anything that is not a namespace file is
    /// refused with [`NetnsError::NotANamespace`] before it is opened, so a
    /// FIFO never blocks the caller; a namespace of another type (a mount
    /// namespace, ...) is refused when a thread enters it.
    pub fn open(path: impl AsRef<Path>) -> Result<Netns, NetnsError> {
        let path = path.as_ref().to_path_buf();
        let open_error = |source: std::io::Error| NetnsError::Open {
            path: path.clone(),
            source,
        };
        // O_PATH resolves the path without opening what it names: a FIFO is
        // not opened (that waits for a writer), a device is not touched.
        let located = File::from(
            nix::fcntl::open(&path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(|errno| open_error(errno.into()))?,
        );
        let metadata = located.metadata().map_err(open_error)?;
        if let Some(reason) =
            not_a_namespace_file(&located, &metadata).map_err(|errno| open_error(errno.into()))?
        {
            return Err(NetnsError::NotANamespace { path, reason });
        }
        // Reopening through /proc reads the very inode checked above, even
        // if the path was swapped meanwhile; O_NONBLOCK keeps even that
        // from ever waiting.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(OFlag::O_NONBLOCK.bits())
            .open(format!("/proc/self/fd/{}", located.as_raw_fd()))
            .map_err(open_error)?;
        Ok(Netns {
            file,
            path,
            id: NsId {
                dev: metadata.dev(),
                ino: metadata.ino(),
            },
        })
    }

    /// The identity of the namespace.
    pub fn id(&self) -> NsId {
        self.id
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
                id: self.id,
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

/// Why the file `located` (opened with `O_PATH`) is not a namespace file,
/// or `None` when it is one.
fn not_a_namespace_file(
    located: &File,
    metadata: &std::fs::Metadata,
) -> Result<Option<String>, Errno> {
    let kind = metadata.file_type();
    let other = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if nix::sys::statfs::fstatfs(located)?.filesystem_type() != NSFS_MAGIC {
        "a file that is not a namespace (not on nsfs)"
    } else {
        return Ok(None);
    };
    Ok(Some(other.to_owned()))
}

/// The identity of the network namespace at `path`, `None` when the path
/// does not exist. Refuses, without blocking, what [`Netns::open`] refuses,
/// and a namespace of another type (checked by entering it on a throwaway
/// thread: only `setns(2)` tells a namespace's type without an ioctl).
pub fn identify_netns(path: impl AsRef<Path>) -> Result<Option<NsId>, NetnsError> {
    let netns = match Netns::open(path) {
        Ok(netns) => netns,
        Err(NetnsError::Open { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(error) => return Err(error),
    };
    run_blocking_in(&netns, || ())?;
    Ok(Some(netns.id()))
}

/// Moves the calling thread into `netns`.
fn enter_netns(netns: &Netns) -> Result<(), NetnsError> {
    match nix::sched::setns(netns.as_fd(), CloneFlags::CLONE_NEWNET) {
        Ok(()) => Ok(()),
        // Netns::open lets only namespace files through, so EINVAL means a
        // namespace of another type.
        Err(Errno::EINVAL) => Err(NetnsError::NotANamespace {
            path: netns.path.clone(),
            reason: "a namespace of another type (mount, pid, user, ...)".to_owned(),
        }),
        Err(error) => Err(NetnsError::Enter(error)),
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
    /// The kernel runs one dump at a time per netlink socket and answers
    /// a second one with EBUSY: dumps on this worker's socket take turns.
    dumps: tokio::sync::Mutex<()>,
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
            dumps: tokio::sync::Mutex::new(()),
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

    /// [`NetlinkWorker::run`] for a job that dumps (lists links, addresses,
    /// routes or neighbours): it waits for any other dump on this worker
    /// to finish first, so concurrent callers never get EBUSY.
    pub async fn run_dump<F, Fut, T>(&self, job: F) -> Result<T, NetnsError>
    where
        F: FnOnce(Handle) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let _turn = self.dumps.lock().await;
        self.run(job).await
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
            enter_netns(&netns)?;
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
            if message.raw_code() == -(Errno::ENODEV as i32) =>
        {
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
}

/// The calling process's own network namespace: the node's, for an agent
/// running on the host.
pub const PROCESS_NETNS: &str = "/proc/self/ns/net";

/// Where `ip netns` keeps named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Creates a named namespace at `/run/netns/NAME`, like `ip netns add`,
/// and returns a handle to it. The namespace lives until
/// [`delete_named_netns`], independent of any thread or handle.
pub fn create_named_netns(name: &str) -> Result<Netns, NetnsError> {
    validate_netns_name(name)?;
    let path = Path::new(NETNS_RUN_DIR).join(name);
    let path_for_thread = path.clone();
    // unshare(2) moves the calling thread: do it on a throwaway thread so no
    // other thread, tokio worker or not, ever changes namespace.
    std::thread::Builder::new()
        .name("hulk-netns-add".into())
        .spawn(move || -> Result<(), NetnsError> {
            let open_error = |source| NetnsError::Open {
                path: path_for_thread.clone(),
                source,
            };
            std::fs::create_dir_all(NETNS_RUN_DIR).map_err(open_error)?;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path_for_thread)
                .map_err(open_error)?;
            let bound = nix::sched::unshare(CloneFlags::CLONE_NEWNET).and_then(|()| {
                nix::mount::mount(
                    Some("/proc/thread-self/ns/net"),
                    &path_for_thread,
                    None::<&str>,
                    nix::mount::MsFlags::MS_BIND,
                    None::<&str>,
                )
            });
            if let Err(error) = bound {
                let _ = std::fs::remove_file(&path_for_thread);
                return Err(NetnsError::Enter(error));
            }
            Ok(())
        })
        .map_err(NetnsError::Worker)?
        .join()
        .map_err(|_| NetnsError::WorkerGone)??;
    Netns::open(path)
}

/// Deletes a named namespace made by [`create_named_netns`] or `ip netns
/// add`. Its links go away once nothing else holds the namespace. Deleting a
/// missing namespace succeeds.
pub fn delete_named_netns(name: &str) -> Result<(), NetnsError> {
    validate_netns_name(name)?;
    let path = Path::new(NETNS_RUN_DIR).join(name);
    match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::ENOENT) | Err(Errno::EINVAL) => {}
        Err(error) => return Err(NetnsError::Enter(error)),
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetnsError::Open { path, source }),
    }
}

fn validate_netns_name(name: &str) -> Result<(), NetnsError> {
    let valid = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if valid {
        Ok(())
    } else {
        Err(NetnsError::Open {
            path: PathBuf::from(name),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a namespace name must be a plain file name",
            ),
        })
    }
}

/// Runs blocking `work` on a new thread inside `netns` and returns its
/// result: sockets it opens belong to that namespace (a probe, a test
/// client, a process launcher).
pub fn run_blocking_in<T: Send + 'static>(
    netns: &Netns,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let netns = netns.try_clone()?;
    std::thread::Builder::new()
        .name("hulk-netns-run".into())
        .spawn(move || {
            enter_netns(&netns)?;
            Ok(work())
        })
        .map_err(NetnsError::Worker)?
        .join()
        .map_err(|_| NetnsError::WorkerGone)?
}
