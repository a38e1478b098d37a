use serde_json::{json, Value};

use super::*;

fn timeline(status: &str, downtime: Option<u64>) -> Value {
    let samples: Vec<Value> = (0..30u64)
        .map(|i| {
            json!({"t-ms": i * 100, "transferred": (i * 10) << 20,
                   "remaining": (30 - i) << 20, "dirty-rate": 5 << 20,
                   "bandwidth": 100 << 20, "pass": 1 + i / 10,
                   "throttle": if i > 20 { 20 } else { 0 }, "status": "active"})
        })
        .collect();
    json!({
        "version": 1, "sample-period-ms": 100, "samples": samples,
        "events": [
            {"t-ms": 0, "event": "status", "status": "setup"},
            {"t-ms": 3, "event": "pass", "pass": 1},
            {"t-ms": 5, "event": "status", "status": "active"},
            {"t-ms": 1000, "event": "pass", "pass": 2},
            {"t-ms": 2000, "event": "pass", "pass": 3},
            {"t-ms": 2800, "event": "status", "status": "device"},
            {"t-ms": 2900, "event": "status", "status": status},
        ],
        "summary": {"status": status, "transferred": 304087040u64, "total-ram": 536870912u64,
                    "page-size": 4096, "normal-pages": 70000, "duplicate-pages": 60000,
                    "passes": 3, "setup-time-ms": 4, "downtime-ms": downtime,
                    "total-time-ms": 2901, "mbps": 800.5},
    })
}

#[test]
fn page_has_the_summary_and_charts() {
    let page = render(&timeline("completed", Some(97))).unwrap();
    assert!(!page.contains("<script"));
    // Nothing from the network: the only address is the SVG namespace.
    assert_eq!(
        page.matches("http").count(),
        page.matches("xmlns=\"http://www.w3.org/2000/svg\"").count()
    );
    // Three charts, and the throttle chart because the throttle was on.
    assert_eq!(page.matches("<svg ").count(), 4);
    assert_eq!(page.matches("</svg>").count(), 4);
    assert!(page.contains("id=\"transferred\">304087040 bytes"));
    assert!(page.contains("id=\"downtime\">97 ms"));
    assert!(page.contains("switchover: stop, 97 ms downtime"));
    assert_eq!(page.matches("class=\"switchover\"").count(), 4);
    assert_eq!(page.matches("class=\"pass\"").count(), 3 * 4);
    assert!(page.contains("MiB/s") && page.contains("time since migrate (s)"));
}

#[test]
fn running_migration_and_hostile_text() {
    let page = render(&timeline("<b>&", None)).unwrap();
    assert!(page.contains("&lt;b&gt;&amp;"));
    assert!(!page.contains("<b>&"));
    assert!(page.contains("id=\"downtime\">-"));
}

#[test]
fn bad_documents_name_what_is_missing() {
    let mut t = timeline("completed", Some(1));
    t["summary"].as_object_mut().unwrap().remove("transferred");
    let e = render(&t).unwrap_err().to_string();
    assert!(e.contains("summary.transferred"), "{e}");
    let mut t = timeline("completed", Some(1));
    t["version"] = json!(2);
    assert!(matches!(render(&t), Err(ReportError::Version(2))));
    assert!(render(&json!([])).is_err());
    t["version"] = json!(1);
    t["samples"][3]["t-ms"] = json!("soon");
    assert!(render(&t)
        .unwrap_err()
        .to_string()
        .contains("samples[].t-ms"));
}

#[test]
fn empty_timeline_still_renders() {
    let t = json!({"version": 1, "samples": [], "events": [],
        "summary": {"status": "setup", "transferred": 0, "total-ram": 0, "page-size": 4096,
        "normal-pages": 0, "duplicate-pages": 0, "passes": 0, "setup-time-ms": 0,
        "downtime-ms": null, "total-time-ms": 0, "mbps": 0}});
    let page = render(&t).unwrap();
    assert_eq!(page.matches("<svg ").count(), 3);
    assert!(!page.contains("NaN") && !page.contains("inf"));
}
