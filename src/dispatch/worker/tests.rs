//! The worker's policies with a fake inbox and a fake source of store
//! paths: what happens to the message and the status when a build works,
//! fails, meets a full disk, is superseded, or the message lies.

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use async_trait::async_trait;

use super::*;
use crate::builder::fake::FakeStore;
use crate::builder::popularity::Popularity;
use crate::builder::tests::request;
use crate::builder::Failure;
use crate::dispatch::queue::InboxError;
use crate::storage::keys::ImageRecordKey;
use crate::storage::records::ImageRecord;
use crate::storage::MemoryStorage;

/// An inbox that hands out what it is given and notes what is done.
#[derive(Default)]
struct FakeInbox {
    messages: Mutex<Vec<Received>>,
    deleted: Mutex<Vec<String>>,
    hidden: Mutex<Vec<String>>,
}

#[async_trait]
impl Inbox for FakeInbox {
    fn name(&self) -> &str {
        "fake"
    }
    async fn visibility_timeout(&self) -> Result<Option<i32>, InboxError> {
        Ok(Some(60))
    }
    async fn receive(&self) -> Result<Option<Received>, InboxError> {
        Ok(self.messages.lock().unwrap().pop())
    }
    async fn delete(&self, receipt: &str) -> Result<(), InboxError> {
        self.deleted.lock().unwrap().push(receipt.to_string());
        Ok(())
    }
    async fn keep_hidden(&self, receipt: &str, _seconds: i32) -> Result<(), InboxError> {
        self.hidden.lock().unwrap().push(receipt.to_string());
        Ok(())
    }
}

struct Setup {
    storage: Arc<MemoryStorage>,
    store: Arc<FakeStore>,
    inbox: Arc<FakeInbox>,
    worker: Worker,
}

fn setup() -> Setup {
    let storage = Arc::new(MemoryStorage::new());
    let store = Arc::new(
        FakeStore::default()
            .with_package("busybox", &[])
            .with_package("hello", &["busybox"]),
    );
    let builder = Builder::new(
        store.clone(),
        storage.clone(),
        Arc::new(Popularity::none()),
        crate::config::default_limits(),
    );
    let inbox = Arc::new(FakeInbox::default());
    let worker = Worker::new(builder, inbox.clone(), Duration::from_secs(10));
    Setup {
        storage,
        store,
        inbox,
        worker,
    }
}

fn message(request: &crate::builder::BuildRequest, attempt: u32, receipt: &str) -> Received {
    Received {
        body: serde_json::to_string(&QueueMessage {
            request: request.clone(),
            attempt,
        })
        .unwrap(),
        receipt: receipt.to_string(),
    }
}

async fn record(
    storage: &MemoryStorage,
    request: &crate::builder::BuildRequest,
) -> Option<ImageRecord> {
    records::read(storage, &ImageRecordKey::of(&request.image_key()))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_build_is_recorded_done_and_its_message_deleted() {
    let s = setup();
    let hello = request(&["hello"]);
    s.worker.handle(&message(&hello, 1, "r1"), 60).await;
    assert!(record(&s.storage, &hello).await.is_some());
    let status = status::read(&*s.storage, &hello.image_key())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.state, State::Done);
    assert!(status.info.stats.is_some());
    assert_eq!(*s.inbox.deleted.lock().unwrap(), ["r1"]);
    // The message was kept hidden while it built.
    assert!(s.inbox.hidden.lock().unwrap().contains(&"r1".to_string()));
}

#[tokio::test]
async fn a_failed_build_is_recorded_and_its_message_deleted() {
    let s = setup();
    let nope = request(&["nope"]);
    s.worker.handle(&message(&nope, 1, "r1"), 60).await;
    let status = status::read(&*s.storage, &nope.image_key())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.state, State::Failed);
    assert_eq!(
        status.failure,
        Some(Failure::UnknownPackages {
            names: vec!["nope".into()]
        })
    );
    assert_eq!(*s.inbox.deleted.lock().unwrap(), ["r1"]);
}

#[tokio::test]
async fn a_full_disk_leaves_the_message_to_come_back_and_says_why() {
    let s = setup();
    s.store.disk_full.store(1, Ordering::SeqCst);
    let hello = request(&["hello"]);
    s.worker.handle(&message(&hello, 1, "r1"), 60).await;
    assert!(s.inbox.deleted.lock().unwrap().is_empty());
    assert!(record(&s.storage, &hello).await.is_none());
    let status = status::read(&*s.storage, &hello.image_key())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.state, State::Queued);
    assert_eq!(status.step, Some(Step::Retrying));
    let detail = status.info.progress.unwrap().detail.unwrap();
    assert!(detail.contains("disk was full"), "{detail}");
    // The message comes back, and this time it builds.
    s.worker.handle(&message(&hello, 1, "r2"), 60).await;
    assert!(record(&s.storage, &hello).await.is_some());
    assert_eq!(*s.inbox.deleted.lock().unwrap(), ["r2"]);
}

#[tokio::test]
async fn a_superseded_attempt_s_message_is_dropped_unbuilt() {
    let s = setup();
    let hello = request(&["hello"]);
    let newer = BuildStatus::queued(&hello, 2);
    status::write(&*s.storage, &hello.image_key(), &newer)
        .await
        .unwrap();
    s.worker.handle(&message(&hello, 1, "old"), 60).await;
    assert_eq!(*s.inbox.deleted.lock().unwrap(), ["old"]);
    assert_eq!(s.store.realised.load(Ordering::SeqCst), 0);
    assert!(record(&s.storage, &hello).await.is_none());
    // Attempt 2's status stands.
    let status = status::read(&*s.storage, &hello.image_key())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.attempt, 2);
}

#[tokio::test]
async fn a_message_cannot_name_another_image_or_a_future() {
    let s = setup();
    let hello = request(&["hello"]);
    s.worker.handle(&message(&hello, 1, "r0"), 60).await;
    let built = record(&s.storage, &hello).await.unwrap();
    let realised = s.store.realised.load(Ordering::SeqCst);
    // A key for some other image, and a time far in the future, which
    // would make every worker rebuild a current image.
    let mut body = serde_json::to_value(QueueMessage {
        request: hello.clone(),
        attempt: 2,
    })
    .unwrap();
    body["request"]["image_key"] = serde_json::json!("0".repeat(64));
    body["request"]["not_before"] = serde_json::json!(u64::MAX / 2);
    let lying = Received {
        body: body.to_string(),
        receipt: "r1".into(),
    };
    s.worker.handle(&lying, 60).await;
    // The current image stands: nothing was built again, under any key.
    assert_eq!(s.store.realised.load(Ordering::SeqCst), realised);
    assert_eq!(record(&s.storage, &hello).await.unwrap(), built);
    assert!(s
        .storage
        .keys()
        .iter()
        .all(|k| !k.contains(&"0".repeat(64))));
    // Garbage is dropped.
    let garbage = Received {
        body: "{not json".into(),
        receipt: "r2".into(),
    };
    s.worker.handle(&garbage, 60).await;
    assert_eq!(*s.inbox.deleted.lock().unwrap(), ["r0", "r1", "r2"]);
}
