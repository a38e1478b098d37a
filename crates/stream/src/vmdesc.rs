//! The VMDESCRIPTION trailer: a JSON description of every FULL section, written after
//! EOF; and the JSON text style QEMU uses (`", "` and `": "` separators).

use serde_json::{json, Value};

use crate::error::{DecodeError, DecodeErrorKind};
use crate::section::VMDESCRIPTION;
use crate::source::Source;

/// The trailer JSON is bounded: QEMU's own descriptions are a few hundred KiB at most.
pub const MAX_VMDESC_LEN: u32 = 16 << 20;

/// Builds the trailer JSON.
pub fn build(configuration: Option<Value>, page_size: u64, devices: Vec<Value>) -> Value {
    let mut v = serde_json::Map::new();
    if let Some(c) = configuration {
        v.insert("configuration".into(), c);
    }
    v.insert("page_size".into(), json!(page_size));
    v.insert("devices".into(), Value::Array(devices));
    Value::Object(v)
}

pub fn encode(out: &mut Vec<u8>, desc: &Value) {
    let text = to_qemu_json(desc);
    out.push(VMDESCRIPTION);
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Reads the trailer after EOF. `Ok(None)` when the stream ends instead (QEMU accepts
/// that with a message).
pub fn decode(src: &mut impl Source) -> Result<Option<Value>, DecodeError> {
    let at = src.offset();
    match src.peek_u8()? {
        None => return Ok(None),
        Some(VMDESCRIPTION) => {}
        Some(other) => return Err(DecodeError::new(at, DecodeErrorKind::BadVmdescTag(other))),
    }
    src.u8("vmdesc tag")?;
    let len_at = src.offset();
    let len = src.be32("vmdesc length")?;
    if len > MAX_VMDESC_LEN {
        return Err(DecodeError::new(
            len_at,
            DecodeErrorKind::VmdescTooLarge(len),
        ));
    }
    let mut text = vec![0u8; len as usize];
    src.fill(&mut text, "vmdesc JSON")?;
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| DecodeError::new(len_at + 4, DecodeErrorKind::VmdescJson(e.to_string())))
}

/// Serialises a JSON value as QEMU does: `{"a": 1, "b": [1, 2]}`.
pub fn to_qemu_json(v: &Value) -> String {
    let mut s = String::new();
    write_value(&mut s, v);
    s
}

fn write_value(s: &mut String, v: &Value) {
    match v {
        Value::Array(items) => {
            s.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                write_value(s, item);
            }
            s.push(']');
        }
        Value::Object(map) => {
            s.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                s.push_str(&Value::String(k.clone()).to_string());
                s.push_str(": ");
                write_value(s, item);
            }
            s.push('}');
        }
        other => s.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SliceSource;

    #[test]
    fn qemu_style_separators() {
        let v = json!({"a": [1, {"b": "c"}], "d": true});
        assert_eq!(to_qemu_json(&v), r#"{"a": [1, {"b": "c"}], "d": true}"#);
    }

    #[test]
    fn trailer_round_trip_and_limits() {
        let d = build(None, 4096, vec![]);
        let mut v = Vec::new();
        encode(&mut v, &d);
        assert_eq!(decode(&mut SliceSource::new(&v)).unwrap(), Some(d));
        assert_eq!(decode(&mut SliceSource::new(&[])).unwrap(), None);
        let e = decode(&mut SliceSource::new(&[6, 0xff, 0, 0, 0])).unwrap_err();
        assert!(matches!(e.kind, DecodeErrorKind::VmdescTooLarge(_)));
    }
}
