//! Migration capabilities and parameters: QEMU 10.0's full lists, defaults, the JSON
//! argument checks of its input visitor, and its validation rules and error texts.

use serde_json::{json, Map, Value};

/// Every capability QEMU 10.0 has, in its enum order (the order queries list them in).
pub const CAPABILITIES: [&str; 22] = [
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
];

/// Capabilities vmigrate implements. `zero-blocks` and `late-block-activate` have no
/// effect in QEMU 10.0 either, so accepting them is faithful.
const SUPPORTED_CAPABILITIES: [&str; 10] = [
    "events",
    "mapped-ram",
    "auto-converge",
    "multifd",
    "return-path",
    "switchover-ack",
    "zero-blocks",
    "late-block-activate",
    "validate-uuid",
    "pause-before-switchover",
];

/// An option error, with the QMP error text. All of them are `GenericError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OptionsError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, OptionsError> {
    Err(OptionsError(msg.into()))
}

/// The capability set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    on: [bool; CAPABILITIES.len()],
}

impl Capabilities {
    pub fn get(&self, name: &str) -> bool {
        CAPABILITIES
            .iter()
            .position(|c| *c == name)
            .is_some_and(|i| self.on[i])
    }

    fn set(&mut self, name: &str, state: bool) {
        if let Some(i) = CAPABILITIES.iter().position(|c| *c == name) {
            self.on[i] = state;
        }
    }

    /// `query-migrate-capabilities`.
    pub fn to_json(&self) -> Value {
        Value::Array(
            CAPABILITIES
                .iter()
                .zip(self.on)
                .map(|(name, state)| json!({"capability": name, "state": state}))
                .collect(),
        )
    }

    /// `migrate-set-capabilities`: checks the argument shapes as QEMU's input visitor
    /// does, merges, validates the would-be set (against the current `params`, which
    /// zero-copy-send looks at) and returns it. `incoming_started` is whether this
    /// process already listens for an incoming migration.
    pub fn merged(
        &self,
        list: &Value,
        incoming_started: bool,
        params: &Parameters,
    ) -> Result<Capabilities, OptionsError> {
        let items = list
            .as_array()
            .ok_or_else(|| invalid_type("capabilities", "array"))?;
        let mut next = self.clone();
        let mut turned_on = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let obj = item
                .as_object()
                .ok_or_else(|| invalid_type(&format!("capabilities[{i}]"), "object"))?;
            let name = match obj.get("capability") {
                None => {
                    return err(format!(
                        "Parameter 'capabilities[{i}].capability' is missing"
                    ))
                }
                Some(Value::String(s)) if CAPABILITIES.contains(&s.as_str()) => s.as_str(),
                // QEMU's enum visitor names the member alone, without its path.
                Some(Value::String(s)) => {
                    return err(format!(
                        "Parameter 'capability' does not accept value '{s}'"
                    ))
                }
                Some(_) => {
                    return Err(invalid_type(
                        &format!("capabilities[{i}].capability"),
                        "string",
                    ))
                }
            };
            let state = match obj.get("state") {
                None => return err(format!("Parameter 'capabilities[{i}].state' is missing")),
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(invalid_type(&format!("capabilities[{i}].state"), "boolean"))
                }
            };
            if let Some(key) = obj.keys().find(|k| *k != "capability" && *k != "state") {
                return err(format!("Parameter 'capabilities[{i}].{key}' is unexpected"));
            }
            if state && !self.get(name) && !turned_on.contains(&name) {
                turned_on.push(name);
            }
            next.set(name, state);
        }
        next.validate(self, incoming_started, params)?;
        for name in turned_on {
            if next.get(name) && !SUPPORTED_CAPABILITIES.contains(&name) {
                return err(format!(
                    "Capability '{name}' is not supported by vmigrate yet"
                ));
            }
        }
        Ok(next)
    }

    /// QEMU's rules on a would-be capability set, in its order.
    fn validate(
        &self,
        old: &Capabilities,
        incoming_started: bool,
        params: &Parameters,
    ) -> Result<(), OptionsError> {
        let on = |c: &str| self.get(c);
        if on("postcopy-ram") {
            if on("x-ignore-shared") {
                return err("Postcopy is not compatible with ignore-shared");
            }
            if on("multifd") {
                return err("Postcopy is not yet compatible with multifd");
            }
        }
        if on("background-snapshot") {
            const CONFLICTS: [&str; 14] = [
                "postcopy-ram",
                "dirty-bitmaps",
                "postcopy-blocktime",
                "late-block-activate",
                "return-path",
                "multifd",
                "pause-before-switchover",
                "auto-converge",
                "release-ram",
                "rdma-pin-all",
                "xbzrle",
                "x-colo",
                "validate-uuid",
                "zero-copy-send",
            ];
            if let Some(c) = CONFLICTS.iter().find(|c| on(c)) {
                return err(format!("Background-snapshot is not compatible with {c}"));
            }
        }
        if on("zero-copy-send")
            && (!on("multifd")
                || on("xbzrle")
                || params.str("multifd-compression") != "none"
                || !params.str("tls-creds").is_empty())
        {
            return err("Zero copy only available for non-compressed non-TLS multifd migration");
        }
        if on("postcopy-preempt") {
            if !on("postcopy-ram") {
                return err("Postcopy preempt requires postcopy-ram");
            }
            if incoming_started && !old.get("postcopy-preempt") {
                return err("Postcopy preempt must be set before incoming starts");
            }
        }
        if on("multifd") && incoming_started && !old.get("multifd") {
            return err("Multifd must be set before incoming starts");
        }
        if on("switchover-ack") && !on("return-path") {
            return err("Capability 'switchover-ack' requires capability 'return-path'");
        }
        if on("dirty-limit") {
            if on("auto-converge") {
                return err(
                    "dirty-limit conflicts with auto-converge either of then available currently",
                );
            }
            return err("dirty-limit requires KVM with accelerator property 'dirty-ring-size' set");
        }
        if on("multifd") && on("xbzrle") {
            return err("Multifd is not compatible with xbzrle");
        }
        if on("mapped-ram") {
            if on("xbzrle") {
                return err("Mapped-ram migration is incompatible with xbzrle");
            }
            if on("postcopy-ram") {
                return err("Mapped-ram migration is incompatible with postcopy");
            }
        }
        Ok(())
    }
}

