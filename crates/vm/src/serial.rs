//! The serial console: where guest output goes (`--serial stdio|FILE|none`), and the
//! 16550-style UART at I/O port 0x3f8 that `kvm` guests write to, migrated as the
//! `serial` section.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use vmigrate_engine::vmm::{DeviceLoadError, DeviceState, VmmError};
use vmigrate_stream::vmstate::{FieldDesc, FieldWriter};
use vmigrate_stream::Source;

/// Where serial output goes.
#[derive(Debug)]
pub enum SerialSink {
    Stdout,
    File(Mutex<File>),
    Discard,
}

impl SerialSink {
    /// Parses `--serial`: `stdio`, `none`, or a file path (appended to).
    pub fn open(spec: &str) -> std::io::Result<Self> {
        Ok(match spec {
            "stdio" => SerialSink::Stdout,
            "none" | "null" => SerialSink::Discard,
            path => SerialSink::File(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(Path::new(path))?,
            )),
        })
    }

    /// Writes bytes the guest sent (best effort: a full disk does not stop the guest).
    pub fn write(&self, bytes: &[u8]) {
        match self {
            SerialSink::Stdout => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(bytes);
                let _ = out.flush();
            }
            SerialSink::File(f) => {
                let _ = f.lock().unwrap_or_else(|e| e.into_inner()).write_all(bytes);
            }
            SerialSink::Discard => {}
        }
    }
}

/// The I/O port of the first serial port.
pub const COM1: u16 = 0x3f8;

/// Line status: transmitter holding register empty and transmitter empty, so a guest
/// that polls before writing never waits.
const LSR_IDLE: u8 = 0x60;

/// The UART's registers a guest can set; writes to the transmit register go straight to
/// the sink, so nothing is ever queued.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UartRegs {
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub scr: u8,
    pub dll: u8,
    pub dlm: u8,
    /// Bytes transmitted since the guest booted.
    pub tx_count: u64,
}

/// The UART device.
#[derive(Debug)]
pub struct Uart {
    regs: Mutex<UartRegs>,
    sink: std::sync::Arc<SerialSink>,
}

pub const SERIAL_IDSTR: &str = "serial";
pub const SERIAL_VERSION: u32 = 1;

impl Uart {
    pub fn new(sink: std::sync::Arc<SerialSink>) -> Self {
        Self {
            regs: Mutex::new(UartRegs {
                dll: 0x0c,
                ..UartRegs::default()
            }),
            sink,
        }
    }

    pub fn regs(&self) -> UartRegs {
        *self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dlab(r: &UartRegs) -> bool {
        r.lcr & 0x80 != 0
    }

    /// A guest `out` to `COM1 + offset`.
    pub fn write(&self, offset: u16, value: u8) {
        let mut r = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        match offset {
            0 if Self::dlab(&r) => r.dll = value,
            0 => {
                r.tx_count += 1;
                drop(r);
                self.sink.write(&[value]);
            }
            1 if Self::dlab(&r) => r.dlm = value,
            1 => r.ier = value & 0x0f,
            3 => r.lcr = value,
            4 => r.mcr = value & 0x1f,
            7 => r.scr = value,
            _ => {}
        }
    }

    /// A guest `in` from `COM1 + offset`.
    pub fn read(&self, offset: u16) -> u8 {
        let r = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        match offset {
            0 if Self::dlab(&r) => r.dll,
            1 if Self::dlab(&r) => r.dlm,
            1 => r.ier,
            2 => 0x01, // no interrupt pending
            3 => r.lcr,
            4 => r.mcr,
            5 => LSR_IDLE,
            6 => 0xb0, // carrier detect, data set ready, clear to send
            7 => r.scr,
            _ => 0,
        }
    }
}

impl DeviceState for Uart {
    fn idstr(&self) -> &str {
        SERIAL_IDSTR
    }
    fn version(&self) -> u32 {
        SERIAL_VERSION
    }
    fn save(&self) -> Result<Vec<u8>, VmmError> {
        let r = self.regs();
        let mut w = FieldWriter::default();
        w.u8(r.ier)
            .u8(r.lcr)
            .u8(r.mcr)
            .u8(r.scr)
            .u8(r.dll)
            .u8(r.dlm)
            .be64(r.tx_count);
        Ok(w.buf)
    }
    fn load(&self, src: &mut dyn Source, _version: u32) -> Result<(), DeviceLoadError> {
        let r = UartRegs {
            ier: src.u8("serial ier")?,
            lcr: src.u8("serial lcr")?,
            mcr: src.u8("serial mcr")?,
            scr: src.u8("serial scr")?,
            dll: src.u8("serial dll")?,
            dlm: src.u8("serial dlm")?,
            tx_count: src.be64("serial tx_count")?,
        };
        *self.regs.lock().unwrap_or_else(|e| e.into_inner()) = r;
        Ok(())
    }
    fn describe(&self) -> serde_json::Value {
        let fields: Vec<_> = ["ier", "lcr", "mcr", "scr", "dll", "dlm"]
            .iter()
            .map(|n| FieldDesc::scalar(n, "uint8", 1).to_json())
            .chain([FieldDesc::scalar("tx_count", "uint64", 8).to_json()])
            .collect();
        serde_json::json!({"name": SERIAL_IDSTR, "instance_id": 0, "vmsd_name": SERIAL_IDSTR,
            "version": SERIAL_VERSION, "fields": fields})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vmigrate_stream::SliceSource;

    #[test]
    fn transmits_and_migrates_registers() {
        let path = std::env::temp_dir().join(format!("vmigrate-serial-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sink = Arc::new(SerialSink::open(path.to_str().unwrap()).unwrap());
        let uart = Uart::new(sink);
        uart.write(3, 0x80);
        uart.write(0, 0x01);
        uart.write(3, 0x03);
        for b in b"hi\n" {
            assert_eq!(uart.read(5) & 0x20, 0x20);
            uart.write(0, *b);
        }
        uart.write(7, 0x5a);
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\n");
        let body = uart.save().unwrap();
        let desc = uart.describe();
        assert_eq!(
            vmigrate_stream::vmstate::described_size(&desc),
            Some(body.len() as u64)
        );
        let other = Uart::new(Arc::new(SerialSink::Discard));
        other.load(&mut SliceSource::new(&body), 1).unwrap();
        assert_eq!(other.regs(), uart.regs());
        assert_eq!(other.regs().tx_count, 3);
        assert_eq!(other.regs().dll, 1);
        let _ = std::fs::remove_file(&path);
    }
}
