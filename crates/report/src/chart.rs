//! Line charts over time as SVG: axes with ticks and units, one polyline per series, a
//! legend, and the timeline's markers (passes, status changes, the switchover band).

use std::fmt::Write;

use crate::escape;
use crate::timeline::{EventKind, Timeline};

const WIDTH: f64 = 1100.0;
const HEIGHT: f64 = 290.0;
const LEFT: f64 = 84.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 62.0;
const BOTTOM: f64 = 50.0;
/// Closest two marker labels may be, in pixels, before the later one is left out.
const LABEL_GAP: f64 = 30.0;

/// One line of a chart: (seconds, value) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: &'static str,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// A chart over time.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: &'static str,
    /// The unit of the y axis.
    pub y_label: &'static str,
    /// Seconds shown on the x axis.
    pub x_max: f64,
    pub series: Vec<Series>,
}

/// What every chart marks: passes, status changes and the switchover, in seconds.
#[derive(Debug, Clone, Default)]
pub struct Markers {
    pub passes: Vec<(f64, u64)>,
    pub statuses: Vec<(f64, String)>,
    /// From the stop (status `device`) to the end of the downtime.
    pub switchover: Option<(f64, f64)>,
    pub downtime_ms: Option<u64>,
}

impl Markers {
    pub fn of(t: &Timeline) -> Self {
        let mut m = Markers {
            downtime_ms: t.summary.downtime_ms,
            ..Self::default()
        };
        for e in &t.events {
            match &e.kind {
                EventKind::Pass(n) => m.passes.push((e.t, *n)),
                EventKind::Status(s) => m.statuses.push((e.t, s.clone())),
            }
        }
        let stop = m
            .statuses
            .iter()
            .find(|(_, s)| s == "device")
            .map(|(t, _)| *t);
        m.switchover = stop.map(|stop| {
            let end = match t.summary.downtime_ms {
                Some(d) => stop + d as f64 / 1000.0,
                // Not ended yet: up to the next status change, if any.
                None => m
                    .statuses
                    .iter()
                    .find(|(t, s)| *t >= stop && s != "device")
                    .map_or(stop, |(t, _)| *t),
            };
            (stop, end)
        });
        m
    }
}

/// A step of 1, 2 or 5 times a power of ten that cuts `range` into about `target` parts.
pub fn nice_step(range: f64, target: f64) -> f64 {
    let raw = (range / target).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let f = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    f * mag
}