/// The migration `mode` parameter (QEMU's `MigMode`).
///
/// - `normal`: live migration.
/// - `cpr-reboot`: the VM is stopped when the migration starts and saved (normally to a
///   `file:`), for a restart of the same VM on a new host process or after a reboot.
/// - `cpr-transfer`: guest RAM stays in place and is handed to a new process over a
///   `cpr` channel; it needs RAM that can be shared.
///
/// Migration blockers are registered per mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigMode {
    Normal,
    CprReboot,
    CprTransfer,
}

impl MigMode {
    /// Every mode, in QEMU's enum order.
    pub const ALL: [MigMode; 3] = [MigMode::Normal, MigMode::CprReboot, MigMode::CprTransfer];
    /// Their names, in the same order.
    pub const NAMES: [&'static str; 3] = ["normal", "cpr-reboot", "cpr-transfer"];

    pub fn name(self) -> &'static str {
        match self {
            MigMode::Normal => Self::NAMES[0],
            MigMode::CprReboot => Self::NAMES[1],
            MigMode::CprTransfer => Self::NAMES[2],
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether this is one of the checkpoint/restart modes.
    pub fn is_cpr(self) -> bool {
        self != MigMode::Normal
    }
}

impl std::fmt::Display for MigMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The capability that a CPR mode cannot be combined with, as the error `migrate`
/// gives, in QEMU's order (`dirty-bitmaps` counts as postcopy, as it does in QEMU).
pub fn cpr_conflict(mode: MigMode, caps: &Capabilities) -> Option<&'static str> {
    if !mode.is_cpr() {
        return None;
    }
    if caps.get("postcopy-ram") || caps.get("dirty-bitmaps") {
        return Some("Cannot use postcopy with CPR");
    }
    if caps.get("background-snapshot") {
        return Some("Cannot use background snapshot with CPR");
    }
    if caps.get("x-colo") {
        return Some("Cannot use COLO with CPR");
    }
    None
}

/// How a parameter's JSON value is typed and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `size` / `uint64`: negative numbers wrap, as QEMU's visitor does.
    U64,
    U32,
    U8,
    Bool,
    /// String or null (`null` is stored as `""`).
    StrOrNull,
    Enum(&'static [&'static str]),
}

const COMPRESSION: &[&str] = &["none", "zlib", "zstd"];
const MODES: &[&str] = &MigMode::NAMES;
const ZERO_PAGE_DETECTION: &[&str] = &["none", "legacy", "multifd"];

