//! Jobs (`query-jobs`, `job-*`, the `JOB_STATUS_CHANGE` event) and the internal-snapshot
//! commands of a VM without block devices, as QEMU 10.0 behaves with `-M none
//! -nodefaults` and no drives.
//!
//! `snapshot-save`, `snapshot-load` and `snapshot-delete` always return `{}`: the
//! command creates a job (`created`, `running`), and right after the reply the job
//! fails (`aborting`, `concluded`) with the error QEMU gives when no block device can
//! hold the snapshot. It stays listed by `query-jobs` until `job-dismiss` (`null`).
//!
//! ```text
//! command ──▶ created ──▶ running ──(after the reply)──▶ aborting ──▶ concluded
//! concluded ──job-dismiss──▶ null (removed)
//! ```
//!
//! A load stops a running VM while the command runs (`restore-vm`) and leaves it
//! stopped, as QEMU does when the load then fails.
//!
//! The internal snapshots of the human monitor (`savevm`, `loadvm`, `delvm`,
//! `info snapshots`) are here too: they fail the same way, with their own texts.

use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};
use vmigrate_engine::{EventBus, RunState, VmControl};

use crate::dispatch::QmpError;

/// What QEMU reports when no block device can take the VM state of a snapshot.
pub const NO_VMSTATE_DEVICE: &str = "no block device can store vmstate for snapshot";

/// The job kinds this VM can create (QEMU's `JobType` has more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobType {
    SnapshotLoad,
    SnapshotSave,
    SnapshotDelete,
}

impl JobType {
    pub fn name(self) -> &'static str {
        match self {
            JobType::SnapshotLoad => "snapshot-load",
            JobType::SnapshotSave => "snapshot-save",
            JobType::SnapshotDelete => "snapshot-delete",
        }
    }
}

/// The statuses a job of this VM goes through (QEMU's `JobStatus` has more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobStatus {
    Created,
    Running,
    Aborting,
    Concluded,
    Null,
}

impl JobStatus {
    fn name(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }
}

/// The `job-*` commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobVerb {
    Cancel,
    Pause,
    Resume,
    Complete,
    Finalize,
    Dismiss,
}

impl JobVerb {
    /// The verb of a `job-<verb>` command name.
    pub fn from_command(command: &str) -> Option<Self> {
        Some(match command.strip_prefix("job-")? {
            "cancel" => JobVerb::Cancel,
            "pause" => JobVerb::Pause,
            "resume" => JobVerb::Resume,
            "complete" => JobVerb::Complete,
            "finalize" => JobVerb::Finalize,
            "dismiss" => JobVerb::Dismiss,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
        }
    }

    /// QEMU's verb table for the statuses a job here can be in.
    fn allowed_in(self, status: JobStatus) -> bool {
        match status {
            JobStatus::Created | JobStatus::Running => {
                matches!(self, JobVerb::Cancel | JobVerb::Pause | JobVerb::Resume)
            }
            JobStatus::Aborting => self == JobVerb::Cancel,
            JobStatus::Concluded => self == JobVerb::Dismiss,
            JobStatus::Null => false,
        }
    }
}

#[derive(Debug)]
struct Job {
    id: String,
    job_type: JobType,
    status: JobStatus,
    error: Option<String>,
}

/// The jobs of one VM, oldest first.
#[derive(Debug)]
pub struct Jobs {
    list: Mutex<Vec<Job>>,
    events: Arc<EventBus>,
}

/// QEMU's rule for ids: a letter, then letters, digits, `-`, `.` or `_`.
fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Arguments of a snapshot command, already checked against its schema.
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    pub job_type: JobType,
    pub job_id: String,
    pub devices: Vec<String>,
}

impl SnapshotRequest {
    /// Why the job fails on a VM without block devices: no device listed, or the first
    /// listed node does not exist.
    fn failure(&self) -> String {
        match self.devices.first() {
            None => "At least one device is required for snapshot".into(),
            Some(node) => format!("No block device node '{node}'"),
        }
    }
}

