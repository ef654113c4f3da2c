//! The emulator's storage: objects by kind, a global resourceVersion, the change history watches replay, and the
//! write semantics (generation, status subresource, optimistic concurrency, finalizers, garbage collection, CRD
//! validation).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use rand::Rng;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::fields::{self, Scope};
use crate::crd_validation::{CrdValidator, Violation};

/// An error in the API server's `Status` shape.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn not_found(kind: &Kind, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", kind.resource_name()),
        )
        .with_details(json!({"name": name, "group": kind.group, "kind": kind.plural}))
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// The `Status` object the API server sends.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

/// A resource type the emulator serves.
#[derive(Debug, Clone)]
pub struct Kind {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    /// Whether it has a `status` subresource.
    pub status: bool,
    pub short_names: Vec<String>,
    /// Schema and CEL validation (custom resources).
    pub validator: Option<Arc<CrdValidator>>,
    /// The CRD's `additionalPrinterColumns`: name, type, JSONPath.
    pub printer_columns: Vec<(String, String, String)>,
}

impl Kind {
    fn builtin(
        group: &str,
        version: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        status: bool,
    ) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            namespaced,
            status,
            short_names: Vec::new(),
            validator: None,
            printer_columns: Vec::new(),
        }
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural.group` (or `plural` for the core group), as the API server names resources in messages.
    pub fn resource_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn scope(&self, subresource: Option<&str>) -> Scope {
        match (self.status, subresource) {
            (_, Some("status")) => Scope::Status,
            (true, _) => Scope::Main,
            (false, _) => Scope::All,
        }
    }
}

/// One change, as a watch reports it.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub kind: &'static str,
    pub object: Value,
    /// The object before a `MODIFIED` change (a watch with a selector turns a change across it into
    /// `ADDED`/`DELETED`).
    pub previous: Option<Value>,
}

type Key = (String, String);

/// Everything the emulator stores.
#[derive(Debug)]
pub struct Store {
    rv: u64,
    kinds: Vec<Kind>,
    objects: BTreeMap<Key, BTreeMap<(String, String), Value>>,
    uids: HashSet<String>,
    history: VecDeque<Arc<Change>>,
    history_limit: usize,
    /// The oldest resourceVersion a watch may still start from.
    compacted: u64,
    pub changes: broadcast::Sender<Arc<Change>>,
}

/// How a write identifies itself and what it may touch.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    pub manager: String,
    pub subresource: Option<String>,
    pub strict: bool,
    pub force: bool,
}

pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn new_uid() -> String {
    let mut rng = rand::rng();
    let bytes: [u8; 16] = rng.random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-4{}-8{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Moves a Secret's `stringData` into `data` (base64), as the API server does on every write.
fn fold_string_data(kind: &Kind, object: &mut Value) {
    use base64::Engine;
    if kind.group.is_empty()
        && kind.plural == "secrets"
        && let Some(Value::Object(strings)) =
            object.as_object_mut().and_then(|o| o.remove("stringData"))
    {
        if !object.get("data").is_some_and(Value::is_object) {
            object["data"] = json!({});
        }
        for (k, v) in strings {
            let text = v.as_str().unwrap_or_default();
            object["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(text));
        }
    }
}

fn spec_part(object: &Value) -> Value {
    let mut o = object.clone();
    if let Value::Object(m) = &mut o {
        m.remove("metadata");
        m.remove("status");
    }
    o
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        let (changes, _) = broadcast::channel(65_536);
        let kinds = vec![
            Kind::builtin("", "v1", "namespaces", "Namespace", false, true),
            Kind::builtin("", "v1", "secrets", "Secret", true, false),
            Kind::builtin("", "v1", "configmaps", "ConfigMap", true, false),
            Kind::builtin("", "v1", "pods", "Pod", true, true),
            Kind::builtin("", "v1", "events", "Event", true, false),
            Kind::builtin("", "v1", "services", "Service", true, true),
            Kind::builtin("", "v1", "serviceaccounts", "ServiceAccount", true, false),
            Kind::builtin("apps", "v1", "deployments", "Deployment", true, true),
            Kind::builtin(
                "policy",
                "v1",
                "poddisruptionbudgets",
                "PodDisruptionBudget",
                true,
                true,
            ),
            Kind::builtin("events.k8s.io", "v1", "events", "Event", true, false),
            Kind::builtin("coordination.k8s.io", "v1", "leases", "Lease", true, false),
            Kind::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "roles",
                "Role",
                true,
                false,
            ),
            Kind::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "rolebindings",
                "RoleBinding",
                true,
                false,
            ),
            Kind::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterroles",
                "ClusterRole",
                false,
                false,
            ),
            Kind::builtin(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterrolebindings",
                "ClusterRoleBinding",
                false,
                false,
            ),
            Kind::builtin(
                "admissionregistration.k8s.io",
                "v1",
                "mutatingwebhookconfigurations",
                "MutatingWebhookConfiguration",
                false,
                false,
            ),
            Kind::builtin(
                "apiextensions.k8s.io",
                "v1",
                "customresourcedefinitions",
                "CustomResourceDefinition",
                false,
                true,
            ),
        ];
        let mut store = Self {
            rv: 1,
            kinds,
            objects: BTreeMap::new(),
            uids: HashSet::new(),
            history: VecDeque::new(),
            history_limit,
            compacted: 1,
            changes,
        };
        for ns in ["default", "kube-system"] {
            store
                .create_namespace(ns)
                .expect("built-in namespaces are valid");
        }
        store
    }

    pub fn create_namespace(&mut self, name: &str) -> Result<Value, ApiError> {
        let kind = self.kind("", "namespaces")?.clone();
        let object = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
            "status": {"phase": "Active"}});
        self.create(&kind, None, object, &WriteOptions::default())
    }

    pub fn kinds(&self) -> &[Kind] {
        &self.kinds
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn kind(&self, group: &str, plural: &str) -> Result<&Kind, ApiError> {
        self.kinds
            .iter()
            .find(|k| k.group == group && k.plural == plural)
            .ok_or_else(|| {
                ApiError::new(
                    404,
                    "NotFound",
                    format!("the server could not find the requested resource ({plural}.{group})"),
                )
            })
    }

    /// Serves the kind a CRD defines (its first served version).
    pub fn register_crd(&mut self, crd: &Value) -> Result<(), ApiError> {
        let typed: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
            serde_json::from_value(crd.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid CustomResourceDefinition: {e}")))?;
        let version = typed
            .spec
            .versions
            .iter()
            .find(|v| v.served)
            .ok_or_else(|| ApiError::bad_request("the CRD serves no version"))?;
        let validator = CrdValidator::from_crd(&typed)
            .map_err(|e| ApiError::bad_request(format!("invalid CRD schema: {e:#}")))?;
        let names = &typed.spec.names;
        let kind = Kind {
            group: typed.spec.group.clone(),
            version: version.name.clone(),
            plural: names.plural.clone(),
            singular: names
                .singular
                .clone()
                .unwrap_or_else(|| names.kind.to_lowercase()),
            kind: names.kind.clone(),
            namespaced: typed.spec.scope == "Namespaced",
            status: version
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some()),
            short_names: names.short_names.clone().unwrap_or_default(),
            validator: Some(Arc::new(validator)),
            printer_columns: version
                .additional_printer_columns
                .iter()
                .flatten()
                .map(|c| (c.name.clone(), c.type_.clone(), c.json_path.clone()))
                .collect(),
        };
        self.kinds
            .retain(|k| !(k.group == kind.group && k.plural == kind.plural));
        self.kinds.push(kind);
        Ok(())
    }

    fn bucket(&self, kind: &Kind) -> Option<&BTreeMap<(String, String), Value>> {
        self.objects.get(&(kind.group.clone(), kind.plural.clone()))
    }

    pub fn get(&self, kind: &Kind, namespace: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.bucket(kind)
            .and_then(|b| b.get(&(namespace.unwrap_or("").to_string(), name.to_string())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, name))
    }

    /// Objects of a kind, in one namespace or all.
    pub fn list(&self, kind: &Kind, namespace: Option<&str>) -> Vec<Value> {
        self.bucket(kind)
            .map(|b| {
                b.iter()
                    .filter(|((ns, _), _)| namespace.is_none_or(|n| n == ns))
                    .map(|(_, v)| v.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Changes after `rv` for a watch, or `None` when `rv` is older than the retained history.
    pub fn changes_since(&self, rv: u64) -> Option<Vec<Arc<Change>>> {
        if rv < self.compacted {
            return None;
        }
        Some(self.history.iter().filter(|c| c.rv > rv).cloned().collect())
    }

    /// Forgets the change history, as etcd compaction does: watches from an older resourceVersion get `410 Gone`.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    fn commit(
        &mut self,
        kind: &Kind,
        namespace: &str,
        name: &str,
        change: &'static str,
        mut object: Value,
    ) -> Value {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let key = (kind.group.clone(), kind.plural.clone());
        let bucket = self.objects.entry(key).or_default();
        let id = (namespace.to_string(), name.to_string());
        let previous = if change == "MODIFIED" {
            bucket.get(&id).cloned()
        } else {
            None
        };
        if change == "DELETED" {
            bucket.remove(&id);
            if let Some(uid) = object.pointer("/metadata/uid").and_then(Value::as_str) {
                self.uids.remove(uid);
            }
        } else {
            if let Some(uid) = object.pointer("/metadata/uid").and_then(Value::as_str) {
                self.uids.insert(uid.to_string());
            }
            bucket.insert(id, object.clone());
        }
        let record = Arc::new(Change {
            rv: self.rv,
            group: kind.group.clone(),
            plural: kind.plural.clone(),
            namespace: namespace.to_string(),
            kind: change,
            object: object.clone(),
            previous,
        });
        self.history.push_back(record.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
        // Nobody watching is fine.
        let _ = self.changes.send(record);
        object
    }

    fn check_namespace(&self, kind: &Kind, namespace: Option<&str>) -> Result<String, ApiError> {
        if !kind.namespaced {
            return Ok(String::new());
        }
        let ns = namespace.ok_or_else(|| ApiError::bad_request("a namespace is required"))?;
        let ns_kind = self.kind("", "namespaces")?;
        let namespace = self.get(ns_kind, None, ns).map_err(|_| {
            ApiError::new(404, "NotFound", format!("namespaces \"{ns}\" not found"))
                .with_details(json!({"name": ns, "kind": "namespaces"}))
        })?;
        if namespace.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "unable to create new content in namespace {ns} because it is being terminated"
                ),
            ));
        }
        Ok(ns.to_string())
    }

    fn validate(
        &self,
        kind: &Kind,
        object: Value,
        old: Option<&Value>,
        strict: bool,
    ) -> Result<Value, ApiError> {
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let Some(validator) = &kind.validator else {
            return Ok(object);
        };
        let object = if strict {
            object
        } else {
            validator.pruned(&object)
        };
        let result = match old {
            None => validator.validate_create(&object),
            Some(old) => validator.validate_update(&object, old),
        };
        result.map_err(|violations| invalid(kind, &name, &violations))
    }

    /// Creates an object (POST).
    pub fn create(
        &mut self,
        kind: &Kind,
        namespace: Option<&str>,
        mut object: Value,
        options: &WriteOptions,
    ) -> Result<Value, ApiError> {
        let ns = self.check_namespace(kind, namespace)?;
        if !object.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        fold_string_data(kind, &mut object);
        if object.get("metadata").is_none_or(|m| !m.is_object()) {
            object["metadata"] = json!({});
        }
        let mut name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if name.is_empty()
            && let Some(prefix) = object
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
        {
            let suffix: String = (0..5)
                .map(|_| {
                    let chars = b"bcdfghjklmnpqrstvwxz2456789";
                    chars[rand::rng().random_range(0..chars.len())] as char
                })
                .collect();
            name = format!("{prefix}{suffix}");
        }
        if !is_dns_subdomain(&name) {
            return Err(invalid(
                kind,
                &name,
                &[Violation {
                    field: "metadata.name".into(),
                    message: if name.is_empty() {
                        "Required value: name or generateName is required".into()
                    } else {
                        format!(
                            "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
                        )
                    },
                }],
            ));
        }
        if self.get(kind, Some(&ns), &name).is_ok() {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", kind.resource_name()),
            )
            .with_details(json!({"name": name, "group": kind.group, "kind": kind.plural})));
        }
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.kind);
        let meta = object["metadata"].as_object_mut().expect("checked above");
        meta.insert("name".into(), json!(name));
        if kind.namespaced {
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        if kind.group.is_empty() && kind.plural == "namespaces" {
            let labels = meta.entry("labels").or_insert_with(|| json!({}));
            if let Value::Object(l) = labels {
                l.insert("kubernetes.io/metadata.name".into(), json!(name));
            }
        }
        meta.insert("uid".into(), json!(new_uid()));
        meta.insert("creationTimestamp".into(), json!(now()));
        meta.insert("generation".into(), json!(1));
        meta.remove("deletionTimestamp");
        meta.remove("resourceVersion");
        if kind.status
            && kind.validator.is_some()
            && let Value::Object(m) = &mut object
        {
            m.remove("status");
        }
        let mut object = self.validate(kind, object, None, options.strict)?;
        if !object["metadata"]
            .get("managedFields")
            .is_some_and(Value::is_array)
        {
            fields::record_update(
                None,
                &mut object,
                &options.manager,
                Scope::All,
                &kind.api_version(),
                &now(),
            );
        }
        if kind.plural == "customresourcedefinitions" {
            self.register_crd(&object)?;
            object["status"] = json!({"conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now()},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now()}
            ]});
        }
        Ok(self.commit(kind, &ns, &name, "ADDED", object))
    }

    /// Replaces an object (PUT), on the main resource or a subresource.
    pub fn replace(
        &mut self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
        object: Value,
        options: &WriteOptions,
    ) -> Result<Value, ApiError> {
        let current = self.get(kind, namespace, name)?;
        if let Some(rv) = object
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && !rv.is_empty()
            && Some(rv)
                != current
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
        {
            return Err(conflict(kind, name));
        }
        self.write(kind, namespace, name, current, object, options, false)
    }

    /// Patches an object: `merge` (JSON merge patch; strategic merge is treated as one), `json` (RFC 6902) or
    /// `apply` (server-side apply, creating the object if needed).
    pub fn patch(
        &mut self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
        patch_type: &str,
        patch: Value,
        options: &WriteOptions,
    ) -> Result<Value, ApiError> {
        let scope = kind.scope(options.subresource.as_deref());
        if patch_type == "apply" {
            if options.manager.is_empty() {
                return Err(ApiError::bad_request(
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                ));
            }
            let (current, exists) = match self.get(kind, namespace, name) {
                Ok(c) => (c, true),
                Err(e) if options.subresource.is_none() => {
                    let _ = e;
                    let mut base = json!({"apiVersion": kind.api_version(), "kind": kind.kind, "metadata": {"name": name}});
                    if let Some(ns) = namespace {
                        base["metadata"]["namespace"] = json!(ns);
                    }
                    (base, false)
                }
                Err(e) => return Err(e),
            };
            if let Some(rv) = patch
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                && exists
                && Some(rv)
                    != current
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
            {
                return Err(conflict(kind, name));
            }
            let merged = fields::apply(
                &current,
                &patch,
                &options.manager,
                options.force,
                scope,
                &kind.api_version(),
                &now(),
            )
            .map_err(|conflicts| {
                let causes: Vec<Value> = conflicts
                    .iter()
                    .map(|c| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{}\"", c.manager), "field": c.field}))
                    .collect();
                let list = conflicts
                    .iter()
                    .map(|c| format!("- {}: {}", c.manager, c.field))
                    .collect::<Vec<_>>()
                    .join("\n");
                ApiError::new(409, "Conflict", format!("Apply failed with {} conflict(s):\n{list}", conflicts.len()))
                    .with_details(json!({"name": name, "group": kind.group, "kind": kind.plural, "causes": causes}))
            })?;
            if !exists {
                return self.create(kind, namespace, merged, options);
            }
            return self.write(kind, namespace, name, current, merged, options, true);
        }
        let current = self.get(kind, namespace, name)?;
        let mut patched = current.clone();
        match patch_type {
            "merge" => json_patch::merge(&mut patched, &patch),
            "json" => {
                let ops: json_patch::Patch = serde_json::from_value(patch)
                    .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                json_patch::patch(&mut patched, &ops).map_err(|e| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!("the JSON patch could not be applied: {e}"),
                    )
                })?;
            }
            other => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("unsupported patch type {other}"),
                ));
            }
        }
        if let Some(rv) = patched
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && Some(rv)
                != current
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
        {
            return Err(conflict(kind, name));
        }
        self.write(kind, namespace, name, current, patched, options, false)
    }

    /// The common end of replace and patch: scope the change, keep server fields, bump generation, validate, and
    /// delete the object when its last finalizer is gone during deletion.
    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
        current: Value,
        requested: Value,
        options: &WriteOptions,
        applied: bool,
    ) -> Result<Value, ApiError> {
        let scope = kind.scope(options.subresource.as_deref());
        let mut requested = requested;
        fold_string_data(kind, &mut requested);
        let mut next = current.clone();
        match scope {
            Scope::Status => {
                next["status"] = requested.get("status").cloned().unwrap_or(Value::Null)
            }
            Scope::Main => {
                let status = current.get("status").cloned();
                next = requested.clone();
                match status {
                    Some(s) => next["status"] = s,
                    None => {
                        if let Value::Object(m) = &mut next {
                            m.remove("status");
                        }
                    }
                }
            }
            Scope::All => next = requested.clone(),
        }
        if let Value::Object(m) = &mut next
            && m.get("status").is_some_and(Value::is_null)
        {
            m.remove("status");
        }
        if !next.get("metadata").is_some_and(Value::is_object) {
            next["metadata"] = json!({});
        }
        // Fields only the server sets.
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
        ] {
            match current["metadata"].get(field) {
                Some(v) => next["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = next["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        if scope == Scope::Status {
            next["metadata"] = current["metadata"].clone();
            if applied {
                next["metadata"]["managedFields"] = requested["metadata"]["managedFields"].clone();
            }
        }
        next["apiVersion"] = json!(kind.api_version());
        next["kind"] = json!(kind.kind);
        if spec_part(&next) != spec_part(&current) {
            let generation = current
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            next["metadata"]["generation"] = json!(generation + 1);
        }
        if current.pointer("/metadata/deletionTimestamp").is_some() {
            let before: HashSet<String> = finalizers(&current).into_iter().collect();
            if finalizers(&next).iter().any(|f| !before.contains(f)) {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "{} \"{name}\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted",
                        kind.resource_name()
                    ),
                ));
            }
        }
        let mut next = self.validate(kind, next, Some(&current), options.strict)?;
        if !applied {
            fields::record_update(
                Some(&current),
                &mut next,
                &options.manager,
                scope,
                &kind.api_version(),
                &now(),
            );
        }
        if next == current {
            return Ok(current);
        }
        let ns = namespace.unwrap_or("").to_string();
        if next.pointer("/metadata/deletionTimestamp").is_some() && finalizers(&next).is_empty() {
            let gone = self.commit(kind, &ns, name, "DELETED", next);
            self.collect_garbage();
            return Ok(gone);
        }
        if kind.plural == "customresourcedefinitions" {
            self.register_crd(&next)?;
        }
        Ok(self.commit(kind, &ns, name, "MODIFIED", next))
    }

    /// Deletes an object: with finalizers it only gets a `deletionTimestamp`; without, it is gone and its dependents
    /// are garbage collected.
    pub fn delete(
        &mut self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
        precondition_uid: Option<&str>,
        precondition_rv: Option<&str>,
    ) -> Result<Value, ApiError> {
        let current = self.get(kind, namespace, name)?;
        if precondition_uid
            .is_some_and(|u| Some(u) != current.pointer("/metadata/uid").and_then(Value::as_str))
            || precondition_rv.is_some_and(|r| {
                Some(r)
                    != current
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
            })
        {
            return Err(conflict(kind, name));
        }
        let ns = namespace.unwrap_or("").to_string();
        if kind.plural == "namespaces" && kind.group.is_empty() {
            self.delete_namespace_contents(name);
        }
        if !finalizers(&current).is_empty() {
            if current.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(current);
            }
            let mut next = current;
            next["metadata"]["deletionTimestamp"] = json!(now());
            next["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            let generation = next
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            next["metadata"]["generation"] = json!(generation + 1);
            return Ok(self.commit(kind, &ns, name, "MODIFIED", next));
        }
        let gone = self.commit(kind, &ns, name, "DELETED", current);
        if kind.plural == "customresourcedefinitions" {
            self.unregister_crd(&gone);
        }
        self.collect_garbage();
        Ok(gone)
    }

    fn unregister_crd(&mut self, crd: &Value) {
        let group = crd
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let plural = crd
            .pointer("/spec/names/plural")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if let Ok(kind) = self.kind(&group, &plural).cloned() {
            for object in self.list(&kind, None) {
                let (ns, name) = ident(&object);
                let _ = self.commit(&kind, &ns, &name, "DELETED", object);
            }
            self.kinds
                .retain(|k| !(k.group == group && k.plural == plural));
        }
    }

    fn delete_namespace_contents(&mut self, namespace: &str) {
        let kinds: Vec<Kind> = self
            .kinds
            .iter()
            .filter(|k| k.namespaced)
            .cloned()
            .collect();
        for kind in kinds {
            for object in self.list(&kind, Some(namespace)) {
                let (_, name) = ident(&object);
                let _ = self.delete(&kind, Some(namespace), &name, None, None);
            }
        }
    }

    /// Background garbage collection: deletes every object whose owners (by uid) are all gone, until none is left.
    pub fn collect_garbage(&mut self) {
        loop {
            let mut orphans = Vec::new();
            for kind in &self.kinds {
                for object in self.bucket(kind).into_iter().flat_map(|b| b.values()) {
                    let Some(Value::Array(owners)) = object.pointer("/metadata/ownerReferences")
                    else {
                        continue;
                    };
                    if owners.is_empty() || object.pointer("/metadata/deletionTimestamp").is_some()
                    {
                        continue;
                    }
                    let alive = owners
                        .iter()
                        .filter_map(|o| o.get("uid").and_then(Value::as_str))
                        .any(|uid| self.uids.contains(uid));
                    if !alive {
                        let (ns, name) = ident(object);
                        orphans.push((kind.clone(), ns, name));
                    }
                }
            }
            if orphans.is_empty() {
                return;
            }
            for (kind, ns, name) in orphans {
                let ns = (!ns.is_empty()).then_some(ns);
                let _ = self.delete(&kind, ns.as_deref(), &name, None, None);
            }
        }
    }
}

/// An object's (namespace, name).
pub(super) fn ident(object: &Value) -> (String, String) {
    let get = |p: &str| {
        object
            .pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (get("/metadata/namespace"), get("/metadata/name"))
}

fn finalizers(object: &Value) -> Vec<String> {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn conflict(kind: &Kind, name: &str) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            kind.resource_name()
        ),
    )
    .with_details(json!({"name": name, "group": kind.group, "kind": kind.plural}))
}

fn invalid(kind: &Kind, name: &str, violations: &[Violation]) -> ApiError {
    let causes: Vec<Value> = violations
        .iter()
        .map(|v| json!({"reason": "FieldValueInvalid", "message": v.message, "field": v.field}))
        .collect();
    let list = violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    ApiError::new(
        422,
        "Invalid",
        format!("{}.{} \"{name}\" is invalid: {list}", kind.kind, kind.group),
    )
    .with_details(json!({"name": name, "group": kind.group, "kind": kind.kind, "causes": causes}))
}

/// Turns a list of objects into the API's list shape.
pub fn list_object(kind: &Kind, items: Vec<Value>, rv: u64) -> Value {
    json!({
        "apiVersion": kind.api_version(),
        "kind": format!("{}List", kind.kind),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    })
}

/// A `meta.k8s.io/v1` Table of objects, with the CRD's printer columns (what `kubectl get` shows).
pub fn table(kind: &Kind, items: &[Value], rv: u64) -> Value {
    let mut columns = vec![json!({"name": "Name", "type": "string", "format": "name"})];
    columns.extend(
        kind.printer_columns
            .iter()
            .map(|(name, type_, _)| json!({"name": name, "type": type_})),
    );
    if kind.printer_columns.is_empty() {
        columns.push(json!({"name": "Age", "type": "date"}));
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut cells = vec![o.pointer("/metadata/name").cloned().unwrap_or(Value::Null)];
            if kind.printer_columns.is_empty() {
                cells.push(
                    o.pointer("/metadata/creationTimestamp")
                        .cloned()
                        .unwrap_or(Value::Null),
                );
            }
            cells.extend(
                kind.printer_columns
                    .iter()
                    .map(|(_, _, path)| super::select::json_path(o, path).unwrap_or(Value::Null)),
            );
            let mut partial = Map::new();
            partial.insert("apiVersion".into(), json!("meta.k8s.io/v1"));
            partial.insert("kind".into(), json!("PartialObjectMetadata"));
            partial.insert("metadata".into(), o["metadata"].clone());
            json!({"cells": cells, "object": Value::Object(partial)})
        })
        .collect();
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "Table",
        "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": columns,
        "rows": rows,
    })
}
