//! The command schema: argument types that QEMU's input visitor checks (with its error
//! texts), and their description for `query-qmp-schema`.

use serde_json::{json, Map, Value};

/// A schema type.
#[derive(Debug)]
pub enum Ty {
    Str,
    /// `int` (int64): a wrong kind is `Invalid parameter type ..., expected: integer`.
    Int,
    /// `uint64`/`size`: a wrong kind is `Parameter 'x' expects uint64`.
    Uint64,
    Bool,
    Any,
    /// String or null.
    StrOrNull,
    Enum(&'static str, &'static [&'static str]),
    Array(&'static Ty),
    Struct(&'static str, &'static [Member]),
    /// A flat union: base members (one of them the discriminator), then the members
    /// of the branch (a struct or another union) the discriminator selects.
    Union {
        name: &'static str,
        base: &'static [Member],
        tag: &'static str,
        branches: &'static [(&'static str, &'static Ty)],
    },
}

/// A struct member.
#[derive(Debug)]
pub struct Member {
    pub name: &'static str,
    pub ty: &'static Ty,
    pub optional: bool,
}

pub const fn req(name: &'static str, ty: &'static Ty) -> Member {
    Member {
        name,
        ty,
        optional: false,
    }
}

pub const fn opt(name: &'static str, ty: &'static Ty) -> Member {
    Member {
        name,
        ty,
        optional: true,
    }
}

fn invalid_type(path: &str, expected: &str) -> String {
    format!("Invalid parameter type for '{path}', expected: {expected}")
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// The members an object of type `ty` has, the union branches chosen by `obj`.
fn flat_members<'a>(ty: &'a Ty, obj: &Map<String, Value>) -> Vec<&'a Member> {
    match ty {
        Ty::Struct(_, members) => members.iter().collect(),
        Ty::Union {
            base,
            tag,
            branches,
            ..
        } => {
            let mut all: Vec<&Member> = base.iter().collect();
            let which = obj.get(*tag).and_then(Value::as_str).unwrap_or("");
            if let Some((_, branch)) = branches.iter().find(|(n, _)| *n == which) {
                all.extend(flat_members(branch, obj));
            }
            all
        }
        _ => Vec::new(),
    }
}

/// Checks the members of an object in schema order, then refuses members the schema
/// does not have, as QEMU does. `path` is "" at top level.
pub fn check_members(obj: &Map<String, Value>, ty: &Ty, path: &str) -> Result<(), String> {
    // Members come in order and a union's tag before its branch, so a bad tag is
    // reported before anything that depends on it.
    let mut checked = 0;
    loop {
        let members = flat_members(ty, obj);
        let Some(m) = members.get(checked) else { break };
        let here = join(path, m.name);
        match obj.get(m.name) {
            None if m.optional => {}
            None => return Err(format!("Parameter '{here}' is missing")),
            Some(v) => check(v, m.ty, &here, m.name)?,
        }
        checked += 1;
    }
    let members = flat_members(ty, obj);
    if let Some(key) = obj.keys().find(|k| !members.iter().any(|m| m.name == *k)) {
        return Err(format!("Parameter '{}' is unexpected", join(path, key)));
    }
    Ok(())
}

/// Checks one value; `name` is the bare member name QEMU's enum errors use.
pub fn check(v: &Value, ty: &Ty, path: &str, name: &str) -> Result<(), String> {
    match ty {
        Ty::Str if v.is_string() => Ok(()),
        Ty::Str => Err(invalid_type(path, "string")),
        Ty::Int if v.is_i64() => Ok(()),
        Ty::Int => Err(invalid_type(path, "integer")),
        Ty::Uint64 if v.is_u64() || v.is_i64() => Ok(()),
        Ty::Uint64 => Err(format!("Parameter '{path}' expects uint64")),
        Ty::Bool if v.is_boolean() => Ok(()),
        Ty::Bool => Err(invalid_type(path, "boolean")),
        Ty::Any => Ok(()),
        Ty::StrOrNull if v.is_string() || v.is_null() => Ok(()),
        Ty::StrOrNull => Err(invalid_type(path, "StrOrNull")),
        Ty::Enum(_, values) => match v.as_str() {
            Some(s) if values.contains(&s) => Ok(()),
            Some(s) => Err(format!("Parameter '{name}' does not accept value '{s}'")),
            None => Err(invalid_type(path, "string")),
        },
        Ty::Array(element) => {
            let items = v.as_array().ok_or_else(|| invalid_type(path, "array"))?;
            for (i, item) in items.iter().enumerate() {
                check(item, element, &format!("{path}[{i}]"), "null")?;
            }
            Ok(())
        }
        Ty::Struct(..) | Ty::Union { .. } => {
            let obj = v.as_object().ok_or_else(|| invalid_type(path, "object"))?;
            check_members(obj, ty, path)
        }
    }
}

static EMPTY_ARGS: Ty = Ty::Struct("q_empty", &[]);

/// `query-qmp-schema` entities for a set of commands and events.
#[derive(Debug, Default)]
pub struct SchemaBuilder {
    entities: Vec<Value>,
    names: Vec<String>,
}

impl SchemaBuilder {
    fn has(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    fn push(&mut self, name: String, entity: Value) {
        self.names.push(name);
        self.entities.push(entity);
    }

    /// Registers `ty` (and what it refers to); returns its schema name.
    pub fn type_name(&mut self, ty: &Ty) -> String {
        let builtin = |b: &mut Self, name: &str, json_type: &str| {
            if !b.has(name) {
                b.push(
                    name.into(),
                    json!({"name": name, "meta-type": "builtin", "json-type": json_type}),
                );
            }
            name.to_string()
        };
        match ty {
            Ty::Str => builtin(self, "str", "string"),
            Ty::Int => builtin(self, "int", "int"),
            // QEMU's introspection shows every integer type as `int`.
            Ty::Uint64 => builtin(self, "int", "int"),
            Ty::Bool => builtin(self, "bool", "boolean"),
            Ty::Any => builtin(self, "any", "value"),
            Ty::StrOrNull => {
                let s = builtin(self, "str", "string");
                let n = builtin(self, "null", "null");
                if !self.has("StrOrNull") {
                    self.push(
                        "StrOrNull".into(),
                        json!({"name": "StrOrNull", "meta-type": "alternate",
                               "members": [{"type": s}, {"type": n}]}),
                    );
                }
                "StrOrNull".into()
            }
            Ty::Enum(name, values) => {
                if !self.has(name) {
                    let members: Vec<Value> = values.iter().map(|v| json!({"name": v})).collect();
                    self.push(
                        name.to_string(),
                        json!({"name": name, "meta-type": "enum", "values": values,
                               "members": members}),
                    );
                }
                name.to_string()
            }
            Ty::Array(element) => {
                let e = self.type_name(element);
                let name = format!("[{e}]");
                if !self.has(&name) {
                    self.push(
                        name.clone(),
                        json!({"name": name, "meta-type": "array", "element-type": e}),
                    );
                }
                name
            }
            Ty::Struct(name, members) => {
                if !self.has(name) {
                    self.names.push(name.to_string());
                    let ms = self.members(members);
                    self.entities
                        .push(json!({"name": name, "meta-type": "object", "members": ms}));
                }
                name.to_string()
            }
            Ty::Union {
                name,
                base,
                tag,
                branches,
            } => {
                if !self.has(name) {
                    self.names.push(name.to_string());
                    let ms = self.members(base);
                    let variants: Vec<Value> = branches
                        .iter()
                        .map(|(case, branch)| json!({"case": case, "type": self.type_name(branch)}))
                        .collect();
                    self.entities
                        .push(json!({"name": name, "meta-type": "object",
                        "members": ms, "tag": tag, "variants": variants}));
                }
                name.to_string()
            }
        }
    }

    fn members(&mut self, members: &[Member]) -> Vec<Value> {
        members
            .iter()
            .map(|m| {
                let t = self.type_name(m.ty);
                if m.optional {
                    json!({"name": m.name, "type": t, "default": null})
                } else {
                    json!({"name": m.name, "type": t})
                }
            })
            .collect()
    }

    pub fn command(&mut self, name: &str, args: &'static Ty, ret: &'static Ty, oob: bool) {
        // A command's own argument struct gets QEMU's implicit-type name.
        let arg_type = match args {
            Ty::Struct(n, members) if *n == name => {
                let implicit = format!("q_obj_{name}-arg");
                if members.is_empty() {
                    self.type_name(&EMPTY_ARGS)
                } else {
                    let ms = self.members(members);
                    self.push(
                        implicit.clone(),
                        json!({"name": implicit, "meta-type": "object", "members": ms}),
                    );
                    implicit
                }
            }
            _ => self.type_name(args),
        };
        let ret_type = self.type_name(ret);
        let mut c = json!({"name": name, "meta-type": "command", "arg-type": arg_type,
                           "ret-type": ret_type});
        if oob {
            c["allow-oob"] = json!(true);
        }
        self.push(name.into(), c);
    }

    pub fn event(&mut self, name: &str, data: &'static Ty) {
        let arg_type = self.type_name(data);
        self.push(
            name.into(),
            json!({"name": name, "meta-type": "event", "arg-type": arg_type}),
        );
    }

    pub fn finish(self) -> Value {
        Value::Array(self.entities)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static STATE: Ty = Ty::Enum("S", &["a", "b"]);
    static ITEM: Ty = Ty::Struct("Item", &[req("s", &STATE), opt("n", &Ty::Int)]);
    static LIST: Ty = Ty::Array(&ITEM);

    #[test]
    fn errors_follow_qemu() {
        let t = |v: Value| check(&v, &LIST, "list", "list").unwrap_err();
        assert_eq!(
            t(json!({})),
            "Invalid parameter type for 'list', expected: array"
        );
        assert_eq!(
            t(json!([1])),
            "Invalid parameter type for 'list[0]', expected: object"
        );
        assert_eq!(t(json!([{}])), "Parameter 'list[0].s' is missing");
        assert_eq!(
            t(json!([{"s": "c"}])),
            "Parameter 's' does not accept value 'c'"
        );
        assert_eq!(
            t(json!([{"s": "a", "n": "x"}])),
            "Invalid parameter type for 'list[0].n', expected: integer"
        );
        assert_eq!(
            t(json!([{"s": "a", "x": 1}])),
            "Parameter 'list[0].x' is unexpected"
        );
        assert!(check(&json!([{"s": "b"}]), &LIST, "list", "list").is_ok());
    }
}
