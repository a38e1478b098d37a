//! User-created objects that migration refers to by id, as QEMU's `-object` and
//! `object-add` make them: TLS credentials (`tls-creds`) and authorization lists
//! (`tls-authz`).
//!
//! Supported types: `tls-creds-x509`, `authz-simple`, `authz-list`. QEMU's other TLS
//! and authz types are known by name and refused with a clear message; any other name
//! gets QEMU's enum error.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

use crate::channels::authz::{Authz, AuthzRule, MatchFormat, Policy};
use crate::channels::tls::{Endpoint, TlsError, X509Creds};

/// Why `object-add` (or `--object`) refused an object, with QEMU's texts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectAddError {
    #[error("Parameter '{0}' is missing")]
    MissingParameter(String),
    #[error("Invalid parameter type for '{key}', expected: {expected}")]
    ParameterType { key: String, expected: &'static str },
    #[error("Parameter '{key}' does not accept value '{value}'")]
    ParameterValue { key: String, value: String },
    #[error("Parameter '{0}' is unexpected")]
    UnexpectedParameter(String),
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    NotOnOff(String),
    #[error("Parameter 'id' expects an identifier")]
    BadId,
    /// A QEMU type vmigrate knows by name but does not implement.
    #[error("Object type '{0}' is not supported by vmigrate yet")]
    UnsupportedType(String),
    #[error("Property '{0}' of tls-creds-x509 is not supported by vmigrate yet")]
    UnsupportedProperty(&'static str),
    #[error("attempt to add duplicate property '{0}' to object (type 'container')")]
    DuplicateId(String),
    #[error("Missing 'dir' property value")]
    MissingDir,
    /// Reading the certificates and key of `tls-creds-x509` failed.
    #[error(transparent)]
    LoadCredentials(#[from] TlsError),
}

/// `object-del` of an id that names no object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("object '{0}' not found")]
pub struct ObjectNotFound(pub String);

/// Why the object a migration parameter names cannot be used, with QEMU's texts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectLookupError {
    #[error("No TLS credentials with id '{0}'")]
    NoTlsCreds(String),
    #[error("Expected TLS credentials for a {} endpoint", .0.name())]
    WrongEndpoint(Endpoint),
    #[error("Object with id '{0}' is not TLS credentials")]
    NotTlsCreds(String),
    #[error("Cannot find QAuthZ object ID {0}")]
    NoAuthz(String),
    #[error("Object with id '{id}' is a {type_name}, not an authorization object")]
    NotAuthz { id: String, type_name: &'static str },
}

/// Why a migration's TLS setup cannot be made from the objects its `tls-creds` and
/// `tls-authz` parameters name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsSetupError {
    /// A parameter names no object of the right kind.
    #[error(transparent)]
    FindObject(#[from] ObjectLookupError),
    /// The credentials do not make a session configuration (no usable hostname, say).
    #[error(transparent)]
    Configure(#[from] TlsError),
}

/// A command-line object (`TYPE,key=value,...`) that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectOptionError {
    /// The text starts with `key=value` instead of the type.
    #[error(
        "Parameter 'qom-type' is missing (the object's type comes first: TYPE,id=ID,...), in '{0}'"
    )]
    TypeNotFirst(String),
    #[error("Expected '=' after parameter '{0}'")]
    MissingEquals(String),
    #[error("Invalid parameter '' in '{0}'")]
    EmptyKey(String),
    #[error("Parameter '{0}' is given more than once")]
    RepeatedKey(String),
    #[error("Parameter '{0}' is both a value and a group")]
    ValueAndGroup(String),
}

fn missing(key: impl Into<String>) -> ObjectAddError {
    ObjectAddError::MissingParameter(key.into())
}

fn wrong_type(key: impl Into<String>, expected: &'static str) -> ObjectAddError {
    ObjectAddError::ParameterType {
        key: key.into(),
        expected,
    }
}

fn bad_value(key: impl Into<String>, value: &str) -> ObjectAddError {
    ObjectAddError::ParameterValue {
        key: key.into(),
        value: value.to_string(),
    }
}

/// One object, as it is held.
#[derive(Debug, Clone)]
pub enum Object {
    TlsCredsX509(Arc<X509Creds>),
    Authz(Arc<Authz>),
}

