//! TLS for migration channels, with x509 credentials as QEMU's `tls-creds-x509` object
//! reads them from a directory.
//!
//! A channel is secured in two steps:
//!
//! 1. [`handshake`] runs the TLS handshake on the connected socket, in the calling
//!    thread, with a deadline and a cancel flag. The source checks the destination's
//!    certificate against the CA and the host name (`tls-hostname`, else the URI's
//!    host); the destination, with `verify-peer`, requires a client certificate from
//!    the same CA, and checks its subject against `tls-authz`.
//! 2. [`relay`] hands the session to a thread that moves plaintext between the TLS
//!    socket and one end of a socket pair, and returns the other end. Everything the
//!    engine does with a socket (gathering writes, `readv` into guest pages, peeking at a
//!    new connection's first bytes, shutdown on cancel, a return path on a second
//!    descriptor) works on that end unchanged, so TLS is one step at connect and accept
//!    time, and the stream inside is exactly the plaintext one.
//!
//! Closing the engine's end sends the peer a `close_notify` (QEMU's destination
//! expects one on its multifd channels).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, ClientConnection, Connection, DigitallySignedStruct,
    DistinguishedName, RootCertStore, ServerConfig, ServerConnection, SignatureScheme,
};

use crate::channels::authz::Authz;
use crate::channels::x509_name;

/// How long a handshake may take before the channel is given up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which side of the handshake a credentials object is for (QEMU's `endpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Client,
    Server,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Client => "client",
            Endpoint::Server => "server",
        }
    }
}

/// A loaded `tls-creds-x509` object: the files of its directory, parsed.
#[derive(Debug)]
pub struct X509Creds {
    pub endpoint: Endpoint,
    pub verify_peer: bool,
    pub dir: PathBuf,
    ca: Vec<CertificateDer<'static>>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    /// This end's certificate chain and key: required for a server, optional for a
    /// client (without one, no client certificate is offered).
    identity: Option<(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
}

/// A TLS failure, with QEMU's wording where QEMU has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

fn cred_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

fn access_error(path: &Path, e: &io::Error) -> TlsError {
    TlsError(format!(
        "Unable to access credentials {}: {}",
        path.display(),
        crate::errno::errno_text(e)
    ))
}

fn load_certs(path: &Path, required: bool) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound && !required => return Ok(Vec::new()),
        Err(e) => return Err(access_error(path, &e)),
        Ok(_) => {}
    }
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| {
            TlsError(format!(
                "Unable to load certificate {}: {e}",
                path.display()
            ))
        })?
        .collect();
    let certs = certs.map_err(|e| {
        TlsError(format!(
            "Unable to load certificate {}: {e}",
            path.display()
        ))
    })?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "Unable to load certificate {}: no certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

