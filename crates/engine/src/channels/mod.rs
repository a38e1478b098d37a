//! The channels a migration runs over: URIs, connections and listeners
//! (`transport`), TLS on them (`tls`, each session relayed on its own thread by
//! `tls_relay`), the credentials and authorization objects TLS names (`objects`,
//! `authz`, `x509_name`), and the return path (`return_path`).

pub(crate) mod authz;
pub(crate) mod objects;
pub(crate) mod return_path;
pub(crate) mod tls;
pub(crate) mod tls_relay;
pub(crate) mod transport;
pub(crate) mod x509_name;

pub use objects::{
    parse_object_option, ObjectAddError, ObjectLookupError, ObjectNotFound, ObjectOptionError,
    ObjectStore, TlsSetupError,
};
pub use return_path::{
    PageRequest, ReturnPath, ReturnPathError, ReturnPathWriter, MAX_QUEUED_PAGE_REQUESTS,
};
pub use tls::TlsError;
pub use transport::{parse_size, Address, FdStore, TransportError};
pub use x509_name::subject_dn;
