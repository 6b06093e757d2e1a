//! One build per image at a time within this process.
//!
//! [`SingleFlight`] wraps any [`Dispatch`]: concurrent requests for the
//! same image key share one call, which runs on its own task, so it goes
//! on (and stores its result) when every client waiting for it has gone.
//! Across processes the queue's claims do the same job; within one, this
//! also spares storage one waiter's polling per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;
use tracing::Instrument;

use super::{Dispatch, DispatchError};
use crate::builder::{BuildError, BuildRequest};
use crate::storage::keys::ImageKey;
use crate::storage::records::ImageRecord;

type Outcome = Option<Result<ImageRecord, DispatchError>>;

pub struct SingleFlight {
    inner: Arc<dyn Dispatch>,
    in_flight: Arc<Mutex<HashMap<ImageKey, watch::Receiver<Outcome>>>>,
}

impl SingleFlight {
    pub fn new(inner: Arc<dyn Dispatch>) -> SingleFlight {
        SingleFlight {
            inner,
            in_flight: Arc::default(),
        }
    }
}

#[async_trait]
impl Dispatch for SingleFlight {
    async fn build(&self, request: BuildRequest) -> Result<ImageRecord, DispatchError> {
        let mut outcome = {
            let mut in_flight = self
                .in_flight
                .lock()
                .expect("the in-flight map is never poisoned");
            let key = request.image_key();
            match in_flight.get(&key) {
                Some(waiting) => waiting.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    in_flight.insert(key.clone(), rx.clone());
                    let inner = self.inner.clone();
                    let map = self.in_flight.clone();
                    // In the span of the request that started it: its log
                    // lines name that request.
                    let span = tracing::Span::current();
                    tokio::spawn(async move {
                        // The call runs on a task of its own so that even a
                        // panic in it ends as an error for the waiters.
                        let result = match tokio::spawn(
                            async move { inner.build(request).await }.instrument(span),
                        )
                        .await
                        {
                            Ok(result) => result,
                            Err(e) => Err(task_failed(e.to_string())),
                        };
                        // Forget the call before announcing it: a later
                        // request then finds the record in storage.
                        map.lock()
                            .expect("the in-flight map is never poisoned")
                            .remove(&key);
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
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
