//! The vmigrate migration engine.
//!
//! ```text
//! migrator (the facade a monitor drives) ── shared (state the session threads report to)
//!    │
//!    ├── outgoing/   save (session) ─ ram_save ─ multifd_send ─ throttle ─ postcopy
//!    ├── incoming/   accept ─ load (stream) ─ ram_load ─ multifd_recv ─ pages ─ postcopy
//!    │               ─ blocktime
//!    └── channels/   transport ─ tls ─ tls_relay ─ objects ─ authz ─ x509_name ─ return_path
//!
//! used by all: options, properties, status, stats, events, io, compress, mapped_ram,
//!              memory (guest RAM), uffd (userfaultfd), vmm (the traits a VMM
//!              implements), errno
//! ```
//!
//! - [`migrator`]: the facade a monitor drives (`migrate`, `migrate-incoming`, ...).
//! - [`outgoing`] and [`incoming`]: the two sides of a migration; [`channels`]: what
//!   they run over.
//! - [`options`]: capabilities and parameters with QEMU's rules; [`properties`]: the
//!   migration object's command-line properties (`-global migration.*`).
//! - [`io`]: buffered reading and gathering writes, rate limiting.
//! - [`vmm`]: the traits a VMM implements; [`memory`]: guest RAM blocks; `guest_memory`
//!   (feature `vm-memory`): rust-vmm `vm-memory` regions as RAM blocks.
//! - [`stats`], [`status`], [`events`]; [`timeline`]: a migration's figures over time.

pub mod channels;
pub mod compress;
pub mod dirtylimit;
pub mod dirtyrate;
pub mod errno;
pub mod events;
#[cfg(feature = "vm-memory")]
pub mod guest_memory;
pub mod incoming;
pub mod io;
pub(crate) mod mapped_ram;
pub mod memory;
pub mod migrator;
pub mod options;
pub mod outgoing;
pub mod properties;
pub(crate) mod shared;
pub mod stats;
pub mod status;
#[cfg(test)]
pub(crate) mod test_support;
pub mod timeline;
pub mod uffd;
pub mod vmm;

pub use events::EventBus;
pub use memory::RamBlock;
pub use migrator::{MigrateError, Migrator};
pub use options::MigMode;
pub use properties::{MigrationProperties, MultifdSync};
pub use shared::IncomingMode;
pub use status::{MigrationStatus, RunState};
pub use vmm::{DeviceState, DirtyBitmap, DirtyTracker, VcpuDirtyControl, VmControl, Vmm, VmmError};
