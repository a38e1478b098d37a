//! Finding the VMDESCRIPTION trailer before the forward walk, so that device bodies the
//! inspector cannot decode can be skipped by their described size.
//!
//! The trailer is `0x06`, be32 length, then that many bytes of JSON running to the end of
//! the file. JSON text never holds a raw control byte, so scanning back from the end for
//! a `0x06` whose length field reaches exactly the end finds it; the few false
//! candidates (a `0x06` inside the length field itself) fail the length or parse check.

use serde_json::Value;
use vmigrate_stream::section::VMDESCRIPTION;
use vmigrate_stream::vmdesc::MAX_VMDESC_LEN;
use vmigrate_stream::vmstate::described_size;

use crate::report::{VmdescDevice, VmdescSummary};

/// Tag byte plus be32 length.
const TRAILER_HEADER_LEN: usize = 5;

/// Looks for a trailer that ends exactly at the end of `data`, not before `stream_start`.
pub(crate) fn locate(data: &[u8], stream_start: usize) -> Option<VmdescSummary> {
    let end = data.len();
    if data.last() != Some(&b'}') {
        return None;
    }
    let longest = MAX_VMDESC_LEN as usize + TRAILER_HEADER_LEN;
    let mut floor = stream_start.max(end.saturating_sub(longest));
    let mut p = end.checked_sub(TRAILER_HEADER_LEN)?;
    while p >= floor {
        let b = data[p];
        if b == VMDESCRIPTION && length_at(data, p) == Some(end - p - TRAILER_HEADER_LEN) {
            if let Some(t) = parse_at(data, p) {
                return Some(t);
            }
        }
        if is_json_forbidden(b) {
            // Not JSON text, so at most part of the length field: the tag cannot be
            // further back than the length field allows.
            floor = floor.max(p.saturating_sub(TRAILER_HEADER_LEN - 1));
        }
        p = p.checked_sub(1)?;
    }
    None
}

/// Control bytes that JSON text never holds raw (whitespace aside).
fn is_json_forbidden(b: u8) -> bool {
    b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')
}

/// The length field of a trailer whose tag is at `p`.
fn length_at(data: &[u8], p: usize) -> Option<usize> {
    let len_bytes: [u8; 4] = data.get(p + 1..p + TRAILER_HEADER_LEN)?.try_into().ok()?;
    usize::try_from(u32::from_be_bytes(len_bytes)).ok()
}

/// Reads a trailer whose tag is at `p`; its JSON must fit in `data`.
pub(crate) fn parse_at(data: &[u8], p: usize) -> Option<VmdescSummary> {
    let json_len = u32::try_from(length_at(data, p)?).ok()?;
    if json_len > MAX_VMDESC_LEN {
        return None;
    }
    let start = p + TRAILER_HEADER_LEN;
    let text = data.get(start..start.checked_add(json_len as usize)?)?;
    if text.first() != Some(&b'{') {
        return None;
    }
    let json: Value = serde_json::from_slice(text).ok()?;
    Some(summarize(p as u64, json_len, json))
}

fn summarize(offset: u64, json_len: u32, json: Value) -> VmdescSummary {
    let devices = json
        .get("devices")
        .and_then(Value::as_array)
        .map(|devs| devs.iter().filter_map(device).collect())
        .unwrap_or_default();
    VmdescSummary {
        offset,
        json_len,
        page_size: json.get("page_size").and_then(Value::as_u64),
        devices,
        json,
    }
}

fn device(d: &Value) -> Option<VmdescDevice> {
    Some(VmdescDevice {
        name: d.get("name")?.as_str()?.to_string(),
        instance_id: u32::try_from(d.get("instance_id")?.as_u64()?).ok()?,
        vmsd_name: d
            .get("vmsd_name")
            .and_then(Value::as_str)
            .map(str::to_string),
        version: d.get("version").and_then(Value::as_u64),
        size: described_size(d),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trailer(json: &str) -> Vec<u8> {
        let mut v = vec![VMDESCRIPTION];
        v.extend_from_slice(&(json.len() as u32).to_be_bytes());
        v.extend_from_slice(json.as_bytes());
        v
    }

    #[test]
    fn finds_trailer_at_end() {
        let mut data = vec![0u8; 40];
        data.extend(trailer(
            r#"{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0,
            "vmsd_name": "timer", "version": 2,
            "fields": [{"name": "a", "type": "int64", "size": 8}]}]}"#,
        ));
        let t = locate(&data, 0).unwrap();
        assert_eq!(t.offset, 40);
        assert_eq!(t.page_size, Some(4096));
        assert_eq!(t.devices.len(), 1);
        assert_eq!(t.devices[0].size, Some(8));
    }

    #[test]
    fn length_byte_that_looks_like_a_tag() {
        // A JSON of 0x0606 bytes: two 0x06 bytes sit in the length field.
        let frame = r#"{"devices": [], "pad": ""}"#.len();
        let json = format!(
            r#"{{"devices": [], "pad": "{}"}}"#,
            "x".repeat(0x0606 - frame)
        );
        assert_eq!(json.len(), 0x0606);
        let mut data = vec![1u8; 3];
        data.extend(trailer(&json));
        assert_eq!(locate(&data, 0).unwrap().offset, 3);
    }

    #[test]
    fn no_trailer() {
        assert!(locate(&[0, 6, 0, 0], 0).is_none());
        assert!(locate(&[], 0).is_none());
        // Length that does not reach the end, and one past it.
        let mut data = trailer("{}");
        data.push(0);
        assert!(locate(&data, 0).is_none());
        assert!(locate(&trailer("{}")[..6], 0).is_none());
        // Before the stream start.
        assert!(locate(&trailer("{}"), 1).is_none());
        // Page data before a trailer-like tail stops the scan early.
        let mut data = vec![0u8; 100];
        data.extend_from_slice(b"}");
        assert!(locate(&data, 0).is_none());
    }
}
