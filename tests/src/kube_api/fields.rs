//! Field ownership for server-side apply: `metadata.managedFields` in the API server's `FieldsV1` form, and the
//! apply merge (ownership, conflicts, removal of fields a manager stopped applying).
//!
//! Granularity: every map key is a field; lists and scalars are leaves (lists are atomic, as for a list without
//! `x-kubernetes-list-type: map`).

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// A field: the keys from the object's root.
pub type Path = Vec<String>;

/// Top-level fields the API server manages itself; they are never owned.
const SERVER_FIELDS: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "generateName",
];

/// Which part of an object a write may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything but `status` (the main resource of a kind with a status subresource).
    Main,
    /// Only `status`.
    Status,
    /// Everything (a kind without a status subresource).
    All,
}

impl Scope {
    pub fn subresource(self) -> Option<&'static str> {
        match self {
            Scope::Status => Some("status"),
            _ => None,
        }
    }

    /// Whether a top-level key belongs to this scope.
    pub fn covers(self, key: &str) -> bool {
        match self {
            Scope::Main => key != "status",
            Scope::Status => key == "status",
            Scope::All => true,
        }
    }
}

/// The leaf fields set in `value`, restricted to `scope`.
pub fn leaf_paths(value: &Value, scope: Scope) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    if let Value::Object(map) = value {
        for (key, child) in map {
            if key == "apiVersion" || key == "kind" || !scope.covers(key) {
                continue;
            }
            if key == "metadata" {
                if let Value::Object(meta) = child {
                    for (mk, mv) in meta {
                        if !SERVER_FIELDS.contains(&mk.as_str()) {
                            collect(mv, vec![key.clone(), mk.clone()], &mut out);
                        }
                    }
                }
                continue;
            }
            collect(child, vec![key.clone()], &mut out);
        }
    }
    out
}

fn collect(value: &Value, path: Path, out: &mut BTreeSet<Path>) {
    match value {
        // An empty map sets nothing, so it owns nothing (its children may belong to others).
        Value::Object(map) => {
            for (k, v) in map {
                let mut p = path.clone();
                p.push(k.clone());
                collect(v, p, out);
            }
        }
        _ => {
            out.insert(path);
        }
    }
}

/// `FieldsV1` (`{"f:spec":{"f:replicas":{}}}`) from a set of fields.
pub fn to_fields_v1(paths: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for path in paths {
        let mut node = &mut root;
        for key in path {
            let entry = node
                .entry(format!("f:{key}"))
                .or_insert_with(|| Value::Object(Map::new()));
            node = match entry {
                Value::Object(m) => m,
                _ => unreachable!("FieldsV1 nodes are objects"),
            };
        }
    }
    Value::Object(root)
}

/// The set of fields a `FieldsV1` value names. Entries for list items (`k:`/`v:`/`i:`) own their whole list.
pub fn from_fields_v1(value: &Value) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    walk_fields(value, Vec::new(), &mut out);
    out
}

fn walk_fields(value: &Value, path: Path, out: &mut BTreeSet<Path>) {
    let Value::Object(map) = value else {
        return;
    };
    if map.is_empty() && !path.is_empty() {
        out.insert(path);
        return;
    }
    for (key, child) in map {
        if key == "." {
            if !path.is_empty() {
                out.insert(path.clone());
            }
        } else if let Some(field) = key.strip_prefix("f:") {
            let mut p = path.clone();
            p.push(field.to_string());
            walk_fields(child, p, out);
        } else if !path.is_empty() {
            out.insert(path.clone());
        }
    }
}

/// The value at a field, if set.
pub fn value_at<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

fn remove_at(value: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = &mut *value;
    for key in parents {
        match node.get_mut(key) {
            Some(next) => node = next,
            None => return,
        }
    }
    if let Value::Object(map) = node {
        map.remove(last);
    }
    // Drop maps the removal left empty, as the API server does for fields nobody sets any more.
    if parents.len() > 1
        && value_at(value, parents).is_some_and(|v| v.as_object().is_some_and(Map::is_empty))
    {
        remove_at(value, parents);
    }
}

/// Merges `patch` into `target`: maps recursively, everything else replaced.
pub fn deep_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        deep_merge(existing, v)
                    }
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn overlaps(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// One `managedFields` entry, parsed.
#[derive(Debug, Clone)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub subresource: Option<String>,
    pub api_version: String,
    pub time: String,
    pub fields: BTreeSet<Path>,
}

