//! Recent builds and build errors seen by this instance, for the landing
//! page. Bounded: the oldest entries fall off.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::oci::name::ImageSpec;
use crate::storage::records::{unix_now as now, ImageRecord};

/// How many of each are kept.
const KEEP: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Unix seconds.
    pub at: u64,
    /// The image, as `pkg/pkg:tag (arch)`.
    pub image: String,
    /// The manifest digest of a build, or the error message of a failure.
    pub outcome: String,
}

#[derive(Debug, Default)]
pub struct Activity {
    builds: Mutex<VecDeque<Event>>,
    errors: Mutex<VecDeque<Event>>,
}

fn push(list: &Mutex<VecDeque<Event>>, event: Event) {
    let mut list = list.lock().expect("never poisoned");
    list.push_front(event);
    list.truncate(KEEP);
}

impl Activity {
    pub fn built(&self, spec: &ImageSpec, record: &ImageRecord) {
        push(
            &self.builds,
            Event {
                at: now(),
                image: spec.to_string(),
                outcome: record.manifest_digest.clone(),
            },
        );
    }

    pub fn failed(&self, spec: &ImageSpec, message: &str) {
        push(
            &self.errors,
            Event {
                at: now(),
                image: spec.to_string(),
                outcome: message.to_string(),
            },
        );
    }

    /// Newest first.
    pub fn builds(&self) -> Vec<Event> {
        self.builds
            .lock()
            .expect("never poisoned")
            .iter()
            .cloned()
            .collect()
    }

    /// Newest first.
    pub fn errors(&self) -> Vec<Event> {
        self.errors
            .lock()
            .expect("never poisoned")
            .iter()
            .cloned()
            .collect()
    }
}
