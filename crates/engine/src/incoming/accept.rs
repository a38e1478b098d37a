//! Accepting an incoming migration's connections: the main channel and, with
//! multifd, every channel, told apart by their first bytes; TLS handshakes on each.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::channels::objects::TlsSetupError;
use crate::channels::tls::{self, TlsError};
use crate::channels::transport::Channel;
use crate::channels::transport::{self, Incoming, TransportError};
use crate::compress::Method;
use crate::events::EventBus;
use crate::incoming::load::MultifdChannels;
use crate::incoming::multifd_recv::{read_init, MultifdHandshakeError, HANDSHAKE_TIMEOUT};
use crate::incoming::recover::PostcopyRecovery;
use crate::options::Parameters;
use crate::properties::MultifdSync;
use crate::shared::Shared;
use crate::status::{MigrationStatus, StatusError};

/// How often a wait for a recovery's connection looks for a newer `migrate-recover`.
const RECOVERY_ACCEPT_POLL: Duration = Duration::from_millis(100);

/// Why an incoming migration's connections could not be accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AcceptError {
    /// `tls-creds` or `tls-authz` does not make a TLS setup.
    #[error(transparent)]
    TlsSetup(#[from] TlsSetupError),
    /// Accepting a connection, or reading its first bytes, failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The main connection's TLS handshake failed.
    #[error(transparent)]
    TlsHandshake(#[from] TlsError),
    /// A multifd channel's initial packet is wrong.
    #[error(transparent)]
    MultifdInit(#[from] MultifdHandshakeError),
    #[error("timed out waiting for the multifd channels' handshakes")]
    HandshakeTimeout,
    #[error("a second main migration channel connected")]
    SecondMain,
    #[error("multifd: channel {0} connected twice")]
    ChannelTwice(u8),
}

/// With multifd, accepts the main connection and every channel (in any order),
/// classifying them by their first bytes as QEMU does.
pub(crate) fn accept_channels(
    incoming: &Incoming,
    tls: Option<&tls::ServerSetup>,
    params: &Parameters,
    sync: MultifdSync,
    uuid: [u8; 16],
    events: &EventBus,
) -> Result<(transport::Channel, Option<MultifdChannels>), AcceptError> {
    let n = usize::from(params.multifd_channels());
    let method = Method::from(params.multifd_compression());
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT * 3;
    let mut main = None;
    let mut channels: Vec<Option<std::os::fd::OwnedFd>> = (0..n).map(|_| None).collect();
    // Each new connection is classified on its own thread, so one that stays silent
    // cannot hold up the others.
    let (tx, rx) = std::sync::mpsc::channel::<Result<Classified, AcceptError>>();
    let mut pending = 0usize;
    while main.is_none() || channels.iter().any(Option::is_none) {
        while let Ok(c) = rx.try_recv() {
            pending -= 1;
            place(c?, &mut main, &mut channels, events)?;
        }
        if main.is_some() && channels.iter().all(Option::is_some) {
            break;
        }
        if pending > 0
            && pending + usize::from(main.is_some()) + channels.iter().flatten().count() > n
        {
            // Enough connections are being classified; wait for one to finish.
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(c) => {
                    pending -= 1;
                    place(c?, &mut main, &mut channels, events)?;
                    continue;
                }
                Err(_) => return Err(AcceptError::HandshakeTimeout),
            }
        }
        let mut ch = incoming.accept_more(deadline)?;
        let tx = tx.clone();
        let tls = tls.cloned();
        pending += 1;
        std::thread::spawn(move || {
            let classified = match &tls {
                Some(setup) => match tls::secure_incoming(&mut ch, setup, "in") {
                    Ok(()) => classify(ch, uuid, n),
                    Err(e) => Ok(Classified::Rejected(e)),
                },
                None => classify(ch, uuid, n),
            };
            let _ = tx.send(classified);
        });
    }
    let fds = channels
        .into_iter()
        .map(|c| c.expect("all channels present"))
        .collect();
    Ok((
        main.expect("main channel present"),
        Some(MultifdChannels { fds, method, sync }),
    ))
}

/// Accepts the one connection of a migration without multifd. With TLS, a connection
/// whose handshake fails is reported and the next one awaited, as QEMU does.
pub(crate) fn accept_main(
    incoming: Incoming,
    tls: Option<&tls::ServerSetup>,
    events: &EventBus,
) -> Result<transport::Channel, AcceptError> {
    let Some(setup) = tls else {
        return Ok(incoming.accept()?);
    };
    if let Incoming::Ready(mut ch) = incoming {
        tls::secure_incoming(&mut ch, setup, "main")?;
        return Ok(ch);
    }
    let forever = Instant::now() + std::time::Duration::from_secs(100 * 365 * 86400);
    loop {
        let mut ch = incoming.accept_more(forever)?;
        match tls::secure_incoming(&mut ch, setup, "main") {
            Ok(()) => return Ok(ch),
            Err(e) => events.warn(&e.to_string()),
        }
    }
}

/// A new incoming connection, told apart by its first bytes.
enum Classified {
    Main(transport::Channel),
    Multifd(u8, std::os::fd::OwnedFd),
    /// Its TLS handshake failed: reported, and the connection dropped.
    Rejected(TlsError),
}

fn classify(
    ch: transport::Channel,
    uuid: [u8; 16],
    channels: usize,
) -> Result<Classified, AcceptError> {
    transport::set_read_timeout(&ch.fd, Some(HANDSHAKE_TIMEOUT));
    let head = transport::peek4(&ch.fd)?;
    if head == vmigrate_stream::header::MAGIC.to_be_bytes() {
        transport::set_read_timeout(&ch.fd, None);
        return Ok(Classified::Main(ch));
    }
    let id = read_init(&ch.fd, uuid, channels)?;
    transport::set_read_timeout(&ch.fd, None);
    Ok(Classified::Multifd(id, ch.fd))
}

fn place(
    c: Classified,
    main: &mut Option<transport::Channel>,
    channels: &mut [Option<std::os::fd::OwnedFd>],
    events: &EventBus,
) -> Result<(), AcceptError> {
    match c {
        Classified::Main(ch) => {
            if main.is_some() {
                return Err(AcceptError::SecondMain);
            }
            *main = Some(ch);
        }
        Classified::Rejected(e) => events.warn(&e.to_string()),
        Classified::Multifd(id, fd) => {
            let slot = &mut channels[usize::from(id)];
            if slot.is_some() {
                return Err(AcceptError::ChannelTwice(id));
            }
            *slot = Some(fd);
        }
    }
    Ok(())
}

/// With `postcopy-preempt`: accepts the main connection and keeps listening, for the
/// preempt channel that [`spawn_preempt_acceptor`] takes later.
pub(crate) fn accept_main_keep_listening(
    incoming: &Incoming,
    tls: Option<&tls::ServerSetup>,
    events: &EventBus,
) -> Result<transport::Channel, AcceptError> {
    let forever = Instant::now() + std::time::Duration::from_secs(100 * 365 * 86400);
    loop {
        let mut ch = incoming.accept_more(forever)?;
        let Some(setup) = tls else {
            return Ok(ch);
        };
        match tls::secure_incoming(&mut ch, setup, "main") {
            Ok(()) => return Ok(ch),
            Err(e) => events.warn(&e.to_string()),
        }
    }
}

/// How often the preempt acceptor looks at its stop flag.
const PREEMPT_ACCEPT_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Accepts the postcopy preempt channel: as in QEMU, the next connection after the main
/// one (no handshake bytes; TLS when configured, a failed handshake reported and the
/// next connection awaited). It is sent on `to`; the thread ends then, or when `stop` is
/// set (the migration ended without postcopy). A unix socket's path is removed at the
/// end, as a plain accept removes it.
pub(crate) fn spawn_preempt_acceptor(
    incoming: Incoming,
    tls: Option<tls::ServerSetup>,
    events: std::sync::Arc<EventBus>,
    to: std::sync::mpsc::Sender<transport::Channel>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    use std::sync::atomic::Ordering;
    std::thread::Builder::new()
        .name("mig/dst/preempt-accept".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let Ok(mut ch) = incoming.accept_more(Instant::now() + PREEMPT_ACCEPT_POLL) else {
                    continue;
                };
                if let Some(setup) = &tls {
                    if let Err(e) = tls::secure_incoming(&mut ch, setup, "preempt") {
                        events.warn(&e.to_string());
                        continue;
                    }
                }
                let _ = to.send(ch);
                break;
            }
            if let Incoming::Unix(_, path) = &incoming {
                let _ = std::fs::remove_file(path);
            }
        })
}

