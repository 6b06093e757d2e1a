//! An SQS-protocol server for tests: moto's server on 127.0.0.1, with a
//! build queue and its dead-letter queue. Stopped on drop.
//!
//! [`Moto::start_with_iam`] also serves S3 and IAM and, once told to
//! ([`Moto::enforce_iam`]), authorises every request against the IAM
//! policies of the user whose key signed it: actions and resources, and
//! of conditions only `StringEquals` (moto treats a statement with any
//! other condition, such as `Null` or `Bool`, as if it had none).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait_until;

pub struct Moto {
    child: Child,
    pub endpoint: String,
}

/// moto's server, with two of its gaps in authorising S3 requests filled
/// and one in its answers (moto 5): it computes a signature over a query whose `/` it had
/// decoded (so every listing by prefix fails), and it cannot read a
/// presigned URL's credentials (a 500). Here the query is encoded again as
/// SigV4 does, and a presigned request is authorised as the user whose key
/// signed it; its signature is not checked (the s3s tests do that). And
/// it answers CompleteMultipartUpload under a root element no SDK reads
/// (`CompleteMultipartUploadResponse`; S3's is
/// `CompleteMultipartUploadResult`), which is renamed here.
const MOTO_WITH_IAM: &str = r#"
import sys
from urllib.parse import urlsplit, parse_qsl, quote
import moto.iam.access_control as ac
import moto.server

init = ac.IAMRequestBase.__init__
def presigned_init(self, account_id, method, path, data, body, headers, action):
    self._presigned = False
    if "Authorization" not in headers:
        query = dict(parse_qsl(urlsplit(path).query))
        if "X-Amz-Credential" in query:
            headers = dict(headers)
            headers["Authorization"] = ("AWS4-HMAC-SHA256 Credential=" + query["X-Amz-Credential"]
                + ", SignedHeaders=host, Signature=" + query.get("X-Amz-Signature", ""))
            self._presigned = True
    init(self, account_id, method, path, data, body, headers, action)
ac.IAMRequestBase.__init__ = presigned_init

check = ac.IAMRequestBase.check_signature
def check_unless_presigned(self):
    if not self._presigned:
        check(self)
ac.IAMRequestBase.check_signature = check_unless_presigned

create = ac.IAMRequestBase._create_aws_request
def create_encoded(self):
    path, _, query = self._path.partition("?")
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        self._path = path + "?" + "&".join(
            quote(k, safe="-_.~") + "=" + quote(v, safe="-_.~") for k, v in pairs)
    return create(self)
ac.IAMRequestBase._create_aws_request = create_encoded

import moto.s3.responses as s3r
serialized = s3r.S3Response.serialized
def serialized_as_s3(self, result):
    status, headers, body = serialized(self, result)
    if self.data.get("Action") == "CompleteMultipartUpload":
        wrong, right = "CompleteMultipartUploadResponse", "CompleteMultipartUploadResult"
        if isinstance(body, bytes):
            body = body.replace(wrong.encode(), right.encode())
        else:
            body = body.replace(wrong, right)
    return status, headers, body
s3r.S3Response.serialized = serialized_as_s3

moto.server.main(sys.argv[1:])
"#;

/// Makes IAM users with inline policies and an access key each (boto3
/// comes with moto); prints `{user: [key id, secret]}`.
const MAKE_USERS: &str = r#"
import boto3, json, sys
iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="setup", aws_secret_access_key="setup")
keys = {}
for user, documents in json.loads(sys.argv[2]).items():
    iam.create_user(UserName=user)
    for i, document in enumerate(documents):
        iam.put_user_policy(UserName=user, PolicyName=f"policy{i}", PolicyDocument=json.dumps(document))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    keys[user] = [key["AccessKeyId"], key["SecretAccessKey"]]
json.dump(keys, sys.stdout)
"#;

/// An access key of a moto IAM user.
#[derive(Debug, Clone)]
pub struct Key {
    pub id: String,
    pub secret: String,
}

impl Moto {
    pub fn start() -> Moto {
        Moto::spawn(Command::new("moto_server"))
    }

    /// moto serving S3, SQS and IAM, ready to enforce IAM policies once
    /// [`Moto::enforce_iam`] is called (until then anything goes, for
    /// setting up).
    pub fn start_with_iam() -> Moto {
        let mut python = Command::new("python3");
        python.args(["-c", MOTO_WITH_IAM]);
        Moto::spawn(python)
    }

    /// Users with these policy documents; their keys by user name.
    pub fn users(&self, users: &serde_json::Value) -> std::collections::BTreeMap<String, Key> {
        let out = super::run(
            Command::new("python3")
                .args(["-c", MAKE_USERS, &self.endpoint])
                .arg(users.to_string()),
        );
        let keys: std::collections::BTreeMap<String, (String, String)> =
            serde_json::from_str(&out).expect("the users' keys");
        keys.into_iter()
            .map(|(user, (id, secret))| (user, Key { id, secret }))
            .collect()
    }

    /// From now on every request must be signed by a user's key and be
    /// allowed by that user's policies.
    pub async fn enforce_iam(&self) {
        let answer = reqwest::Client::new()
            .post(format!("{}/moto-api/reset-auth", self.endpoint))
            .body("0")
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{answer:?}");
    }

    fn spawn(mut command: Command) -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = command
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
