//! The timeline document, read from its JSON form.

use serde_json::Value;

use crate::ReportError;

/// The version of the document this reader knows.
const VERSION: u64 = 1;

/// The figures at one moment; rates in bytes per second.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Seconds since the migration started.
    pub t: f64,
    pub transferred: u64,
    pub remaining: u64,
    pub dirty_rate: u64,
    pub bandwidth: u64,
    pub pass: u64,
    pub throttle: u64,
    pub status: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    Status(String),
    Pass(u64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Seconds since the migration started.
    pub t: f64,
    pub kind: EventKind,
}

/// The figures of `query-migrate` when the timeline was read.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub status: String,
    pub transferred: u64,
    pub total_ram: u64,
    pub page_size: u64,
    pub normal_pages: u64,
    pub duplicate_pages: u64,
    pub passes: u64,
    pub setup_ms: u64,
    /// Known once the migration ended.
    pub downtime_ms: Option<u64>,
    pub total_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    pub sample_period_ms: u64,
    pub samples: Vec<Sample>,
    pub events: Vec<Event>,
    pub summary: Summary,
}

fn get<'a>(v: &'a Value, key: &str, path: &str) -> Result<&'a Value, ReportError> {
    v.get(key)
        .ok_or_else(|| ReportError::Missing(format!("{path}{key}")))
}

fn u64_of(v: &Value, key: &str, path: &str) -> Result<u64, ReportError> {
    get(v, key, path)?
        .as_u64()
        .ok_or_else(|| ReportError::Missing(format!("{path}{key} (an unsigned number)")))
}

fn str_of(v: &Value, key: &str, path: &str) -> Result<String, ReportError> {
    Ok(get(v, key, path)?
        .as_str()
        .ok_or_else(|| ReportError::Missing(format!("{path}{key} (a string)")))?
        .to_string())
}

fn array_of<'a>(v: &'a Value, key: &str) -> Result<&'a Vec<Value>, ReportError> {
    get(v, key, "")?
        .as_array()
        .ok_or_else(|| ReportError::Missing(format!("{key} (an array)")))
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

impl Timeline {
    pub fn from_json(v: &Value) -> Result<Self, ReportError> {
        let version = u64_of(v, "version", "")?;
        if version != VERSION {
            return Err(ReportError::Version(version));
        }
        let samples = array_of(v, "samples")?
            .iter()
            .map(|s| {
                let p = "samples[].";
                Ok(Sample {
                    t: seconds(u64_of(s, "t-ms", p)?),
                    transferred: u64_of(s, "transferred", p)?,
                    remaining: u64_of(s, "remaining", p)?,
                    dirty_rate: u64_of(s, "dirty-rate", p)?,
                    bandwidth: u64_of(s, "bandwidth", p)?,
                    pass: u64_of(s, "pass", p)?,
                    throttle: u64_of(s, "throttle", p)?,
                    status: str_of(s, "status", p)?,
                })
            })
            .collect::<Result<Vec<_>, ReportError>>()?;
        let events = array_of(v, "events")?
            .iter()
            .map(|e| {
                let p = "events[].";
                let t = seconds(u64_of(e, "t-ms", p)?);
                let kind = match str_of(e, "event", p)?.as_str() {
                    "pass" => EventKind::Pass(u64_of(e, "pass", p)?),
                    _ => EventKind::Status(str_of(e, "status", p)?),
                };
                Ok(Event { t, kind })
            })
            .collect::<Result<Vec<_>, ReportError>>()?;
        let s = get(v, "summary", "")?;
        let p = "summary.";
        let summary = Summary {
            status: str_of(s, "status", p)?,
            transferred: u64_of(s, "transferred", p)?,
            total_ram: u64_of(s, "total-ram", p)?,
            page_size: u64_of(s, "page-size", p)?,
            normal_pages: u64_of(s, "normal-pages", p)?,
            duplicate_pages: u64_of(s, "duplicate-pages", p)?,
            passes: u64_of(s, "passes", p)?,
            setup_ms: u64_of(s, "setup-time-ms", p)?,
            downtime_ms: s.get("downtime-ms").and_then(Value::as_u64),
            total_ms: u64_of(s, "total-time-ms", p)?,
        };
        Ok(Self {
            sample_period_ms: v
                .get("sample-period-ms")
                .and_then(Value::as_u64)
                .unwrap_or(100),
            samples,
            events,
            summary,
        })
    }
}
