//! The text of the `info` commands, built from QMP replies.
//!
//! Every formatter takes the JSON `return` value of its QMP query and tolerates missing or
//! mistyped members: a member that is absent is not printed (or counts as zero inside a block
//! that QEMU always prints whole), so a partial reply never panics.

use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::executor::MigrationGlobals;

/// `on` or `off`, as HMP prints booleans.
fn on_off(state: bool) -> &'static str {
    if state {
        "on"
    } else {
        "off"
    }
}

/// An integer member printed as QEMU prints it (unsigned or signed as it comes).
fn integer_text(object: &Map<String, Value>, key: &str) -> Option<String> {
    let value = object.get(key)?;
    value
        .as_u64()
        .map(|unsigned| unsigned.to_string())
        .or_else(|| value.as_i64().map(|signed| signed.to_string()))
}

/// An unsigned member; negative numbers wrap the way a C `uint64_t` would.
fn unsigned(object: &Map<String, Value>, key: &str) -> Option<u64> {
    let value = object.get(key)?;
    value
        .as_u64()
        .or_else(|| value.as_i64().map(|signed| signed as u64))
}

/// A floating-point member.
fn float(object: &Map<String, Value>, key: &str) -> f64 {
    object.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

/// A string member.
fn text<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    object.get(key).and_then(Value::as_str)
}

/// `info status`, from the `query-status` reply.
pub fn format_status(status: &Value) -> String {
    let empty = Map::new();
    let status = status.as_object().unwrap_or(&empty);
    let running = status
        .get("running")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let run_state = text(status, "status").unwrap_or("");
    if running {
        "VM status: running\n".to_owned()
    } else if run_state == "paused" || run_state.is_empty() {
        "VM status: paused\n".to_owned()
    } else {
        format!("VM status: paused ({run_state})\n")
    }
}

/// `info version`, from the `query-version` reply: `MAJOR.MINOR.MICRO` directly followed by the
/// package string (QEMU puts no space between them).
pub fn format_version(version: &Value) -> String {
    let empty = Map::new();
    let version = version.as_object().unwrap_or(&empty);
    let numbers = version
        .get("qemu")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let part = |key| integer_text(numbers, key).unwrap_or_else(|| "0".to_owned());
    format!(
        "{}.{}.{}{}\n",
        part("major"),
        part("minor"),
        part("micro"),
        text(version, "package").unwrap_or("")
    )
}

/// `info migrate_capabilities`, from the `query-migrate-capabilities` reply, in its order.
pub fn format_capabilities(capabilities: &Value) -> String {
    let mut out = String::new();
    for entry in capabilities.as_array().into_iter().flatten() {
        let Some(entry) = entry.as_object() else {
            continue;
        };
        let Some(name) = text(entry, "capability") else {
            continue;
        };
        let state = entry.get("state").and_then(Value::as_bool).unwrap_or(false);
        let _ = writeln!(out, "{name}: {}", on_off(state));
    }
    out
}

