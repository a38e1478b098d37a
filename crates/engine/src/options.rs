//! Migration capabilities and parameters: QEMU 10.0's full lists, defaults, the JSON
//! argument checks of its input visitor, and its validation rules and error texts.
//!
//! Each list is written once, in a table (`capabilities!` and `parameters!` below),
//! and the table generates both the QMP names and the typed accessors the engine uses:
//! `caps.multifd()` or `caps.has(Cap::Multifd)`, `params.max_bandwidth()`,
//! `params.multifd_compression()`. Only the QMP parsing looks options up by name.

use serde_json::{json, Map, Value};

/// Defines one of QEMU's QAPI enums: its variants, each with its QEMU name, in QEMU's
/// enum order, with `ALL`, `NAMES`, `name`, `from_name` and `Display`.
macro_rules! qapi_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $ty:ident {
            $($(#[$variant_meta:meta])* $variant:ident = $name:literal,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $ty {
            $($(#[$variant_meta])* $variant,)*
        }

        impl $ty {
            /// Every value, in QEMU's enum order.
            pub const ALL: [$ty; [$($name),*].len()] = [$($ty::$variant),*];
            /// Their QEMU names, in the same order.
            pub const NAMES: [&'static str; [$($name),*].len()] = [$($name),*];

            /// The QEMU name.
            pub const fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name,)*
                }
            }

            /// The value with this QEMU name.
            pub fn from_name(name: &str) -> Option<Self> {
                Self::ALL.into_iter().find(|v| v.name() == name)
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

/// The capability table: each capability's variant, accessor and QEMU name. Generates
/// [`Cap`], [`CAPABILITIES`] and one `Capabilities` accessor per capability.
macro_rules! capabilities {
    ($($variant:ident $method:ident = $name:literal,)*) => {
        qapi_enum! {
            /// A migration capability (QEMU's `MigrationCapability`).
            pub enum Cap {
                $($variant = $name,)*
            }
        }

        /// Every capability QEMU 10.0 has, in its enum order (the order queries list
        /// them in).
        pub const CAPABILITIES: [&str; Cap::ALL.len()] = Cap::NAMES;

        impl Capabilities {
            $(
                #[doc = concat!("Whether `", $name, "` is on.")]
                pub fn $method(&self) -> bool {
                    self.has(Cap::$variant)
                }
            )*
        }
    };
}

capabilities! {
    Xbzrle xbzrle = "xbzrle",
    RdmaPinAll rdma_pin_all = "rdma-pin-all",
    AutoConverge auto_converge = "auto-converge",
    ZeroBlocks zero_blocks = "zero-blocks",
    Events events = "events",
    PostcopyRam postcopy_ram = "postcopy-ram",
    XColo x_colo = "x-colo",
    ReleaseRam release_ram = "release-ram",
    ReturnPath return_path = "return-path",
    PauseBeforeSwitchover pause_before_switchover = "pause-before-switchover",
    Multifd multifd = "multifd",
    DirtyBitmaps dirty_bitmaps = "dirty-bitmaps",
    PostcopyBlocktime postcopy_blocktime = "postcopy-blocktime",
    LateBlockActivate late_block_activate = "late-block-activate",
    XIgnoreShared x_ignore_shared = "x-ignore-shared",
    ValidateUuid validate_uuid = "validate-uuid",
    BackgroundSnapshot background_snapshot = "background-snapshot",
    ZeroCopySend zero_copy_send = "zero-copy-send",
    PostcopyPreempt postcopy_preempt = "postcopy-preempt",
    SwitchoverAck switchover_ack = "switchover-ack",
    DirtyLimit dirty_limit = "dirty-limit",
    MappedRam mapped_ram = "mapped-ram",
}

/// Capabilities vmigrate implements. `zero-blocks` and `late-block-activate` have no
/// effect in QEMU 10.0 either, so accepting them is faithful.
const SUPPORTED_CAPABILITIES: [Cap; 20] = [
    Cap::BackgroundSnapshot,
    Cap::XIgnoreShared,
    Cap::Xbzrle,
    Cap::ZeroCopySend,
    Cap::Events,
    Cap::PostcopyRam,
    Cap::ReleaseRam,
    Cap::PostcopyBlocktime,
    Cap::PostcopyPreempt,
    Cap::MappedRam,
    Cap::AutoConverge,
    Cap::Multifd,
    Cap::ReturnPath,
    Cap::SwitchoverAck,
    Cap::ZeroBlocks,
    Cap::LateBlockActivate,
    Cap::ValidateUuid,
    Cap::PauseBeforeSwitchover,
    Cap::DirtyLimit,
    Cap::XColo,
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
    on: [bool; Cap::ALL.len()],
}

impl Capabilities {
    /// Whether `cap` is on.
    pub fn has(&self, cap: Cap) -> bool {
        self.on[cap as usize]
    }

    fn set(&mut self, cap: Cap, state: bool) {
        self.on[cap as usize] = state;
    }

    /// `query-migrate-capabilities`.
    pub fn to_json(&self) -> Value {
        Value::Array(
            Cap::ALL
                .iter()
                .zip(self.on)
                .map(|(cap, state)| json!({"capability": cap.name(), "state": state}))
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
        self.merged_checking_host(list, incoming_started, params, None, false)
    }

    /// [`Capabilities::merged`] on a destination waiting for its migration (run state
    /// `inmigrate`): turning `postcopy-ram` on first asks `postcopy_host` whether this
    /// host can be a postcopy destination, as QEMU does, and refuses with its text.
    /// `dirty_limit_host` tells whether the VM can limit per-vCPU dirty rates (on QEMU:
    /// KVM with a dirty ring).
    pub fn merged_checking_host(
        &self,
        list: &Value,
        incoming_started: bool,
        params: &Parameters,
        postcopy_host: Option<&dyn Fn() -> Result<(), String>>,
        dirty_limit_host: bool,
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
            let cap = match obj.get("capability") {
                None => {
                    return err(format!(
                        "Parameter 'capabilities[{i}].capability' is missing"
                    ))
                }
                Some(Value::String(s)) => match Cap::from_name(s) {
                    Some(cap) => cap,
                    // QEMU's enum visitor names the member alone, without its path.
                    None => {
                        return err(format!(
                            "Parameter 'capability' does not accept value '{s}'"
                        ))
                    }
                },
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
            if state && !self.has(cap) && !turned_on.contains(&cap) {
                turned_on.push(cap);
            }
            next.set(cap, state);
        }
        if next.postcopy_ram() && !self.postcopy_ram() {
            if let Some(check) = postcopy_host {
                check().map_err(|e| OptionsError(format!("Postcopy is not supported: {e}")))?;
            }
        }
        next.validate(self, incoming_started, params, dirty_limit_host)?;
        for cap in turned_on {
            if next.has(cap) && !SUPPORTED_CAPABILITIES.contains(&cap) {
                return err(format!(
                    "Capability '{cap}' is not supported by vmigrate yet"
                ));
            }
        }
        Ok(next)
    }

    /// Whether `background-snapshot` is on once `list` (as `migrate-set-capabilities`
    /// takes it) is applied; malformed items are left to [`Capabilities::merged`].
    pub fn background_snapshot_after(&self, list: &Value) -> bool {
        let mut on = self.background_snapshot();
        for item in list.as_array().into_iter().flatten() {
            if item.get("capability").and_then(Value::as_str) == Some("background-snapshot") {
                if let Some(state) = item.get("state").and_then(Value::as_bool) {
                    on = state;
                }
            }
        }
        on
    }

    /// QEMU's rules on a would-be capability set, in its order.
    fn validate(
        &self,
        old: &Capabilities,
        incoming_started: bool,
        params: &Parameters,
        dirty_limit_host: bool,
    ) -> Result<(), OptionsError> {
        if self.postcopy_ram() {
            if self.x_ignore_shared() {
                return err("Postcopy is not compatible with ignore-shared");
            }
            if self.multifd() {
                return err("Postcopy is not yet compatible with multifd");
            }
        }
        if self.background_snapshot() {
            const CONFLICTS: [Cap; 14] = [
                Cap::PostcopyRam,
                Cap::DirtyBitmaps,
                Cap::PostcopyBlocktime,
                Cap::LateBlockActivate,
                Cap::ReturnPath,
                Cap::Multifd,
                Cap::PauseBeforeSwitchover,
                Cap::AutoConverge,
                Cap::ReleaseRam,
                Cap::RdmaPinAll,
                Cap::Xbzrle,
                Cap::XColo,
                Cap::ValidateUuid,
                Cap::ZeroCopySend,
            ];
            if let Some(c) = CONFLICTS.iter().find(|c| self.has(**c)) {
                return err(format!("Background-snapshot is not compatible with {c}"));
            }
        }
        if self.zero_copy_send()
            && (!self.multifd()
                || self.xbzrle()
                || params.multifd_compression() != MultifdCompression::None
                || !params.tls_creds().is_empty())
        {
            return err("Zero copy only available for non-compressed non-TLS multifd migration");
        }
        if self.postcopy_preempt() {
            if !self.postcopy_ram() {
                return err("Postcopy preempt requires postcopy-ram");
            }
            if incoming_started && !old.postcopy_preempt() {
                return err("Postcopy preempt must be set before incoming starts");
            }
        }
        if self.multifd() && incoming_started && !old.multifd() {
            return err("Multifd must be set before incoming starts");
        }
        if self.switchover_ack() && !self.return_path() {
            return err("Capability 'switchover-ack' requires capability 'return-path'");
        }
        if self.dirty_limit() {
            if self.auto_converge() {
                return err(
                    "dirty-limit conflicts with auto-converge either of then available currently",
                );
            }
            if !dirty_limit_host {
                return err(
                    "dirty-limit requires KVM with accelerator property 'dirty-ring-size' set",
                );
            }
        }
        if self.multifd() && self.xbzrle() {
            return err("Multifd is not compatible with xbzrle");
        }
        if self.mapped_ram() {
            if self.xbzrle() {
                return err("Mapped-ram migration is incompatible with xbzrle");
            }
            if self.postcopy_ram() {
                return err("Mapped-ram migration is incompatible with postcopy");
            }
        }
        Ok(())
    }
}

qapi_enum! {
    /// The migration `mode` parameter (QEMU's `MigMode`).
    ///
    /// - `normal`: live migration.
    /// - `cpr-reboot`: the VM is stopped when the migration starts and saved (normally to a
    ///   `file:`), for a restart of the same VM on a new host process or after a reboot.
    /// - `cpr-transfer`: guest RAM stays in place and is handed to a new process over a
    ///   `cpr` channel; it needs RAM that can be shared.
    ///
    /// Migration blockers are registered per mode.
    pub enum MigMode {
        Normal = "normal",
        CprReboot = "cpr-reboot",
        CprTransfer = "cpr-transfer",
    }
}

impl MigMode {
    /// Whether this is one of the checkpoint/restart modes.
    pub fn is_cpr(self) -> bool {
        self != MigMode::Normal
    }
}

qapi_enum! {
    /// The `multifd-compression` parameter (QEMU's `MultiFDCompression`, as built
    /// without QPL, UADK or QATzip).
    pub enum MultifdCompression {
        None = "none",
        Zlib = "zlib",
        Zstd = "zstd",
    }
}

qapi_enum! {
    /// The `zero-page-detection` parameter (QEMU's `ZeroPageDetection`).
    pub enum ZeroPageDetection {
        /// Zero pages are sent as data.
        None = "none",
        /// The migration thread looks for zero pages.
        Legacy = "legacy",
        /// The multifd threads look for zero pages (the migration thread without
        /// multifd).
        Multifd = "multifd",
    }
}

/// The capability that a CPR mode cannot be combined with, as the error `migrate`
/// gives, in QEMU's order (`dirty-bitmaps` counts as postcopy, as it does in QEMU).
pub fn cpr_conflict(mode: MigMode, caps: &Capabilities) -> Option<&'static str> {
    if !mode.is_cpr() {
        return None;
    }
    if caps.postcopy_ram() || caps.dirty_bitmaps() {
        return Some("Cannot use postcopy with CPR");
    }
    if caps.background_snapshot() {
        return Some("Cannot use background snapshot with CPR");
    }
    if caps.x_colo() {
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

/// A parameter kind's [`Kind`].
macro_rules! param_kind {
    (U64) => {
        Kind::U64
    };
    (U32) => {
        Kind::U32
    };
    (U8) => {
        Kind::U8
    };
    (Bool) => {
        Kind::Bool
    };
    (StrOrNull) => {
        Kind::StrOrNull
    };
    (Enum($ty:ident)) => {
        Kind::Enum(&$ty::NAMES)
    };
}

/// The Rust type a parameter kind's accessor returns.
macro_rules! param_type {
    (U64) => {
        u64
    };
    (U32) => {
        u32
    };
    (U8) => {
        u8
    };
    (Bool) => {
        bool
    };
    (StrOrNull) => {
        &str
    };
    (Enum($ty:ident)) => {
        $ty
    };
}

/// A parameter kind's default, as the JSON value queries show.
macro_rules! param_default {
    (U64, $d:tt) => {{
        let d: u64 = $d;
        Value::from(d)
    }};
    (U32, $d:tt) => {
        param_default!(U64, $d)
    };
    (U8, $d:tt) => {
        param_default!(U64, $d)
    };
    (Bool, $d:tt) => {
        Value::Bool($d)
    };
    (StrOrNull, $d:tt) => {
        Value::from($d)
    };
    (Enum($ty:ident), $d:tt) => {
        Value::from($ty::$d.name())
    };
}

/// Reads a stored JSON value (always one that passed [`check_type`]) as its kind's type.
macro_rules! param_read {
    ($v:expr, U64) => {
        $v.and_then(Value::as_u64).unwrap_or(0)
    };
    ($v:expr, U32) => {
        $v.and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    };
    ($v:expr, U8) => {
        $v.and_then(Value::as_u64)
            .and_then(|n| u8::try_from(n).ok())
            .unwrap_or(0)
    };
    ($v:expr, Bool) => {
        $v.and_then(Value::as_bool).unwrap_or(false)
    };
    ($v:expr, StrOrNull) => {
        $v.and_then(Value::as_str).unwrap_or("")
    };
    ($v:expr, Enum($ty:ident)) => {
        $v.and_then(Value::as_str)
            .and_then($ty::from_name)
            .unwrap_or($ty::ALL[0])
    };
}

/// The parameter table: each parameter's variant, accessor, QEMU name, kind and
/// default, in the order `query-migrate-parameters` lists them. Generates [`Param`] and
/// one `Parameters` accessor per parameter.
macro_rules! parameters {
    ($(
        $variant:ident $method:ident = $name:literal : $kind:ident $(($ty:ident))? = $default:tt,
    )*) => {
        qapi_enum! {
            /// A migration parameter (a member of QEMU's `MigrationParameters`), in the
            /// order `query-migrate-parameters` lists them.
            pub enum Param {
                $($variant = $name,)*
            }
        }

        impl Param {
            /// How its JSON value is typed and checked.
            fn kind(self) -> Kind {
                match self {
                    $(Param::$variant => param_kind!($kind $(($ty))?),)*
                }
            }

            /// Its default, as `query-migrate-parameters` shows it.
            fn default_value(self) -> Value {
                match self {
                    $(Param::$variant => param_default!($kind $(($ty))?, $default),)*
                }
            }
        }

        impl Parameters {
            $(
                #[doc = concat!("The `", $name, "` parameter.")]
                pub fn $method(&self) -> param_type!($kind $(($ty))?) {
                    param_read!(self.value(Param::$variant), $kind $(($ty))?)
                }
            )*
        }
    };
}

parameters! {
    AnnounceInitial announce_initial = "announce-initial": U64 = 50,
    AnnounceMax announce_max = "announce-max": U64 = 550,
    AnnounceRounds announce_rounds = "announce-rounds": U64 = 5,
    AnnounceStep announce_step = "announce-step": U64 = 100,
    ThrottleTriggerThreshold throttle_trigger_threshold = "throttle-trigger-threshold": U8 = 50,
    CpuThrottleInitial cpu_throttle_initial = "cpu-throttle-initial": U8 = 20,
    CpuThrottleIncrement cpu_throttle_increment = "cpu-throttle-increment": U8 = 10,
    CpuThrottleTailslow cpu_throttle_tailslow = "cpu-throttle-tailslow": Bool = false,
    MaxCpuThrottle max_cpu_throttle = "max-cpu-throttle": U8 = 99,
    TlsCreds tls_creds = "tls-creds": StrOrNull = "",
    TlsHostname tls_hostname = "tls-hostname": StrOrNull = "",
    TlsAuthz tls_authz = "tls-authz": StrOrNull = "",
    MaxBandwidth max_bandwidth = "max-bandwidth": U64 = 134_217_728,
    AvailSwitchoverBandwidth avail_switchover_bandwidth = "avail-switchover-bandwidth": U64 = 0,
    DowntimeLimit downtime_limit = "downtime-limit": U64 = 300,
    XCheckpointDelay x_checkpoint_delay = "x-checkpoint-delay": U32 = 20000,
    MultifdChannels multifd_channels = "multifd-channels": U8 = 2,
    MultifdCompression multifd_compression = "multifd-compression":
        Enum(MultifdCompression) = None,
    MultifdZlibLevel multifd_zlib_level = "multifd-zlib-level": U8 = 1,
    MultifdQatzipLevel multifd_qatzip_level = "multifd-qatzip-level": U8 = 1,
    MultifdZstdLevel multifd_zstd_level = "multifd-zstd-level": U8 = 1,
    XbzrleCacheSize xbzrle_cache_size = "xbzrle-cache-size": U64 = 67_108_864,
    MaxPostcopyBandwidth max_postcopy_bandwidth = "max-postcopy-bandwidth": U64 = 0,
    XVcpuDirtyLimitPeriod x_vcpu_dirty_limit_period = "x-vcpu-dirty-limit-period": U64 = 1000,
    VcpuDirtyLimit vcpu_dirty_limit = "vcpu-dirty-limit": U64 = 1,
    Mode mode = "mode": Enum(MigMode) = Normal,
    ZeroPageDetection zero_page_detection = "zero-page-detection":
        Enum(ZeroPageDetection) = Multifd,
    DirectIo direct_io = "direct-io": Bool = false,
    XVmigratePostcopyAfter x_vmigrate_postcopy_after = "x-vmigrate-postcopy-after": U64 = 0,
}

const BLOCK_BITMAP_MAPPING: &str = "block-bitmap-mapping";

/// A member of `migrate-set-parameters`: a parameter, or `block-bitmap-mapping`, which
/// has no default and is only listed by queries once set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetMember {
    Param(Param),
    BlockBitmapMapping,
}

impl SetMember {
    fn name(self) -> &'static str {
        match self {
            SetMember::Param(p) => p.name(),
            SetMember::BlockBitmapMapping => BLOCK_BITMAP_MAPPING,
        }
    }
}

/// The members of `migrate-set-parameters` in the order of QEMU's schema, which is the
/// order its input visitor checks them in.
const SET_ORDER: [SetMember; Param::ALL.len() + 1] = {
    use SetMember::{BlockBitmapMapping, Param as P};
    [
        P(Param::AnnounceInitial),
        P(Param::AnnounceMax),
        P(Param::AnnounceRounds),
        P(Param::AnnounceStep),
        P(Param::ThrottleTriggerThreshold),
        P(Param::CpuThrottleInitial),
        P(Param::CpuThrottleIncrement),
        P(Param::CpuThrottleTailslow),
        P(Param::TlsCreds),
        P(Param::TlsHostname),
        P(Param::TlsAuthz),
        P(Param::MaxBandwidth),
        P(Param::AvailSwitchoverBandwidth),
        P(Param::DowntimeLimit),
        P(Param::XCheckpointDelay),
        P(Param::MultifdChannels),
        P(Param::XbzrleCacheSize),
        P(Param::MaxPostcopyBandwidth),
        P(Param::MaxCpuThrottle),
        P(Param::MultifdCompression),
        P(Param::MultifdZlibLevel),
        P(Param::MultifdQatzipLevel),
        P(Param::MultifdZstdLevel),
        BlockBitmapMapping,
        P(Param::XVcpuDirtyLimitPeriod),
        P(Param::VcpuDirtyLimit),
        P(Param::Mode),
        P(Param::ZeroPageDetection),
        P(Param::DirectIo),
        // vmigrate's own, after QEMU's members: the `x-vmigrate-` prefix keeps it out of
        // any name QEMU may take.
        P(Param::XVmigratePostcopyAfter),
    ]
};

/// The parameter set, kept as the JSON values `query-migrate-parameters` returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Parameters {
    values: Map<String, Value>,
}

impl Default for Parameters {
    fn default() -> Self {
        let values = Param::ALL
            .iter()
            .map(|p| (p.name().to_string(), p.default_value()))
            .collect();
        Self { values }
    }
}

impl Parameters {
    pub fn to_json(&self) -> Value {
        Value::Object(self.values.clone())
    }

    fn value(&self, param: Param) -> Option<&Value> {
        self.values.get(param.name())
    }

    /// `migrate-set-parameters`: type-checks every member in the schema's order (then
    /// refuses unknown members, as QEMU's input visitor does), merges into a copy, runs
    /// QEMU's checks on the merged set, and returns it. Nothing changes on error.
    pub fn merged(&self, args: &Map<String, Value>) -> Result<Parameters, OptionsError> {
        let mut next = self.clone();
        for member in SET_ORDER {
            let name = member.name();
            let Some(value) = args.get(name) else {
                continue;
            };
            let checked = match member {
                SetMember::BlockBitmapMapping => check_bitmap_mapping_shape(value)?,
                SetMember::Param(p) => check_type(name, p.kind(), value)?,
            };
            next.values.insert(name.to_string(), checked);
        }
        if let Some(key) = args
            .keys()
            .find(|k| !SET_ORDER.iter().any(|m| m.name() == k.as_str()))
        {
            return err(format!("Parameter '{key}' is unexpected"));
        }
        next.validate()?;
        Ok(next)
    }

    /// QEMU's parameter checks, in its order.
    fn validate(&self) -> Result<(), OptionsError> {
        let between = |value: u8, c: &str, lo: u8, hi: u8| {
            if (lo..=hi).contains(&value) {
                Ok(())
            } else {
                err(format!(
                    "Parameter '{c}' expects an integer in the range of {lo} to {hi}"
                ))
            }
        };
        between(
            self.throttle_trigger_threshold(),
            "throttle_trigger_threshold",
            1,
            100,
        )?;
        between(self.cpu_throttle_initial(), "cpu_throttle_initial", 1, 99)?;
        between(
            self.cpu_throttle_increment(),
            "cpu_throttle_increment",
            1,
            99,
        )?;
        if self.downtime_limit() > 2_000_000 {
            return err("Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms");
        }
        if self.multifd_channels() < 1 {
            return err("Parameter 'multifd_channels' expects a value between 1 and 255");
        }
        if self.multifd_zlib_level() > 9 {
            return err("Parameter 'multifd_zlib_level' expects a value between 0 and 9");
        }
        if !(1..=9).contains(&self.multifd_qatzip_level()) {
            return err("Parameter 'multifd_qatzip_level' expects a value between 1 and 9");
        }
        if self.multifd_zstd_level() > 20 {
            return err("Parameter 'multifd_zstd_level' expects a value between 0 and 20");
        }
        let cache = self.xbzrle_cache_size();
        if !cache.is_power_of_two() || cache < 4096 {
            return err("Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size");
        }
        let max_throttle = self.max_cpu_throttle();
        if max_throttle < self.cpu_throttle_initial() || max_throttle > 99 {
            return err("Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99");
        }
        for (value, c, hi) in [
            (self.announce_initial(), "announce_initial", 100_000),
            (self.announce_max(), "announce_max", 100_000),
            (self.announce_rounds(), "announce_rounds", 1000),
        ] {
            if value > hi {
                return err(format!(
                    "Parameter '{c}' expects a value between 0 and {hi}"
                ));
            }
        }
        if !(1..=10_000).contains(&self.announce_step()) {
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
        if !(1..=1000).contains(&self.x_vcpu_dirty_limit_period()) {
            return err("Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000");
        }
        if self.vcpu_dirty_limit() < 1 {
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
        let plain = |p: &Parameters| {
            p.multifd_compression() == MultifdCompression::None && p.tls_creds().is_empty()
        };
        if caps.zero_copy_send() && !plain(self) {
            return err("Zero copy only available for non-compressed non-TLS multifd migration");
        }
        if caps.mapped_ram() && !plain(stored) {
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
        assert_eq!(p.max_bandwidth(), 134_217_728);
        assert_eq!(p.downtime_limit(), 300);
        assert_eq!(p.zero_page_detection(), ZeroPageDetection::Multifd);
        // QEMU's 28, then vmigrate's own.
        assert_eq!(p.to_json().as_object().unwrap().len(), 29);
        // `query-migrate-parameters` on a fresh process, byte for byte
        let expected = [
            "{",
            "\"announce-initial\":50,\"announce-max\":550,\"announce-rounds\":5,",
            "\"announce-step\":100,\"throttle-trigger-threshold\":50,",
            "\"cpu-throttle-initial\":20,\"cpu-throttle-increment\":10,",
            "\"cpu-throttle-tailslow\":false,\"max-cpu-throttle\":99,\"tls-creds\":\"\",",
            "\"tls-hostname\":\"\",\"tls-authz\":\"\",\"max-bandwidth\":134217728,",
            "\"avail-switchover-bandwidth\":0,\"downtime-limit\":300,",
            "\"x-checkpoint-delay\":20000,\"multifd-channels\":2,",
            "\"multifd-compression\":\"none\",\"multifd-zlib-level\":1,",
            "\"multifd-qatzip-level\":1,\"multifd-zstd-level\":1,",
            "\"xbzrle-cache-size\":67108864,\"max-postcopy-bandwidth\":0,",
            "\"x-vcpu-dirty-limit-period\":1000,\"vcpu-dirty-limit\":1,\"mode\":\"normal\",",
            "\"zero-page-detection\":\"multifd\",\"direct-io\":false,",
            "\"x-vmigrate-postcopy-after\":0",
            "}",
        ]
        .concat();
        assert_eq!(p.to_json().to_string(), expected);
    }

    #[test]
    fn typed_tables_agree_with_the_qmp_names() {
        for cap in Cap::ALL {
            assert_eq!(Cap::from_name(cap.name()), Some(cap));
            assert_eq!(CAPABILITIES[cap as usize], cap.name());
        }
        assert_eq!(Cap::from_name("multi-fd"), None);
        let listed = Capabilities::default().to_json();
        let listed = listed.as_array().unwrap();
        assert_eq!(listed.len(), Cap::ALL.len());
        assert_eq!(CAPABILITIES.len(), Cap::ALL.len());
        for (entry, cap) in listed.iter().zip(Cap::ALL) {
            assert_eq!(entry["capability"], cap.name());
        }
        // setting one capability turns on that one alone, and it shows in the query
        // under its own name
        let on = |cap: Cap| {
            let mut c = Capabilities::default();
            c.set(cap, true);
            c
        };
        for cap in Cap::ALL {
            let c = on(cap);
            assert!(Cap::ALL
                .iter()
                .all(|other| c.has(*other) == (*other == cap)));
            let listed = c.to_json();
            let shown_on: Vec<_> = listed
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["state"] == true)
                .map(|e| e["capability"].clone())
                .collect();
            assert_eq!(shown_on, [json!(cap.name())]);
        }
        assert!(on(Cap::Multifd).multifd() && !on(Cap::Multifd).mapped_ram());
        assert!(on(Cap::MappedRam).mapped_ram() && !on(Cap::MappedRam).multifd());
        assert!(on(Cap::SwitchoverAck).switchover_ack());

        for param in Param::ALL {
            assert_eq!(Param::from_name(param.name()), Some(param));
        }
        assert_eq!(Param::from_name("block-bitmap-mapping"), None);
        let query = Parameters::default().to_json();
        let query = query.as_object().unwrap();
        assert_eq!(query.len(), Param::ALL.len());
        assert!(query.keys().map(String::as_str).eq(Param::NAMES));
        // every parameter can be set under its name, and every member of the set
        // command is a parameter except block-bitmap-mapping
        assert_eq!(SET_ORDER.len(), Param::ALL.len() + 1);
        for param in Param::ALL {
            assert!(SET_ORDER.contains(&SetMember::Param(param)));
        }
        let p = Parameters::default()
            .merged(
                json!({"max-bandwidth": 7, "multifd-channels": 9, "tls-creds": "tls0",
                       "direct-io": true, "multifd-compression": "zstd",
                       "zero-page-detection": "legacy", "mode": "cpr-transfer",
                       "x-checkpoint-delay": 4_000_000_000_u64})
                .as_object()
                .unwrap(),
            )
            .unwrap();
        assert_eq!(p.max_bandwidth(), 7);
        assert_eq!(p.multifd_channels(), 9);
        assert_eq!(p.tls_creds(), "tls0");
        assert!(p.direct_io());
        assert_eq!(p.multifd_compression(), MultifdCompression::Zstd);
        assert_eq!(p.zero_page_detection(), ZeroPageDetection::Legacy);
        assert_eq!(p.mode(), MigMode::CprTransfer);
        assert_eq!(p.x_checkpoint_delay(), 4_000_000_000);
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
        assert_eq!(q.max_bandwidth(), u64::MAX);
        let q = p
            .merged(json!({"tls-authz": null}).as_object().unwrap())
            .unwrap();
        assert_eq!(q.tls_authz(), "");
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
        let with = |caps: &[Cap]| {
            let mut c = Capabilities::default();
            for cap in caps {
                c.set(*cap, true);
            }
            c
        };
        let none = with(&[]);
        assert_eq!(cpr_conflict(MigMode::CprReboot, &none), None);
        let all = with(&[Cap::XColo, Cap::BackgroundSnapshot, Cap::PostcopyRam]);
        assert_eq!(cpr_conflict(MigMode::Normal, &all), None);
        assert_eq!(
            cpr_conflict(MigMode::CprReboot, &all),
            Some("Cannot use postcopy with CPR")
        );
        assert_eq!(
            cpr_conflict(MigMode::CprTransfer, &with(&[Cap::DirtyBitmaps])),
            Some("Cannot use postcopy with CPR")
        );
        assert_eq!(
            cpr_conflict(
                MigMode::CprReboot,
                &with(&[Cap::XColo, Cap::BackgroundSnapshot])
            ),
            Some("Cannot use background snapshot with CPR")
        );
        assert_eq!(
            cpr_conflict(
                MigMode::CprReboot,
                &with(&[Cap::XColo, Cap::PostcopyBlocktime])
            ),
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
        assert!(c
            .merged(&json!([{"capability": "xbzrle", "state": true}]), false, &p)
            .unwrap()
            .xbzrle());
        let on = c
            .merged(&json!([{"capability": "events", "state": true}]), false, &p)
            .unwrap();
        assert!(on.events());
        assert!(on.has(Cap::Events));
        // release-ram is accepted alone (postcopy uses it; without postcopy it does
        // nothing, as in QEMU), and refused with background-snapshot, QEMU's text.
        let release = c
            .merged(
                &json!([{"capability": "release-ram", "state": true}]),
                false,
                &p,
            )
            .unwrap();
        assert!(release.release_ram());
        assert_eq!(
            set(json!([
                {"capability": "release-ram", "state": true},
                {"capability": "background-snapshot", "state": true}
            ])),
            "Background-snapshot is not compatible with release-ram"
        );
    }
}
