//! Golden tests: the precopy streams captured from QEMU 10.0.2 load into the reference
//! VM with the engine's loader; guest RAM ends up as the capture's fill pattern, and the
//! return-path bytes the loader sends equal the ones QEMU's destination sent.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::json;
use vmigrate_engine::channels::ReturnPathWriter;
use vmigrate_engine::incoming::{load_stream, LoadError};
use vmigrate_engine::io::FdSource;
use vmigrate_engine::options::Capabilities;
use vmigrate_engine::{EventBus, MultifdSync, RunState, Vmm};
use vmigrate_vm::{LabConfig, Machine, MachineConfig, MachineKind};

fn capture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/qemu-oracle/captures")
        .join(name)
}

fn machine(ram_id: &str, mib: u64) -> Machine {
    Machine::new(
        &MachineConfig {
            kind: MachineKind::None,
            memory: mib << 20,
            mem_path: None,
            share: false,
            ram_id: ram_id.into(),
            uuid: None,
            initial: RunState::InMigrate,
            lab: LabConfig::default(),
        },
        EventBus::new(),
    )
    .unwrap()
}

/// Page `i` of the captures' fill: byte j = (i*7 + j) & 0xff, first 4 bytes = be32 i.
fn fill_page(i: u32) -> Vec<u8> {
    let mut p: Vec<u8> = (0..4096u32).map(|j| ((i * 7 + j) & 0xff) as u8).collect();
    p[..4].copy_from_slice(&i.to_be_bytes());
    p
}

fn assert_ram(m: &Machine, mib: u64, filled: &[std::ops::RangeInclusive<u32>]) {
    let mut page = vec![0u8; 4096];
    for i in 0..((mib << 20) / 4096) as u32 {
        assert!(m.read_physical(u64::from(i) * 4096, &mut page));
        if filled.iter().any(|r| r.contains(&i)) {
            assert_eq!(page, fill_page(i), "page {i}");
        } else {
            assert!(page.iter().all(|b| *b == 0), "page {i} should be zero");
        }
    }
}

#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<u8>>>);

impl Write for Collect {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn load(
    m: &Machine,
    name: &str,
    caps: &Capabilities,
    rp: Option<Collect>,
) -> Result<vmigrate_engine::incoming::LoadOutcome, LoadError> {
    let file = std::fs::File::open(capture(name)).unwrap();
    let mut src = FdSource::new(file.into(), 0);
    load_stream(
        &mut src,
        m,
        caps,
        rp.map(|c| ReturnPathWriter::new(Box::new(c))),
        None,
    )
}

#[test]
fn none_bin_loads() {
    let m = machine("ram", 8);
    let out = load(&m, "none.bin", &Capabilities::default(), None).unwrap();
    assert_eq!(out.runstate.as_deref(), Some("paused"));
    assert_eq!(out.zero_pages, 2048);
    assert_eq!(out.normal_pages, 0);
    assert_ram(&m, 8, &[]);
}

#[test]
fn base_bin_loads_its_pages() {
    let m = machine("m0", 8);
    let out = load(&m, "base.bin", &Capabilities::default(), None).unwrap();
    assert_eq!((out.normal_pages, out.zero_pages), (4, 2044));
    assert_ram(&m, 8, &[0..=3]);
    assert_eq!(out.vmdesc_note, None);
}

#[test]
fn zero_records_clear_pages_that_held_data() {
    let m = machine("m0", 8);
    m.write_physical(4 * 4096, &[0xaa; 4096]);
    m.write_physical(0, &[0x55; 100]);
    load(&m, "base.bin", &Capabilities::default(), None).unwrap();
    assert_ram(&m, 8, &[0..=3]);
}

#[test]
fn return_path_capture_loads_and_answers_like_qemu() {
    let m = machine("m0", 64);
    let caps = Capabilities::default()
        .merged(
            &json!([{"capability": "return-path", "state": true},
                    {"capability": "switchover-ack", "state": true}]),
            false,
            &vmigrate_engine::options::Parameters::default(),
        )
        .unwrap();
    let rp = Collect::default();
    load(&m, "cap_rp/conn0.c2s", &caps, Some(rp.clone())).unwrap();
    assert_ram(&m, 64, &[0..=3]);
    let qemu = std::fs::read(capture("cap_rp/conn0.s2c")).unwrap();
    assert_eq!(*rp.0.lock().unwrap(), qemu);
}

#[test]
fn return_path_without_a_way_back_fails() {
    let m = machine("m0", 64);
    let e = load(&m, "cap_rp/conn0.c2s", &Capabilities::default(), None).unwrap_err();
    assert!(e.to_string().contains("return-path"), "{e}");
}

#[test]
fn captures_vmigrate_cannot_take_yet_fail_with_a_reason() {
    let cases = [
        (
            "none_slirp.bin",
            "ram",
            8,
            "Unknown savevm section or instance 'slirp' 0",
        ),
        (
            "uuid_is.bin",
            "m0",
            8,
            "Capability x-ignore-shared is off, but received capability is on",
        ),
        (
            "mr.bin",
            "m0",
            8,
            "Capability mapped-ram is off, but received capability is on",
        ),
        (
            "xbzrle.bin",
            "pc.ram",
            64,
            "Machine type received is 'pc-i440fx-10.0' and local is 'none'",
        ),
    ];
    for (name, id, mib, want) in cases {
        let m = machine(id, mib);
        let e = load(&m, name, &Capabilities::default(), None).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(want), "{name}: {text}");
        assert!(text.contains("at byte offset"), "{name}: {text}");
    }
}