/// Every parameter, in the order `query-migrate-parameters` lists them, with its default.
const PARAMETERS: [(&str, Kind, DefaultValue); 28] = [
    ("announce-initial", Kind::U64, DefaultValue::U(50)),
    ("announce-max", Kind::U64, DefaultValue::U(550)),
    ("announce-rounds", Kind::U64, DefaultValue::U(5)),
    ("announce-step", Kind::U64, DefaultValue::U(100)),
    ("throttle-trigger-threshold", Kind::U8, DefaultValue::U(50)),
    ("cpu-throttle-initial", Kind::U8, DefaultValue::U(20)),
    ("cpu-throttle-increment", Kind::U8, DefaultValue::U(10)),
    ("cpu-throttle-tailslow", Kind::Bool, DefaultValue::B(false)),
    ("max-cpu-throttle", Kind::U8, DefaultValue::U(99)),
    ("tls-creds", Kind::StrOrNull, DefaultValue::S("")),
    ("tls-hostname", Kind::StrOrNull, DefaultValue::S("")),
    ("tls-authz", Kind::StrOrNull, DefaultValue::S("")),
    ("max-bandwidth", Kind::U64, DefaultValue::U(134_217_728)),
    ("avail-switchover-bandwidth", Kind::U64, DefaultValue::U(0)),
    ("downtime-limit", Kind::U64, DefaultValue::U(300)),
    ("x-checkpoint-delay", Kind::U32, DefaultValue::U(20000)),
    ("multifd-channels", Kind::U8, DefaultValue::U(2)),
    (
        "multifd-compression",
        Kind::Enum(COMPRESSION),
        DefaultValue::S("none"),
    ),
    ("multifd-zlib-level", Kind::U8, DefaultValue::U(1)),
    ("multifd-qatzip-level", Kind::U8, DefaultValue::U(1)),
    ("multifd-zstd-level", Kind::U8, DefaultValue::U(1)),
    ("xbzrle-cache-size", Kind::U64, DefaultValue::U(67_108_864)),
    ("max-postcopy-bandwidth", Kind::U64, DefaultValue::U(0)),
    (
        "x-vcpu-dirty-limit-period",
        Kind::U64,
        DefaultValue::U(1000),
    ),
    ("vcpu-dirty-limit", Kind::U64, DefaultValue::U(1)),
    ("mode", Kind::Enum(MODES), DefaultValue::S("normal")),
    (
        "zero-page-detection",
        Kind::Enum(ZERO_PAGE_DETECTION),
        DefaultValue::S("multifd"),
    ),
    ("direct-io", Kind::Bool, DefaultValue::B(false)),
];
const BLOCK_BITMAP_MAPPING: &str = "block-bitmap-mapping";

/// The members of `migrate-set-parameters` in the order of QEMU's schema, which is the
/// order its input visitor checks them in.
const SET_ORDER: [&str; 29] = [
    "announce-initial",
    "announce-max",
    "announce-rounds",
    "announce-step",
    "throttle-trigger-threshold",
    "cpu-throttle-initial",
    "cpu-throttle-increment",
    "cpu-throttle-tailslow",
    "tls-creds",
    "tls-hostname",
    "tls-authz",
    "max-bandwidth",
    "avail-switchover-bandwidth",
    "downtime-limit",
    "x-checkpoint-delay",
    "multifd-channels",
    "xbzrle-cache-size",
    "max-postcopy-bandwidth",
    "max-cpu-throttle",
    "multifd-compression",
    "multifd-zlib-level",
    "multifd-qatzip-level",
    "multifd-zstd-level",
    BLOCK_BITMAP_MAPPING,
    "x-vcpu-dirty-limit-period",
    "vcpu-dirty-limit",
    "mode",
    "zero-page-detection",
    "direct-io",
];

#[derive(Debug, Clone, Copy)]
enum DefaultValue {
    U(u64),
    B(bool),
    S(&'static str),
}

/// The parameter set, kept as the JSON values `query-migrate-parameters` returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Parameters {
    values: Map<String, Value>,
}

impl Default for Parameters {
    fn default() -> Self {
        let values = PARAMETERS
            .iter()
            .map(|(name, _, d)| {
                let v = match d {
                    DefaultValue::U(u) => json!(u),
                    DefaultValue::B(b) => json!(b),
                    DefaultValue::S(s) => json!(s),
                };
                (name.to_string(), v)
            })
            .collect();
        Self { values }
    }
}

