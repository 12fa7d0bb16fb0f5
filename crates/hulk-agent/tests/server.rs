//! The agent's socket server against clients that misbehave: silent,
//! flooding, oversized, undecodable, not root, or another agent on the
//! same path; random bytes thrown at the real server; the metrics
//! endpoint's bounds. Servers run `lines::serve` with the real plugin and
//! rescue APIs over the in-memory kernel and mock backend, on sockets in a
//! temporary directory; the open-file-limit and non-root cases run a child
//! process (this test binary again, see `child_*`).

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use hulk_node::testing as support;

use std::io::{BufRead, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hulk_agent::plugin_service::{PluginMetrics, PluginService};
use hulk_agent::rescue::{RescueReply, RescueRequest, RescueService};
use hulk_agent::server::{AllowedPeers, BindError, ServeLimits, bind};
use hulk_agent_api::codes;
use hulk_agent_api::{PluginReply, PluginRequest, call};
use hulk_cni::ErrorCode;
use hulk_netns::fake::FakeKernel;
use hulk_node::Node;
use hulk_pool::PoolConfig;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh directory under the system's temporary directory, removed when
/// dropped; 0755 so that the non-root client can reach sockets in it.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("hulk-server-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(path)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("agent.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn node() -> Arc<Node<FakeKernel>> {
    let kernel = FakeKernel::new();
    kernel.add_parent("eth1", 1500);
    kernel.add_namespace("/var/run/netns/p0");
    let config = PoolConfig {
        warm_up: 4,
        ..PoolConfig::default()
    };
    support::memory_node(kernel, config).await
}

/// A running server; dropping it does not stop it (the test's runtime
/// ends it), `stop` does.
struct Running {
    stop: CancellationToken,
    served: tokio::task::JoinHandle<()>,
}

/// The plugin API served on `socket` (mode 0666: who is served is up to
/// `limits.allowed_peers`).
async fn plugin_server(socket: &Path, limits: ServeLimits) -> Running {
    let (listener, file) = bind(socket, 0o666).await.unwrap();
    let api = Arc::new(PluginService::new(node().await, PluginMetrics::default()));
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let served = tokio::spawn(async move {
        hulk_agent::server::serve(api, listener, limits, stopped).await;
        drop(file);
    });
    Running { stop, served }
}

async fn rescue_server(socket: &Path, limits: ServeLimits) -> Running {
    let (listener, file) = bind(socket, 0o600).await.unwrap();
    let api = Arc::new(RescueService::new(node().await));
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let served = tokio::spawn(async move {
        hulk_agent::server::serve(api, listener, limits, stopped).await;
        drop(file);
    });
    Running { stop, served }
}

/// Sends `bytes`, closes the sending side and returns everything the
/// server wrote. A server that stops reading early resets the connection
/// after its reply: that counts as the end.
async fn exchange(socket: &Path, bytes: &[u8]) -> Vec<u8> {
    let stream = UnixStream::connect(socket).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let bytes = bytes.to_vec();
    // Concurrently: an oversized request fills the socket's buffer, and
    // the server answers before it has read all of it.
    let sending = tokio::spawn(async move {
        let _ = writer.write_all(&bytes).await;
        let _ = writer.shutdown().await;
    });
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(TIMEOUT, reader.read(&mut chunk)).await {
            Err(_) => panic!("no answer within {TIMEOUT:?}"),
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&chunk[..n]),
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionReset => break,
            Ok(Err(error)) => panic!("reading the answer: {error}"),
        }
    }
    sending.abort();
    answer
}

/// The one reply line in `answer`, decoded.
fn one_line<Reply: serde::de::DeserializeOwned>(answer: &[u8]) -> Reply {
    let text = std::str::from_utf8(answer).unwrap();
    assert_eq!(text.matches('\n').count(), 1, "not one line: {text:?}");
    assert!(text.ends_with('\n'), "{text:?}");
    serde_json::from_str(text).unwrap()
}

fn decoding_failure(reply: &PluginReply) -> Option<&str> {
    match reply {
        PluginReply::Failed(error) if error.code == ErrorCode::DecodingFailure => Some(&error.msg),
        _ => None,
    }
}

