//! A three-node nats-server cluster with JetStream on loopback: each node with its own client and route ports and
//! store directory. A node can be killed and started again on the same ports and store (a node lost mid-stream).

use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use tempfile::TempDir;

use crate::process::{ServerProcess, free_port};
use crate::tools;

/// One node.
#[derive(Debug)]
struct Node {
    name: String,
    port: u16,
    route: u16,
    process: Option<ServerProcess>,
}

/// A running cluster. Stopped and its stores removed on drop.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: TempDir,
}

impl NatsCluster {
    /// Starts `size` nodes and waits until JetStream answers through each.
    pub async fn start(size: usize) -> crate::Result<Self> {
        let mut nodes = Vec::with_capacity(size);
        for i in 0..size {
            nodes.push(Node {
                name: format!("n{i}"),
                port: free_port()?,
                route: free_port()?,
                process: None,
            });
        }
        let mut cluster = Self {
            nodes,
            dir: tempfile::Builder::new()
                .prefix("projectionist-nats-cluster-")
                .tempdir()?,
        };
        for i in 0..size {
            cluster.spawn(i)?;
        }
        for i in 0..size {
            cluster.wait_ready(i).await?;
        }
        Ok(cluster)
    }

    /// The client URLs of every node, comma-separated (what a client that fails over is given).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The server name of node `i` (as stream info names a leader).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The node called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Connects a client to every node (it fails over).
    pub async fn connect(&self) -> crate::Result<async_nats::Client> {
        let urls: Vec<String> = self.urls().split(',').map(str::to_string).collect();
        async_nats::ConnectOptions::new()
            .connect(urls)
            .await
            .context("connecting to the cluster")
    }

    fn spawn(&mut self, i: usize) -> crate::Result<()> {
        let routes = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| format!("nats://127.0.0.1:{}", n.route))
            .collect::<Vec<_>>()
            .join(",");
        let node = &self.nodes[i];
        let mut cmd = Command::new(tools::nats_server()?);
        cmd.arg("--addr")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(node.port.to_string())
            .arg("--jetstream")
            .arg("--store_dir")
            .arg(self.dir.path().join(&node.name))
            .arg("--server_name")
            .arg(&node.name)
            .arg("--cluster_name")
            .arg("projectionist-test")
            .arg("--cluster")
            .arg(format!("nats://127.0.0.1:{}", node.route))
            .arg("--routes")
            .arg(routes);
        let log = self.dir.path().join(format!("{}.log", node.name));
        let process = ServerProcess::spawn("nats-server", cmd, &log)?;
        self.nodes[i].process = Some(process);
        Ok(())
    }

    async fn wait_ready(&mut self, i: usize) -> crate::Result<()> {
        let port = self.nodes[i].port;
        let url = format!("nats://127.0.0.1:{port}");
        let process = self.nodes[i].process.as_mut().context("node not running")?;
        process
            .wait_ready(port, Duration::from_secs(30), || async {
                let client = async_nats::connect(&url).await.map_err(|e| e.to_string())?;
                async_nats::jetstream::new(client)
                    .query_account()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await
    }

    /// Kills node `i` (a crash).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].process.take() {
            p.kill();
        }
    }

    /// Starts node `i` again on its ports and store, and waits until JetStream answers through it.
    pub async fn start_again(&mut self, i: usize) -> crate::Result<()> {
        if self.nodes[i].process.is_none() {
            self.spawn(i)?;
        }
        self.wait_ready(i).await
    }
}
