//! The local mode's dispatch: the [`Builder`] right here, in this process.
//! Wrap it in [`super::single_flight::SingleFlight`] so that concurrent
//! pulls of one image share one build.

use async_trait::async_trait;

use super::{Dispatch, DispatchError};
use crate::builder::{BuildRequest, Builder};
use crate::storage::records::ImageRecord;

pub struct InProcess {
    builder: Builder,
}

impl InProcess {
    pub fn new(builder: Builder) -> InProcess {
        InProcess { builder }
    }
}

#[async_trait]
impl Dispatch for InProcess {
    async fn build(&self, request: BuildRequest) -> Result<ImageRecord, DispatchError> {
        Ok(self.builder.build(&request, None).await?)
    }
}