#[tokio::test]
async fn invalid_utf8_and_garbage_are_answered_with_an_error_document() {
    let dir = TempDir::new("garbage");
    let _server = plugin_server(&dir.socket(), ServeLimits::default()).await;
    let inputs: [&[u8]; 6] = [
        b"\xff\xfe\xfd\n",
        b"{\"op\":\"del\",\"container_id\":\"\xc3\x28\",\"ifname\":\"eth0\"}\n",
        b"{\"op\":\"status\"\xff}\n",
        b"{\"op\":\"reboot\"}\n",
        b"\n",
        b"",
    ];
    for input in inputs {
        let reply: PluginReply = one_line(&exchange(&dir.socket(), input).await);
        assert!(decoding_failure(&reply).is_some(), "{input:?}: {reply:?}");
    }
    // The server is still fine.
    let reply = call(&dir.socket(), &PluginRequest::Status, TIMEOUT).await;
    assert_eq!(reply.unwrap(), PluginReply::Done);
}

#[tokio::test]
async fn a_line_over_the_limit_is_refused_and_one_at_the_limit_served() {
    let dir = TempDir::new("long");
    let limits = ServeLimits {
        max_request_bytes: 1024,
        ..ServeLimits::default()
    };
    let _server = plugin_server(&dir.socket(), limits).await;
    // 4 MiB without a newline: more than the socket buffers hold.
    let reply: PluginReply = one_line(&exchange(&dir.socket(), &vec![b' '; 4 << 20]).await);
    let message = decoding_failure(&reply).unwrap();
    assert!(message.contains("longer than 1024 bytes"), "{message}");

    let mut exact = br#"{"op":"status"}"#.to_vec();
    exact.resize(1024, b' ');
    exact.push(b'\n');
    let reply: PluginReply = one_line(&exchange(&dir.socket(), &exact).await);
    assert_eq!(reply, PluginReply::Done);
    exact.insert(0, b' ');
    let reply: PluginReply = one_line(&exchange(&dir.socket(), &exact).await);
    assert!(decoding_failure(&reply).is_some(), "{reply:?}");
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_client_timeout() {
    let dir = TempDir::new("silent");
    let limits = ServeLimits {
        client_timeout: Duration::from_millis(300),
        ..ServeLimits::default()
    };
    let _server = plugin_server(&dir.socket(), limits).await;
    for first in [&b""[..], b"{\"op\":\"sta"] {
        let mut stream = UnixStream::connect(dir.socket()).await.unwrap();
        stream.write_all(first).await.unwrap();
        let started = Instant::now();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut rest)).await;
        assert_eq!(read.unwrap().unwrap(), 0, "dropped without a reply");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
    }
}

