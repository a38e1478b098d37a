//! The vmigrate migration engine.
//!
//! ```text
//! migrator (the facade a monitor drives) ── shared (state the session threads report to)
//!    │
//!    ├── outgoing/   save (session) ─ ram_save ─ multifd_send ─ throttle ─ postcopy
//!    │               ─ recover ─ xbzrle_cache ─ zero_copy ─ background_snapshot ─ colo
//!    ├── incoming/   accept ─ load (stream) ─ ram_load ─ multifd_recv ─ pages ─ postcopy
//!    │               ─ recover ─ blocktime ─ xbzrle_load ─ colo
//!    └── channels/   transport ─ tls ─ tls_relay ─ objects ─ authz ─ x509_name ─ return_path
//!
//! used by all: options, properties, status, stats, events, io, compress, mapped_ram,
//!              memory (guest RAM), uffd (userfaultfd), vmm (the traits a VMM
//!              implements), errno, timeline, dirtylimit, cpr, uffd_wp, colo (failover
//!              state and figures both COLO sides share with the monitor)
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
//!
//! # Embedding: the seam a VMM implements
//!
//! A VMM hands the engine four things through [`Vmm`]: its guest RAM as named
//! [`RamBlock`]s (anonymous, a file, or memory the VMM already mapped, such as a
//! `vm-memory` region with the `vm-memory` feature), a [`DirtyTracker`] that reports the
//! pages written since the last sync, [`VmControl`] to stop and start the vCPUs, and its
//! devices as [`DeviceState`] sections. A [`Migrator`] per VM then answers the monitor
//! commands (`migrate`, `migrate-incoming`, `query-migrate`, capabilities, parameters).
//!
//! The example below is a whole VMM in a few lines: a stopped VM with one RAM block and
//! no devices, migrated over a unix socket to a second migrator in the same process.
//! `examples/embed.rs` (`cargo run --release --example embed`) does the same live, with
//! guest memory from `vm-memory`, a guest writing during the migration, and the
//! destination in a second process.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::{Duration, Instant};
//! use vmigrate_engine::*;
//!
//! /// A stopped guest writes nothing: nothing is dirty after the first pass, which
//! /// sends every page.
//! struct Quiet;
//! impl DirtyTracker for Quiet {
//!     fn start(&self) -> Result<(), VmmError> { Ok(()) }
//!     fn sync(&self, _block: usize, _out: &mut DirtyBitmap) -> Result<(), VmmError> { Ok(()) }
//!     fn requeue(&self, _block: usize, _pages: &DirtyBitmap) {}
//!     fn stop(&self) {}
//! }
//!
//! /// Run control without vCPUs: only the state.
//! struct Control(Mutex<RunState>);
//! impl VmControl for Control {
//!     fn run_state(&self) -> RunState { *self.0.lock().unwrap() }
//!     fn vm_stop(&self, state: RunState) { *self.0.lock().unwrap() = state }
//!     fn vm_start(&self) { *self.0.lock().unwrap() = RunState::Running }
//!     fn set_run_state(&self, state: RunState) { *self.0.lock().unwrap() = state }
//! }
//!
//! struct Vm { ram: Vec<Arc<RamBlock>>, tracker: Quiet, control: Control }
//! impl Vmm for Vm {
//!     fn machine_name(&self) -> &str { "none" }
//!     fn ram_blocks(&self) -> &[Arc<RamBlock>] { &self.ram }
//!     fn dirty_tracker(&self) -> &dyn DirtyTracker { &self.tracker }
//!     fn control(&self) -> &dyn VmControl { &self.control }
//!     fn devices(&self) -> Vec<Arc<dyn DeviceState>> { Vec::new() }
//!     fn uuid(&self) -> Option<[u8; 16]> { None }
//! }
//!
//! fn vm(state: RunState) -> Result<Arc<Vm>, Box<dyn std::error::Error>> {
//!     let ram = Arc::new(RamBlock::anonymous("ram", 4 << 20, 0)?);
//!     Ok(Arc::new(Vm { ram: vec![ram], tracker: Quiet, control: Control(Mutex::new(state)) }))
//! }
//!
//! fn wait(m: &Migrator) -> MigrationStatus {
//!     let t0 = Instant::now();
//!     loop {
//!         let s = m.status();
//!         if matches!(s, MigrationStatus::Completed | MigrationStatus::Failed)
//!             || t0.elapsed() > Duration::from_secs(30)
//!         {
//!             return s;
//!         }
//!         std::thread::sleep(Duration::from_millis(5));
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (src, dst) = (vm(RunState::Paused)?, vm(RunState::InMigrate)?);
//! src.ram[0].write(0x1000, b"hello from the source");
//!
//! let dir = std::env::temp_dir().join(format!("vmigrate-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let uri = format!("unix:{}", dir.join("mig.sock").display());
//!
//! // Destination: `migrate-incoming unix:...`.
//! let incoming = Migrator::new(dst.clone(), EventBus::new(), IncomingMode::Deferred);
//! incoming.migrate_incoming(Migrator::parse_target(Some(&uri), None, true)?, false)?;
//!
//! // Source: `migrate unix:...`.
//! let outgoing = Migrator::new(src.clone(), EventBus::new(), IncomingMode::Disabled);
//! outgoing.migrate(Migrator::parse_target(Some(&uri), None, false)?, false, None)?;
//!
//! assert_eq!(wait(&outgoing), MigrationStatus::Completed);
//! assert_eq!(wait(&incoming), MigrationStatus::Completed);
//! let mut got = [0u8; 21];
//! dst.ram[0].read(0x1000, &mut got);
//! assert_eq!(&got, b"hello from the source");
//! std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```

pub mod channels;
pub mod colo;
pub mod compress;
pub mod cpr;
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
pub mod uffd_wp;
pub mod vmm;

pub use events::EventBus;
pub use memory::RamBlock;
pub use migrator::{MigrateError, Migrator};
pub use options::MigMode;
pub use properties::{MigrationProperties, MultifdSync};
pub use shared::IncomingMode;
pub use status::{MigrationStatus, RunState};
pub use vmm::{DeviceState, DirtyBitmap, DirtyTracker, VcpuDirtyControl, VmControl, Vmm, VmmError};
