//! Bodies of the global state entries a `none` machine migrates: `timer` and
//! `globalstate`.

use serde_json::{json, Value};

use crate::error::{DecodeError, DecodeErrorKind};
use crate::source::Source;
use crate::vmstate::{refuse_subsections, FieldDesc, FieldWriter};

pub const TIMER_IDSTR: &str = "timer";
pub const TIMER_VERSION: u32 = 2;
pub const TIMER_MIN_VERSION: u32 = 1;
pub const GLOBALSTATE_IDSTR: &str = "globalstate";
pub const GLOBALSTATE_VERSION: u32 = 1;
const RUNSTATE_FIELD_LEN: usize = 32;
const GLOBALSTATE_UNUSED_LEN: usize = 66;

/// The `timer` entry: the guest clock offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimerState {
    pub cpu_ticks_offset: i64,
    pub cpu_clock_offset: i64,
}

impl TimerState {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = FieldWriter::default();
        w.be64(self.cpu_ticks_offset as u64)
            .zeros(8)
            .be64(self.cpu_clock_offset as u64);
        w.buf
    }

    pub fn decode(src: &mut impl Source, version: u32) -> Result<Self, DecodeError> {
        let cpu_ticks_offset = src.be64("timer cpu_ticks_offset")? as i64;
        src.skip(8, "timer unused")?;
        let cpu_clock_offset = if version >= 2 {
            src.be64("timer cpu_clock_offset")? as i64
        } else {
            0
        };
        refuse_subsections(src, TIMER_IDSTR)?;
        Ok(Self {
            cpu_ticks_offset,
            cpu_clock_offset,
        })
    }

    pub fn describe() -> Value {
        json!({"name": TIMER_IDSTR, "instance_id": 0, "vmsd_name": TIMER_IDSTR,
        "version": TIMER_VERSION, "fields": [
            FieldDesc::scalar("cpu_ticks_offset", "int64", 8).to_json(),
            FieldDesc::scalar("unused", "unused_buffer", 8).to_json(),
            FieldDesc::scalar("cpu_clock_offset", "int64", 8).to_json(),
        ]})
    }
}

/// QEMU's run state names that a `globalstate` section may carry.
pub const RUN_STATES: [&str; 16] = [
    "debug",
    "inmigrate",
    "internal-error",
    "io-error",
    "paused",
    "postmigrate",
    "prelaunch",
    "finish-migrate",
    "restore-vm",
    "running",
    "save-vm",
    "shutdown",
    "suspended",
    "watchdog",
    "guest-panicked",
    "colo",
];

/// The `globalstate` entry: the run state the source had when migration started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalState {
    pub runstate: String,
    pub vm_was_suspended: bool,
}

impl GlobalState {
    pub fn encode(&self) -> Vec<u8> {
        let mut name = [0u8; RUNSTATE_FIELD_LEN];
        let b = self.runstate.as_bytes();
        let n = b.len().min(RUNSTATE_FIELD_LEN - 1);
        name[..n].copy_from_slice(&b[..n]);
        let mut w = FieldWriter::default();
        w.be32(n as u32 + 1)
            .bytes(&name)
            .u8(1)
            .u8(u8::from(self.vm_was_suspended))
            .zeros(GLOBALSTATE_UNUSED_LEN);
        w.buf
    }

    pub fn decode(src: &mut impl Source) -> Result<Self, DecodeError> {
        let at = src.offset();
        let size = src.be32("globalstate size")?;
        let mut name = [0u8; RUNSTATE_FIELD_LEN];
        src.fill(&mut name, "globalstate runstate")?;
        let _has_suspended = src.u8("globalstate has_vm_was_suspended")?;
        let vm_was_suspended = src.u8("globalstate vm_was_suspended")? != 0;
        src.skip(GLOBALSTATE_UNUSED_LEN as u64, "globalstate unused")?;
        if size as usize > RUNSTATE_FIELD_LEN {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::Invalid {
                    what: "globalstate",
                    detail: format!("runstate size {size} exceeds {RUNSTATE_FIELD_LEN}"),
                },
            ));
        }
        let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        let runstate = String::from_utf8_lossy(&name[..end]).into_owned();
        if !RUN_STATES.contains(&runstate.as_str()) {
            return Err(DecodeError::new(
                at,
                DecodeErrorKind::UnknownRunState(runstate),
            ));
        }
        refuse_subsections(src, GLOBALSTATE_IDSTR)?;
        Ok(Self {
            runstate,
            vm_was_suspended,
        })
    }

    pub fn describe() -> Value {
        json!({"name": GLOBALSTATE_IDSTR, "instance_id": 0, "vmsd_name": GLOBALSTATE_IDSTR,
        "version": GLOBALSTATE_VERSION, "fields": [
            FieldDesc::scalar("size", "uint32", 4).to_json(),
            FieldDesc::scalar("runstate", "buffer", RUNSTATE_FIELD_LEN).to_json(),
            FieldDesc::scalar("has_vm_was_suspended", "uint8", 1).to_json(),
            FieldDesc::scalar("vm_was_suspended", "uint8", 1).to_json(),
            FieldDesc::scalar("unused", "buffer", GLOBALSTATE_UNUSED_LEN).to_json(),
        ]})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SliceSource;

    #[test]
    fn globalstate_round_trip() {
        let g = GlobalState {
            runstate: "paused".into(),
            vm_was_suspended: false,
        };
        let v = g.encode();
        assert_eq!(v.len(), 104);
        assert_eq!(&v[..4], &[0, 0, 0, 7]);
        assert_eq!(GlobalState::decode(&mut SliceSource::new(&v)).unwrap(), g);
    }

    #[test]
    fn globalstate_unknown_runstate() {
        let mut v = GlobalState {
            runstate: "paused".into(),
            vm_was_suspended: false,
        }
        .encode();
        v[4..10].copy_from_slice(b"bogus!");
        assert!(GlobalState::decode(&mut SliceSource::new(&v)).is_err());
    }

    #[test]
    fn timer_is_24_bytes() {
        let t = TimerState {
            cpu_ticks_offset: 0x1000,
            cpu_clock_offset: 0x2000,
        };
        let v = t.encode();
        assert_eq!(v.len(), 24);
        assert_eq!(TimerState::decode(&mut SliceSource::new(&v), 2).unwrap(), t);
    }
}
