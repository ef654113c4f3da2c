//! The chart through Helm's own engine (`scripts/helm.py` on the PyPI package helm-python-sdk, which
//! `scripts/setup.sh` installs into `.tools/venv`).

use std::process::Command;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::repo;

fn run(args: &[&str]) -> crate::Result<std::process::Output> {
    let python = repo::root().join(".tools/venv/bin/python");
    anyhow::ensure!(
        python.exists(),
        "{} missing: run scripts/setup.sh",
        python.display()
    );
    Command::new(python)
        .arg(repo::root().join("scripts/helm.py"))
        .args(args)
        .output()
        .context("running scripts/helm.py")
}

/// The chart's directory.
pub fn chart() -> std::path::PathBuf {
    repo::root().join("charts/projectionist")
}

/// `helm lint --strict` with `values`: the report (`messages` with `severity` 1 info, 2 warning, 3 error; `errors`).
pub fn lint(values: &Value) -> crate::Result<Value> {
    let chart = chart();
    let out = run(&["lint", &chart.to_string_lossy(), &values.to_string()])?;
    if !out.status.success() {
        bail!("helm lint failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Renders the chart (after checking `values` against `values.schema.json`); every manifest, in template order.
pub fn render(values: &Value, release: &str, namespace: &str) -> crate::Result<Vec<Value>> {
    let chart = chart();
    let out = run(&[
        "render",
        &chart.to_string_lossy(),
        &values.to_string(),
        release,
        namespace,
    ])?;
    if !out.status.success() {
        bail!(
            "helm render failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let files: std::collections::BTreeMap<String, String> = serde_json::from_slice(&out.stdout)?;
    let mut manifests = Vec::new();
    for (path, text) in files {
        if !path.ends_with(".yaml") {
            continue;
        }
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: Value =
                serde::Deserialize::deserialize(doc).with_context(|| format!("parsing {path}"))?;
            if !value.is_null() {
                manifests.push(value);
            }
        }
    }
    Ok(manifests)
}

/// Checks `values` against the chart's `values.schema.json`: `Err` carries Helm's message.
pub fn validate(values: &Value) -> crate::Result<Result<(), String>> {
    let chart = chart();
    let out = run(&["validate", &chart.to_string_lossy(), &values.to_string()])?;
    Ok(if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

/// The rendered manifest of `kind` named `name`.
pub fn find<'a>(manifests: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    manifests
        .iter()
        .find(|m| m["kind"] == kind && m["metadata"]["name"] == name)
}