impl Object {
    fn type_name(&self) -> &'static str {
        match self {
            Object::TlsCredsX509(_) => "tls-creds-x509",
            Object::Authz(a) => match **a {
                Authz::Simple { .. } => "authz-simple",
                Authz::List { .. } => "authz-list",
            },
        }
    }
}

/// QEMU object types vmigrate knows by name but does not implement.
const UNSUPPORTED_TYPES: &[&str] = &[
    "tls-creds-anon",
    "tls-creds-psk",
    "tls-cipher-suites",
    "authz-listfile",
    "authz-pam",
    "secret",
    "secret_keyring",
    "memory-backend-file",
    "memory-backend-memfd",
    "memory-backend-ram",
    "iothread",
    "main-loop",
    "throttle-group",
    "rng-random",
    "rng-builtin",
    "rng-egd",
    "filter-buffer",
    "filter-dump",
    "filter-mirror",
    "filter-redirector",
    "filter-replay",
    "filter-rewriter",
    "colo-compare",
    "cryptodev-backend",
    "cryptodev-backend-builtin",
    "cryptodev-backend-lkcf",
    "dbus-vmstate",
    "input-barrier",
    "input-linux",
    "can-bus",
    "can-host-socketcan",
    "pr-manager-helper",
    "qtest",
    "x-remote-object",
    "x-vfio-user-server",
];

/// The objects of one VM, by id.
#[derive(Debug, Default)]
pub struct ObjectStore {
    objects: Mutex<BTreeMap<String, Object>>,
}

impl ObjectStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Object>> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `object-add` (and `--object`): `props` holds `qom-type`, `id` and the type's
    /// properties. `typed` is true for QMP, whose values must have their JSON types;
    /// the command line gives strings (`on`/`off` for booleans).
    pub fn add(&self, props: &Map<String, Value>, typed: bool) -> Result<(), ObjectAddError> {
        let qom_type = match props.get("qom-type") {
            None => return Err(missing("qom-type")),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(wrong_type("qom-type", "string")),
        };
        let id = match props.get("id") {
            None => return Err(missing("id")),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(wrong_type("id", "string")),
        };
        let known = ["tls-creds-x509", "authz-simple", "authz-list"];
        if !known.contains(&qom_type) {
            if UNSUPPORTED_TYPES.contains(&qom_type) {
                return Err(ObjectAddError::UnsupportedType(qom_type.to_string()));
            }
            return Err(bad_value("qom-type", qom_type));
        }
        if !is_identifier(id) {
            return Err(ObjectAddError::BadId);
        }
        let p = Props {
            map: props,
            typed,
            allowed: match qom_type {
                "tls-creds-x509" => &[
                    "verify-peer",
                    "dir",
                    "endpoint",
                    "priority",
                    "sanity-check",
                    "passwordid",
                ],
                "authz-simple" => &["identity"],
                _ => &["policy", "rules"],
            },
        };
        p.check_unexpected()?;
        if self.lock().contains_key(id) {
            return Err(ObjectAddError::DuplicateId(id.to_string()));
        }
        let object = match qom_type {
            "tls-creds-x509" => {
                for unsupported in ["priority", "passwordid"] {
                    if p.map.contains_key(unsupported) {
                        return Err(ObjectAddError::UnsupportedProperty(unsupported));
                    }
                }
                let verify_peer = p.bool("verify-peer")?.unwrap_or(true);
                // Certificates are always checked against the CA; there is nothing
                // more for sanity-check to turn on or off.
                p.bool("sanity-check")?;
                let endpoint = match p.string("endpoint")? {
                    None | Some("client") => Endpoint::Client,
                    Some("server") => Endpoint::Server,
                    Some(other) => return Err(bad_value("endpoint", other)),
                };
                let Some(dir) = p.string("dir")? else {
                    return Err(ObjectAddError::MissingDir);
                };
                let creds = X509Creds::load(Path::new(dir), endpoint, verify_peer)?;
                Object::TlsCredsX509(Arc::new(creds))
            }
            "authz-simple" => {
                let Some(identity) = p.string("identity")? else {
                    return Err(missing("identity"));
                };
                Object::Authz(Arc::new(Authz::Simple {
                    identity: identity.to_string(),
                }))
            }
            _ => {
                let policy = policy_of(p.string("policy")?, "policy")?.unwrap_or(Policy::Deny);
                let rules = match p.map.get("rules") {
                    None => Vec::new(),
                    Some(v) => parse_rules(v)?,
                };
                Object::Authz(Arc::new(Authz::List { policy, rules }))
            }
        };
        let mut objects = self.lock();
        if objects.contains_key(id) {
            return Err(ObjectAddError::DuplicateId(id.to_string()));
        }
        objects.insert(id.to_string(), object);
        Ok(())
    }

    /// `object-del`. A migration that took the object keeps its own reference.
    pub fn delete(&self, id: &str) -> Result<(), ObjectNotFound> {
        match self.lock().remove(id) {
            Some(_) => Ok(()),
            None => Err(ObjectNotFound(id.to_string())),
        }
    }

    /// The `tls-creds` object with `id`, for `endpoint`, with QEMU's errors.
    pub fn tls_creds(
        &self,
        id: &str,
        endpoint: Endpoint,
    ) -> Result<Arc<X509Creds>, ObjectLookupError> {
        match self.lock().get(id) {
            None => Err(ObjectLookupError::NoTlsCreds(id.to_string())),
            Some(Object::TlsCredsX509(c)) if c.endpoint == endpoint => Ok(c.clone()),
            Some(Object::TlsCredsX509(_)) => Err(ObjectLookupError::WrongEndpoint(endpoint)),
            Some(_) => Err(ObjectLookupError::NotTlsCreds(id.to_string())),
        }
    }

    /// The `tls-authz` object with `id`.
    pub fn authz(&self, id: &str) -> Result<Arc<Authz>, ObjectLookupError> {
        match self.lock().get(id) {
            None => Err(ObjectLookupError::NoAuthz(id.to_string())),
            Some(Object::Authz(a)) => Ok(a.clone()),
            Some(o) => Err(ObjectLookupError::NotAuthz {
                id: id.to_string(),
                type_name: o.type_name(),
            }),
        }
    }

    /// (id, type) of every object, in id order.
    pub fn list(&self) -> Vec<(String, &'static str)> {
        self.lock()
            .iter()
            .map(|(id, o)| (id.clone(), o.type_name()))
            .collect()
    }
}