impl X509Creds {
    /// Reads DIR/ca-cert.pem, the optional DIR/ca-crl.pem, and this end's certificate
    /// and key (server-cert.pem and server-key.pem, or client-cert.pem and
    /// client-key.pem), as QEMU does when the object is created.
    pub fn load(dir: &Path, endpoint: Endpoint, verify_peer: bool) -> Result<Self, TlsError> {
        let ca = load_certs(&cred_path(dir, "ca-cert.pem"), true)?;
        let crl_path = cred_path(dir, "ca-crl.pem");
        let crls = match std::fs::metadata(&crl_path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(access_error(&crl_path, &e)),
            Ok(_) => CertificateRevocationListDer::pem_file_iter(&crl_path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    TlsError(format!(
                        "Unable to load revocation list {}: {e}",
                        crl_path.display()
                    ))
                })?,
        };
        let (cert_name, key_name, required) = match endpoint {
            Endpoint::Server => ("server-cert.pem", "server-key.pem", true),
            Endpoint::Client => ("client-cert.pem", "client-key.pem", false),
        };
        let cert_path = cred_path(dir, cert_name);
        let key_path = cred_path(dir, key_name);
        let chain = load_certs(&cert_path, required)?;
        let identity = if chain.is_empty() {
            None
        } else {
            if let Err(e) = std::fs::metadata(&key_path) {
                return Err(access_error(&key_path, &e));
            }
            let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
                TlsError(format!(
                    "Unable to load private key {}: {e}",
                    key_path.display()
                ))
            })?;
            Some((chain, Arc::new(key)))
        };
        let creds = Self {
            endpoint,
            verify_peer,
            dir: dir.to_path_buf(),
            ca,
            crls,
            identity,
        };
        // Building the configuration checks the key against the certificate and the
        // CA list now, rather than at the first connection.
        match endpoint {
            Endpoint::Server => {
                creds.server_config(None)?;
            }
            Endpoint::Client => {
                creds.client_config()?;
            }
        }
        Ok(creds)
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).map_err(|e| {
                TlsError(format!(
                    "Unable to import CA certificate list {}: {e}",
                    cred_path(&self.dir, "ca-cert.pem").display()
                ))
            })?;
        }
        Ok(Arc::new(roots))
    }

    /// The configuration of a source's handshake.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?;
        let builder = if self.verify_peer {
            let verifier = WebPkiServerVerifier::builder_with_provider(self.roots()?, provider)
                .with_crls(self.crls.clone())
                .build()
                .map_err(|e| TlsError(format!("Unable to set up certificate checks: {e}")))?;
            builder.with_webpki_verifier(verifier)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoPeerCheck(provider)))
        };
        let mut config = match &self.identity {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| TlsError(format!("Unable to use the client certificate: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        config.enable_sni = false;
        Ok(Arc::new(config))
    }

    /// The configuration of a destination's handshake. With `authz`, the client's
    /// subject is checked inside the handshake, so a refused client gets an alert.
    pub fn server_config(&self, authz: Option<Arc<Authz>>) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?;
        let builder = if self.verify_peer {
            let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider)
                .with_crls(self.crls.clone())
                .build()
                .map_err(|e| TlsError(format!("Unable to set up certificate checks: {e}")))?;
            match authz {
                Some(authz) => builder.with_client_cert_verifier(Arc::new(AuthzVerifier {
                    inner: verifier,
                    authz,
                })),
                None => builder.with_client_cert_verifier(verifier),
            }
        } else {
            builder.with_no_client_auth()
        };
        let (chain, key) = self.identity.as_ref().ok_or_else(|| {
            TlsError(format!(
                "Unable to access credentials {}: No such file or directory",
                cred_path(&self.dir, "server-cert.pem").display()
            ))
        })?;
        let mut config = builder
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| TlsError(format!("Unable to use the server certificate: {e}")))?;
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `verify-peer=off` on a client: any certificate is taken, but the handshake's
/// signatures are still checked against it.
#[derive(Debug)]
struct NoPeerCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoPeerCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What a source needs to secure each of its channels.
#[derive(Debug, Clone)]
pub struct ClientSetup {
    config: Arc<ClientConfig>,
    hostname: ServerName<'static>,
}

impl ClientSetup {
    /// `hostname`: `tls-hostname`, else the host of a `tcp:` URI. Without one, a
    /// client that checks its peer cannot go on (QEMU's text).
    pub fn new(creds: &X509Creds, hostname: Option<&str>) -> Result<Self, TlsError> {
        let hostname = match hostname.filter(|h| !h.is_empty()) {
            Some(h) => ServerName::try_from(h.to_string())
                .map_err(|_| TlsError(format!("Certificate does not match the hostname {h}")))?,
            None if creds.verify_peer => {
                return Err(TlsError("No hostname for certificate validation".into()))
            }
            // Never checked, since the peer's certificate is not.
            None => ServerName::try_from("migration").expect("a valid DNS name"),
        };
        Ok(Self {
            config: creds.client_config()?,
            hostname,
        })
    }

