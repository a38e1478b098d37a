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
use crate::channels::tls::{Endpoint, X509Creds};

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

fn err<T>(msg: impl Into<String>) -> Result<T, String> {
    Err(msg.into())
}

impl ObjectStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Object>> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `object-add` (and `--object`): `props` holds `qom-type`, `id` and the type's
    /// properties. `typed` is true for QMP, whose values must have their JSON types;
    /// the command line gives strings (`on`/`off` for booleans).
    pub fn add(&self, props: &Map<String, Value>, typed: bool) -> Result<(), String> {
        let qom_type = match props.get("qom-type") {
            None => return err("Parameter 'qom-type' is missing"),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return err("Invalid parameter type for 'qom-type', expected: string"),
        };
        let id = match props.get("id") {
            None => return err("Parameter 'id' is missing"),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return err("Invalid parameter type for 'id', expected: string"),
        };
        let known = ["tls-creds-x509", "authz-simple", "authz-list"];
        if !known.contains(&qom_type) {
            if UNSUPPORTED_TYPES.contains(&qom_type) {
                return err(format!(
                    "Object type '{qom_type}' is not supported by vmigrate yet"
                ));
            }
            return err(format!(
                "Parameter 'qom-type' does not accept value '{qom_type}'"
            ));
        }
        if !is_identifier(id) {
            return err("Parameter 'id' expects an identifier");
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
            return err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ));
        }
        let object = match qom_type {
            "tls-creds-x509" => {
                for unsupported in ["priority", "passwordid"] {
                    if p.map.contains_key(unsupported) {
                        return err(format!(
                            "Property '{unsupported}' of tls-creds-x509 is not supported by vmigrate yet"
                        ));
                    }
                }
                let verify_peer = p.bool("verify-peer")?.unwrap_or(true);
                // Certificates are always checked against the CA; there is nothing
                // more for sanity-check to turn on or off.
                p.bool("sanity-check")?;
                let endpoint = match p.string("endpoint")? {
                    None | Some("client") => Endpoint::Client,
                    Some("server") => Endpoint::Server,
                    Some(other) => {
                        return err(format!(
                            "Parameter 'endpoint' does not accept value '{other}'"
                        ))
                    }
                };
                let Some(dir) = p.string("dir")? else {
                    return err("Missing 'dir' property value");
                };
                let creds =
                    X509Creds::load(Path::new(dir), endpoint, verify_peer).map_err(|e| e.0)?;
                Object::TlsCredsX509(Arc::new(creds))
            }
            "authz-simple" => {
                let Some(identity) = p.string("identity")? else {
                    return err("Parameter 'identity' is missing");
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
            return err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ));
        }
        objects.insert(id.to_string(), object);
        Ok(())
    }

    /// `object-del`. A migration that took the object keeps its own reference.
    pub fn delete(&self, id: &str) -> Result<(), String> {
        match self.lock().remove(id) {
            Some(_) => Ok(()),
            None => err(format!("object '{id}' not found")),
        }
    }

    /// The `tls-creds` object with `id`, for `endpoint`, with QEMU's errors.
    pub fn tls_creds(&self, id: &str, endpoint: Endpoint) -> Result<Arc<X509Creds>, String> {
        match self.lock().get(id) {
            None => err(format!("No TLS credentials with id '{id}'")),
            Some(Object::TlsCredsX509(c)) if c.endpoint == endpoint => Ok(c.clone()),
            Some(Object::TlsCredsX509(_)) => err(format!(
                "Expected TLS credentials for a {} endpoint",
                endpoint.name()
            )),
            Some(_) => err(format!("Object with id '{id}' is not TLS credentials")),
        }
    }

    /// The `tls-authz` object with `id`.
    pub fn authz(&self, id: &str) -> Result<Arc<Authz>, String> {
        match self.lock().get(id) {
            None => err(format!("Cannot find QAuthZ object ID {id}")),
            Some(Object::Authz(a)) => Ok(a.clone()),
            Some(o) => err(format!(
                "Object with id '{id}' is a {}, not an authorization object",
                o.type_name()
            )),
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
    fn check_unexpected(&self) -> Result<(), String> {
        for key in self.map.keys() {
            if key != "qom-type" && key != "id" && !self.allowed.contains(&key.as_str()) {
                return err(format!("Parameter '{key}' is unexpected"));
            }
        }
        Ok(())
    }

    fn string(&self, key: &str) -> Result<Option<&str>, String> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => err(format!(
                "Invalid parameter type for '{key}', expected: string"
            )),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, String> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if !self.typed => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(Some(true)),
                "off" | "no" | "false" | "n" => Ok(Some(false)),
                _ => err(format!("Parameter '{key}' expects 'on' or 'off'")),
            },
            Some(_) => err(format!(
                "Invalid parameter type for '{key}', expected: boolean"
            )),
        }
    }
}