#[tokio::test]
async fn connections_over_the_cap_wait_for_a_slot() {
    let dir = TempDir::new("cap");
    let limits = ServeLimits {
        max_connections: 2,
        client_timeout: Duration::from_millis(800),
        ..ServeLimits::default()
    };
    let _server = plugin_server(&dir.socket(), limits).await;
    let _idle: Vec<UnixStream> = vec![
        UnixStream::connect(dir.socket()).await.unwrap(),
        UnixStream::connect(dir.socket()).await.unwrap(),
    ];
    // Connected (the backlog holds it) but not accepted until an idle
    // connection is dropped.
    let started = Instant::now();
    let reply = call(&dir.socket(), &PluginRequest::Status, TIMEOUT).await;
    assert_eq!(reply.unwrap(), PluginReply::Done);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // With the slots free again, at once.
    let started = Instant::now();
    call(&dir.socket(), &PluginRequest::Status, TIMEOUT)
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn a_shutdown_is_not_held_up_by_an_idle_client() {
    let dir = TempDir::new("shutdown");
    let limits = ServeLimits {
        client_timeout: Duration::from_secs(600),
        ..ServeLimits::default()
    };
    let server = plugin_server(&dir.socket(), limits).await;
    let mut idle = UnixStream::connect(dir.socket()).await.unwrap();
    idle.write_all(b"{\"op\":").await.unwrap();
    // Accepted before the stop.
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.stop.cancel();
    tokio::time::timeout(Duration::from_secs(2), server.served)
        .await
        .expect("the shutdown waited for the idle client")
        .unwrap();
    assert!(!dir.socket().exists(), "the socket file was left behind");
}

#[tokio::test]
async fn a_refused_peer_gets_an_error_line() {
    let dir = TempDir::new("refused");
    let limits = ServeLimits {
        allowed_peers: AllowedPeers::Uids(vec![4242]),
        ..ServeLimits::default()
    };
    let _server = plugin_server(&dir.socket(), limits.clone()).await;
    let PluginReply::Failed(error) = call(&dir.socket(), &PluginRequest::Status, TIMEOUT)
        .await
        .unwrap()
    else {
        panic!("served a uid not allowed");
    };
    assert_eq!(error.code, codes::AGENT_UNAVAILABLE);
    assert!(error.msg.contains("uid 0"), "{}", error.msg);

    let rescue = dir.0.join("rescue.sock");
    let _rescue = rescue_server(&rescue, limits).await;
    let reply = hulk_agent_api::call(&rescue, &RescueRequest::Pools, TIMEOUT).await;
    assert!(
        matches!(&reply, Ok(RescueReply::Failed { message }) if message.contains("does not serve")),
        "{reply:?}"
    );
}

/// Runs the ignored test `name` of this binary in a child process, as
/// `uid` if given, with `env`.
fn child(name: &str, uid: Option<u32>, env: &[(&str, &str)]) -> Command {
    let exe = std::env::current_exe().unwrap();
    let program = match uid {
        None => exe,
        // The checkout may sit where another user cannot enter (a 0700
        // temporary directory): that user runs a copy from a 0755 one.
        Some(_) => {
            let dir = other_users_exe_dir();
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            let copy = dir.join("server-test");
            std::fs::copy(&exe, &copy).unwrap();
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
            copy
        }
    };
    let mut command = Command::new(program);
    command
        .args([
            "--ignored",
            "--exact",
            name,
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(env.iter().copied());
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    command
}

/// Where [`child`] puts the copy of this binary another user runs.
fn other_users_exe_dir() -> PathBuf {
    std::env::temp_dir().join(format!("hulk-server-exe-{}", std::process::id()))
}

const NOBODY: u32 = 65534;

/// The child of `non_root_peers_are_kept_out_by_mode_and_by_uid`: connects
/// to `HULK_TEST_SOCKET`, asks STATUS and prints `REPLY <line>` or
/// `ERROR <kind>`.
#[tokio::test]
#[ignore = "run by another test in a child process"]
async fn child_asks_status() {
    let socket = std::env::var("HULK_TEST_SOCKET").unwrap();
    match call(Path::new(&socket), &PluginRequest::Status, TIMEOUT).await {
        Ok(reply) => println!("REPLY {}", serde_json::to_string(&reply).unwrap()),
        Err(hulk_agent_api::ClientError::Io { source, .. }) => {
            println!("ERROR {:?}", source.kind())
        }
        Err(error) => println!("ERROR {error}"),
    }
}

async fn status_as_nobody(socket: &Path) -> String {
    let mut command = child(
        "child_asks_status",
        Some(NOBODY),
        &[("HULK_TEST_SOCKET", socket.to_str().unwrap())],
    );
    // Off the runtime's thread: the server runs on it.
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(other_users_exe_dir());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let outcome = ["REPLY ", "ERROR "]
        .iter()
        .find_map(|tag| stdout.find(tag))
        .unwrap_or_else(|| panic!("no outcome from the child: {stdout}"));
    stdout[outcome..].lines().next().unwrap().to_owned()
}

#[tokio::test]
async fn non_root_peers_are_kept_out_by_mode_and_by_uid() {
    let dir = TempDir::new("nobody");
    // 0666: the mode lets nobody in; the uid check refuses it.
    let _plugin = plugin_server(&dir.socket(), ServeLimits::default()).await;
    let outcome = status_as_nobody(&dir.socket()).await;
    let reply: PluginReply = serde_json::from_str(
        outcome
            .strip_prefix("REPLY ")
            .unwrap_or_else(|| panic!("nobody got no reply: {outcome}")),
    )
    .unwrap();
    assert!(
        matches!(&reply, PluginReply::Failed(error)
            if error.code == codes::AGENT_UNAVAILABLE && error.msg.contains("uid 65534")),
        "{reply:?}"
    );
    // Root is served.
    let reply = call(&dir.socket(), &PluginRequest::Status, TIMEOUT).await;
    assert_eq!(reply.unwrap(), PluginReply::Done);
    // 0600 (the rescue socket's mode): nobody cannot even connect.
    let rescue = dir.0.join("rescue.sock");
    let _rescue = rescue_server(&rescue, ServeLimits::default()).await;
    assert_eq!(status_as_nobody(&rescue).await, "ERROR PermissionDenied");
}

#[tokio::test]
async fn the_socket_never_exists_with_a_wider_mode_even_under_umask_000() {
    let dir = TempDir::new("umask");
    let path = dir.socket();
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (path, done) = (path.clone(), done.clone());
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            while !done.load(Ordering::Relaxed) {
                if let Ok(meta) = std::fs::symlink_metadata(&path) {
                    seen.insert(meta.mode() & 0o7777);
                }
            }
            seen
        })
    };
    // Process-wide, but only ever narrowed back: other tests running now
    // create their files with wider modes at worst, which they do not check.
    let previous = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    for _ in 0..50 {
        let bound = bind(&path, 0o600).await.unwrap();
        drop(bound);
    }
    nix::sys::stat::umask(previous);
    done.store(true, Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    assert!(
        seen.iter().all(|mode| *mode == 0o600),
        "modes seen: {seen:?}"
    );
    assert!(!seen.is_empty(), "the watcher never saw the socket");
    // And nothing left behind but what was asked for.
    let left: Vec<_> = std::fs::read_dir(&dir.0).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn a_live_socket_is_not_taken_over_and_a_stale_one_is_replaced() {
    let dir = TempDir::new("takeover");
    let path = dir.socket();
    let server = plugin_server(&path, ServeLimits::default()).await;
    let error = bind(&path, 0o660).await.unwrap_err();
    assert!(matches!(&error, BindError::Live { path: refused } if *refused == path));
    assert!(
        error.to_string().contains(path.to_str().unwrap()),
        "{error}"
    );
    // The first server is untouched.
    let reply = call(&path, &PluginRequest::Status, TIMEOUT).await;
    assert_eq!(reply.unwrap(), PluginReply::Done);

    // A stale socket: bound, listener gone, file kept.
    server.stop.cancel();
    server.served.await.unwrap();
    let (listener, stale) = bind(&path, 0o660).await.unwrap();
    drop(listener);
    let (_listener, fresh) = bind(&path, 0o660).await.unwrap();
    // The stale one's file is not its own any more: left in place.
    drop(stale);
    assert!(path.exists());
    drop(fresh);
    assert!(!path.exists());

    std::fs::write(&path, "not a socket").unwrap();
    let error = bind(&path, 0o660).await.unwrap_err();
    assert!(matches!(error, BindError::NotASocket { .. }), "{error}");
}

/// The child of `at_the_open_file_limit_accept_backs_off_and_status_is_answered`:
/// serves the plugin API on `HULK_TEST_SOCKET` with `HULK_TEST_SPARE_FILES`
/// files free, logging to stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by another test in a child process"]
async fn child_serves_with_few_files() {
    use nix::sys::resource::{Resource, setrlimit};
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let socket = PathBuf::from(std::env::var("HULK_TEST_SOCKET").unwrap());
    let spare: u64 = std::env::var("HULK_TEST_SPARE_FILES")
        .unwrap()
        .parse()
        .unwrap();
    let client_timeout = Duration::from_millis(
        std::env::var("HULK_TEST_CLIENT_TIMEOUT_MS")
            .unwrap()
            .parse()
            .unwrap(),
    );
    let (listener, _file) = bind(&socket, 0o600).await.unwrap();
    let api = Arc::new(PluginService::new(node().await, PluginMetrics::default()));
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    setrlimit(Resource::RLIMIT_NOFILE, open + spare, open + spare).unwrap();
    println!("READY");
    let limits = ServeLimits {
        client_timeout,
        ..ServeLimits::default()
    };
    hulk_agent::server::serve(api, listener, limits, CancellationToken::new()).await;
}

/// CPU seconds (user + system) a process used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Kills the child server when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn at_the_open_file_limit_accept_backs_off_and_status_is_answered() {
    let dir = TempDir::new("emfile");
    let log = dir.0.join("server.log");
    let mut server = Child(
        child(
            "child_serves_with_few_files",
            None,
            &[
                ("HULK_TEST_SOCKET", dir.socket().to_str().unwrap()),
                ("HULK_TEST_SPARE_FILES", "20"),
                ("HULK_TEST_CLIENT_TIMEOUT_MS", "2000"),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap(),
    );
    let mut ready = String::new();
    let mut stdout = std::io::BufReader::new(server.0.stdout.take().unwrap());
    while !ready.contains("READY") {
        ready.clear();
        assert_ne!(stdout.read_line(&mut ready).unwrap(), 0, "the child exited");
    }
    // More idle connections than the server has files; those it cannot
    // accept wait in the backlog.
    let mut idle = Vec::new();
    for _ in 0..30 {
        idle.push(UnixStream::connect(dir.socket()).await.unwrap());
    }
    let pid = server.0.id();
    let cpu_before = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cpu = cpu_seconds(pid) - cpu_before;
    let mut text = String::new();
    std::fs::File::open(&log)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let errors = text.matches("cannot accept").count();
    assert!(errors >= 1, "the limit was not reached:\n{text}");
    // Back-off: 1 ms doubling, so about 11 lines in the first 1.5 s.
    assert!(errors <= 15, "{errors} accept error lines in 1.5 s");
    assert!(cpu < 0.5, "{cpu} CPU seconds in 1.5 s");
    // The idle clients stay: STATUS is answered once the server has dropped
    // the silent ones it holds (2 s) and reached it in the backlog.
    let reply = call(
        &dir.socket(),
        &PluginRequest::Status,
        Duration::from_secs(8),
    )
    .await;
    assert_eq!(reply.unwrap(), PluginReply::Done);
    drop(idle);
}

#[tokio::test]
async fn the_metrics_endpoint_caps_connections_and_their_lifetime() {
    use hulk_agent::http::HttpLimits;
    let pools = node().await.pools().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let limits = HttpLimits {
        max_connections: 1,
        connection_lifetime: Duration::from_millis(600),
    };
    let served = tokio::spawn(hulk_agent::http::serve(
        listener,
        limits,
        pools,
        prometheus_client::registry::Registry::default(),
        stop.clone(),
    ));
    let healthz = || async move {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(TIMEOUT, stream.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        answer
    };
    assert!(healthz().await.ends_with("ok\n"));
    // A client sending its headers slowly holds the only slot, for its
    // lifetime at most.
    let mut slow = tokio::net::TcpStream::connect(address).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    assert!(healthz().await.ends_with("ok\n"));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // Nor does one hold the shutdown.
    let mut slow = tokio::net::TcpStream::connect(address).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(3), served)
        .await
        .expect("the shutdown waited for a slow client")
        .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Bytes the decoders and servers may see: valid requests, valid
    /// requests with bytes overwritten, inserted or cut, and noise.
    #[test]
    fn any_bytes_get_exactly_one_reply_line(input in requests()) {
        // The decoders alone: an error, never a panic.
        let _ = serde_json::from_slice::<PluginRequest>(&input);
        let _ = serde_json::from_slice::<RescueRequest>(&input);
        RUNTIME.block_on(async {
            let servers = servers().await;
            let _: PluginReply = one_line(&exchange(&servers.plugin, &input).await);
            let _: RescueReply = one_line(&exchange(&servers.rescue, &input).await);
        });
    }
}

const VALID: [&str; 8] = [
    r#"{"op":"status"}"#,
    r#"{"op":"del","container_id":"c0","ifname":"eth0","netns":"/var/run/netns/p0"}"#,
    r#"{"op":"check","container_id":"c9","ifname":"eth0","netns":null,"timeout_ms":5}"#,
    r#"{"op":"gc","cni_network":"vpc","valid":[{"containerID":"c0","ifname":"eth0"}]}"#,
    r#"{"op":"pools"}"#,
    r#"{"op":"leases","subnet":"subnet-a"}"#,
    r#"{"op":"drain","subnet":"subnet-zz"}"#,
    r#"{"op":"release","address":"10.20.0.77"}"#,
];

fn requests() -> impl Strategy<Value = Vec<u8>> {
    let mutated = (
        prop::sample::select(&VALID[..]),
        prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 0..6),
    )
        .prop_map(|(valid, edits)| {
            let mut bytes = valid.as_bytes().to_vec();
            for (at, byte, kind) in edits {
                let at = at % (bytes.len() + 1);
                match kind {
                    0 if at < bytes.len() => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ => bytes.truncate(at),
                }
            }
            bytes.push(b'\n');
            bytes
        });
    prop_oneof![mutated, prop::collection::vec(any::<u8>(), 0..600)]
}

/// One runtime and one pair of servers for all the cases, so that cases
/// cost a connection each.
static RUNTIME: std::sync::LazyLock<tokio::runtime::Runtime> =
    std::sync::LazyLock::new(|| tokio::runtime::Runtime::new().unwrap());

struct Servers {
    plugin: PathBuf,
    rescue: PathBuf,
    _dir: TempDir,
    _running: (Running, Running),
}

async fn servers() -> &'static Servers {
    static SERVERS: tokio::sync::OnceCell<Servers> = tokio::sync::OnceCell::const_new();
    SERVERS
        .get_or_init(|| async {
            let dir = TempDir::new("fuzz");
            let (plugin, rescue) = (dir.socket(), dir.0.join("rescue.sock"));
            let limits = ServeLimits {
                client_timeout: Duration::from_secs(2),
                ..ServeLimits::default()
            };
            let running = (
                plugin_server(&plugin, limits.clone()).await,
                rescue_server(&rescue, limits).await,
            );
            Servers {
                plugin,
                rescue,
                _dir: dir,
                _running: running,
            }
        })
        .await
}