    fn shown_hostname(&self) -> String {
        self.hostname.to_str().into_owned()
    }
}

/// What a destination needs to secure each incoming channel.
#[derive(Debug, Clone)]
pub struct ServerSetup {
    config: Arc<ServerConfig>,
    /// `tls-authz` without `verify-peer`: no client certificate is asked for, so the
    /// check, made after the handshake, finds none to allow. (With `verify-peer` the
    /// handshake itself checks.)
    authz_without_certificate: bool,
}

impl ServerSetup {
    pub fn new(creds: &X509Creds, authz: Option<Arc<Authz>>) -> Result<Self, TlsError> {
        Ok(Self {
            authz_without_certificate: authz.is_some() && !creds.verify_peer,
            config: creds.server_config(authz)?,
        })
    }
}

/// A client certificate refused by `tls-authz`, carried through rustls's error.
#[derive(Debug)]
struct AuthzDenied(String);

impl std::fmt::Display for AuthzDenied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TLS x509 authz check for {} is denied", self.0)
    }
}

impl std::error::Error for AuthzDenied {}

/// The CA's checks, then the `tls-authz` check of the certificate's subject.
#[derive(Debug)]
struct AuthzVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    authz: Arc<Authz>,
}

impl ClientCertVerifier for AuthzVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let dn = x509_name::subject_dn(end_entity).unwrap_or_default();
        if self.authz.is_allowed(&dn) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(AuthzDenied(dn))),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Runs a source's handshake on `socket`.
pub fn handshake_client(
    socket: OwnedFd,
    setup: &ClientSetup,
    cancel: &AtomicBool,
) -> Result<Session, TlsError> {
    let conn = ClientConnection::new(setup.config.clone(), setup.hostname.clone())
        .map_err(|e| TlsError(format!("TLS handshake failed: {e}")))?;
    let mut conn = Connection::from(conn);
    run_handshake(&mut conn, &socket, cancel).map_err(|e| describe(e, &setup.shown_hostname()))?;
    Ok(Session { conn, socket })
}

/// Runs a destination's handshake on `socket`, then its `tls-authz` check.
pub fn handshake_server(
    socket: OwnedFd,
    setup: &ServerSetup,
    cancel: &AtomicBool,
) -> Result<Session, TlsError> {
    let conn = ServerConnection::new(setup.config.clone())
        .map_err(|e| TlsError(format!("TLS handshake failed: {e}")))?;
    let mut conn = Connection::from(conn);
    run_handshake(&mut conn, &socket, cancel).map_err(|e| describe(e, ""))?;
    if setup.authz_without_certificate {
        return Err(TlsError(
            "TLS x509 authz check needs a client certificate, and the peer sent none".into(),
        ));
    }
    Ok(Session { conn, socket })
}

enum HandshakeFailure {
    Tls(rustls::Error),
    Io(io::Error),
    Closed,
    TimedOut,
    Cancelled,
}

fn run_handshake(
    conn: &mut Connection,
    socket: &OwnedFd,
    cancel: &AtomicBool,
) -> Result<(), HandshakeFailure> {
    let slice = Some(Duration::from_millis(200));
    let set_timeouts = |t: Option<Duration>| {
        use rustix::net::sockopt::{set_socket_timeout, Timeout};
        let _ = set_socket_timeout(socket, Timeout::Recv, t);
        let _ = set_socket_timeout(socket, Timeout::Send, t);
    };
    set_timeouts(slice);
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut io = SocketIo(socket.as_fd());
    let result = loop {
        if !conn.is_handshaking() && !conn.wants_write() {
            break Ok(());
        }
        if cancel.load(Ordering::Relaxed) {
            break Err(HandshakeFailure::Cancelled);
        }
        match conn.complete_io(&mut io) {
            Ok((0, 0)) if conn.is_handshaking() => break Err(HandshakeFailure::Closed),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() >= deadline {
                    break Err(HandshakeFailure::TimedOut);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let tls = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .cloned();
                break Err(match tls {
                    Some(t) => HandshakeFailure::Tls(t),
                    None if e.kind() == io::ErrorKind::UnexpectedEof => HandshakeFailure::Closed,
                    None => HandshakeFailure::Io(e),
                });
            }
        }
    };
    set_timeouts(None);
    result
}