/// QEMU's id rule: a letter, then letters, digits, `-`, `.`, `_`.
fn is_identifier(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

struct Props<'a> {
    map: &'a Map<String, Value>,
    typed: bool,
    allowed: &'static [&'static str],
}

impl Props<'_> {
    fn check_unexpected(&self) -> Result<(), ObjectAddError> {
        for key in self.map.keys() {
            if key != "qom-type" && key != "id" && !self.allowed.contains(&key.as_str()) {
                return Err(ObjectAddError::UnexpectedParameter(key.clone()));
            }
        }
        Ok(())
    }

    fn string(&self, key: &str) -> Result<Option<&str>, ObjectAddError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(wrong_type(key, "string")),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ObjectAddError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if !self.typed => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(Some(true)),
                "off" | "no" | "false" | "n" => Ok(Some(false)),
                _ => Err(ObjectAddError::NotOnOff(key.to_string())),
            },
            Some(_) => Err(wrong_type(key, "boolean")),
        }
    }
}

fn policy_of(v: Option<&str>, key: &str) -> Result<Option<Policy>, ObjectAddError> {
    match v {
        None => Ok(None),
        Some("allow") => Ok(Some(Policy::Allow)),
        Some("deny") => Ok(Some(Policy::Deny)),
        Some(other) => Err(bad_value(key, other)),
    }
}

fn parse_rules(v: &Value) -> Result<Vec<AuthzRule>, ObjectAddError> {
    let Some(items) = v.as_array() else {
        return Err(wrong_type("rules", "array"));
    };
    let mut rules = Vec::with_capacity(items.len().min(1024));
    for (i, item) in items.iter().enumerate() {
        let Some(rule) = item.as_object() else {
            return Err(wrong_type(format!("rules[{i}]"), "object"));
        };
        let field = |k: &str| -> Result<Option<&str>, ObjectAddError> {
            match rule.get(k) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(wrong_type(format!("rules[{i}].{k}"), "string")),
            }
        };
        for key in rule.keys() {
            if !matches!(key.as_str(), "match" | "policy" | "format") {
                return Err(ObjectAddError::UnexpectedParameter(format!(
                    "rules[{i}].{key}"
                )));
            }
        }
        let Some(pattern) = field("match")? else {
            return Err(missing(format!("rules[{i}].match")));
        };
        let Some(policy) = policy_of(field("policy")?, &format!("rules[{i}].policy"))? else {
            return Err(missing(format!("rules[{i}].policy")));
        };
        let format = match field("format")? {
            None | Some("exact") => MatchFormat::Exact,
            Some("glob") => MatchFormat::Glob,
            Some(other) => return Err(bad_value(format!("rules[{i}].format"), other)),
        };
        rules.push(AuthzRule {
            pattern: pattern.to_string(),
            policy,
            format,
        });
    }
    Ok(rules)
}