/// A tick value with as many decimals as its step needs.
fn tick_label(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// The chart as an `<svg>` element.
pub fn render(c: &Chart, m: &Markers) -> String {
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x_max = if c.x_max > 0.0 { c.x_max } else { 1.0 };
    let data_max = c
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    let y_step = nice_step(if data_max > 0.0 { data_max } else { 1.0 }, 5.0);
    let y_max = ((data_max / y_step).ceil() * y_step).max(y_step);
    let x_step = nice_step(x_max, 10.0);
    let sx = |t: f64| LEFT + (t / x_max).clamp(0.0, 1.0) * plot_w;
    let sy = |v: f64| TOP + plot_h - (v / y_max).clamp(0.0, 1.0) * plot_h;

    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{}\" \
         font-family=\"sans-serif\" font-size=\"12\">",
        escape(c.title)
    );
    let _ = writeln!(
        s,
        "<rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"#ffffff\"/>"
    );
    let _ = writeln!(
        s,
        "<text x=\"{LEFT}\" y=\"20\" font-size=\"15\" font-weight=\"bold\">{}</text>",
        escape(c.title)
    );

    // The switchover band, under everything else.
    if let Some((stop, end)) = m.switchover {
        let x0 = sx(stop);
        let w = (sx(end) - x0).max(4.0);
        let _ = writeln!(
            s,
            "<rect class=\"switchover\" x=\"{x0:.1}\" y=\"{TOP}\" width=\"{w:.1}\" \
             height=\"{plot_h}\" fill=\"#f4a261\" fill-opacity=\"0.6\"/>"
        );
        let label = match m.downtime_ms {
            Some(d) => format!("switchover: stop, {d} ms downtime"),
            None => "switchover: stop".to_string(),
        };
        // Inside the plot, on the side with room.
        let (anchor, x) = if x0 > LEFT + plot_w * 0.7 {
            ("end", x0 - 4.0)
        } else {
            ("start", x0 + w + 4.0)
        };
        let _ = writeln!(
            s,
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\" fill=\"#b5651d\" \
             font-weight=\"bold\">{}</text>",
            TOP + 16.0,
            escape(&label)
        );
    }

    // Grid and y ticks.
    let mut v = 0.0;
    while v <= y_max + y_step * 1e-6 {
        let y = sy(v);
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#e4e4e4\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + plot_w,
            LEFT - 8.0,
            y + 4.0,
            tick_label(v, y_step)
        );
        v += y_step;
    }
    // x ticks.
    let mut t = 0.0;
    while t <= x_max + x_step * 1e-6 {
        let x = sx(t);
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#888\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            TOP + plot_h,
            TOP + plot_h + 5.0,
            TOP + plot_h + 19.0,
            tick_label(t, x_step)
        );
        t += x_step;
    }
    // Axes and their labels.
    let _ = writeln!(
        s,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" \
         stroke=\"#888\"/>"
    );
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">time since migrate (s)</text>",
        LEFT + plot_w / 2.0,
        HEIGHT - 8.0
    );
    let _ = writeln!(
        s,
        "<text x=\"18\" y=\"{0:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {0:.1})\">{1}</text>",
        TOP + plot_h / 2.0,
        escape(c.y_label)
    );

    // Passes: dotted lines; passes close together share one label.
    let pass_groups = group_close(&m.passes, &sx, LABEL_GAP);
    for (t, _) in &m.passes {
        let x = sx(*t);
        let _ = writeln!(
            s,
            "<line class=\"pass\" x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{:.1}\" \
             stroke=\"#999\" stroke-dasharray=\"2,3\"/>",
            TOP + plot_h
        );
    }
    for (x, group) in &pass_groups {
        let label = match (group.first(), group.last()) {
            (Some(a), Some(b)) if a != b => format!("passes {a}-{b}"),
            (Some(a), _) => format!("pass {a}"),
            _ => continue,
        };
        // At the edges the label runs inwards.
        let anchor = if *x < LEFT + 30.0 {
            "start"
        } else if *x > LEFT + plot_w - 30.0 {
            "end"
        } else {
            "middle"
        };
        let _ = writeln!(
            s,
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\" font-size=\"10\" \
             fill=\"#666\">{label}</text>",
            TOP - 4.0
        );
    }
    // Status changes: a tick above the plot; changes close together share one label.
    for (t, _) in &m.statuses {
        let x = sx(*t);
        let _ = writeln!(
            s,
            "<line class=\"status\" x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{TOP}\" \
             stroke=\"#333\"/>",
            TOP - 16.0
        );
    }
    for (x, group) in group_close(&m.statuses, &sx, LABEL_GAP * 3.0) {
        let label = group.join(", ");
        // Labels near the right edge end at their tick.
        let (anchor, lx) = if x > LEFT + plot_w * 0.85 {
            ("end", x - 2.0)
        } else {
            ("start", x + 2.0)
        };
        let _ = writeln!(
            s,
            "<text x=\"{lx:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\" font-size=\"10\" \
             fill=\"#333\">{}</text>",
            TOP - 18.0,
            escape(&label)
        );
    }

    // Series and the legend.
    for (i, series) in c.series.iter().enumerate() {
        let mut points = String::new();
        for (t, v) in &series.points {
            let _ = write!(points, "{:.1},{:.1} ", sx(*t), sy(*v));
        }
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>",
            series.color,
            points.trim_end()
        );
        let lx = WIDTH - RIGHT - 180.0 * (c.series.len() - i) as f64;
        let _ = writeln!(
            s,
            "<line x1=\"{lx:.1}\" y1=\"16\" x2=\"{:.1}\" y2=\"16\" stroke=\"{}\" stroke-width=\"3\"/>\
             <text x=\"{:.1}\" y=\"20\">{}</text>",
            lx + 22.0,
            series.color,
            lx + 28.0,
            escape(series.name)
        );
    }
    s.push_str("</svg>");
    s
}

/// Marker values whose positions lie within `gap` pixels of the first of their group,
/// as (position of the first, values).
fn group_close<T: Clone + ToString>(
    marks: &[(f64, T)],
    sx: &dyn Fn(f64) -> f64,
    gap: f64,
) -> Vec<(f64, Vec<String>)> {
    let mut groups: Vec<(f64, Vec<String>)> = Vec::new();
    for (t, v) in marks {
        let x = sx(*t);
        match groups.last_mut() {
            Some((first, values)) if x - *first < gap => values.push(v.to_string()),
            _ => groups.push((x, vec![v.to_string()])),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_one_two_five() {
        assert_eq!(nice_step(10.0, 5.0), 2.0);
        assert_eq!(nice_step(100.0, 10.0), 10.0);
        assert_eq!(nice_step(3.0, 10.0), 0.5);
        assert_eq!(nice_step(7000.0, 5.0), 2000.0);
        assert_eq!(tick_label(0.5, 0.5), "0.5");
        assert_eq!(tick_label(2000.0, 2000.0), "2000");
    }
}
