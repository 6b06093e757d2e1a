//! One build per image at a time within this process, and (for builds
//! that run here) a bounded number of them at once, with a bounded queue.
//!
//! [`SingleFlight`] wraps any [`Dispatch`]: concurrent requests for the
//! same image key share one call, which runs on its own task, so it goes
//! on (and stores its result) when every client waiting for it has gone.
//! Across processes the queue's claims do the same job; within one, this
//! also spares storage one waiter's polling per request.
//!
//! With [`Turns`] ([`SingleFlight::taking_turns`], the local mode), at
//! most `running` calls run at once; the others wait for their turn, at
//! most `waiting` of them, and a request for yet another image is refused
//! at once ([`DispatchError::Busy`]). A call that has not started yet
//! belongs to the requests waiting for it: when the last of them goes (its
//! client gave up), the call is dropped before it did anything, so
//! abandoned requests neither hold a place in the queue nor leave a build
//! behind. Once started, a call runs to its end, waited for or not.
//!
//! ```text
//! request ──> waiting (at most `waiting`; its requests all gone: dropped)
//!                │ a turn is free
//!                v
//!             running (at most `running`; ends whoever waits)
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::{watch, Semaphore};
use tracing::Instrument;

use super::{Dispatch, DispatchError};
use crate::builder::{BuildError, BuildRequest};
use crate::storage::keys::ImageKey;
use crate::storage::records::ImageRecord;

type Outcome = Option<Result<ImageRecord, DispatchError>>;

/// How many calls run at once, and how many may wait for their turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turns {
    pub running: usize,
    pub waiting: usize,
}

pub struct SingleFlight {
    inner: Arc<dyn Dispatch>,
    flights: Arc<Mutex<Flights>>,
    /// The turns, and one permit per call that may run at once.
    turns: Option<(Turns, Arc<Semaphore>)>,
}

/// The calls under way, by image.
#[derive(Default)]
struct Flights {
    by_key: HashMap<ImageKey, Flight>,
    /// Tells a flight from a later one of the same image.
    next_id: u64,
}

struct Flight {
    id: u64,
    outcome: watch::Receiver<Outcome>,
    /// Requests waiting for it now.
    waiters: usize,
    /// Whether the call has begun; until then, its task only waits for
    /// a turn.
    started: bool,
    task: tokio::task::AbortHandle,
}

impl Flights {
    fn waiting(&self) -> usize {
        self.by_key.values().filter(|f| !f.started).count()
    }
}

fn lock(flights: &Mutex<Flights>) -> MutexGuard<'_, Flights> {
    // Nothing panics while holding it; and a guard's drop must not panic.
    flights
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SingleFlight {
    /// Every call starts at once (the queue's dispatch: the builds run
    /// elsewhere).
    pub fn new(inner: Arc<dyn Dispatch>) -> SingleFlight {
        SingleFlight {
            inner,
            flights: Arc::default(),
            turns: None,
        }
    }

    /// Calls take turns: see the module's documentation.
    pub fn taking_turns(inner: Arc<dyn Dispatch>, turns: Turns) -> SingleFlight {
        let permits = Arc::new(Semaphore::new(turns.running.max(1)));
        SingleFlight {
            turns: Some((turns, permits)),
            ..SingleFlight::new(inner)
        }
    }

    /// Joins the flight of `request`'s image, or starts one: the outcome
    /// to wait for, and the waiter (which leaves the flight when dropped).
    fn join(
        &self,
        request: BuildRequest,
    ) -> Result<(watch::Receiver<Outcome>, Waiter), DispatchError> {
        let key = request.image_key();
        let mut flights = lock(&self.flights);
        if let Some(flight) = flights.by_key.get_mut(&key) {
            flight.waiters += 1;
            let waiter = Waiter {
                flights: self.flights.clone(),
                key,
                id: flight.id,
            };
            return Ok((flight.outcome.clone(), waiter));
        }
        if let Some((turns, permits)) = &self.turns {
            // Flights that have not started yet, and are not about to.
            let waiting = flights.waiting();
            if waiting >= turns.waiting + permits.available_permits() {
                tracing::warn!(image = %key, waiting, "build refused: the queue is full");
                return Err(DispatchError::Busy { waiting });
            }
        }
        let id = flights.next_id;
        flights.next_id += 1;
        let (tx, rx) = watch::channel(None);
        let flight = Flying {
            inner: self.inner.clone(),
            flights: self.flights.clone(),
            key: key.clone(),
            id,
            turns: self.turns.clone(),
        };
        // In the span of the request that started it: its log lines name
        // that request.
        let span = tracing::Span::current();
        let task = tokio::spawn(flight.fly(request, tx).instrument(span));
        flights.by_key.insert(
            key.clone(),
            Flight {
                id,
                outcome: rx.clone(),
                waiters: 1,
                // Without turns a call starts at once: never dropped.
                started: self.turns.is_none(),
                task: task.abort_handle(),
            },
        );
        let waiter = Waiter {
            flights: self.flights.clone(),
            key,
            id,
        };
        Ok((rx, waiter))
    }
}