/// The message for a failed handshake, in QEMU's words where GnuTLS has some.
fn describe(f: HandshakeFailure, hostname: &str) -> TlsError {
    let text = match f {
        HandshakeFailure::Tls(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("Certificate does not match the hostname {hostname}")
            }
            CertificateError::UnknownIssuer => "The certificate hasn't got a known issuer".into(),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "The certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "The certificate is not yet activated".into()
            }
            CertificateError::Revoked => "The certificate has been revoked".into(),
            CertificateError::Other(other) => match other.0.downcast_ref::<AuthzDenied>() {
                Some(denied) => denied.to_string(),
                None => format!("The certificate is not trusted: {other}"),
            },
            other => format!("The certificate is not trusted: {other:?}"),
        },
        HandshakeFailure::Tls(rustls::Error::NoCertificatesPresented) => {
            "Verify failed: No certificate was found.".into()
        }
        HandshakeFailure::Tls(e) => format!("TLS handshake failed: {e}"),
        HandshakeFailure::Closed => {
            "TLS handshake failed: The TLS connection was non-properly terminated.".into()
        }
        HandshakeFailure::Io(e) => {
            format!("TLS handshake failed: {}", crate::errno::errno_text(&e))
        }
        HandshakeFailure::TimedOut => format!(
            "TLS handshake failed: the peer did not answer within {} s",
            HANDSHAKE_TIMEOUT.as_secs()
        ),
        HandshakeFailure::Cancelled => "TLS handshake cancelled".into(),
    };
    TlsError(text)
}

pub(crate) use crate::channels::tls_relay::SocketIo;
pub use crate::channels::tls_relay::{relay, RelayDone, Session};

/// Secures an outgoing channel: handshake, then a relay in front of it. `ch.fd`
/// becomes the plaintext end.
pub fn secure_outgoing(
    ch: &mut crate::channels::transport::Channel,
    setup: &ClientSetup,
    cancel: &AtomicBool,
    name: &str,
) -> Result<(), TlsError> {
    secure(ch, name, |socket| handshake_client(socket, setup, cancel))
}

/// Secures an incoming channel, as [`secure_outgoing`] does an outgoing one.
pub fn secure_incoming(
    ch: &mut crate::channels::transport::Channel,
    setup: &ServerSetup,
    name: &str,
) -> Result<(), TlsError> {
    secure(ch, name, |socket| {
        handshake_server(socket, setup, &AtomicBool::new(false))
    })
}