/// Parses a command-line object, `TYPE,key=value,...`, into `object-add`'s members.
/// As with QEMU's `-object`: `,,` is a literal comma, and dotted keys build nested
/// members, where numeric keys make a list (`rules.0.match=...`).
pub fn parse_object_option(text: &str) -> Result<Map<String, Value>, ObjectOptionError> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    let mut out = Map::new();
    let mut iter = parts.into_iter();
    let first = iter.next().unwrap_or_default();
    match first.split_once('=') {
        Some(("qom-type", v)) => {
            out.insert("qom-type".into(), Value::String(v.to_string()));
        }
        Some(_) => {
            // `key=value,...` without a type first
            return Err(ObjectOptionError::TypeNotFirst(text.to_string()));
        }
        None => {
            out.insert("qom-type".into(), Value::String(first));
        }
    }
    for part in iter {
        let Some((key, value)) = part.split_once('=') else {
            return Err(ObjectOptionError::MissingEquals(part));
        };
        if key.is_empty() {
            return Err(ObjectOptionError::EmptyKey(text.to_string()));
        }
        insert_dotted(&mut out, key, Value::String(value.to_string()))?;
    }
    Ok(lists_from_numeric_keys(Value::Object(out))
        .as_object()
        .cloned()
        .unwrap_or_default())
}