/// What a flight's task needs.
struct Flying {
    inner: Arc<dyn Dispatch>,
    flights: Arc<Mutex<Flights>>,
    key: ImageKey,
    id: u64,
    turns: Option<(Turns, Arc<Semaphore>)>,
}

impl Flying {
    /// Waits for a turn, begins unless dropped meanwhile, makes the call
    /// and announces its outcome.
    async fn fly(self, request: BuildRequest, outcome: watch::Sender<Outcome>) {
        let _turn = match &self.turns {
            Some((turns, permits)) => {
                if permits.available_permits() == 0 {
                    tracing::info!(
                        image = %self.key,
                        max_builds = turns.running,
                        "waiting for a build slot"
                    );
                }
                match permits.clone().acquire_owned().await {
                    Ok(turn) => Some(turn),
                    Err(_) => return,
                }
            }
            None => None,
        };
        {
            let mut flights = lock(&self.flights);
            match flights.by_key.get_mut(&self.key) {
                Some(flight) if flight.id == self.id => flight.started = true,
                // Dropped while it waited: it never starts.
                _ => return,
            }
        }
        // The call runs on a task of its own so that even a panic in it
        // ends as an error for the waiters.
        let inner = self.inner.clone();
        let call = async move { inner.build(request).await }.in_current_span();
        let result = match tokio::spawn(call).await {
            Ok(result) => result,
            Err(e) => Err(task_failed(e.to_string())),
        };
        // Forget the call before announcing it: a later request then finds
        // the record in storage.
        {
            let mut flights = lock(&self.flights);
            if flights
                .by_key
                .get(&self.key)
                .is_some_and(|f| f.id == self.id)
            {
                flights.by_key.remove(&self.key);
            }
        }
        let _ = outcome.send(Some(result));
    }
}

/// A request waiting for a flight. Dropped (the request answered, or its
/// client gone), it leaves the flight; the last to leave a flight that has
/// not started drops it.
struct Waiter {
    flights: Arc<Mutex<Flights>>,
    key: ImageKey,
    id: u64,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut flights = lock(&self.flights);
        let Some(flight) = flights.by_key.get_mut(&self.key) else {
            return;
        };
        if flight.id != self.id {
            return;
        }
        flight.waiters -= 1;
        if flight.waiters == 0 && !flight.started {
            if let Some(flight) = flights.by_key.remove(&self.key) {
                flight.task.abort();
            }
            tracing::info!(image = %self.key, "build dropped: every pull waiting for it left before it started");
        }
    }
}

#[async_trait]
impl Dispatch for SingleFlight {
    async fn build(&self, request: BuildRequest) -> Result<ImageRecord, DispatchError> {
        let (mut outcome, _waiter) = self.join(request)?;
        let done = outcome
            .wait_for(Option::is_some)
            .await
            .map_err(|_| task_failed("the build task stopped without a result".to_string()))?;
        done.clone().expect("wait_for returned a finished outcome")
    }
}

/// A build task that panicked or vanished: logged, and reported like any
/// other internal build failure.
fn task_failed(message: String) -> DispatchError {
    // Logged (as an internal error) by the conversion.
    DispatchError::from(BuildError::Task(message))
}
