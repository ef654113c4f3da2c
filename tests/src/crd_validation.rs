//! Validates objects against a CustomResourceDefinition the way the API server does on create and update: schema
//! defaults are applied first, then the `openAPIV3Schema` is checked (strictly: unknown fields are errors, as with
//! `kubectl apply`'s default `--validate=strict`), then the CEL rules (`x-kubernetes-validations`), with transition
//! rules (`oldSelf`) on update.
//!
//! OpenAPI v3's `nullable: true` is translated into JSON Schema's `null` type. Formats are annotations only, as in
//! the API server for the formats these CRDs use.

use anyhow::Context;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel;
use serde_json::{Map, Value};

/// One reason an object is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The field, dotted from the object's root, e.g. `spec.stream.storage`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A CRD's schema, ready to validate objects of its kind.
#[derive(Debug)]
pub struct CrdValidator {
    /// The served version's `openAPIV3Schema`, as written in the CRD.
    schema: Value,
    /// The same schema translated to JSON Schema, compiled.
    json_schema: jsonschema::Validator,
    /// CEL evaluator.
    cel: cel::Validator,
}

impl CrdValidator {
    /// From a CRD object (its first version's schema).
    pub fn from_crd(crd: &CustomResourceDefinition) -> crate::Result<Self> {
        let schema = crd
            .spec
            .versions
            .first()
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .context("the CRD has no openAPIV3Schema")?;
        let schema = serde_json::to_value(schema)?;
        let mut translated = to_json_schema(&schema, true);
        // The API server handles the object's envelope itself; the CRD's schema need not list it.
        if let Some(Value::Object(props)) = translated.get_mut("properties") {
            for (field, schema) in [
                ("apiVersion", serde_json::json!({"type": "string"})),
                ("kind", serde_json::json!({"type": "string"})),
                ("metadata", serde_json::json!({"type": "object"})),
            ] {
                props.entry(field).or_insert(schema);
            }
        }
        let json_schema = jsonschema::validator_for(&translated)
            .map_err(|e| anyhow::anyhow!("the CRD's schema does not compile: {e}"))?;
        Ok(Self {
            schema,
            json_schema,
            cel: cel::Validator::new(),
        })
    }

    /// From a CRD YAML file's content.
    pub fn from_yaml(text: &str) -> crate::Result<Self> {
        let crd: CustomResourceDefinition = serde_yaml::from_str(text)?;
        Self::from_crd(&crd)
    }

    /// The object with the schema's defaults applied, as the API server stores it.
    pub fn defaulted(&self, object: &Value) -> Value {
        cel::apply_defaults(&self.schema, object)
    }

    /// The object without the fields its schema does not know (what the API server stores unless asked for strict
    /// field validation). `apiVersion`, `kind` and `metadata` are the server's and always kept.
    pub fn pruned(&self, object: &Value) -> Value {
        let mut out = prune(&self.schema, object);
        for field in ["apiVersion", "kind", "metadata"] {
            if let (Value::Object(o), Some(v)) = (&mut out, object.get(field)) {
                o.insert(field.into(), v.clone());
            }
        }
        out
    }

    /// Validates a create. Returns the defaulted object, or every violation.
    pub fn validate_create(&self, object: &Value) -> Result<Value, Vec<Violation>> {
        self.validate(object, None)
    }

    /// Validates an update of `old` to `object`, including transition rules.
    pub fn validate_update(&self, object: &Value, old: &Value) -> Result<Value, Vec<Violation>> {
        self.validate(object, Some(old))
    }