/// How one line of `info migrate_parameters` shows its value.
#[derive(Debug, Clone, Copy)]
enum ParameterDisplay {
    /// The integer followed by a unit (`50 ms`), or alone when the unit is empty.
    Integer(&'static str),
    /// `on`/`off`.
    OnOff,
    /// The string in single quotes.
    Quoted,
    /// The string as it is (enum members).
    Bare,
    /// The `block-bitmap-mapping` block.
    BitmapMapping,
}

/// The lines of `info migrate_parameters`, in QEMU 10.0's order. The multifd compression levels
/// are deliberately absent: QEMU 10.0 does not print them.
const PARAMETER_LINES: &[(&str, ParameterDisplay)] = &[
    ("announce-initial", ParameterDisplay::Integer(" ms")),
    ("announce-max", ParameterDisplay::Integer(" ms")),
    ("announce-rounds", ParameterDisplay::Integer("")),
    ("announce-step", ParameterDisplay::Integer(" ms")),
    ("throttle-trigger-threshold", ParameterDisplay::Integer("")),
    ("cpu-throttle-initial", ParameterDisplay::Integer("")),
    ("cpu-throttle-increment", ParameterDisplay::Integer("")),
    ("cpu-throttle-tailslow", ParameterDisplay::OnOff),
    ("max-cpu-throttle", ParameterDisplay::Integer("")),
    ("tls-creds", ParameterDisplay::Quoted),
    ("tls-hostname", ParameterDisplay::Quoted),
    ("max-bandwidth", ParameterDisplay::Integer(" bytes/second")),
    (
        "avail-switchover-bandwidth",
        ParameterDisplay::Integer(" bytes/second"),
    ),
    ("downtime-limit", ParameterDisplay::Integer(" ms")),
    ("x-checkpoint-delay", ParameterDisplay::Integer(" ms")),
    ("multifd-channels", ParameterDisplay::Integer("")),
    ("multifd-compression", ParameterDisplay::Bare),
    ("zero-page-detection", ParameterDisplay::Bare),
    ("xbzrle-cache-size", ParameterDisplay::Integer(" bytes")),
    ("max-postcopy-bandwidth", ParameterDisplay::Integer("")),
    ("tls-authz", ParameterDisplay::Quoted),
    ("block-bitmap-mapping", ParameterDisplay::BitmapMapping),
    (
        "x-vcpu-dirty-limit-period",
        ParameterDisplay::Integer(" ms"),
    ),
    ("vcpu-dirty-limit", ParameterDisplay::Integer(" MB/s")),
    ("mode", ParameterDisplay::Bare),
    ("direct-io", ParameterDisplay::OnOff),
];

/// `info migrate_parameters`, from the `query-migrate-parameters` reply.
pub fn format_parameters(parameters: &Value) -> String {
    let empty = Map::new();
    let parameters = parameters.as_object().unwrap_or(&empty);
    let mut out = String::new();
    for &(name, display) in PARAMETER_LINES {
        let Some(value) = parameters.get(name) else {
            continue;
        };
        match display {
            ParameterDisplay::Integer(unit) => {
                if let Some(number) = integer_text(parameters, name) {
                    let _ = writeln!(out, "{name}: {number}{unit}");
                }
            }
            ParameterDisplay::OnOff => {
                if let Some(state) = value.as_bool() {
                    let _ = writeln!(out, "{name}: {}", on_off(state));
                }
            }
            ParameterDisplay::Quoted => {
                let _ = writeln!(out, "{name}: '{}'", value.as_str().unwrap_or(""));
            }
            ParameterDisplay::Bare => {
                let _ = writeln!(out, "{name}: {}", value.as_str().unwrap_or(""));
            }
            ParameterDisplay::BitmapMapping => write_bitmap_mapping(&mut out, value),
        }
    }
    out
}

/// The `block-bitmap-mapping:` block: one `'node' -> 'alias'` line per node, then one
/// `'bitmap' -> 'alias'` line per bitmap of that node.
fn write_bitmap_mapping(out: &mut String, mapping: &Value) {
    out.push_str("block-bitmap-mapping:\n");
    for node in mapping.as_array().into_iter().flatten() {
        let Some(node) = node.as_object() else {
            continue;
        };
        let _ = writeln!(
            out,
            "  '{}' -> '{}'",
            text(node, "node-name").unwrap_or(""),
            text(node, "alias").unwrap_or("")
        );
        for bitmap in node
            .get("bitmaps")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(bitmap) = bitmap.as_object() else {
                continue;
            };
            let _ = writeln!(
                out,
                "    '{}' -> '{}'",
                text(bitmap, "name").unwrap_or(""),
                text(bitmap, "alias").unwrap_or("")
            );
        }
    }
}

