//! The vmigrate migration engine.
//!
//! - [`migrator`]: the facade a monitor drives (`migrate`, `migrate-incoming`, ...).
//! - [`save`] and [`ram_save`]: the outgoing precopy session and the RAM saver.
//! - [`load`] and [`ram_load`]: the incoming stream and the RAM loader.
//! - [`options`]: capabilities and parameters with QEMU's rules; [`properties`]: the
//!   migration object's command-line properties (`-global migration.*`).
//! - [`transport`]: URIs, channels, listeners; [`tls`]: TLS on those channels, with
//!   the credentials and authorization [`objects`] it names.
//! - [`io`]: buffered reading and gathering writes, rate limiting.
//! - [`vmm`]: the traits a VMM implements; [`memory`]: guest RAM blocks.
//! - [`stats`], [`status`], [`events`].

pub mod compress;
pub mod dirtyrate;
pub mod events;
pub mod io;
pub mod load;
pub mod mapped_ram;
pub mod memory;
pub mod migrator;
pub mod multifd_recv;
pub mod multifd_send;
pub mod objects;
pub mod options;
pub mod properties;
pub mod ram_load;
pub mod ram_save;
pub mod return_path;
pub mod save;
pub mod stats;
pub mod status;
pub mod throttle;
pub mod tls;
mod tls_relay;
pub mod transport;
pub mod vmm;
pub mod x509_name;

pub use events::EventBus;
pub use memory::RamBlock;
pub use migrator::{IncomingMode, MigrateError, Migrator};
pub use options::MigMode;
pub use properties::{MigrationProperties, MultifdSync};
pub use status::{MigrationStatus, RunState};
pub use vmm::{DeviceState, DirtyBitmap, DirtyTracker, VmControl, Vmm, VmmError};