impl Parameters {
    pub fn to_json(&self) -> Value {
        Value::Object(self.values.clone())
    }

    pub fn u64(&self, name: &str) -> u64 {
        self.values.get(name).and_then(Value::as_u64).unwrap_or(0)
    }

    pub fn bool(&self, name: &str) -> bool {
        self.values
            .get(name)
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    pub fn str(&self, name: &str) -> &str {
        self.values.get(name).and_then(Value::as_str).unwrap_or("")
    }

    /// The `mode` parameter (only the enum's names are ever stored).
    pub fn mode(&self) -> MigMode {
        MigMode::from_name(self.str("mode")).unwrap_or(MigMode::Normal)
    }

    /// `migrate-set-parameters`: type-checks every member in the schema's order (then
    /// refuses unknown members, as QEMU's input visitor does), merges into a copy, runs
    /// QEMU's checks on the merged set, and returns it. Nothing changes on error.
    pub fn merged(&self, args: &Map<String, Value>) -> Result<Parameters, OptionsError> {
        let mut next = self.clone();
        for key in SET_ORDER {
            let Some(value) = args.get(key) else { continue };
            if key == BLOCK_BITMAP_MAPPING {
                next.values
                    .insert(key.to_string(), check_bitmap_mapping_shape(value)?);
                continue;
            }
            let Some((name, kind, _)) = PARAMETERS.iter().find(|(n, _, _)| *n == key) else {
                continue;
            };
            next.values
                .insert(name.to_string(), check_type(name, *kind, value)?);
        }
        if let Some(key) = args.keys().find(|k| !SET_ORDER.contains(&k.as_str())) {
            return err(format!("Parameter '{key}' is unexpected"));
        }
        next.validate()?;
        Ok(next)
    }

    /// QEMU's parameter checks, in its order.
    fn validate(&self) -> Result<(), OptionsError> {
        let u = |n: &str| self.u64(n);
        let between = |n: &str, c: &str, lo: u64, hi: u64| {
            if (lo..=hi).contains(&u(n)) {
                Ok(())
            } else {
                err(format!(
                    "Parameter '{c}' expects an integer in the range of {lo} to {hi}"
                ))
            }
        };
        between(
            "throttle-trigger-threshold",
            "throttle_trigger_threshold",
            1,
            100,
        )?;
        between("cpu-throttle-initial", "cpu_throttle_initial", 1, 99)?;
        between("cpu-throttle-increment", "cpu_throttle_increment", 1, 99)?;
        if u("downtime-limit") > 2_000_000 {
            return err("Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms");
        }
        if u("multifd-channels") < 1 {
            return err("Parameter 'multifd_channels' expects a value between 1 and 255");
        }
        if u("multifd-zlib-level") > 9 {
            return err("Parameter 'multifd_zlib_level' expects a value between 0 and 9");
        }
        if !(1..=9).contains(&u("multifd-qatzip-level")) {
            return err("Parameter 'multifd_qatzip_level' expects a value between 1 and 9");
        }
        if u("multifd-zstd-level") > 20 {
            return err("Parameter 'multifd_zstd_level' expects a value between 0 and 20");
        }
        let cache = u("xbzrle-cache-size");
        if !cache.is_power_of_two() || cache < 4096 {
            return err("Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size");
        }
        let max_throttle = u("max-cpu-throttle");
        if max_throttle < u("cpu-throttle-initial") || max_throttle > 99 {
            return err("Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99");
        }
        for (n, c, hi) in [
            ("announce-initial", "announce_initial", 100_000),
            ("announce-max", "announce_max", 100_000),
            ("announce-rounds", "announce_rounds", 1000),
        ] {
            if u(n) > hi {
                return err(format!(
                    "Parameter '{c}' expects a value between 0 and {hi}"
                ));
            }
        }
        if !(1..=10_000).contains(&u("announce-step")) {
            return err("Parameter 'announce_step' expects a value between 0 and 10000");
        }
        if let Some(mapping) = self.values.get(BLOCK_BITMAP_MAPPING) {
            check_bitmap_mapping_rules(mapping).map_err(|e| {
                OptionsError(format!(
                    "Invalid mapping given for block-bitmap-mapping: {}",
                    e.0
                ))
            })?;
        }
        if !(1..=1000).contains(&u("x-vcpu-dirty-limit-period")) {
            return err("Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000");
        }
        if u("vcpu-dirty-limit") < 1 {
            return err("Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s");
        }
        Ok(())
    }

    /// Checks made by both parameter and capability updates that look at the pair.
    pub fn cross_check(
        &self,
        stored: &Parameters,
        caps: &Capabilities,
    ) -> Result<(), OptionsError> {
        if caps.get("zero-copy-send")
            && (self.str("multifd-compression") != "none" || !self.str("tls-creds").is_empty())
        {
            return err("Zero copy only available for non-compressed non-TLS multifd migration");
        }
        if caps.get("mapped-ram")
            && (stored.str("multifd-compression") != "none" || !stored.str("tls-creds").is_empty())
        {
            return err("Mapped-ram only available for non-compressed non-TLS multifd migration");
        }
        Ok(())
    }
}

/// QEMU's input-visitor error for a JSON value of the wrong kind (integers aside, which
/// get `Parameter 'x' expects uint64`).
pub fn invalid_type(path: &str, expected: &str) -> OptionsError {
    OptionsError(format!(
        "Invalid parameter type for '{path}', expected: {expected}"
    ))
}

/// Checks the shape of `block-bitmap-mapping`
/// (`[{node-name, alias, bitmaps: [{name, alias, transform?: {persistent?}}]}]`).
fn check_bitmap_mapping_shape(v: &Value) -> Result<Value, OptionsError> {
    fn object<'a>(
        v: &'a Value,
        path: &str,
        members: &[(&str, &str, bool)],
    ) -> Result<&'a Map<String, Value>, OptionsError> {
        let obj = v.as_object().ok_or_else(|| invalid_type(path, "object"))?;
        for (name, ty, required) in members {
            let here = format!("{path}.{name}");
            match obj.get(*name) {
                None if *required => {
                    return err(format!("Parameter '{here}' is missing"));
                }
                None => {}
                Some(m) => {
                    let ok = match *ty {
                        "string" => m.is_string(),
                        "boolean" => m.is_boolean(),
                        "array" => m.is_array(),
                        _ => true,
                    };
                    if !ok {
                        return Err(invalid_type(&here, ty));
                    }
                }
            }
        }
        if let Some(key) = obj
            .keys()
            .find(|k| !members.iter().any(|(n, _, _)| n == *k))
        {
            return err(format!("Parameter '{path}.{key}' is unexpected"));
        }
        Ok(obj)
    }
    let nodes = v
        .as_array()
        .ok_or_else(|| invalid_type(BLOCK_BITMAP_MAPPING, "array"))?;
    for (i, node) in nodes.iter().enumerate() {
        let path = format!("{BLOCK_BITMAP_MAPPING}[{i}]");
        let obj = object(
            node,
            &path,
            &[
                ("node-name", "string", true),
                ("alias", "string", true),
                ("bitmaps", "array", true),
            ],
        )?;
        let bitmaps = obj["bitmaps"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        for (j, bitmap) in bitmaps.iter().enumerate() {
            let bpath = format!("{path}.bitmaps[{j}]");
            let b = object(
                bitmap,
                &bpath,
                &[
                    ("name", "string", true),
                    ("alias", "string", true),
                    ("transform", "object", false),
                ],
            )?;
            if let Some(t) = b.get("transform") {
                object(
                    t,
                    &format!("{bpath}.transform"),
                    &[("persistent", "boolean", false)],
                )?;
            }
        }
    }
    Ok(v.clone())
}

