//! The outgoing side: the precopy session (`save`), the RAM saver (`ram_save`),
//! multifd channels (`multifd_send`), auto-converge (`throttle`) and the source
//! side of postcopy (`postcopy`) and its recovery after a network failure (`recover`),
//! the XBZRLE cache (`xbzrle_cache`) and MSG_ZEROCOPY sends (`zero_copy`), and the COLO
//! primary's checkpoints (`colo`).

pub(crate) mod background_snapshot;
pub(crate) mod colo;
pub(crate) mod multifd_send;
pub(crate) mod postcopy;
pub(crate) mod ram_save;
pub(crate) mod recover;
pub(crate) mod save;
pub(crate) mod throttle;
pub mod xbzrle_cache;
pub mod zero_copy;

pub use ram_save::{RamSaver, ZeroPages};
pub use save::SaveError;