#[test]
fn truncated_capture_reports_where_it_ended() {
    let m = machine("m0", 8);
    let data = std::fs::read(capture("base.bin")).unwrap();
    let dir = std::env::temp_dir().join(format!("vmigrate-golden-{}", std::process::id()));
    std::fs::write(&dir, &data[..20000]).unwrap();
    let mut src = FdSource::new(std::fs::File::open(&dir).unwrap().into(), 0);
    let e = load_stream(&mut src, &m, &Capabilities::default(), None, None).unwrap_err();
    let _ = std::fs::remove_file(&dir);
    let text = e.to_string();
    assert!(text.contains("stream ended early"), "{text}");
    assert!(text.contains("at byte offset 2"), "{text}");
    assert_eq!(m.ram_blocks().len(), 1);
}

/// Loads a multifd capture: the main stream and its channels, through the engine's
/// multifd receiver, with the channels' init packets checked first.
fn load_multifd(
    dir: &str,
    channels: usize,
    method: vmigrate_engine::compress::Method,
    uuid: [u8; 16],
) -> Machine {
    let m = machine("m0", 64);
    load_multifd_into(&m, dir, channels, method, uuid, MultifdSync::PerRound).unwrap();
    m
}

fn load_multifd_into(
    m: &Machine,
    dir: &str,
    channels: usize,
    method: vmigrate_engine::compress::Method,
    uuid: [u8; 16],
    sync: MultifdSync,
) -> Result<vmigrate_engine::incoming::LoadOutcome, LoadError> {
    use std::os::fd::OwnedFd;
    use vmigrate_engine::incoming::read_init;
    use vmigrate_engine::incoming::MultifdChannels;
    let mut fds: Vec<Option<OwnedFd>> = (0..channels).map(|_| None).collect();
    for conn in 1..=channels {
        let f = std::fs::File::open(capture(&format!("{dir}/conn{conn}.c2s"))).unwrap();
        let fd = OwnedFd::from(f);
        let id = read_init(&fd, uuid, channels).unwrap() as usize;
        fds[id] = Some(fd);
    }
    let main = std::fs::File::open(capture(&format!("{dir}/conn0.c2s"))).unwrap();
    let mut src = FdSource::new(main.into(), 0);
    let mf = MultifdChannels {
        fds: fds.into_iter().map(Option::unwrap).collect(),
        method,
        sync,
    };
    load_stream(&mut src, m, &Capabilities::default(), None, Some(mf))
}

#[test]
fn multifd_captures_load_through_the_receiver() {
    use vmigrate_engine::compress::Method;
    let full = [0..=3, 100..=100, 200..=460];
    for (dir, method) in [
        ("cap_mf", Method::None),
        ("cap_mf_zlib", Method::Zlib),
        ("cap_mf_zstd", Method::Zstd),
    ] {
        let m = load_multifd(dir, 2, method, [0; 16]);
        assert_ram(&m, 64, &full);
    }
    let m = load_multifd("cap_mf_zplegacy", 2, Method::None, [0; 16]);
    assert_ram(&m, 64, &[0..=3, 100..=100]);
    let uuid = vmigrate_stream::config::parse_uuid("12345678-9abc-def0-1122-334455667788").unwrap();
    let m = load_multifd("cap_mf_uuid", 3, Method::None, uuid);
    assert_ram(&m, 64, &[0..=3]);
}

