//! The vmigrate reference VM: guest memory, run state and the devices of its machines.
//!
//! - [`machine`]: the machines (`none`: RAM only, the interop machine).
//! - [`runstate`]: the run state with `STOP`/`RESUME` events.
//! - [`dirty`]: dirty tracking for writes the VMM itself makes.
//! - [`timer`]: the guest clock, migrated as QEMU's `timer` section.

pub mod dirty;
pub mod machine;
pub mod runstate;
pub mod timer;

pub use machine::{Machine, MachineConfig, MachineError, MachineKind};
