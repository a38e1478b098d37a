//! The incoming side: accepting connections (`accept`), the stream loader
//! (`load`), the RAM loader (`ram_load`), multifd channels (`multifd_recv`) and
//! the pages a load has written (`pages`), and the postcopy destination
//! (`postcopy`: userfaultfd, the fault thread and the listen thread) and its recovery
//! after a network failure (`recover`), XBZRLE pages (`xbzrle_load`), and the COLO
//! secondary's checkpoints (`colo`).

pub(crate) mod accept;
pub(crate) mod blocktime;
pub(crate) mod colo;
pub(crate) mod load;
pub(crate) mod multifd_recv;
pub(crate) mod pages;
pub(crate) mod postcopy;
pub(crate) mod ram_load;
pub(crate) mod recover;
pub(crate) mod xbzrle_load;

pub use load::{
    load_stream, load_stream_postcopy, load_stream_with, LoadError, LoadOutcome, MultifdChannels,
    PostcopyHooks, PostcopyOutcome, MAX_PACKAGE_LEN,
};
pub use multifd_recv::{
    read_init, MultifdHandshakeError, MultifdReceiver, MultifdRecvError, ReceiveConfig,
};
pub use pages::ReceivedPages;
pub use postcopy::{LatencySummary, PostcopyError, PostcopyIncoming};
pub use ram_load::MappedRamLoad;
pub use recover::{PostcopyRecovery, RecoverError};
