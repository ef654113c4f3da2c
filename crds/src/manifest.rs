//! Reading EventStore and Projection manifests from YAML files, as a user would `kubectl apply` them: a file may
//! hold several documents, a directory several files; other kinds (Secrets, ...) are skipped.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{EventStore, Projection, Reactor};

/// The EventStores and Projections found in some files.
#[derive(Debug, Default, Clone)]
pub struct Manifests {
    /// EventStores, in file order.
    pub event_stores: Vec<EventStore>,
    /// Projections, in file order.
    pub projections: Vec<Projection>,
    /// Every Reactor, in file order.
    pub reactors: Vec<Reactor>,
}

/// A manifest that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file or directory cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A document is not valid YAML or does not match its kind's schema; the message names the field.
    #[error("{path}: document {document}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based document index within the file.
        document: usize,
        /// The YAML error.
        #[source]
        source: serde_yaml::Error,
    },
    /// A Projection's EventStore is not among the manifests.
    #[error("{kind} {projection}: EventStore {store:?} not found in the given files")]
    MissingStore {
        /// `Projection` or `Reactor`.
        kind: &'static str,
        /// The Projection's name.
        projection: String,
        /// The EventStore it names.
        store: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

impl Manifests {
    /// Reads every `.yaml`/`.yml` file under each path (files are read directly; directories are listed, sorted).
    pub fn read(paths: &[PathBuf]) -> Result<Self, ManifestError> {
        let mut out = Manifests::default();
        for path in paths {
            for file in yaml_files(path)? {
                out.read_file(&file)?;
            }
        }
        Ok(out)
    }

    fn read_file(&mut self, path: &Path) -> Result<(), ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let parse_err = |source| ManifestError::Parse {
                path: path.to_path_buf(),
                document: i + 1,
                source,
            };
            let value = serde_yaml::Value::deserialize(doc).map_err(parse_err)?;
            if value.is_null() {
                continue;
            }
            let meta: TypeMeta = serde_yaml::from_value(value.clone()).map_err(parse_err)?;
            if meta.api_version != format!("{}/{}", crate::GROUP, crate::VERSION) {
                continue;
            }
            match meta.kind.as_str() {
                "EventStore" => self
                    .event_stores
                    .push(serde_yaml::from_value(value).map_err(parse_err)?),
                "Projection" => self
                    .projections
                    .push(serde_yaml::from_value(value).map_err(parse_err)?),
                "Reactor" => self
                    .reactors
                    .push(serde_yaml::from_value(value).map_err(parse_err)?),
                _ => {}
            }
        }
        Ok(())
    }

    /// The EventStore a Projection reads (same namespace and name).
    pub fn store_of(&self, projection: &Projection) -> Result<&EventStore, ManifestError> {
        self.store_named(
            &projection.metadata,
            &projection.spec.event_store,
            "Projection",
        )
    }

    /// The EventStore a Reactor reads.
    pub fn store_of_reactor(&self, reactor: &Reactor) -> Result<&EventStore, ManifestError> {
        self.store_named(&reactor.metadata, &reactor.spec.event_store, "Reactor")
    }

    fn store_named(
        &self,
        reader: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        store: &str,
        kind: &'static str,
    ) -> Result<&EventStore, ManifestError> {
        self.event_stores
            .iter()
            .find(|s| {
                s.metadata.name.as_deref() == Some(store)
                    && s.metadata.namespace == reader.namespace
            })
            .ok_or_else(|| ManifestError::MissingStore {
                kind,
                projection: reader.name.clone().unwrap_or_default(),
                store: store.to_string(),
            })
    }
}

fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_err = |source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    Ok(files)
}
