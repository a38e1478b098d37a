//! The vmigrate reference VM: guest memory, run state, vCPUs and the devices of its
//! machines.
//!
//! - [`machine`]: the machines (`none`: RAM only, the interop machine; `lab`: RAM plus
//!   vCPUs running a workload, for live migration).
//! - [`runstate`]: the run state with `STOP`/`RESUME` events, parking the vCPUs.
//! - [`gate`]: how vCPU threads run, park and are throttled.
//! - [`workload`]: the `--workload` specification and the self-check's page pattern.
//! - [`soft`]: the `soft` accelerator, vCPU threads writing guest RAM directly.
//! - [`kvm`]: the `kvm` accelerator, real vCPUs running `guest/lab.S`, dirty pages from KVM's dirty log (with manual clear) or its dirty ring.
//! - [`serial`]: the serial console and the UART of `kvm` guests.
//! - [`dirty`]: dirty tracking for writes the VMM itself makes.
//! - [`uffd`]: dirty tracking of `soft` guests by the kernel, userfaultfd asynchronous
//!   write-protection read with `PAGEMAP_SCAN`.
//! - [`timer`]: the guest clock, migrated as QEMU's `timer` section.
//! - [`blockers`]: migration blockers, per migration mode.

pub mod blockers;
pub mod dirty;
pub mod gate;
pub mod kvm;
pub mod machine;
pub mod runstate;
pub mod serial;
pub mod soft;
pub mod timer;
pub mod uffd;
pub mod vcpu_threads;
pub mod workload;

pub use machine::{Accel, LabConfig, Machine, MachineConfig, MachineError, MachineKind};
pub use workload::WorkloadSpec;
