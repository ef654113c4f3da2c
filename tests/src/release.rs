//! The chart installed on a [`ControlPlane`] with the real `helm install` (CRDs included), and the operator run as a
//! local process the way the chart's Deployment runs it: the Deployment's own arguments (ports moved to free
//! loopback ports, a writable work dir) and a kubeconfig for the chart's own ServiceAccount, so the chart's RBAC is
//! exactly what the operator has.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::control_plane::{ControlPlane, tool};
use crate::process::free_port;
use crate::repo;

/// Runs the real `helm` as the admin; its stdout, or an error with its output.
pub fn helm(plane: &ControlPlane, args: &[&str]) -> crate::Result<String> {
    let out = Command::new(tool("helm")?)
        .arg("--kubeconfig")
        .arg(plane.admin_kubeconfig())
        .args(args)
        .output()
        .context("running helm")?;
    if !out.status.success() {
        bail!(
            "helm {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An installed release of the chart.
#[derive(Debug)]
pub struct Release {
    /// The release's namespace.
    pub namespace: String,
    /// Every manifest of the release, as `helm get manifest` prints them.
    pub manifests: Vec<Value>,
    /// `helm install`'s output.
    pub notes: String,
    /// The operator's admin (health, metrics) port on 127.0.0.1.
    pub admin_port: u16,
    /// The webhook's port on 127.0.0.1.
    pub webhook_port: u16,
    /// The operator's arguments: the Deployment's, with local ports and `work_dir`.
    pub args: Vec<String>,
    /// The Deployment's ServiceAccount.
    pub service_account: String,
    /// A kubeconfig with a token of that ServiceAccount.
    pub kubeconfig: PathBuf,
}

impl Release {
    /// `helm install projectionist charts/projectionist -n <namespace> --create-namespace <extra>`, then the
    /// operator's command line taken from the installed Deployment.
    pub fn install(
        plane: &ControlPlane,
        namespace: &str,
        work_dir: &Path,
        extra: &[&str],
    ) -> crate::Result<Self> {
        let chart = repo::root().join("charts/projectionist");
        let chart = chart.display().to_string();
        let mut args = vec![
            "install",
            "projectionist",
            &chart,
            "-n",
            namespace,
            "--create-namespace",
        ];
        args.extend_from_slice(extra);
        let notes = helm(plane, &args)?;
        let text = helm(
            plane,
            &["get", "manifest", "projectionist", "-n", namespace],
        )?;
        let manifests: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
            .filter_map(|doc| serde_yaml::Value::deserialize(doc).ok())
            .filter_map(|v| serde_json::to_value(v).ok())
            .filter(|v: &Value| v.is_object())
            .collect();
        let deployment = find(&manifests, "Deployment", "projectionist")
            .context("the chart installed no Deployment")?;
        let pod_spec = &deployment["spec"]["template"]["spec"];
        let mut args: Vec<String> = pod_spec["containers"][0]["args"]
            .as_array()
            .context("the operator's args")?
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        let admin_port = free_port()?;
        let webhook_port = free_port()?;
        replace_arg(
            &mut args,
            "--admin-addr",
            &format!("127.0.0.1:{admin_port}"),
        );
        replace_arg(
            &mut args,
            "--webhook-addr",
            &format!("127.0.0.1:{webhook_port}"),
        );
        replace_arg(
            &mut args,
            "--work-dir",
            &work_dir.join("work").to_string_lossy(),
        );
        let service_account = pod_spec["serviceAccountName"]
            .as_str()
            .context("serviceAccountName")?
            .to_string();
        let kubeconfig = plane.service_account_kubeconfig(namespace, &service_account)?;
        Ok(Self {
            namespace: namespace.to_string(),
            manifests,
            notes,
            admin_port,
            webhook_port,
            args,
            service_account,
            kubeconfig,
        })
    }

    /// The manifest of `kind`/`name` in the release.
    pub fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        find(&self.manifests, kind, name)
    }

    /// The value of `--flag=value` in the operator's arguments.
    pub fn arg(&self, flag: &str) -> Option<String> {
        self.args
            .iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")).map(str::to_string))
    }

    /// The operator's command: `binary` with the Deployment's arguments, as the ServiceAccount, as pod `pod_name`.
    pub fn operator_command(&self, binary: &Path, pod_name: &str) -> Command {
        let mut cmd = Command::new(binary);
        cmd.args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("POD_NAME", pod_name)
            .env("POD_NAMESPACE", &self.namespace);
        cmd
    }

    /// The ServiceAccount's user name, as the audit log records it.
    pub fn user(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

fn find<'a>(manifests: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    manifests
        .iter()
        .find(|m| m["kind"] == kind && m["metadata"]["name"] == name)
}

fn replace_arg(args: &mut [String], flag: &str, value: &str) {
    for a in args.iter_mut() {
        if a.starts_with(&format!("{flag}=")) {
            *a = format!("{flag}={value}");
        }
    }
}
