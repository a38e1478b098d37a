//! Assembles the `lab` machine's KVM guest (guest/lab.S) into a flat binary with the
//! system's GNU as and ld.

use std::path::PathBuf;
use std::process::Command;

/// Where the VMM loads the guest (kept in sync with `GUEST_LOAD` in src/kvm.rs).
const GUEST_LOAD: &str = "0x1000";

fn run(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{shown} failed with {s}"),
        Err(e) => {
            panic!("cannot run {shown}: {e} (GNU binutils are needed to build the lab guest)")
        }
    }
}

fn main() {
    println!("cargo:rerun-if-changed=guest/lab.S");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let obj = out.join("lab.o");
    let bin = out.join("lab-guest.bin");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if arch != "x86_64" {
        // No KVM guest on other architectures; the kvm module is not built there.
        std::fs::write(&bin, []).expect("write empty guest");
        return;
    }
    run(Command::new("as")
        .args(["--32", "-o"])
        .arg(&obj)
        .arg("guest/lab.S"));
    run(Command::new("ld")
        .args(["-m", "elf_i386", "--oformat", "binary", "-e", "_start"])
        .arg(format!("-Ttext={GUEST_LOAD}"))
        .arg("-o")
        .arg(&bin)
        .arg(&obj));
}