/// Postcopy recovery's connections on the destination: pauses the migration and
/// accepts the recovery's main connection on the listener `migrate-recover` opened
/// (and, with preempt, the new preempt channel after it).
pub(crate) struct RecoveryAcceptor<'a> {
    pub shared: &'a Shared,
    pub tls: Option<tls::ServerSetup>,
    pub events: Arc<EventBus>,
    /// `postcopy-preempt`: where the new preempt channel goes, and the flag that stops
    /// its acceptor when the migration ends.
    pub preempt: Option<(Mutex<Sender<Channel>>, Arc<AtomicBool>)>,
}

impl PostcopyRecovery for RecoveryAcceptor<'_> {
    fn pause_and_accept(&self, reason: &str) -> Option<Channel> {
        let from = self.shared.status();
        self.shared.pause_postcopy(from, reason).ok()?;
        loop {
            let listener = self.shared.wait_recovery(|r| r.listener.take());
            if let Some(ch) = self.accept_on(listener) {
                self.shared
                    .transition(
                        MigrationStatus::PostcopyPaused,
                        MigrationStatus::PostcopyRecover,
                    )
                    .ok()?;
                return Some(ch);
            }
        }
    }

    fn resumed(&self) -> Result<(), StatusError> {
        self.shared.transition(
            MigrationStatus::PostcopyRecover,
            MigrationStatus::PostcopyActive,
        )
    }
}

impl RecoveryAcceptor<'_> {
    /// Accepts the recovery's main connection on `listener`; `None` when a newer
    /// `migrate-recover` replaced it (or it failed: reported, and the next
    /// `migrate-recover` awaited). With preempt the listener stays open for the new
    /// preempt channel.
    fn accept_on(&self, listener: Incoming) -> Option<Channel> {
        loop {
            if self.shared.lock().recovery.listener.is_some() {
                return None;
            }
            let mut ch = match listener.accept_more(Instant::now() + RECOVERY_ACCEPT_POLL) {
                Ok(ch) => ch,
                Err(_) => continue,
            };
            if let Some(setup) = &self.tls {
                if let Err(e) = tls::secure_incoming(&mut ch, setup, "main") {
                    self.events.warn(&e.to_string());
                    continue;
                }
            }
            match &self.preempt {
                Some((to, stop)) => {
                    let to = to.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if let Err(e) = spawn_preempt_acceptor(
                        listener,
                        self.tls.clone(),
                        self.events.clone(),
                        to,
                        stop.clone(),
                    ) {
                        self.events
                            .warn(&format!("cannot start the preempt channel's acceptor: {e}"));
                    }
                }
                None => {
                    if let Incoming::Unix(_, path) = &listener {
                        let _ = std::fs::remove_file(path);
                    }
                }
            }
            return Some(ch);
        }
    }
}