fn policy_of(v: Option<&str>, key: &str) -> Result<Option<Policy>, String> {
    match v {
        None => Ok(None),
        Some("allow") => Ok(Some(Policy::Allow)),
        Some("deny") => Ok(Some(Policy::Deny)),
        Some(other) => err(format!("Parameter '{key}' does not accept value '{other}'")),
    }
}

fn parse_rules(v: &Value) -> Result<Vec<AuthzRule>, String> {
    let Some(items) = v.as_array() else {
        return err("Invalid parameter type for 'rules', expected: array");
    };
    let mut rules = Vec::with_capacity(items.len().min(1024));
    for (i, item) in items.iter().enumerate() {
        let Some(rule) = item.as_object() else {
            return err(format!(
                "Invalid parameter type for 'rules[{i}]', expected: object"
            ));
        };
        let field = |k: &str| -> Result<Option<&str>, String> {
            match rule.get(k) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(_) => err(format!(
                    "Invalid parameter type for 'rules[{i}].{k}', expected: string"
                )),
            }
        };
        for key in rule.keys() {
            if !matches!(key.as_str(), "match" | "policy" | "format") {
                return err(format!("Parameter 'rules[{i}].{key}' is unexpected"));
            }
        }
        let Some(pattern) = field("match")? else {
            return err(format!("Parameter 'rules[{i}].match' is missing"));
        };
        let Some(policy) = policy_of(field("policy")?, &format!("rules[{i}].policy"))? else {
            return err(format!("Parameter 'rules[{i}].policy' is missing"));
        };
        let format = match field("format")? {
            None | Some("exact") => MatchFormat::Exact,
            Some("glob") => MatchFormat::Glob,
            Some(other) => {
                return err(format!(
                    "Parameter 'rules[{i}].format' does not accept value '{other}'"
                ))
            }
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
pub fn parse_object_option(text: &str) -> Result<Map<String, Value>, String> {
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
            return err(format!(
                "Parameter 'qom-type' is missing (the object's type comes first: TYPE,id=ID,...), in '{text}'"
            ));
        }
        None => {
            out.insert("qom-type".into(), Value::String(first));
        }
    }
    for part in iter {
        let Some((key, value)) = part.split_once('=') else {
            return err(format!("Expected '=' after parameter '{part}'"));
        };
        if key.is_empty() {
            return err(format!("Invalid parameter '' in '{text}'"));
        }
        insert_dotted(&mut out, key, Value::String(value.to_string()))?;
    }
    Ok(lists_from_numeric_keys(Value::Object(out))
        .as_object()
        .cloned()
        .unwrap_or_default())
}

fn insert_dotted(map: &mut Map<String, Value>, key: &str, value: Value) -> Result<(), String> {
    match key.split_once('.') {
        None => {
            if map.contains_key(key) {
                return err(format!("Parameter '{key}' is given more than once"));
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
                None => err(format!("Parameter '{head}' is both a value and a group")),
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
            add(json!({"qom-type": "nosuch", "id": "x"})).unwrap_err(),
            "Parameter 'qom-type' does not accept value 'nosuch'"
        );
        assert_eq!(
            add(json!({"qom-type": "tls-creds-psk", "id": "x"})).unwrap_err(),
            "Object type 'tls-creds-psk' is not supported by vmigrate yet"
        );
        assert_eq!(
            add(json!({"qom-type": "authz-simple"})).unwrap_err(),
            "Parameter 'id' is missing"
        );
        assert_eq!(
            add(json!({"qom-type": "authz-simple", "id": "1x", "identity": "a"})).unwrap_err(),
            "Parameter 'id' expects an identifier"
        );
        assert_eq!(
            add(json!({"qom-type": "authz-simple", "id": "a", "identity": "a", "x": 1}))
                .unwrap_err(),
            "Parameter 'x' is unexpected"
        );
        add(json!({"qom-type": "authz-simple", "id": "a", "identity": "CN=x"})).unwrap();
        assert_eq!(
            add(json!({"qom-type": "authz-simple", "id": "a", "identity": "CN=y"})).unwrap_err(),
            "attempt to add duplicate property 'a' to object (type 'container')"
        );
        assert_eq!(
            add(json!({"qom-type": "tls-creds-x509", "id": "t", "verify-peer": "on"})).unwrap_err(),
            "Invalid parameter type for 'verify-peer', expected: boolean"
        );
        assert_eq!(
            add(json!({"qom-type": "tls-creds-x509", "id": "t", "dir": "/nonexistent"}))
                .unwrap_err(),
            "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory"
        );
        assert_eq!(
            store.tls_creds("a", Endpoint::Client).unwrap_err(),
            "Object with id 'a' is not TLS credentials"
        );
        assert_eq!(
            store.tls_creds("zz", Endpoint::Client).unwrap_err(),
            "No TLS credentials with id 'zz'"
        );
        assert_eq!(store.list(), vec![("a".to_string(), "authz-simple")]);
        store.delete("a").unwrap();
        assert_eq!(store.delete("a").unwrap_err(), "object 'a' not found");
    }
}