fn secure(
    ch: &mut crate::channels::transport::Channel,
    name: &str,
    handshake: impl FnOnce(OwnedFd) -> Result<Session, TlsError>,
) -> Result<(), TlsError> {
    if !ch.is_socket {
        return Err(TlsError(
            "TLS needs a socket transport (tcp:, unix: or a socket fd:)".into(),
        ));
    }
    let socket = ch
        .fd
        .try_clone()
        .map_err(|e| TlsError(format!("TLS handshake failed: {e}")))?;
    let session = handshake(socket)?;
    let (fd, done) =
        relay(session, name).map_err(|e| TlsError(format!("cannot start the TLS relay: {e}")))?;
    ch.fd = fd;
    ch.tls_relay = Some(done);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::transport::Channel;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    /// A CA, a server certificate for localhost and a client certificate, written in
    /// the layout tls-creds-x509 reads; returns (server dir, client dir).
    fn pki(tag: &str) -> (PathBuf, PathBuf) {
        let root = std::env::temp_dir().join(format!("vmigrate-tls-{tag}-{}", std::process::id()));
        let (srv, cli) = (root.join("server"), root.join("client"));
        std::fs::create_dir_all(&srv).unwrap();
        std::fs::create_dir_all(&cli).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.distinguished_name
            .push(DnType::CommonName, format!("test CA {tag}"));
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issue = |names: Vec<String>, usage, dn: &[(DnType, &str)]| {
            let mut p = CertificateParams::new(names).unwrap();
            p.extended_key_usages = vec![usage];
            p.distinguished_name = rcgen::DistinguishedName::new();
            for (t, v) in dn {
                p.distinguished_name.push(t.clone(), *v);
            }
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = issue(
            vec!["localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            &[(DnType::CommonName, "localhost")],
        );
        let (client_cert, client_key) = issue(
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            &[
                (DnType::CountryName, "GB"),
                (DnType::OrganizationName, "vmigrate, tests"),
                (DnType::CommonName, "client"),
            ],
        );
        for dir in [&srv, &cli] {
            std::fs::write(dir.join("ca-cert.pem"), ca_cert.pem()).unwrap();
        }
        std::fs::write(srv.join("server-cert.pem"), server_cert).unwrap();
        std::fs::write(srv.join("server-key.pem"), server_key).unwrap();
        std::fs::write(cli.join("client-cert.pem"), client_cert).unwrap();
        std::fs::write(cli.join("client-key.pem"), client_key).unwrap();
        (srv, cli)
    }

    fn channel(fd: OwnedFd) -> Channel {
        Channel {
            fd,
            child: None,
            is_socket: true,
            base_offset: 0,
            tls_relay: None,
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    /// Starts a server that secures one connection and returns what it read, or the
    /// handshake's error.
    fn serve(setup: ServerSetup) -> (u16, std::thread::JoinHandle<Result<Vec<u8>, TlsError>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut ch = channel(OwnedFd::from(s));
            secure_incoming(&mut ch, &setup, "test")?;
            let mut got = Vec::new();
            std::fs::File::from(ch.fd).read_to_end(&mut got).unwrap();
            Ok(got)
        });
        (port, t)
    }

    fn connect(port: u16, setup: &ClientSetup) -> Result<Channel, TlsError> {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut ch = channel(OwnedFd::from(s));
        secure_outgoing(&mut ch, setup, &AtomicBool::new(false), "test")?;
        Ok(ch)
    }

    #[test]
    fn a_stream_crosses_intact_and_the_relay_reports_success() {
        let (srv, cli) = pki("ok");
        let server = X509Creds::load(&srv, Endpoint::Server, true).unwrap();
        let client = X509Creds::load(&cli, Endpoint::Client, true).unwrap();
        let allowed = Arc::new(Authz::Simple {
            identity: "C=GB,O=vmigrate\\, tests,CN=client".into(),
        });
        let (port, t) = serve(ServerSetup::new(&server, Some(allowed)).unwrap());
        let mut ch = connect(port, &ClientSetup::new(&client, Some("localhost")).unwrap()).unwrap();
        let data = pattern(8 << 20);
        let mut f = std::fs::File::from(ch.fd.try_clone().unwrap());
        f.write_all(&data).unwrap();
        drop(f);
        rustix::net::shutdown(&ch.fd, rustix::net::Shutdown::Both).unwrap();
        let relay = ch.tls_relay.take().unwrap();
        drop(ch);
        assert_eq!(relay.wait(Duration::from_secs(20)), Some(Ok(())));
        let got = t.join().unwrap().unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "the stream changed on the way");
    }

    #[test]
    fn a_refused_client_fails_on_both_sides_with_the_subject_named() {
        let (srv, cli) = pki("authz");
        let server = X509Creds::load(&srv, Endpoint::Server, true).unwrap();
        let client = X509Creds::load(&cli, Endpoint::Client, true).unwrap();
        let other = Arc::new(Authz::Simple {
            identity: "CN=someone-else".into(),
        });
        let (port, t) = serve(ServerSetup::new(&server, Some(other)).unwrap());
        let setup = ClientSetup::new(&client, Some("localhost")).unwrap();
        // TLS 1.3: the client is done before the server has checked its certificate,
        // so the refusal reaches it as an alert, through the relay's outcome.
        let outcome = match connect(port, &setup) {
            Err(e) => Err(e.to_string()),
            Ok(mut ch) => {
                let _ = std::fs::File::from(ch.fd.try_clone().unwrap()).write_all(b"QEVM");
                rustix::net::shutdown(&ch.fd, rustix::net::Shutdown::Both).unwrap();
                let relay = ch.tls_relay.take().unwrap();
                relay
                    .wait(Duration::from_secs(20))
                    .unwrap()
                    .map_err(|e| e.to_string())
            }
        };
        let err = outcome.unwrap_err();
        assert!(err.contains("alert"), "{err}");
        assert_eq!(
            t.join().unwrap().unwrap_err().0,
            "TLS x509 authz check for C=GB,O=vmigrate\\, tests,CN=client is denied"
        );
    }

    #[test]
    fn certificate_checks_fail_with_qemus_texts() {
        let (srv, cli) = pki("names");
        let server = X509Creds::load(&srv, Endpoint::Server, true).unwrap();
        let client = X509Creds::load(&cli, Endpoint::Client, true).unwrap();
        let (port, t) = serve(ServerSetup::new(&server, None).unwrap());
        let wrong = ClientSetup::new(&client, Some("other.example")).unwrap();
        assert_eq!(
            connect(port, &wrong).unwrap_err().0,
            "Certificate does not match the hostname other.example"
        );
        assert!(t.join().unwrap().is_err());
        assert_eq!(
            ClientSetup::new(&client, None).unwrap_err().0,
            "No hostname for certificate validation"
        );
        // A server whose CA the client does not know.
        let (other_srv, _) = pki("names-other");
        let stranger = X509Creds::load(&other_srv, Endpoint::Server, true).unwrap();
        let (port, t) = serve(ServerSetup::new(&stranger, None).unwrap());
        let setup = ClientSetup::new(&client, Some("localhost")).unwrap();
        assert_eq!(
            connect(port, &setup).unwrap_err().0,
            "The certificate hasn't got a known issuer"
        );
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn a_cancelled_handshake_returns_at_once() {
        let (_, cli) = pki("cancel");
        let client = X509Creds::load(&cli, Endpoint::Client, true).unwrap();
        let setup = ClientSetup::new(&client, Some("localhost")).unwrap();
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(silent.local_addr().unwrap()).unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        let t0 = Instant::now();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            c.store(true, Ordering::Relaxed);
        });
        let fd = OwnedFd::from(s);
        let raw = fd.as_raw_fd();
        let err = handshake_client(fd, &setup, &cancel).unwrap_err();
        assert_eq!(err.0, "TLS handshake cancelled", "fd {raw}");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn missing_files_are_named() {
        let (srv, _) = pki("missing");
        std::fs::remove_file(srv.join("server-key.pem")).unwrap();
        let e = X509Creds::load(&srv, Endpoint::Server, true).unwrap_err();
        assert_eq!(
            e.0,
            format!(
                "Unable to access credentials {}: No such file or directory",
                srv.join("server-key.pem").display()
            )
        );
        // a client's certificate and key are optional
        let dir = srv.parent().unwrap().join("ca-only");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(srv.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
        assert!(X509Creds::load(&dir, Endpoint::Client, true).is_ok());
        std::fs::write(dir.join("ca-cert.pem"), "not a certificate").unwrap();
        assert!(X509Creds::load(&dir, Endpoint::Client, true)
            .unwrap_err()
            .0
            .contains("ca-cert.pem"));
    }
}
