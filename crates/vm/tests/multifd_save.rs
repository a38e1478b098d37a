//! Golden checks of the multifd streams vmigrate writes: where the sync points go and
//! what marks them, per round (MULTIFD_FLUSH) and per section (the RAM EOS), as QEMU
//! 10.0 writes them (the `cap_mf` and `cap_mf_persec` captures).

use std::io::Read;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use vmigrate_engine::channels::Address;
use vmigrate_engine::{
    EventBus, IncomingMode, MigrationProperties, MigrationStatus, Migrator, RunState,
};
use vmigrate_stream::multifd::{packet_len, PacketHeader, INIT_LEN};
use vmigrate_vm::{LabConfig, Machine, MachineConfig, MachineKind};

const PAGE: u64 = 4096;

/// What one outgoing migration put on each connection.
struct Captured {
    main: Vec<u8>,
    channels: Vec<Vec<u8>>,
}

/// Migrates a stopped 64 MiB `none` machine with pages 0-3 and 100 filled over 2
/// uncompressed multifd channels to a listener that records every connection.
fn capture_save(properties: MigrationProperties) -> Captured {
    let machine = Arc::new(
        Machine::new(
            &MachineConfig {
                kind: MachineKind::None,
                memory: 64 << 20,
                mem_path: None,
                share: false,
                ram_id: "m0".into(),
                uuid: None,
                initial: RunState::Paused,
                lab: LabConfig::default(),
            },
            EventBus::new(),
        )
        .unwrap(),
    );
    for page in [0u64, 1, 2, 3, 100] {
        machine.write_physical(page * PAGE, &vec![page as u8 + 1; PAGE as usize]);
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let readers = std::thread::spawn(move || {
        let mut threads = Vec::new();
        for _ in 0..3 {
            let (mut conn, _) = listener.accept().unwrap();
            threads.push(std::thread::spawn(move || {
                let mut bytes = Vec::new();
                conn.read_to_end(&mut bytes).unwrap();
                bytes
            }));
        }
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect::<Vec<_>>()
    });
    let migrator = Migrator::new(machine.clone(), EventBus::new(), IncomingMode::Disabled);
    migrator.set_properties(properties);
    migrator
        .set_capabilities(&json!([{"capability": "multifd", "state": true}]))
        .unwrap();
    let params = json!({"multifd-channels": 2, "max-bandwidth": 0});
    migrator
        .set_parameters(params.as_object().unwrap())
        .unwrap();
    let addr = Address::parse_uri(&format!("tcp:127.0.0.1:{port}")).unwrap();
    migrator.migrate(addr, false, None).unwrap();
    let t0 = Instant::now();
    while migrator.status() != MigrationStatus::Completed {
        assert!(
            !matches!(migrator.status(), MigrationStatus::Failed),
            "{}",
            migrator.query_migrate()
        );
        assert!(t0.elapsed() < Duration::from_secs(30), "migration hangs");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut conns = readers.join().unwrap();
    let main = conns
        .iter()
        .position(|c| c.starts_with(b"QEVM"))
        .expect("a main stream");
    Captured {
        main: conns.remove(main),
        channels: conns,
    }
}

/// SYNC packets on one uncompressed channel, checking that the packets fill it exactly.
fn sync_packets(channel: &[u8]) -> u64 {
    let mut at = INIT_LEN;
    let mut syncs = 0;
    while at < channel.len() {
        let h = PacketHeader::decode(&channel[at..at + packet_len(PAGE)], PAGE, 0).unwrap();
        at += packet_len(PAGE) + h.next_packet_size as usize;
        syncs += u64::from(h.is_sync());
    }
    assert_eq!(at, channel.len(), "the channel ends inside a packet");
    syncs
}

/// (MULTIFD_FLUSH records, RAM EOS records) of a main stream, which must be complete.
fn main_stream_markers(main: &[u8]) -> (u64, u64) {
    let report = vmigrate_inspect::inspect(main, 0);
    assert!(report.is_complete(), "{:?}", report.error);
    let ram = report.ram.expect("a ram section");
    assert_eq!(ram.normal_pages(), 0, "pages belong on the channels");
    (ram.multifd_flushes, ram.eos)
}

#[test]
fn per_section_save_marks_each_sync_point_with_the_eos_only() {
    let properties = MigrationProperties {
        multifd_flush_after_each_section: true,
    };
    let cap = capture_save(properties);
    let (flushes, eos) = main_stream_markers(&cap.main);
    assert_eq!(flushes, 0, "no MULTIFD_FLUSH in per-section mode");
    // Setup, at least one PART, END.
    assert!(eos >= 3, "{eos} RAM EOS records");
    assert_eq!(cap.channels.len(), 2);
    for channel in &cap.channels {
        assert_eq!(
            sync_packets(channel),
            eos,
            "one SYNC per RAM EOS on every channel"
        );
    }
}

#[test]
fn per_round_save_marks_each_sync_point_with_a_flush() {
    let cap = capture_save(MigrationProperties::default());
    let (flushes, _) = main_stream_markers(&cap.main);
    // Setup, and at least the completion pass.
    assert!(flushes >= 2, "{flushes} MULTIFD_FLUSH records");
    for channel in &cap.channels {
        assert_eq!(sync_packets(channel), flushes, "one SYNC per MULTIFD_FLUSH");
    }
}

#[test]
fn the_counts_match_qemu_captures() {
    // The same checks on QEMU's own streams, per round (3 FLUSH, 3 SYNC per channel) and
    // per section (no FLUSH, 4 EOS, 4 SYNC per channel).
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/qemu-oracle/captures");
    let read = |p: &str| std::fs::read(dir.join(p)).unwrap();
    let (flushes, _) = main_stream_markers(&read("cap_mf/conn0.c2s"));
    assert_eq!(flushes, 3);
    for c in ["cap_mf/conn1.c2s", "cap_mf/conn2.c2s"] {
        assert_eq!(sync_packets(&read(c)), flushes, "{c}");
    }
    let (flushes, eos) = main_stream_markers(&read("cap_mf_persec/conn0.c2s"));
    assert_eq!((flushes, eos), (0, 4));
    for c in ["cap_mf_persec/conn1.c2s", "cap_mf_persec/conn2.c2s"] {
        assert_eq!(sync_packets(&read(c)), eos, "{c}");
    }
}
