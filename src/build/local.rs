//! In-process builds with the local Nix, one per image at a time.
//!
//! Concurrent requests for the same image key share one build; the build
//! runs on its own task, so it goes on (and stores its result) when every
//! client waiting for it has gone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;

use super::{BuildError, BuildRequest, Builder, Dispatch, ImageRecord};

type Outcome = Option<Result<ImageRecord, Arc<BuildError>>>;

pub struct LocalDispatch {
    builder: Arc<Builder>,
    in_flight: Arc<Mutex<HashMap<String, watch::Receiver<Outcome>>>>,
}

impl LocalDispatch {
    pub fn new(builder: Builder) -> LocalDispatch {
        LocalDispatch { builder: Arc::new(builder), in_flight: Arc::default() }
    }
}

#[async_trait]
impl Dispatch for LocalDispatch {
    async fn build(&self, request: BuildRequest) -> Result<ImageRecord, Arc<BuildError>> {
        let mut outcome = {
            let mut in_flight = self.in_flight.lock().expect("the in-flight map is never poisoned");
            match in_flight.get(&request.image_key) {
                Some(waiting) => waiting.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    in_flight.insert(request.image_key.clone(), rx.clone());
                    let builder = self.builder.clone();
                    let map = self.in_flight.clone();
                    tokio::spawn(async move {
                        let key = request.image_key.clone();
                        // The build runs on a task of its own so that even a
                        // panic in it ends as an error for the waiters.
                        let result = match tokio::spawn(async move { builder.build(&request).await }).await {
                            Ok(result) => result.map_err(Arc::new),
                            Err(e) => Err(Arc::new(BuildError::Task(e.to_string()))),
                        };
                        // Forget the build before announcing it: a later
                        // request then finds the record in storage.
                        map.lock().expect("the in-flight map is never poisoned").remove(&key);
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        let done = outcome
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Arc::new(BuildError::Task("the build task stopped without a result".to_string())))?;
        done.clone().expect("wait_for returned a finished outcome")
    }
}