    fn validate(&self, object: &Value, old: Option<&Value>) -> Result<Value, Vec<Violation>> {
        let defaulted = self.defaulted(object);
        let mut violations: Vec<Violation> = self
            .json_schema
            .iter_errors(&defaulted)
            .map(|e| {
                let mut field = pointer_to_dotted(e.instance_path().as_str());
                let message = match e.kind() {
                    jsonschema::error::ValidationErrorKind::Required { property } => {
                        let name = property.as_str().unwrap_or_default();
                        field = if field.is_empty() {
                            name.to_string()
                        } else {
                            format!("{field}.{name}")
                        };
                        "Required value".to_string()
                    }
                    jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => {
                        let names = unexpected.join(", ");
                        format!("unknown field(s): {names}")
                    }
                    _ => e.to_string(),
                };
                Violation { field, message }
            })
            .collect();
        // The API server only evaluates CEL on objects that pass the structural checks.
        if violations.is_empty() {
            let defaulted_old = old.map(|o| self.defaulted(o));
            if let Err(errors) = self
                .cel
                .validate(&self.schema, &defaulted, defaulted_old.as_ref())
            {
                violations.extend(errors.iter().map(|e| Violation {
                    field: e.field_path.trim_start_matches('.').to_string(),
                    message: e.message.clone(),
                }));
            }
        }
        if violations.is_empty() {
            Ok(defaulted)
        } else {
            Err(violations)
        }
    }
}

fn prune(schema: &Value, value: &Value) -> Value {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return value.clone();
    }
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            if props.is_none() && additional.is_none() {
                return value.clone();
            }
            Value::Object(
                map.iter()
                    .filter_map(|(k, v)| {
                        let child = props.and_then(|p| p.get(k)).or(additional)?;
                        Some((k.clone(), prune(child, v)))
                    })
                    .collect(),
            )
        }
        Value::Array(items) => match schema.get("items") {
            Some(item_schema) => {
                Value::Array(items.iter().map(|v| prune(item_schema, v)).collect())
            }
            None => value.clone(),
        },
        _ => value.clone(),
    }
}

fn pointer_to_dotted(pointer: &str) -> String {
    pointer
        .trim_start_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect::<Vec<_>>()
        .join(".")
}

/// Translates an OpenAPI v3 structural schema into JSON Schema: `nullable` becomes a `null` type, and with `strict`
/// objects that list their properties refuse unknown ones (except where unknown fields are preserved).
pub fn to_json_schema(schema: &Value, strict: bool) -> Value {
    let Value::Object(map) = schema else {
        return schema.clone();
    };
    let mut out = Map::new();
    for (key, value) in map {
        let translated = match key.as_str() {
            "properties" | "patternProperties" => match value {
                Value::Object(props) => Value::Object(
                    props
                        .iter()
                        .map(|(k, v)| (k.clone(), to_json_schema(v, strict)))
                        .collect(),
                ),
                other => other.clone(),
            },
            "items" | "additionalProperties" | "not" => to_json_schema(value, strict),
            "allOf" | "anyOf" | "oneOf" => match value {
                Value::Array(list) => {
                    Value::Array(list.iter().map(|v| to_json_schema(v, strict)).collect())
                }
                other => other.clone(),
            },
            // Extensions and OpenAPI-only keywords are not JSON Schema.
            k if k.starts_with("x-kubernetes-") || k == "nullable" => continue,
            _ => value.clone(),
        };
        out.insert(key.clone(), translated);
    }
    if map.get("nullable") == Some(&Value::Bool(true))
        && let Some(Value::String(t)) = map.get("type")
    {
        out.insert(
            "type".into(),
            Value::Array(vec![Value::String(t.clone()), Value::String("null".into())]),
        );
        if let Some(Value::Array(values)) = out.get_mut("enum") {
            values.push(Value::Null);
        }
    }
    let preserves = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if strict
        && map.contains_key("properties")
        && !map.contains_key("additionalProperties")
        && !preserves
    {
        out.insert("additionalProperties".into(), Value::Bool(false));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nullable_becomes_a_null_type_and_strict_closes_objects() {
        let s =
            json!({"type": "object", "properties": {"a": {"type": "string", "nullable": true}}});
        let t = to_json_schema(&s, true);
        assert_eq!(t["properties"]["a"]["type"], json!(["string", "null"]));
        assert_eq!(t["additionalProperties"], json!(false));
    }

    #[test]
    fn pointers_become_dotted_paths() {
        assert_eq!(
            pointer_to_dotted("/spec/handlers/0/sql"),
            "spec.handlers.0.sql"
        );
        assert_eq!(pointer_to_dotted(""), "");
    }
}
