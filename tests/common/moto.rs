//! An SQS-protocol server for tests: moto's server on 127.0.0.1, with a
//! build queue and its dead-letter queue. Stopped on drop.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait_until;

pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server (pip install 'moto[server]')");
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut moto = Moto { child, endpoint };
        let up = wait_until(Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(
            up && moto.child.try_wait().unwrap().is_none(),
            "moto_server did not start"
        );
        moto
    }

    /// A build queue (messages hidden for `visibility` seconds once
    /// received, moved to a dead-letter queue after `max_receives`); its URL.
    pub async fn queue(&self, name: &str, visibility: u32, max_receives: u32) -> String {
        let sqs = self.client().await;
        let dlq = sqs
            .create_queue()
            .queue_name(format!("{name}-dead"))
            .send()
            .await
            .unwrap();
        let dlq_arn = sqs
            .get_queue_attributes()
            .queue_url(dlq.queue_url().unwrap())
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes()
            .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
            .clone();
        let redrive =
            format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"{max_receives}"}}"#);
        let queue = sqs
            .create_queue()
            .queue_name(name)
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout,
                visibility.to_string(),
            )
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy,
                redrive,
            )
            .send()
            .await
            .unwrap();
        queue.queue_url().unwrap().to_string()
    }

    pub async fn client(&self) -> aws_sdk_sqs::Client {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                "x", "y", None, None, "test",
            ))
            .endpoint_url(&self.endpoint)
            .load()
            .await;
        aws_sdk_sqs::Client::new(&sdk)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