/// The entries of an object's `metadata.managedFields`.
pub fn entries(object: &Value) -> Vec<Entry> {
    let Some(Value::Array(list)) = object.pointer("/metadata/managedFields") else {
        return Vec::new();
    };
    list.iter()
        .map(|e| Entry {
            manager: e["manager"].as_str().unwrap_or_default().to_string(),
            operation: e["operation"].as_str().unwrap_or("Update").to_string(),
            subresource: e["subresource"].as_str().map(str::to_string),
            api_version: e["apiVersion"].as_str().unwrap_or_default().to_string(),
            time: e["time"].as_str().unwrap_or_default().to_string(),
            fields: from_fields_v1(&e["fieldsV1"]),
        })
        .collect()
}

/// Writes `entries` back into `metadata.managedFields` (entries owning nothing are dropped).
pub fn set_entries(object: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            });
            if let Some(sub) = &e.subresource {
                v["subresource"] = json!(sub);
            }
            v
        })
        .collect();
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// A field another manager owns with a different value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub manager: String,
    pub field: String,
}

/// Server-side apply of `applied` to `current` by `manager`. Returns the new object (its managed fields updated),
/// or the conflicts when `force` is false.
pub fn apply(
    current: &Value,
    applied: &Value,
    manager: &str,
    force: bool,
    scope: Scope,
    api_version: &str,
    now: &str,
) -> Result<Value, Vec<Conflict>> {
    let subresource = scope.subresource().map(str::to_string);
    let mut all = entries(current);
    let new_fields = leaf_paths(applied, scope);
    let is_mine =
        |e: &Entry| e.manager == manager && e.operation == "Apply" && e.subresource == subresource;

    let mut conflicts = Vec::new();
    for entry in all.iter_mut().filter(|e| !is_mine(e)) {
        let mut taken = Vec::new();
        for owned in &entry.fields {
            for field in new_fields.iter().filter(|f| overlaps(f, owned)) {
                let deeper = if field.len() >= owned.len() {
                    field
                } else {
                    owned
                };
                if value_at(current, deeper) != value_at(applied, deeper) {
                    if force {
                        taken.push(owned.clone());
                    } else {
                        conflicts.push(Conflict {
                            manager: entry.manager.clone(),
                            field: format!(".{}", deeper.join(".")),
                        });
                    }
                }
            }
        }
        for owned in taken {
            entry.fields.remove(&owned);
        }
    }
    if !conflicts.is_empty() {
        conflicts.dedup();
        return Err(conflicts);
    }

    let mut object = current.clone();
    let previously: BTreeSet<Path> = all
        .iter()
        .filter(|e| is_mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    for dropped in previously.difference(&new_fields) {
        let owned_by_other = all
            .iter()
            .filter(|e| !is_mine(e))
            .any(|e| e.fields.iter().any(|f| overlaps(f, dropped)));
        if !owned_by_other {
            remove_at(&mut object, dropped);
        }
    }
    if let Value::Object(map) = applied {
        for (key, value) in map {
            if key == "apiVersion" || key == "kind" || !scope.covers(key) {
                continue;
            }
            if key == "metadata" {
                let mut meta = value.clone();
                if let Value::Object(m) = &mut meta {
                    m.retain(|k, _| !SERVER_FIELDS.contains(&k.as_str()));
                }
                deep_merge(&mut object["metadata"], &meta);
            } else {
                match object.get_mut(key) {
                    Some(existing) => deep_merge(existing, value),
                    None => object[key] = value.clone(),
                }
            }
        }
    }

    all.retain(|e| !is_mine(e));
    all.push(Entry {
        manager: manager.to_string(),
        operation: "Apply".into(),
        subresource,
        api_version: api_version.to_string(),
        time: now.to_string(),
        fields: new_fields,
    });
    set_entries(&mut object, &all);
    Ok(object)
}

/// Records an update (create, replace, merge or JSON patch) by `manager`: the fields it changed become its own and
/// no one else's; fields that disappeared are owned by no one.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    scope: Scope,
    api_version: &str,
    now: &str,
) {
    let subresource = scope.subresource().map(str::to_string);
    let mut all = old.map(entries).unwrap_or_default();
    let before = old.map(|o| leaf_paths(o, scope)).unwrap_or_default();
    let after = leaf_paths(new, scope);
    let changed: BTreeSet<Path> = after
        .iter()
        .filter(|p| !before.contains(*p) || old.and_then(|o| value_at(o, p)) != value_at(new, p))
        .cloned()
        .collect();
    for entry in &mut all {
        entry.fields.retain(|f| {
            after.iter().any(|a| overlaps(a, f)) && !changed.iter().any(|c| overlaps(c, f))
        });
    }
    if !changed.is_empty() {
        match all.iter_mut().find(|e| {
            e.manager == manager && e.operation == "Update" && e.subresource == subresource
        }) {
            Some(entry) => {
                entry.fields.extend(changed);
                entry.time = now.to_string();
            }
            None => all.push(Entry {
                manager: manager.to_string(),
                operation: "Update".into(),
                subresource,
                api_version: api_version.to_string(),
                time: now.to_string(),
                fields: changed,
            }),
        }
    }
    set_entries(new, &all);
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-01-01T00:00:00Z";

    fn obj(spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": spec})
    }

    #[test]
    fn fields_v1_round_trips() {
        let v = obj(json!({"x": "1", "y": {"z": [1, 2]}}));
        let paths = leaf_paths(&v, Scope::All);
        assert_eq!(from_fields_v1(&to_fields_v1(&paths)), paths);
    }

    #[test]
    fn apply_owns_fields_and_removes_the_ones_it_stops_applying() {
        let base = obj(json!({}));
        let first = apply(
            &base,
            &obj(json!({"x": "1", "y": "2"})),
            "a",
            false,
            Scope::All,
            "v1",
            NOW,
        )
        .expect("no conflict");
        let second = apply(
            &first,
            &obj(json!({"x": "1"})),
            "a",
            false,
            Scope::All,
            "v1",
            NOW,
        )
        .expect("no conflict");
        assert_eq!(second["data"], json!({"x": "1"}));
    }

    #[test]
    fn a_different_value_for_anothers_field_conflicts_unless_forced() {
        let base = apply(
            &obj(json!({})),
            &obj(json!({"x": "1"})),
            "a",
            false,
            Scope::All,
            "v1",
            NOW,
        )
        .expect("no conflict");
        let err = apply(
            &base,
            &obj(json!({"x": "2"})),
            "b",
            false,
            Scope::All,
            "v1",
            NOW,
        )
        .expect_err("conflict");
        assert_eq!(err[0].manager, "a");
        assert_eq!(err[0].field, ".data.x");
        // The same value is shared ownership, not a conflict.
        apply(
            &base,
            &obj(json!({"x": "1"})),
            "b",
            false,
            Scope::All,
            "v1",
            NOW,
        )
        .expect("shared");
        let forced = apply(
            &base,
            &obj(json!({"x": "2"})),
            "b",
            true,
            Scope::All,
            "v1",
            NOW,
        )
        .expect("forced");
        assert_eq!(forced["data"]["x"], "2");
        let owners = entries(&forced);
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].manager, "b");
    }

    #[test]
    fn a_field_another_manager_still_owns_is_kept() {
        let a = apply(
            &obj(json!({})),
            &obj(json!({"x": "1"})),
            "a",
            false,
            Scope::All,
            "v1",
            NOW,
        )
        .expect("ok");
        let b = apply(
            &a,
            &obj(json!({"x": "1"})),
            "b",
            false,
            Scope::All,
            "v1",
            NOW,
        )
        .expect("ok");
        let a2 = apply(&b, &obj(json!({})), "a", false, Scope::All, "v1", NOW).expect("ok");
        assert_eq!(a2["data"]["x"], "1");
    }

    #[test]
    fn updates_take_over_the_fields_they_change() {
        let a = apply(
            &obj(json!({})),
            &obj(json!({"x": "1"})),
            "a",
            false,
            Scope::All,
            "v1",
            NOW,
        )
        .expect("ok");
        let mut updated = a.clone();
        updated["data"]["x"] = json!("2");
        record_update(Some(&a), &mut updated, "kubectl", Scope::All, "v1", NOW);
        let owners = entries(&updated);
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].manager, "kubectl");
    }
}