fn insert_dotted(
    map: &mut Map<String, Value>,
    key: &str,
    value: Value,
) -> Result<(), ObjectOptionError> {
    match key.split_once('.') {
        None => {
            if map.contains_key(key) {
                return Err(ObjectOptionError::RepeatedKey(key.to_string()));
            }
            map.insert(key.to_string(), value);
            Ok(())
        }
        Some((head, rest)) => {
            let entry = map
                .entry(head.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            match entry.as_object_mut() {
                Some(inner) => insert_dotted(inner, rest, value),
                None => Err(ObjectOptionError::ValueAndGroup(head.to_string())),
            }
        }
    }
}

/// Objects whose keys are 0, 1, ... n-1 become lists, recursively.
fn lists_from_numeric_keys(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let n = map.len();
            let numeric = n > 0 && (0..n).all(|i| map.contains_key(&i.to_string()));
            if numeric {
                let mut map = map;
                Value::Array(
                    (0..n)
                        .map(|i| {
                            lists_from_numeric_keys(
                                map.remove(&i.to_string()).unwrap_or(Value::Null),
                            )
                        })
                        .collect(),
                )
            } else {
                Value::Object(
                    map.into_iter()
                        .map(|(k, v)| (k, lists_from_numeric_keys(v)))
                        .collect(),
                )
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn command_line_objects_unescape_commas_and_build_lists() {
        let m = parse_object_option(
            "authz-list,id=az0,policy=deny,rules.0.match=CN=a,,O=b,rules.0.policy=allow,rules.1.match=*,rules.1.policy=deny,rules.1.format=glob",
        )
        .unwrap();
        assert_eq!(
            Value::Object(m.clone()),
            json!({"qom-type": "authz-list", "id": "az0", "policy": "deny",
                   "rules": [{"match": "CN=a,O=b", "policy": "allow"},
                             {"match": "*", "policy": "deny", "format": "glob"}]})
        );
        let store = ObjectStore::default();
        store.add(&m, false).unwrap();
        let a = store.authz("az0").unwrap();
        assert!(a.is_allowed("CN=a,O=b"));
        assert!(!a.is_allowed("CN=c"));
    }

    #[test]
    fn add_and_delete_give_qemus_errors() {
        let store = ObjectStore::default();
        let add = |v: Value| store.add(v.as_object().unwrap(), true);
        assert_eq!(
            add(json!({"qom-type": "nosuch", "id": "x"}))
                .unwrap_err()
                .to_string(),
            "Parameter 'qom-type' does not accept value 'nosuch'"
        );
        assert_eq!(
            add(json!({"qom-type": "tls-creds-psk", "id": "x"}))
                .unwrap_err()
                .to_string(),
            "Object type 'tls-creds-psk' is not supported by vmigrate yet"
        );
        assert_eq!(
            add(json!({"qom-type": "authz-simple"}))
                .unwrap_err()
                .to_string(),
            "Parameter 'id' is missing"
        );
        assert_eq!(
            add(json!({"qom-type": "authz-simple", "id": "1x", "identity": "a"}))
                .unwrap_err()
                .to_string(),
            "Parameter 'id' expects an identifier"
        );
        assert_eq!(
            add(json!({"qom-type": "authz-simple", "id": "a", "identity": "a", "x": 1}))
                .unwrap_err()
                .to_string(),
            "Parameter 'x' is unexpected"
        );
        add(json!({"qom-type": "authz-simple", "id": "a", "identity": "CN=x"})).unwrap();
        assert_eq!(
            add(json!({"qom-type": "authz-simple", "id": "a", "identity": "CN=y"}))
                .unwrap_err()
                .to_string(),
            "attempt to add duplicate property 'a' to object (type 'container')"
        );
        assert_eq!(
            add(json!({"qom-type": "tls-creds-x509", "id": "t", "verify-peer": "on"}))
                .unwrap_err()
                .to_string(),
            "Invalid parameter type for 'verify-peer', expected: boolean"
        );
        assert_eq!(
            add(json!({"qom-type": "tls-creds-x509", "id": "t", "dir": "/nonexistent"}))
                .unwrap_err()
                .to_string(),
            "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory"
        );
        assert_eq!(
            store
                .tls_creds("a", Endpoint::Client)
                .unwrap_err()
                .to_string(),
            "Object with id 'a' is not TLS credentials"
        );
        assert_eq!(
            store
                .tls_creds("zz", Endpoint::Client)
                .unwrap_err()
                .to_string(),
            "No TLS credentials with id 'zz'"
        );
        assert_eq!(store.list(), vec![("a".to_string(), "authz-simple")]);
        store.delete("a").unwrap();
        assert_eq!(
            store.delete("a").unwrap_err().to_string(),
            "object 'a' not found"
        );
    }

    #[test]
    fn authz_rules_errors_name_the_rule() {
        let store = ObjectStore::default();
        let add = |rules: Value| {
            store.add(
                json!({"qom-type": "authz-list", "id": "az", "rules": rules})
                    .as_object()
                    .unwrap(),
                true,
            )
        };
        assert_eq!(
            add(json!([{"match": "a"}])).unwrap_err().to_string(),
            "Parameter 'rules[0].policy' is missing"
        );
        assert_eq!(
            add(json!([{"match": "a", "policy": "allow", "format": "regex"}])).unwrap_err(),
            ObjectAddError::ParameterValue {
                key: "rules[0].format".into(),
                value: "regex".into()
            }
        );
        assert_eq!(
            add(json!([{"match": 1, "policy": "allow"}]))
                .unwrap_err()
                .to_string(),
            "Invalid parameter type for 'rules[0].match', expected: string"
        );
        assert_eq!(
            store.authz("az").unwrap_err().to_string(),
            "Cannot find QAuthZ object ID az"
        );
    }

    #[test]
    fn command_line_object_errors() {
        let cases = [
            (
                "id=x,authz-simple",
                ObjectOptionError::TypeNotFirst("id=x,authz-simple".into()),
            ),
            (
                "authz-simple,id",
                ObjectOptionError::MissingEquals("id".into()),
            ),
            (
                "authz-simple,=x",
                ObjectOptionError::EmptyKey("authz-simple,=x".into()),
            ),
            (
                "authz-simple,id=a,id=b",
                ObjectOptionError::RepeatedKey("id".into()),
            ),
            (
                "authz-list,r=1,r.0=2",
                ObjectOptionError::ValueAndGroup("r".into()),
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_object_option(text).unwrap_err(), expected, "{text}");
        }
        assert_eq!(
            ObjectOptionError::RepeatedKey("id".into()).to_string(),
            "Parameter 'id' is given more than once"
        );
    }
}
