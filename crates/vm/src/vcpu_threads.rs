//! Which host thread runs which vCPU: each vCPU thread records its thread id when it
//! starts, so that postcopy-blocktime can tell a vCPU's page fault from anyone else's.

use std::sync::atomic::{AtomicU32, Ordering};

/// The thread id of each vCPU's thread, by vCPU index (0 until the thread started).
#[derive(Debug)]
pub struct VcpuThreadIds {
    ids: Vec<AtomicU32>,
}

impl VcpuThreadIds {
    pub fn new(vcpus: usize) -> Self {
        Self {
            ids: (0..vcpus).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Called on vCPU `index`'s own thread.
    pub fn record_current(&self, index: usize) {
        if let Some(slot) = self.ids.get(index) {
            let tid = current_thread_id();
            slot.store(tid, Ordering::Release);
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Every vCPU's thread id, by index.
    pub fn snapshot(&self) -> Vec<u32> {
        self.ids.iter().map(|t| t.load(Ordering::Acquire)).collect()
    }

    /// The vCPU whose thread is `thread_id`.
    pub fn index_of(&self, thread_id: u32) -> Option<usize> {
        if thread_id == 0 {
            return None;
        }
        self.ids
            .iter()
            .position(|t| t.load(Ordering::Acquire) == thread_id)
    }
}

/// The calling thread's host thread id.
fn current_thread_id() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    tid as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_thread_is_found_by_its_id() {
        let ids = std::sync::Arc::new(VcpuThreadIds::new(2));
        assert_eq!(ids.index_of(0), None);
        let t = ids.clone();
        let tid = std::thread::spawn(move || {
            t.record_current(1);
            super::current_thread_id()
        })
        .join()
        .unwrap();
        assert_eq!(ids.index_of(tid), Some(1));
        assert_eq!(ids.len(), 2);
        assert_eq!(ids.snapshot(), [0, tid]);
    }
}