/// QEMU's rules on a well-typed `block-bitmap-mapping` (without the
/// `Invalid mapping given for block-bitmap-mapping: ` prefix).
fn check_bitmap_mapping_rules(v: &Value) -> Result<(), OptionsError> {
    /// QEMU's rule for ids: a letter, then letters, digits, `-`, `.` or `_`.
    fn well_formed(id: &str) -> bool {
        let mut chars = id.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    }
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let mut node_names = Vec::new();
    let mut node_aliases = Vec::new();
    for node in v.as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let (name, alias) = (s(node, "node-name"), s(node, "alias"));
        if !well_formed(&alias) {
            return err(format!("The node alias '{alias}' is not well-formed"));
        }
        if alias.len() > 255 {
            return err(format!("The node alias '{alias}' is longer than 255 bytes"));
        }
        if node_names.contains(&name) {
            return err(format!("The node name '{name}' is mapped twice"));
        }
        if node_aliases.contains(&alias) {
            return err(format!("The node alias '{alias}' is used twice"));
        }
        node_names.push(name.clone());
        node_aliases.push(alias.clone());
        let mut bitmap_names = Vec::new();
        let mut bitmap_aliases = Vec::new();
        let bitmaps = node.get("bitmaps").and_then(Value::as_array);
        for bitmap in bitmaps.map(Vec::as_slice).unwrap_or(&[]) {
            let (bname, balias) = (s(bitmap, "name"), s(bitmap, "alias"));
            if balias.len() > 255 {
                return err(format!(
                    "The bitmap alias '{alias}'/'{balias}' is longer than 255 bytes"
                ));
            }
            if bitmap_names.contains(&bname) {
                return err(format!("The bitmap '{name}'/'{bname}' is mapped twice"));
            }
            if bitmap_aliases.contains(&balias) {
                return err(format!(
                    "The bitmap alias '{alias}'/'{balias}' is used twice"
                ));
            }
            bitmap_names.push(bname);
            bitmap_aliases.push(balias);
        }
    }
    Ok(())
}

