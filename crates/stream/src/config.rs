//! The configuration record (`0x07`) that follows the header, with its subsections.

use crate::error::{DecodeError, DecodeErrorKind};
use crate::section::SUBSECTION;
use crate::source::Source;
use crate::{put_counted, vmstate::FieldDesc};

pub const CONFIGURATION: u8 = 0x07;
pub const SUB_PAGE_BITS: &str = "configuration/target-page-bits";
pub const SUB_CAPABILITIES: &str = "configuration/capabilities";
pub const SUB_UUID: &str = "configuration/uuid";
/// The capabilities QEMU 10.0 validates through the configuration record.
pub const VALIDATED_CAPABILITIES: [&str; 2] = ["x-ignore-shared", "mapped-ram"];
/// Machine names longer than this are not real QEMU machine names.
const MAX_MACHINE_NAME: u32 = 256;
/// QEMU never lists more than its validated capabilities; allow a little slack.
const MAX_CAPABILITIES: u32 = 64;

/// What the configuration record says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Configuration {
    pub machine: String,
    /// `configuration/target-page-bits`, absent means the architecture's minimum.
    pub target_page_bits: Option<u32>,
    /// Names from `configuration/capabilities` (only validated capabilities are listed).
    pub capabilities: Vec<String>,
    /// `configuration/uuid`, 16 bytes in RFC order.
    pub uuid: Option<[u8; 16]>,
}

impl Configuration {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(CONFIGURATION);
        out.extend_from_slice(&(self.machine.len() as u32).to_be_bytes());
        out.extend_from_slice(self.machine.as_bytes());
        if let Some(bits) = self.target_page_bits {
            put_subsection_header(out, SUB_PAGE_BITS);
            out.extend_from_slice(&bits.to_be_bytes());
        }
        if !self.capabilities.is_empty() {
            put_subsection_header(out, SUB_CAPABILITIES);
            out.extend_from_slice(&(self.capabilities.len() as u32).to_be_bytes());
            for cap in &self.capabilities {
                put_counted(out, cap);
            }
        }
        if let Some(uuid) = &self.uuid {
            put_subsection_header(out, SUB_UUID);
            out.extend_from_slice(uuid);
        }
    }

    /// Decodes the record, starting at its `0x07` tag.
    pub fn decode(src: &mut impl Source) -> Result<Self, DecodeError> {
        let at = src.offset();
        if src.u8("configuration tag")? != CONFIGURATION {
            return Err(DecodeError::new(at, DecodeErrorKind::MissingConfiguration));
        }
        let at = src.offset();
        let len = src.be32("machine name length")?;
        if len == 0 || len > MAX_MACHINE_NAME {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::BadMachineNameLength(len),
            ));
        }
        let mut name = vec![0u8; len as usize];
        src.fill(&mut name, "machine name")?;
        let mut cfg = Configuration {
            machine: String::from_utf8_lossy(&name).into_owned(),
            ..Default::default()
        };
        while src.peek_u8()? == Some(SUBSECTION) {
            let at = src.offset();
            src.u8("subsection tag")?;
            let sub = src.counted("subsection name")?;
            let _version = src.be32("subsection version")?;
            match sub.as_str() {
                SUB_PAGE_BITS => cfg.target_page_bits = Some(src.be32("target page bits")?),
                SUB_CAPABILITIES => {
                    let at = src.offset();
                    let count = src.be32("capability count")?;
                    if count > MAX_CAPABILITIES {
                        return Err(DecodeError::new(
                            at,
                            DecodeErrorKind::BadCapabilityCount(count),
                        ));
                    }
                    for _ in 0..count {
                        cfg.capabilities.push(src.counted("capability name")?);
                    }
                }
                SUB_UUID => {
                    let mut uuid = [0u8; 16];
                    src.fill(&mut uuid, "uuid")?;
                    cfg.uuid = Some(uuid);
                }
                _ => {
                    return Err(DecodeError::new(
                        at,
                        DecodeErrorKind::UnknownConfigSubsection(sub),
                    ))
                }
            }
        }
        Ok(cfg)
    }

    /// The vmstate description of this record, as QEMU writes it into the vmdesc trailer.
    pub fn describe(&self) -> serde_json::Value {
        use serde_json::json;
        let mut desc = json!({
            "vmsd_name": "configuration",
            "version": 1,
            "fields": [
                FieldDesc::scalar("len", "uint32", 4).to_json(),
                FieldDesc::scalar("name", "buffer", self.machine.len()).to_json(),
            ],
        });
        let mut subs = Vec::new();
        if self.target_page_bits.is_some() {
            subs.push(json!({"vmsd_name": SUB_PAGE_BITS, "version": 1,
                "fields": [FieldDesc::scalar("target_page_bits", "uint32", 4).to_json()]}));
        }
        if !self.capabilities.is_empty() {
            let mut fields = vec![FieldDesc::scalar("caps_count", "uint32", 4).to_json()];
            for (i, cap) in self.capabilities.iter().enumerate() {
                let name = if i == 0 {
                    "capabilities".to_string()
                } else {
                    format!("capabilities[{i}]")
                };
                fields.push(FieldDesc::scalar(&name, "capability", 1 + cap.len()).to_json());
            }
            subs.push(json!({"vmsd_name": SUB_CAPABILITIES, "version": 1, "fields": fields}));
        }
        if self.uuid.is_some() {
            subs.push(json!({"vmsd_name": SUB_UUID, "version": 1, "fields": [
                {"name": "uuid.data", "array_len": 16, "type": "uint8", "size": 1}]}));
        }
        if !subs.is_empty() {
            desc["subsections"] = serde_json::Value::Array(subs);
        }
        desc
    }

    pub fn has_capability(&self, name: &str) -> bool {
        self.capabilities.iter().any(|c| c == name)
    }
}

fn put_subsection_header(out: &mut Vec<u8>, name: &str) {
    out.push(SUBSECTION);
    put_counted(out, name);
    out.extend_from_slice(&1u32.to_be_bytes());
}

/// Formats a UUID in its canonical 8-4-4-4-12 form.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

/// Parses a canonical UUID string.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || s.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SliceSource;

    #[test]
    fn mapped_ram_example_bytes() {
        let cfg = Configuration {
            machine: "none".into(),
            capabilities: vec!["mapped-ram".into()],
            ..Default::default()
        };
        let mut v = Vec::new();
        cfg.encode(&mut v);
        let mut want = vec![7, 0, 0, 0, 4];
        want.extend_from_slice(
            b"none\x05\x1aconfiguration/capabilities\0\0\0\x01\0\0\0\x01\x0amapped-ram",
        );
        assert_eq!(v, want);
        assert_eq!(
            Configuration::decode(&mut SliceSource::new(&v)).unwrap(),
            cfg
        );
    }

    #[test]
    fn unknown_subsection_is_refused() {
        let mut v = vec![7, 0, 0, 0, 4];
        v.extend_from_slice(b"none\x05\x11configuration/xyz\0\0\0\x01");
        let e = Configuration::decode(&mut SliceSource::new(&v)).unwrap_err();
        assert!(matches!(
            e.kind,
            DecodeErrorKind::UnknownConfigSubsection(_)
        ));
        assert_eq!(e.offset, 9);
    }

    #[test]
    fn uuid_text() {
        let u = parse_uuid("12345678-9abc-def0-1122-334455667788").unwrap();
        assert_eq!(format_uuid(&u), "12345678-9abc-def0-1122-334455667788");
        assert!(parse_uuid("1234").is_none());
    }
}
