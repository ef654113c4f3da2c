//! Paths inside the repository.

use std::path::PathBuf;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `examples/`.
pub fn examples() -> PathBuf {
    root().join("examples")
}

/// `crds/`, where the generated CRD YAML lives.
pub fn crds() -> PathBuf {
    root().join("crds")
}

/// The user-management example's directory.
pub fn user_management_example() -> PathBuf {
    examples().join("user-management")
}

/// Reads a YAML file (the first document) into `T`.
pub fn read_yaml<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> crate::Result<T> {
    use anyhow::Context;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The example's EventStore and Projection.
pub fn user_management_resources() -> crate::Result<(
    projectionist_crds::EventStore,
    projectionist_crds::Projection,
)> {
    let dir = user_management_example();
    Ok((
        read_yaml(&dir.join("eventstore.yaml"))?,
        read_yaml(&dir.join("projection.yaml"))?,
    ))
}
