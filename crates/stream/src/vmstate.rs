//! vmstate field encoding: the building blocks of FULL section bodies, and the field
//! descriptions that go into the vmdesc trailer.

use serde_json::{json, Value};

use crate::error::{DecodeError, DecodeErrorKind};
use crate::section::SUBSECTION;
use crate::source::Source;

/// How one field is described in the vmdesc JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDesc {
    pub name: String,
    pub ty: &'static str,
    /// Bytes of one element as written.
    pub size: usize,
    pub array_len: Option<usize>,
}

impl FieldDesc {
    pub fn scalar(name: &str, ty: &'static str, size: usize) -> Self {
        Self {
            name: name.to_string(),
            ty,
            size,
            array_len: None,
        }
    }

    /// The JSON object, with QEMU's member order: name, [array_len], type, size.
    pub fn to_json(&self) -> Value {
        match self.array_len {
            Some(n) => {
                json!({"name": self.name, "array_len": n, "type": self.ty, "size": self.size})
            }
            None => json!({"name": self.name, "type": self.ty, "size": self.size}),
        }
    }
}

/// Appends big-endian primitives, as vmstate writes them.
#[derive(Debug, Default)]
pub struct FieldWriter {
    pub buf: Vec<u8>,
}

impl FieldWriter {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub fn be32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn be64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.buf.resize(self.buf.len() + n, 0);
        self
    }
}

/// Size in bytes of a device body described by a vmdesc device (or subsection) object:
/// the sum of its fields plus each subsection's header and body. `None` when the
/// description is malformed.
pub fn described_size(desc: &Value) -> Option<u64> {
    let mut total = 0u64;
    for f in desc.get("fields")?.as_array()? {
        let size = f.get("size")?.as_u64()?;
        let n = f.get("array_len").and_then(Value::as_u64).unwrap_or(1);
        total = total.checked_add(size.checked_mul(n)?)?;
    }
    if let Some(subs) = desc.get("subsections").and_then(Value::as_array) {
        for s in subs {
            let name = s.get("vmsd_name")?.as_str()?;
            total = total.checked_add(1 + 1 + name.len() as u64 + 4)?;
            total = total.checked_add(described_size(s)?)?;
        }
    }
    Some(total)
}

/// Fails if a subsection starts here: for bodies the destination decodes itself and
/// whose subsections it does not know.
pub fn refuse_subsections(src: &mut impl Source, parent: &str) -> Result<(), DecodeError> {
    if src.peek_u8()? == Some(SUBSECTION) {
        let at = src.offset();
        src.u8("subsection tag")?;
        let name = src.counted("subsection name")?;
        if name.len() > parent.len() && name.starts_with(parent) {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::UnknownSubsection(name),
            ));
        }
        return Err(DecodeError::new(
            at,
            DecodeErrorKind::MissingFooter(parent.to_string()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_from_description() {
        let d = json!({"fields": [{"name": "a", "type": "uint32", "size": 4},
            {"name": "b", "array_len": 16, "type": "uint8", "size": 1}],
            "subsections": [{"vmsd_name": "x/y", "version": 1,
                "fields": [{"name": "c", "type": "uint64", "size": 8}]}]});
        assert_eq!(described_size(&d), Some(4 + 16 + (1 + 1 + 3 + 4) + 8));
        assert_eq!(described_size(&json!({"fields": [{"name": "a"}]})), None);
    }
}
