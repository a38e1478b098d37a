//! A migration timeline (the engine's `x-vmigrate-query-migrate-timeline`) as one
//! self-contained HTML page: a summary table and SVG charts of bandwidth and dirty rate,
//! remaining bytes and bytes sent over time, with the dirty-bitmap passes, the status
//! changes and the switchover (stop to restart, the downtime) marked. No script, no
//! style sheet or font from elsewhere: the page opens offline in any browser.
//!
//! The SVG is written by hand ([`chart`]): three line charts on one time axis need
//! little more than a polyline, ticks and labels, and doing it here keeps the output
//! exact (text as text, numbers as the timeline has them) and the build free of a
//! plotting library and its font stack.
//!
//! ```
//! let timeline = serde_json::json!({
//!     "version": 1, "sample-period-ms": 100,
//!     "samples": [
//!         {"t-ms": 0, "transferred": 0, "remaining": 1000, "dirty-rate": 0,
//!          "bandwidth": 0, "pass": 1, "throttle": 0, "status": "active"},
//!         {"t-ms": 100, "transferred": 1100, "remaining": 0, "dirty-rate": 0,
//!          "bandwidth": 11000, "pass": 2, "throttle": 0, "status": "completed"}],
//!     "events": [{"t-ms": 50, "event": "status", "status": "device"}],
//!     "summary": {"status": "completed", "transferred": 1100, "total-ram": 1000,
//!                 "page-size": 4096, "normal-pages": 0, "duplicate-pages": 0,
//!                 "passes": 2, "setup-time-ms": 1, "downtime-ms": 7,
//!                 "total-time-ms": 100, "mbps": 0.088}});
//! let page = vmigrate_report::render(&timeline).unwrap();
//! assert!(page.contains("<svg") && !page.contains("<script"));
//! ```

pub mod chart;
mod timeline;

pub use timeline::{Event, EventKind, Sample, Summary, Timeline};

use chart::{Chart, Markers, Series};

/// Why a timeline could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("the timeline has no '{0}' (is it the output of x-vmigrate-query-migrate-timeline?)")]
    Missing(String),
    #[error("timeline format version {0} is not known (this vmigrate reads version 1)")]
    Version(u64),
}

const MIB: f64 = (1u64 << 20) as f64;

/// Renders the page for a timeline in its JSON form.
pub fn render(json: &serde_json::Value) -> Result<String, ReportError> {
    Ok(render_timeline(&Timeline::from_json(json)?))
}

/// Renders the page for a parsed timeline.
pub fn render_timeline(t: &Timeline) -> String {
    let markers = Markers::of(t);
    let end = t
        .samples
        .last()
        .map_or(0.0, |s| s.t)
        .max(t.summary.total_ms as f64 / 1000.0)
        .max(markers.switchover.map_or(0.0, |(_, e)| e));
    let series = |name: &'static str, color: &'static str, f: &dyn Fn(&Sample) -> f64| Series {
        name,
        color,
        points: t.samples.iter().map(|s| (s.t, f(s))).collect(),
    };
    // Remaining and dirty rate are known from the first dirty-bitmap pass on.
    let synced = |name: &'static str, color: &'static str, f: &dyn Fn(&Sample) -> f64| Series {
        name,
        color,
        points: t
            .samples
            .iter()
            .filter(|s| s.pass > 0)
            .map(|s| (s.t, f(s)))
            .collect(),
    };
    let mut charts = vec![
        Chart {
            title: "Bandwidth and dirty rate",
            y_label: "MiB/s",
            x_max: end,
            series: vec![
                series("bandwidth (sent)", "#1f6fb4", &|s| s.bandwidth as f64 / MIB),
                synced("dirty rate (guest)", "#d1495b", &|s| {
                    s.dirty_rate as f64 / MIB
                }),
            ],
        },
        Chart {
            title: "Remaining dirty RAM",
            y_label: "MiB",
            x_max: end,
            series: vec![synced("remaining", "#7a4fb0", &|s| {
                s.remaining as f64 / MIB
            })],
        },
        Chart {
            title: "Bytes sent",
            y_label: "MiB",
            x_max: end,
            series: vec![series("sent (cumulative)", "#2a9d8f", &|s| {
                s.transferred as f64 / MIB
            })],
        },
    ];
    if t.samples.iter().any(|s| s.throttle > 0) {
        charts.push(Chart {
            title: "auto-converge throttle",
            y_label: "%",
            x_max: end,
            series: vec![series("vCPU throttle", "#e07a1f", &|s| s.throttle as f64)],
        });
    }
    let mut html = String::new();
    html.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>vmigrate migration report</title>\n<style>\n\
         body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1140px; }\n\
         h1 { font-size: 22px; margin-bottom: 4px; }\n\
         p.sub { color: #555; margin-top: 0; }\n\
         table { border-collapse: collapse; margin: 12px 0 20px; }\n\
         td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: left; font-size: 14px; }\n\
         th { background: #f3f3f3; font-weight: normal; color: #444; }\n\
         td.num { font-variant-numeric: tabular-nums; }\n\
         </style>\n</head>\n<body>\n",
    );
    html.push_str("<h1>vmigrate migration report</h1>\n");
    html.push_str(&format!(
        "<p class=\"sub\">Outgoing migration, {}: {} samples every {} ms, {} events. \
         Shaded band: the switchover, from the stop to the end of the downtime; \
         dotted lines: dirty-bitmap passes.</p>\n",
        escape(&t.summary.status),
        t.samples.len(),
        t.sample_period_ms,
        t.events.len(),
    ));
    html.push_str(&summary_table(t, &markers));
    for c in &charts {
        html.push_str(&chart::render(c, &markers));
        html.push('\n');
    }
    html.push_str("</body>\n</html>\n");
    html
}

fn summary_table(t: &Timeline, markers: &Markers) -> String {
    let s = &t.summary;
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / MIB);
    let mut rows: Vec<(&str, &str, String)> = vec![
        ("status", "status", escape(&s.status)),
        ("total time", "total-time", format!("{} ms", s.total_ms)),
        ("setup time", "setup-time", format!("{} ms", s.setup_ms)),
        (
            "downtime",
            "downtime",
            s.downtime_ms.map_or("-".to_string(), |d| format!("{d} ms")),
        ),
        (
            "bytes sent",
            "transferred",
            format!("{} bytes ({})", s.transferred, mib(s.transferred)),
        ),
        (
            "guest RAM",
            "total-ram",
            format!("{} bytes ({})", s.total_ram, mib(s.total_ram)),
        ),
        (
            "pages sent",
            "pages",
            format!(
                "{} normal, {} zero ({} byte pages)",
                s.normal_pages, s.duplicate_pages, s.page_size
            ),
        ),
        ("dirty-bitmap passes", "passes", s.passes.to_string()),
        (
            "mean bandwidth",
            "mean-bandwidth",
            if s.total_ms > 0 {
                format!(
                    "{:.1} MiB/s",
                    s.transferred as f64 / MIB / (s.total_ms as f64 / 1000.0)
                )
            } else {
                "-".to_string()
            },
        ),
    ];
    if let Some((stop, _)) = markers.switchover {
        rows.push(("switchover at", "switchover", format!("{stop:.3} s")));
    }
    let mut out = String::from("<table>\n");
    for (label, id, value) in rows {
        out.push_str(&format!(
            "<tr><th>{label}</th><td class=\"num\" id=\"{id}\">{value}</td></tr>\n"
        ));
    }
    out.push_str("</table>\n");
    out
}

/// Escapes text for HTML and SVG.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests;