/// Type-checks one member as QEMU's input visitor does.
fn check_type(name: &str, kind: Kind, v: &Value) -> Result<Value, OptionsError> {
    let expects = |t: &str| OptionsError(format!("Parameter '{name}' expects {t}"));
    match kind {
        Kind::U64 | Kind::U32 | Kind::U8 => {
            let n = match v {
                Value::Number(n) if n.is_u64() => n.as_u64().unwrap_or(0),
                Value::Number(n) if n.is_i64() => n.as_i64().unwrap_or(0) as u64,
                _ => return Err(expects("uint64")),
            };
            let negative = v.as_i64().is_some_and(|i| i < 0);
            match kind {
                Kind::U8 if negative || n > u64::from(u8::MAX) => Err(expects("uint8_t")),
                Kind::U32 if negative || n > u64::from(u32::MAX) => Err(expects("uint32_t")),
                _ => Ok(json!(n)),
            }
        }
        Kind::Bool => v
            .as_bool()
            .map(Value::Bool)
            .ok_or_else(|| invalid_type(name, "boolean")),
        Kind::StrOrNull => match v {
            Value::Null => Ok(json!("")),
            Value::String(s) => Ok(json!(s)),
            _ => Err(invalid_type(name, "StrOrNull")),
        },
        Kind::Enum(values) => match v.as_str() {
            Some(s) if values.contains(&s) => Ok(json!(s)),
            Some(s) => Err(OptionsError(format!(
                "Parameter '{name}' does not accept value '{s}'"
            ))),
            None => Err(invalid_type(name, "string")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_qemu() {
        let p = Parameters::default();
        assert_eq!(p.u64("max-bandwidth"), 134_217_728);
        assert_eq!(p.u64("downtime-limit"), 300);
        assert_eq!(p.str("zero-page-detection"), "multifd");
        assert_eq!(p.to_json().as_object().unwrap().len(), 28);
    }

    #[test]
    fn parameter_type_and_range_errors() {
        let p = Parameters::default();
        let set = |v: Value| p.merged(v.as_object().unwrap()).map(|_| ()).unwrap_err().0;
        assert_eq!(
            set(json!({"multifd-channels": "x"})),
            "Parameter 'multifd-channels' expects uint64"
        );
        assert_eq!(
            set(json!({"multifd-channels": 256})),
            "Parameter 'multifd-channels' expects uint8_t"
        );
        assert_eq!(
            set(json!({"multifd-channels": 0})),
            "Parameter 'multifd_channels' expects a value between 1 and 255"
        );
        assert_eq!(set(json!({"nope": 1})), "Parameter 'nope' is unexpected");
        assert_eq!(
            set(json!({"downtime-limit": 2_000_001})),
            "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"
        );
        assert_eq!(
            set(json!({"multifd-compression": "lz4"})),
            "Parameter 'multifd-compression' does not accept value 'lz4'"
        );
        let q = p
            .merged(json!({"max-bandwidth": -1}).as_object().unwrap())
            .unwrap();
        assert_eq!(q.u64("max-bandwidth"), u64::MAX);
        let q = p
            .merged(json!({"tls-authz": null}).as_object().unwrap())
            .unwrap();
        assert_eq!(q.str("tls-authz"), "");
    }

    #[test]
    fn visitor_texts_and_member_order() {
        let p = Parameters::default();
        let set = |v: Value| p.merged(v.as_object().unwrap()).map(|_| ()).unwrap_err().0;
        assert_eq!(
            set(json!({"direct-io": "on"})),
            "Invalid parameter type for 'direct-io', expected: boolean"
        );
        assert_eq!(
            set(json!({"tls-creds": 1})),
            "Invalid parameter type for 'tls-creds', expected: StrOrNull"
        );
        assert_eq!(
            set(json!({"mode": null})),
            "Invalid parameter type for 'mode', expected: string"
        );
        // members are checked in schema order before unknown ones are refused
        assert_eq!(
            set(json!({"nope": 1, "max-bandwidth": "x"})),
            "Parameter 'max-bandwidth' expects uint64"
        );
    }

    #[test]
    fn block_bitmap_mapping_rules() {
        let p = Parameters::default();
        let set = |v: Value| {
            p.merged(json!({"block-bitmap-mapping": v}).as_object().unwrap())
                .map(|_| ())
                .unwrap_err()
                .0
        };
        let node = |n: &str, a: &str| json!({"node-name": n, "alias": a, "bitmaps": []});
        assert_eq!(
            set(json!([{}])),
            "Parameter 'block-bitmap-mapping[0].node-name' is missing"
        );
        assert_eq!(
            set(json!([node("n", "a"), node("n", "b")])),
            "Invalid mapping given for block-bitmap-mapping: The node name 'n' is mapped twice"
        );
        assert_eq!(
            set(json!([node("n", "a b")])),
            "Invalid mapping given for block-bitmap-mapping: The node alias 'a b' is not well-formed"
        );
        let ok = p
            .merged(
                json!({"block-bitmap-mapping": [node("n", "a")]})
                    .as_object()
                    .unwrap(),
            )
            .unwrap();
        assert!(ok.to_json().get("block-bitmap-mapping").is_some());
    }

    #[test]
    fn modes_and_cpr_conflicts() {
        for m in MigMode::ALL {
            assert_eq!(MigMode::from_name(m.name()), Some(m));
        }
        assert_eq!(MigMode::from_name("cpr-exec"), None);
        let p = Parameters::default();
        assert_eq!(p.mode(), MigMode::Normal);
        let q = p
            .merged(json!({"mode": "cpr-reboot"}).as_object().unwrap())
            .unwrap();
        assert_eq!(q.mode(), MigMode::CprReboot);
        let with = |names: &[&str]| {
            let mut c = Capabilities::default();
            for n in names {
                c.set(n, true);
            }
            c
        };
        let none = with(&[]);
        assert_eq!(cpr_conflict(MigMode::CprReboot, &none), None);
        let all = with(&["x-colo", "background-snapshot", "postcopy-ram"]);
        assert_eq!(cpr_conflict(MigMode::Normal, &all), None);
        assert_eq!(
            cpr_conflict(MigMode::CprReboot, &all),
            Some("Cannot use postcopy with CPR")
        );
        assert_eq!(
            cpr_conflict(MigMode::CprTransfer, &with(&["dirty-bitmaps"])),
            Some("Cannot use postcopy with CPR")
        );
        assert_eq!(
            cpr_conflict(
                MigMode::CprReboot,
                &with(&["x-colo", "background-snapshot"])
            ),
            Some("Cannot use background snapshot with CPR")
        );
        assert_eq!(
            cpr_conflict(MigMode::CprReboot, &with(&["x-colo", "postcopy-blocktime"])),
            Some("Cannot use COLO with CPR")
        );
    }

    #[test]
    fn capability_rules() {
        let c = Capabilities::default();
        let p = Parameters::default();
        let set = |v: Value| c.merged(&v, false, &p).map(|_| ()).unwrap_err().0;
        assert_eq!(
            set(
                json!([{"capability": "multifd", "state": true}, {"capability": "xbzrle", "state": true}])
            ),
            "Multifd is not compatible with xbzrle"
        );
        assert_eq!(
            set(json!([{"capability": "switchover-ack", "state": true}])),
            "Capability 'switchover-ack' requires capability 'return-path'"
        );
        assert_eq!(
            set(json!([{"capability": "nosuch", "state": true}])),
            "Parameter 'capability' does not accept value 'nosuch'"
        );
        assert!(set(json!([{"capability": "xbzrle", "state": true}])).contains("not supported"));
        let on = c
            .merged(&json!([{"capability": "events", "state": true}]), false, &p)
            .unwrap();
        assert!(on.get("events"));
    }
}