#[test]
fn per_section_capture_loads_with_flush_after_each_section() {
    // QEMU with `-global migration.multifd-flush-after-each-section=on`: no
    // MULTIFD_FLUSH, every RAM EOS (4) is a sync point, 4 SYNC packets per channel.
    let m = machine("m0", 64);
    let out = load_multifd_into(
        &m,
        "cap_mf_persec",
        2,
        vmigrate_engine::compress::Method::None,
        [0; 16],
        MultifdSync::PerSection,
    )
    .unwrap();
    assert_eq!(out.runstate.as_deref(), Some("paused"));
    assert_ram(&m, 64, &[0..=3, 100..=100]);
}

#[test]
fn per_round_capture_fails_fast_when_loaded_per_section() {
    // Each RAM EOS waits for one more SYNC than the source sent: the channels end
    // before the last sync point, and the error says which setting to check.
    let m = machine("m0", 64);
    let t0 = std::time::Instant::now();
    let e = load_multifd_into(
        &m,
        "cap_mf",
        2,
        vmigrate_engine::compress::Method::None,
        [0; 16],
        MultifdSync::PerSection,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("multifd-flush-after-each-section"), "{e}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{e}");
}

#[test]
fn multifd_handshake_checks_uuid_and_id() {
    use std::os::fd::OwnedFd;
    use vmigrate_engine::incoming::{read_init, MultifdHandshakeError};
    let open = |p: &str| OwnedFd::from(std::fs::File::open(capture(p)).unwrap());
    let e = read_init(&open("cap_mf_uuid/conn1.c2s"), [0; 16], 3).unwrap_err();
    assert!(
        matches!(e, MultifdHandshakeError::UuidMismatch { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("uuid"), "{e}");
    // Channel id 1 with only one channel configured.
    let e = read_init(&open("cap_mf/conn2.c2s"), [0; 16], 1).unwrap_err();
    assert!(
        matches!(
            e,
            MultifdHandshakeError::ChannelIdOutOfRange { id: 1, channels: 1 }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("channel id"), "{e}");
}

/// The postcopy capture's main stream, replayed over a socket into a destination with
/// postcopy-ram: precopy, DISCARD, the package (LISTEN, devices, PING, RUN), then the
/// listen thread places the rest. The capture's source pushed every page, so nothing
/// needs to be asked for; RAM ends as the fill and the return path ends with SHUT 0.
#[test]
fn cap_pc_replays_into_a_postcopy_destination() {
    use std::os::unix::net::UnixStream;
    use vmigrate_engine::incoming::{load_stream_postcopy, MappedRamLoad, PostcopyHooks};
    use vmigrate_stream::return_path::RpMessage;
    use vmigrate_stream::SliceSource;

    if let Err(e) = vmigrate_engine::uffd::available() {
        eprintln!("SKIP postcopy test: userfaultfd is not usable here: {e}");
        return;
    }
    let m = machine("m0", 8);
    let caps = Capabilities::default()
        .merged(
            &json!([{"capability": "postcopy-ram", "state": true}]),
            false,
            &vmigrate_engine::options::Parameters::default(),
        )
        .unwrap();
    let bytes = std::fs::read(capture("cap_pc/conn0.c2s")).unwrap();
    let (dst, mut source) = UnixStream::pair().unwrap();
    let feeder = std::thread::spawn(move || {
        // The socket's far end stays open until the loader is done with it.
        source.write_all(&bytes).unwrap();
        source
    });
    let rp = Collect::default();
    let listened = std::sync::atomic::AtomicBool::new(false);
    let runs = Mutex::new(Vec::new());
    let on_listen = |_: &Arc<vmigrate_engine::incoming::PostcopyIncoming>| -> Result<(), String> {
        listened.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    };
    let on_run = |r: Option<&str>| runs.lock().unwrap().push(r.map(str::to_string));
    let hooks = PostcopyHooks {
        on_listen: &on_listen,
        on_run: &on_run,
        recovery: None,
    };
    let mut src = FdSource::new(dst.into(), 0);
    let out = load_stream_postcopy(
        &mut src,
        &m,
        &caps,
        Some(ReturnPathWriter::new(Box::new(rp.clone()))),
        None,
        MappedRamLoad::default(),
        Some(&hooks),
    )
    .unwrap();
    drop(feeder.join().unwrap());
    assert!(listened.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(*runs.lock().unwrap(), vec![Some("paused".to_string())]);
    let pc = out.postcopy.expect("the load ended in postcopy");
    assert_eq!(
        pc.requests, 0,
        "nothing read guest RAM, so nothing was asked for"
    );
    assert_ram(&m, 8, &[0..=500]);
    // PONG 1-4 in some order (PING 3 is in the package), then SHUT 0.
    let sent = rp.0.lock().unwrap().clone();
    let mut s = SliceSource::new(&sent);
    let mut msgs = Vec::new();
    while msgs.len() < 16 {
        match RpMessage::decode(&mut s) {
            Ok(msg) => msgs.push(msg),
            Err(_) => break,
        }
    }
    let mut pongs: Vec<u32> = msgs
        .iter()
        .filter_map(|m| match m {
            RpMessage::Pong(v) => Some(*v),
            _ => None,
        })
        .collect();
    pongs.sort_unstable();
    assert_eq!(pongs, vec![1, 2, 3, 4]);
    assert_eq!(msgs.last(), Some(&RpMessage::Shut(0)));
}

/// A machine whose RAM block is the shared file `path`, as the destination of an
/// x-ignore-shared migration maps it.
fn shared_machine(ram_id: &str, mib: u64, path: &std::path::Path) -> Machine {
    Machine::new(
        &MachineConfig {
            kind: MachineKind::None,
            memory: mib << 20,
            mem_path: Some(path.to_path_buf()),
            share: true,
            ram_id: ram_id.into(),
            uuid: None,
            initial: RunState::InMigrate,
            lab: LabConfig::default(),
        },
        EventBus::new(),
    )
    .unwrap()
}

fn ignore_shared_caps() -> Capabilities {
    Capabilities::default()
        .merged(
            &json!([{"capability": "x-ignore-shared", "state": true}]),
            false,
            &vmigrate_engine::options::Parameters::default(),
        )
        .unwrap()
}

/// The shared file as the capture's source left it: pages 0-3 filled.
fn shared_file(tag: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("vmigrate-is-{tag}-{}", std::process::id()));
    let mut data = vec![0u8; 8 << 20];
    for i in 0..4u32 {
        data[i as usize * 4096..][..4096].copy_from_slice(&fill_page(i));
    }
    std::fs::write(&path, &data).unwrap();
    path
}

#[test]
fn ignore_shared_capture_loads_into_the_same_shared_file() {
    let path = shared_file("ok");
    let m = shared_machine("m0", 8, &path);
    let out = load(&m, "uuid_is.bin", &ignore_shared_caps(), None);
    let _ = std::fs::remove_file(&path);
    let out = out.unwrap();
    assert_eq!(
        out.normal_pages + out.zero_pages,
        0,
        "no page is sent for a shared block"
    );
    assert_ram(&m, 8, &[0..=3]);
}

#[test]
fn ignore_shared_block_at_another_address_fails_like_qemu() {
    let mut data = std::fs::read(capture("uuid_is.bin")).unwrap();
    // The block entry: counted "m0", be64 length 0x800000, be64 address 0.
    let mut entry = vec![2u8, b'm', b'0'];
    entry.extend_from_slice(&0x80_0000u64.to_be_bytes());
    let at = data
        .windows(entry.len())
        .position(|w| w == entry.as_slice())
        .expect("block entry in the capture")
        + entry.len();
    assert_eq!(data[at..at + 8], [0u8; 8], "the capture's address is 0");
    data[at..at + 8].copy_from_slice(&0x1000u64.to_be_bytes());
    let stream = std::env::temp_dir().join(format!("vmigrate-is-stream-{}", std::process::id()));
    std::fs::write(&stream, &data).unwrap();
    let path = shared_file("gpa");
    let m = shared_machine("m0", 8, &path);
    let mut src = FdSource::new(std::fs::File::open(&stream).unwrap().into(), 0);
    let e = load_stream(&mut src, &m, &ignore_shared_caps(), None, None).unwrap_err();
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&stream);
    assert!(
        e.to_string()
            .contains("Mismatched GPAs for block m0 4096!= 0"),
        "{e}"
    );
}
