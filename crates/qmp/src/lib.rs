//! The QMP server and the HMP text monitor of vmigrate, mapped onto the engine's API.
//!
//! - [`framing`]: splits the input byte stream into JSON objects, as QEMU's parser does.
//! - [`dispatch`]: the commands, their argument checks and errors.
//! - [`server`]: sockets, the greeting, capabilities negotiation, events.
//! - [`hmp`]: the human monitor on stdio or a socket, through `vmigrate-hmp`.
//! - [`jobs`]: `query-jobs`, `job-*` and the snapshot commands of a diskless VM.

pub mod dispatch;
pub mod framing;
pub mod hmp;
pub mod jobs;
pub mod schema;
pub mod server;

pub use dispatch::{Dispatcher, QmpError, VmBackend};
pub use server::{serve, MonitorAddress};