impl Jobs {
    pub fn new(events: Arc<EventBus>) -> Self {
        Self {
            list: Mutex::new(Vec::new()),
            events,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Job>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_status(&self, id: &str, status: JobStatus) {
        let mut list = self.lock();
        if let Some(job) = list.iter_mut().find(|j| j.id == id) {
            job.status = status;
        }
        if status == JobStatus::Null {
            list.retain(|j| j.id != id);
        }
        drop(list);
        self.events.emit(
            "JOB_STATUS_CHANGE",
            Some(json!({"id": id, "status": status.name()})),
        );
    }

    /// The command part of a snapshot job: creates and starts it. The returned step
    /// runs after the reply and ends the job.
    pub fn start_snapshot(
        self: &Arc<Self>,
        request: SnapshotRequest,
    ) -> Result<impl FnOnce() + Send + 'static, QmpError> {
        let id = request.job_id.clone();
        {
            let mut list = self.lock();
            if !id_wellformed(&id) {
                return Err(QmpError::generic(format!("Invalid job ID '{id}'")));
            }
            if list.iter().any(|j| j.id == id) {
                return Err(QmpError::generic(format!("Job ID '{id}' already in use")));
            }
            list.push(Job {
                id: id.clone(),
                job_type: request.job_type,
                status: JobStatus::Created,
                error: None,
            });
        }
        self.events.emit(
            "JOB_STATUS_CHANGE",
            Some(json!({"id": id, "status": JobStatus::Created.name()})),
        );
        self.set_status(&id, JobStatus::Running);
        let jobs = self.clone();
        Ok(move || {
            let error = request.failure();
            if let Some(job) = jobs.lock().iter_mut().find(|j| j.id == id) {
                job.error = Some(error);
            }
            jobs.set_status(&id, JobStatus::Aborting);
            jobs.set_status(&id, JobStatus::Concluded);
        })
    }

    /// `query-jobs`: newest first.
    pub fn query(&self) -> Value {
        Value::Array(
            self.lock()
                .iter()
                .rev()
                .map(|j| {
                    let mut v = json!({
                        "id": j.id,
                        "type": j.job_type.name(),
                        "status": j.status.name(),
                        "current-progress": 1,
                        "total-progress": 1,
                    });
                    if let Some(e) = &j.error {
                        v["error"] = json!(e);
                    }
                    v
                })
                .collect(),
        )
    }

    /// `job-cancel`, `job-pause`, `job-resume`, `job-complete`, `job-finalize`,
    /// `job-dismiss`. A job here is never paused and never waits for completion, so the
    /// verbs QEMU accepts on a running job change nothing.
    pub fn verb(&self, verb: JobVerb, id: &str) -> Result<(), QmpError> {
        let status = self
            .lock()
            .iter()
            .find(|j| j.id == id)
            .map(|j| j.status)
            .ok_or_else(|| QmpError::generic("Job not found"))?;
        if verb == JobVerb::Resume {
            return Err(QmpError::generic("Can't resume a job that was not paused"));
        }
        if !verb.allowed_in(status) {
            return Err(QmpError::generic(format!(
                "Job '{id}' in state '{}' cannot accept command verb '{}'",
                status.name(),
                verb.name()
            )));
        }
        if verb == JobVerb::Dismiss {
            self.set_status(id, JobStatus::Null);
        }
        Ok(())
    }
}

/// Stops a running VM into `state`; a VM that is not running keeps its state, as with
/// QEMU's `vm_stop`.
pub fn stop_if_running(control: &dyn VmControl, state: RunState) {
    if control.run_state().is_running() {
        control.vm_stop(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event emitted: name and data.
    type Seen = Arc<Mutex<Vec<(String, Value)>>>;

    fn jobs() -> (Arc<Jobs>, Seen) {
        let events = EventBus::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        events.subscribe(move |name, data| {
            s.lock()
                .unwrap()
                .push((name.to_string(), data.cloned().unwrap_or(Value::Null)));
        });
        (Arc::new(Jobs::new(events)), seen)
    }

    fn request(job_type: JobType, id: &str, devices: &[&str]) -> SnapshotRequest {
        SnapshotRequest {
            job_type,
            job_id: id.into(),
            devices: devices.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn a_snapshot_job_fails_after_the_reply_and_waits_for_dismiss() {
        let (jobs, seen) = jobs();
        let finish = jobs
            .start_snapshot(request(JobType::SnapshotSave, "s1", &[]))
            .unwrap();
        assert_eq!(jobs.query()[0]["status"], "running");
        finish();
        assert_eq!(
            jobs.query(),
            json!([{"id": "s1", "type": "snapshot-save", "status": "concluded",
                    "current-progress": 1, "total-progress": 1,
                    "error": "At least one device is required for snapshot"}])
        );
        let statuses: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, d)| d["status"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(statuses, ["created", "running", "aborting", "concluded"]);
        assert_eq!(
            jobs.verb(JobVerb::Cancel, "s1").unwrap_err().desc,
            "Job 's1' in state 'concluded' cannot accept command verb 'cancel'"
        );
        assert_eq!(
            jobs.verb(JobVerb::Resume, "s1").unwrap_err().desc,
            "Can't resume a job that was not paused"
        );
        jobs.verb(JobVerb::Dismiss, "s1").unwrap();
        assert_eq!(jobs.query(), json!([]));
        assert_eq!(
            jobs.verb(JobVerb::Dismiss, "s1").unwrap_err().desc,
            "Job not found"
        );
    }

    #[test]
    fn job_ids_are_checked_and_unique() {
        let (jobs, _) = jobs();
        for bad in ["", "1a", "a b", "#a"] {
            let e = jobs
                .start_snapshot(request(JobType::SnapshotDelete, bad, &[]))
                .err()
                .unwrap();
            assert_eq!(e.desc, format!("Invalid job ID '{bad}'"));
        }
        let finish = jobs
            .start_snapshot(request(JobType::SnapshotLoad, "a-b_c.d", &["x"]))
            .unwrap();
        finish();
        let e = jobs
            .start_snapshot(request(JobType::SnapshotSave, "a-b_c.d", &[]))
            .err()
            .unwrap();
        assert_eq!(e.desc, "Job ID 'a-b_c.d' already in use");
        assert_eq!(jobs.query()[0]["error"], "No block device node 'x'");
    }
}
