//! The agent as a library ([`Agent::with_kernel`] on the fake kernel)
//! against the Kubernetes API stand-in: one agent per node name. A second
//! agent under a held node name refuses to start, naming the holder; the
//! same agent restarted takes its Lease back at once; a graceful stop
//! gives the Lease back and removes the sockets. Without Kubernetes, the
//! instance marks in the backend refuse a second agent all the same.

// Test code: a panic is how a helper reports a broken test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hulk_agent::config::AgentConfig;
use hulk_agent::{Agent, AgentError};
use hulk_agent_api::{PluginReply, PluginRequest, call};
use hulk_kube_standin::{StandIn, StandInConfig};
use hulk_netns::fake::FakeKernel;
use tokio_util::sync::CancellationToken;

/// A directory of its own for one agent's sockets and files.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("hulk-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An agent of node `node-1` with its sockets and files in `scratch`,
/// its instance id in `instance`, a state file when `stored` (a cloud
/// backend), and `sections` (its backend, and Kubernetes or not) after the
/// common ones.
fn agent_config(scratch: &Scratch, instance: &Path, stored: bool, sections: &str) -> AgentConfig {
    let state_file = if stored {
        format!("state_file = \"{}\"", scratch.path("pool.redb").display())
    } else {
        String::new()
    };
    let path = |file: &str| scratch.path(file).display().to_string();
    AgentConfig::parse(&format!(
        r#"
        node_name = "node-1"
        socket = "{}"
        rescue_socket = "{}"
        pending_del_dir = "{}"
        instance_file = "{}"
        {state_file}
        [network]
        parent = "eth1"
        node_address = "10.20.0.250/24"
        [default_pool]
        network = "vpc"
        subnet = "subnet-a"
        {sections}
        "#,
        path("agent.sock"),
        path("rescue.sock"),
        path("pending-dels"),
        instance.display(),
    ))
    .unwrap()
}

/// An agent of `node-1` on the memory backend, reading Kubernetes at `api`.
fn config(scratch: &Scratch, instance: &Path, api: &str) -> AgentConfig {
    let path = |file: &str| scratch.path(file).display().to_string();
    agent_config(
        scratch,
        instance,
        false,
        &format!(
            r#"
            [backend]
            type = "memory"
            subnet = "10.20.0.0/24"
            [kubernetes]
            api_server = "{api}"
            token_file = "{}"
            ca_file = "{}"
            "#,
            path("no-token"),
            path("no-ca"),
        ),
    )
}

fn kernel() -> FakeKernel {
    let kernel = FakeKernel::new();
    kernel.add_parent("eth1", 1500);
    kernel
}

#[tokio::test]
async fn one_agent_per_node_name_and_the_same_one_comes_back_at_once() {
    let api = StandIn::start(StandInConfig::default()).await.unwrap();
    let (first, second) = (Scratch::new("fence-a"), Scratch::new("fence-b"));
    let first_instance = first.path("instance-id");
    let agent = Agent::with_kernel(config(&first, &first_instance, &api.url()), kernel())
        .await
        .unwrap();
    let holder = std::fs::read_to_string(&first_instance).unwrap();

    // Another machine under the same node name: refused, naming the holder.
    let refused = Agent::with_kernel(
        config(&second, &second.path("instance-id"), &api.url()),
        kernel(),
    )
    .await
    .unwrap_err();
    match &refused {
        AgentError::NodeHeld {
            node,
            holder: other,
            ..
        } => {
            assert_eq!(node, "node-1");
            assert_eq!(other, holder.trim());
        }
        other => panic!("expected NodeHeld, got {other:?}"),
    }
    assert!(refused.to_string().contains(holder.trim()), "{refused}");
    // It touched nothing: its sockets are gone with it.
    assert!(!second.path("agent.sock").exists());

    // The same agent restarted (killed: its Lease still runs) is the same
    // holder and takes the Lease back at once.
    drop(agent);
    let agent = Agent::with_kernel(config(&first, &first_instance, &api.url()), kernel())
        .await
        .unwrap();

    // Serving, then a graceful stop: the Lease is given back, so the
    // other machine may start now.
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(agent.run(shutdown.clone()));
    let socket = first.path("agent.sock");
    let reply = call(&socket, &PluginRequest::Status, Duration::from_secs(10)).await;
    assert_eq!(reply.unwrap(), PluginReply::Done);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!socket.exists(), "the socket file is removed at the stop");
    Agent::with_kernel(
        config(&second, &second.path("instance-id"), &api.url()),
        kernel(),
    )
    .await
    .unwrap();
}

/// An agent of node `node-1` without Kubernetes, its addresses from the
/// UltrON-style service at `ultron`.
fn config_without_kubernetes(scratch: &Scratch, ultron: &str) -> AgentConfig {
    std::fs::write(scratch.path("token"), "s3cret").unwrap();
    agent_config(
        scratch,
        &scratch.path("instance-id"),
        true,
        &format!(
            r#"
            [backend]
            type = "ultron"
            url = "{ultron}"
            token_file = "{}"
            cluster = "test"
            "#,
            scratch.path("token").display(),
        ),
    )
}

#[tokio::test]
async fn without_kubernetes_a_second_agent_under_one_node_name_is_refused_by_the_marks() {
    let cloud = std::sync::Arc::new(hulk_ipam::MemoryBackend::new(
        "10.20.0.0/24".parse().unwrap(),
    ));
    let app = hulk_openstack::ultron::server::router(cloud.clone(), "s3cret");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let ultron = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum_serve(listener, app).await });

    let (first, second) = (Scratch::new("marks-a"), Scratch::new("marks-b"));
    let agent = Agent::with_kernel(config_without_kubernetes(&first, &ultron), kernel())
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(agent.run(shutdown.clone()));
    // The warm-up allocates the node's first addresses, marked as the
    // first agent's.
    let holder = std::fs::read_to_string(first.path("instance-id")).unwrap();
    let mut marked = Vec::new();
    for _ in 0..100 {
        marked = hulk_ipam::IpamBackend::list(&*cloud, &hulk_ipam::ListScope::Cluster)
            .await
            .unwrap();
        if !marked.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!marked.is_empty(), "the first agent warmed its pool up");

    // Another machine under the same node name, no Kubernetes anywhere.
    let refused = Agent::with_kernel(config_without_kubernetes(&second, &ultron), kernel())
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, AgentError::HeldElsewhere { node, .. } if node == "node-1"),
        "{refused:?}"
    );
    let said = hulk_cni::describe(&refused);
    assert!(
        said.contains(holder.trim()),
        "names the other holder: {said}"
    );
    assert!(!second.path("agent.sock").exists(), "it serves nothing");
    let after = hulk_ipam::IpamBackend::list(&*cloud, &hulk_ipam::ListScope::Cluster)
        .await
        .unwrap();
    assert!(
        after
            .iter()
            .all(|lease| lease.marked_by.as_ref().unwrap().instance == holder.trim()),
        "it marked nothing as its own: {after:?}"
    );
    // The first agent serves on.
    let reply = call(
        &first.path("agent.sock"),
        &PluginRequest::Status,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(reply.unwrap(), PluginReply::Done);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    server.abort();
}

async fn axum_serve(listener: tokio::net::TcpListener, app: axum::Router) {
    let _ = axum::serve(listener, app).await;
}