/// A `SocketAddress` object in the URI form `info migrate` lists under `socket address:`.
/// QEMU does not bracket IPv6 hosts here (`tcp:::1:4444`).
fn socket_address_uri(address: &Map<String, Value>) -> String {
    let member = |key| text(address, key).unwrap_or("");
    match member("type") {
        "inet" => format!("tcp:{}:{}", member("host"), member("port")),
        "unix" => format!("unix:{}", member("path")),
        "vsock" => format!("vsock:{}:{}", member("cid"), member("port")),
        "fd" => format!("fd:{}", member("str")),
        other => format!("{other}:"),
    }
}

/// A list of integers the way QEMU's string output visitor prints it: sorted, duplicates
/// merged, runs of consecutive values as `first-last`, separated by commas (`0,2-4`).
fn integer_ranges(values: &[u64]) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for value in sorted {
        match ranges.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(value) => *last = value,
            _ => ranges.push((value, value)),
        }
    }
    ranges
        .iter()
        .map(|&(first, last)| {
            if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `info migrate`, from the `query-migrate` reply and the migration object's globals.
pub fn format_migration_info(info: &Value, globals: &MigrationGlobals) -> String {
    let empty = Map::new();
    let info = info.as_object().unwrap_or(&empty);
    let mut out = String::new();

    let _ = write!(
        out,
        "globals:\n\
         store-global-state: {}\n\
         only-migratable: {}\n\
         send-configuration: {}\n\
         send-section-footer: {}\n\
         send-switchover-start: {}\n\
         clear-bitmap-shift: {}\n",
        on_off(globals.store_global_state),
        on_off(globals.only_migratable),
        on_off(globals.send_configuration),
        on_off(globals.send_section_footer),
        on_off(globals.send_switchover_start),
        globals.clear_bitmap_shift
    );

    let blocked_reasons: Vec<&str> = info
        .get("blocked-reasons")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !blocked_reasons.is_empty() {
        out.push_str("Outgoing migration blocked:\n");
        for reason in blocked_reasons {
            let _ = writeln!(out, "  {reason}");
        }
    }

    if let Some(status) = text(info, "status") {
        match text(info, "error-desc") {
            Some(error_desc) if status == "failed" => {
                let _ = writeln!(out, "Migration status: {status} ({error_desc})");
            }
            _ => {
                let _ = writeln!(out, "Migration status: {status}");
            }
        }
        let total_time = integer_text(info, "total-time").unwrap_or_else(|| "0".to_owned());
        let _ = writeln!(out, "total time: {total_time} ms");
    }
    for (key, label) in [
        ("expected-downtime", "expected downtime"),
        ("downtime", "downtime"),
        ("setup-time", "setup"),
    ] {
        if let Some(milliseconds) = integer_text(info, key) {
            let _ = writeln!(out, "{label}: {milliseconds} ms");
        }
    }

    if let Some(ram) = info.get("ram").and_then(Value::as_object) {
        write_ram_statistics(&mut out, ram);
    }
    if let Some(cache) = info.get("xbzrle-cache").and_then(Value::as_object) {
        write_xbzrle_statistics(&mut out, cache);
    }

    if let Some(percentage) = integer_text(info, "cpu-throttle-percentage") {
        let _ = writeln!(out, "cpu throttle percentage: {percentage}");
    }
    if let Some(microseconds) = integer_text(info, "dirty-limit-throttle-time-per-round") {
        let _ = writeln!(out, "dirty-limit throttle time: {microseconds} us");
    }
    if let Some(microseconds) = integer_text(info, "dirty-limit-ring-full-time") {
        let _ = writeln!(out, "dirty-limit ring full time: {microseconds} us");
    }
    if let Some(blocktime) = integer_text(info, "postcopy-blocktime") {
        let _ = writeln!(out, "postcopy blocktime: {blocktime}");
    }
    if let Some(per_vcpu) = info
        .get("postcopy-vcpu-blocktime")
        .and_then(Value::as_array)
    {
        let values: Vec<u64> = per_vcpu.iter().filter_map(Value::as_u64).collect();
        let _ = writeln!(out, "postcopy vcpu blocktime: {}", integer_ranges(&values));
    }
    if let Some(addresses) = info.get("socket-address").and_then(Value::as_array) {
        out.push_str("socket address: [\n");
        for address in addresses.iter().filter_map(Value::as_object) {
            let _ = writeln!(out, "\t{}", socket_address_uri(address));
        }
        out.push_str("]\n");
    }
    if let Some(vfio) = info.get("vfio").and_then(Value::as_object) {
        let kbytes = unsigned(vfio, "transferred").unwrap_or(0) >> 10;
        let _ = writeln!(out, "vfio device transferred: {kbytes} kbytes");
    }
    out
}

/// The RAM block of `info migrate`.
fn write_ram_statistics(out: &mut String, ram: &Map<String, Value>) {
    let count = |key| unsigned(ram, key).unwrap_or(0);
    let kbytes = |key| count(key) >> 10;
    let _ = write!(
        out,
        "transferred ram: {} kbytes\n\
         throughput: {:.2} mbps\n\
         remaining ram: {} kbytes\n\
         total ram: {} kbytes\n\
         duplicate: {} pages\n\
         normal: {} pages\n\
         normal bytes: {} kbytes\n\
         dirty sync count: {}\n\
         page size: {} kbytes\n\
         multifd bytes: {} kbytes\n\
         pages-per-second: {}\n",
        kbytes("transferred"),
        float(ram, "mbps"),
        kbytes("remaining"),
        kbytes("total"),
        count("duplicate"),
        count("normal"),
        kbytes("normal-bytes"),
        count("dirty-sync-count"),
        kbytes("page-size"),
        kbytes("multifd-bytes"),
        count("pages-per-second"),
    );
    if count("dirty-pages-rate") != 0 {
        let _ = writeln!(out, "dirty pages rate: {} pages", count("dirty-pages-rate"));
    }
    if count("postcopy-requests") != 0 {
        let _ = writeln!(
            out,
            "postcopy request count: {}",
            count("postcopy-requests")
        );
    }
    for (key, label) in [
        ("precopy-bytes", "precopy ram"),
        ("downtime-bytes", "downtime ram"),
        ("postcopy-bytes", "postcopy ram"),
    ] {
        if count(key) != 0 {
            let _ = writeln!(out, "{label}: {} kbytes", kbytes(key));
        }
    }
    if count("dirty-sync-missed-zero-copy") != 0 {
        let _ = writeln!(
            out,
            "Zero-copy-send fallbacks happened: {} times",
            count("dirty-sync-missed-zero-copy")
        );
    }
}

/// The XBZRLE block of `info migrate`.
fn write_xbzrle_statistics(out: &mut String, cache: &Map<String, Value>) {
    let count = |key| unsigned(cache, key).unwrap_or(0);
    let _ = write!(
        out,
        "cache size: {} bytes\n\
         xbzrle transferred: {} kbytes\n\
         xbzrle pages: {} pages\n\
         xbzrle cache miss: {} pages\n\
         xbzrle cache miss rate: {:.2}\n\
         xbzrle encoding rate: {:.2}\n\
         xbzrle overflow: {}\n",
        count("cache-size"),
        count("bytes") >> 10,
        count("pages"),
        count("cache-miss"),
        float(cache, "cache-miss-rate"),
        float(cache, "encoding-rate"),
        count("overflow"),
    );
}

/// `info vcpu_dirty_limit`, from a `query-vcpu-dirty-limit` reply: one line per limited
/// vCPU, or QEMU's notice when none is (the limiter is not in service).
pub fn format_vcpu_dirty_limit(reply: &Value) -> String {
    let limits = reply.as_array().map(Vec::as_slice).unwrap_or(&[]);
    if limits.is_empty() {
        return "Dirty page limit not enabled!\n".to_owned();
    }
    let empty = Map::new();
    let mut out = String::new();
    for limit in limits {
        let limit = limit.as_object().unwrap_or(&empty);
        let number = |key| integer_text(limit, key).unwrap_or_else(|| "0".to_owned());
        let _ = writeln!(
            out,
            "vcpu[{}], limit rate {} (MB/s), current rate {} (MB/s)",
            number("cpu-index"),
            number("limit-rate"),
            number("current-rate")
        );
    }
    out
}

/// `info dirty_rate`, from a `query-dirty-rate` reply. QEMU labels the start time "(ms)"
/// although the value is in seconds; the label is kept as QEMU prints it.
pub fn format_dirty_rate(reply: &Value) -> String {
    let n = |k: &str| reply.get(k).and_then(Value::as_i64).unwrap_or(0);
    let s = |k: &str| reply.get(k).and_then(Value::as_str).unwrap_or("");
    let mut out = String::new();
    out.push_str(&format!("Status: {}\n", s("status")));
    out.push_str(&format!("Start Time: {} (ms)\n", n("start-time")));
    if s("mode") == "page-sampling" {
        out.push_str(&format!("Sample Pages: {} (per GB)\n", n("sample-pages")));
    }
    out.push_str(&format!("Period: {} (sec)\n", n("calc-time")));
    out.push_str(&format!("Mode: {}\n", s("mode")));
    match reply.get("dirty-rate").and_then(Value::as_i64) {
        Some(rate) if s("status") == "measured" => {
            out.push_str(&format!("Dirty rate: {rate} (MB/s)\n"))
        }
        _ => out.push_str("Dirty rate: (not ready)\n"),
    }
    if let Some(vcpus) = reply.get("vcpu-dirty-rate").and_then(Value::as_array) {
        for v in vcpus {
            let id = v.get("id").and_then(Value::as_i64).unwrap_or(0);
            let rate = v.get("dirty-rate").and_then(Value::as_i64).unwrap_or(0);
            out.push_str(&format!("vcpu[{id}], Dirty rate: {rate} (MB/s)\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_blocktime_lists_merge_runs() {
        assert_eq!(integer_ranges(&[176]), "176");
        assert_eq!(integer_ranges(&[0, 0, 0]), "0");
        assert_eq!(integer_ranges(&[3, 1, 2, 7, 9, 10]), "1-3,7,9-10");
        assert_eq!(integer_ranges(&[]), "");
        assert_eq!(
            integer_ranges(&[u64::MAX, u64::MAX - 1]),
            format!("{}-{}", u64::MAX - 1, u64::MAX)
        );
    }

    #[test]
    fn socket_addresses_of_each_kind() {
        let uri = |value: Value| socket_address_uri(value.as_object().unwrap());
        use serde_json::json;
        assert_eq!(
            uri(json!({"type": "inet", "host": "::1", "port": "5"})),
            "tcp:::1:5"
        );
        assert_eq!(
            uri(json!({"type": "unix", "path": "/run/m.sock"})),
            "unix:/run/m.sock"
        );
        assert_eq!(
            uri(json!({"type": "vsock", "cid": "3", "port": "9"})),
            "vsock:3:9"
        );
        assert_eq!(uri(json!({"type": "fd", "str": "mig"})), "fd:mig");
    }

    #[test]
    fn malformed_replies_do_not_panic() {
        let globals = MigrationGlobals::default();
        for reply in [
            Value::Null,
            Value::from(3),
            serde_json::json!({"ram": 5, "status": 7}),
        ] {
            assert!(format_migration_info(&reply, &globals).starts_with("globals:\n"));
            assert_eq!(format_capabilities(&reply), "");
            assert_eq!(format_parameters(&reply), "");
            assert_eq!(format_status(&reply), "VM status: paused\n");
            assert_eq!(format_version(&reply), "0.0.0\n");
        }
    }
}
