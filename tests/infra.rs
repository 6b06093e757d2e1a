//! The deployment: `infra/template.yaml` passes cfn-lint and SAM's own
//! checks, sets exactly the settings the code reads, on each side that
//! runs a command reading them (the environment contract below), gives each
//! role what its side does and no more, sizes the function for assembling
//! images and schedules the index task, and the Nix expressions of the
//! worker image parse, with the parts that need no nixpkgs evaluated and
//! checked by a real Nix.
//!
//! Needs cfn-lint and aws-sam-cli (`.ci/setup --test` installs them with pip;
//! the template is read with cfn-lint's own YAML decoder, which understands
//! `!Ref`, `!Sub` and friends) and Nix. No AWS account or network.
// The integration tier: needs cfn-lint, aws-sam-cli and Nix (`.ci/test` turns it on).
#![cfg(feature = "integration")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use nixery::config::{variables, Cli, Command as CliCommand};
use nixery::metrics;
use nixery::oci::name::Arch;
use serde_json::{json, Value};

const TEMPLATE: &str = "infra/template.yaml";

/// A part of the deployment that runs `nixery` with settings from the
/// template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    /// The registry function (Lambda): `nixery serve`.
    Function,
    /// The build workers (ECS service): `nixery worker`.
    Worker,
    /// The scheduled garbage collection task: `nixery gc`.
    Gc,
    /// The scheduled index task: `nixery index`.
    Index,
}

impl Side {
    const ALL: [Side; 4] = [Side::Function, Side::Worker, Side::Gc, Side::Index];

    /// As the deployment guide names it.
    fn name(self) -> &'static str {
        match self {
            Side::Function => "function",
            Side::Worker => "worker",
            Side::Gc => "gc",
            Side::Index => "index",
        }
    }

    /// The command it runs (the Lambda runtime starts the function with
    /// none, which means `serve`).
    fn command(self) -> &'static str {
        match self {
            Side::Function => "serve",
            Side::Worker => "worker",
            Side::Gc => "gc",
            Side::Index => "index",
        }
    }

    /// Its environment, as the template sets it.
    fn env(self) -> BTreeMap<String, Setting> {
        match self {
            Side::Function => function_env(),
            Side::Worker => worker_env(),
            Side::Gc => task_env("GcTaskDefinition"),
            Side::Index => index_env(),
        }
    }
}

/// Set nowhere.
const NOWHERE: &[Side] = &[];
const FUNCTION: &[Side] = &[Side::Function];
const WORKER: &[Side] = &[Side::Worker];
const BOTH: &[Side] = &[Side::Function, Side::Worker];
const GC: &[Side] = &[Side::Gc];
/// Where the package source is read: the function resolves it for pulls,
/// the index task lists the same source's attributes.
const SOURCE: &[Side] = &[Side::Function, Side::Index];
/// Everything that reads or writes the bucket.
const STORAGE: &[Side] = &[Side::Function, Side::Worker, Side::Gc, Side::Index];

/// The environment contract: every variable the code reads
/// (`nixery::config::variables()`), where the template sets it, and why.
/// A variable set in several places has the same value in each, and each
/// place runs a command that reads it (checked against clap's definition).
///
/// The function resolves the package source and decides everything that
/// goes into an image's key, then assembles the image from the binary cache
/// or sends a BuildRequest that carries it (the source, the layer budget,
/// the implicit packages); the worker needs only what it takes requests
/// from and writes to, and how it runs Nix; the index task, the source it
/// lists and how it runs Nix.
const CONTRACT: &[(&str, &[Side], &str)] = &[
    // Local mode only.
    ("PORT", NOWHERE, "the local server's port; Lambda has no port"),
    ("NIXERY_LISTEN", NOWHERE, "the local server's address"),
    ("STORAGE_PATH", NOWHERE, "filesystem storage; AWS uses S3"),
    ("NIXERY_PKGS_PATH", NOWHERE, "a local package set; AWS uses a channel or a git repository"),
    ("NIXERY_S3_ENDPOINT", NOWHERE, "S3-compatible servers outside AWS; in AWS the SDK finds S3"),
    ("NIXERY_SQS_ENDPOINT", NOWHERE, "SQS-compatible servers outside AWS (local testing)"),
    (
        "NIXERY_S3_PREFIX",
        NOWHERE,
        "the stack owns its bucket, so keys start at its root; the IAM policies and the lifecycle rule name builds/ and staging/ there",
    ),
    // Storage and the queue.
    ("NIXERY_STORAGE_BACKEND", STORAGE, "s3"),
    ("NIXERY_S3_BUCKET", STORAGE, "the stack's bucket"),
    ("NIXERY_QUEUE_URL", BOTH, "the function sends build requests, the worker receives them"),
    (
        "NIXERY_HEARTBEAT_SECONDS",
        BOTH,
        "the worker records progress this often; the function takes six silent intervals for a dead worker",
    ),
    // The function: serving, dispatching, and what goes into image keys.
    ("NIXERY_PRESIGN_SECONDS", FUNCTION, "blob GETs redirect to presigned URLs"),
    ("NIXERY_BUILDER", FUNCTION, "sqs: builds go to the worker"),
    ("NIXERY_BUILD_TIMEOUT", FUNCTION, "how long a pull waits for a build, below the function's timeout"),
    ("NIXERY_FAILURE_TTL", FUNCTION, "the function reads build status before dispatching again"),
    (
        "NIXERY_CHANNEL",
        SOURCE,
        "the function resolves the source (the request carries it); the index task lists the same source",
    ),
    (
        "NIXERY_PKGS_REPO",
        SOURCE,
        "the function resolves the source (the request carries it); the index task lists the same source",
    ),
    (
        "NIXERY_TAG_TTL",
        FUNCTION,
        "the function decides when an image or an index of a moving source is stale; the index task resolves one tag once",
    ),
    ("NIXERY_LAYER_BUDGET", FUNCTION, "part of the image key; the request carries it"),
    ("NIXERY_IMPLICIT_PACKAGES", FUNCTION, "part of the image key; the request carries it"),
    ("NIXERY_COMPRESSION", FUNCTION, "part of the image key; the request carries it"),
    (
        "NIXERY_PLATFORMS",
        SOURCE,
        "the function answers a tag with one image or an index of one per platform, and sends one build per platform; the index task indexes each platform",
    ),
    (
        "NIXERY_ARM64_QUEUE_URL",
        FUNCTION,
        "the function sends aarch64-linux builds to the arm64 workers' queue, when the stack has arm64 workers; they read it as their NIXERY_QUEUE_URL",
    ),
    (
        "NIXERY_CACHE_TTL",
        NOWHERE,
        "the default (an hour) is far below the unused time after which images are collected",
    ),
    (
        "NIXERY_CACHE_SIZE",
        NOWHERE,
        "the default (64 MiB, tens of thousands of manifests) fits the smallest function memory",
    ),
    // The binary cache: the function assembles from it.
    (
        "NIXERY_SUBSTITUTER",
        FUNCTION,
        "the function assembles images from the cache; workers build with Nix, and the index task reads it only for --popularity, which it does not run",
    ),
    (
        "NIXERY_TRUSTED_KEYS",
        FUNCTION,
        "the function checks every narinfo it assembles from; as NIXERY_SUBSTITUTER for the others",
    ),
    (
        "NIXERY_FROM_CACHE",
        FUNCTION,
        "the function decides whether a new image is assembled, built, or both in turn",
    ),
    // Running Nix and layering.
    (
        "NIX_TIMEOUT",
        &[Side::Worker, Side::Index],
        "the worker runs Nix for builds and index jobs, the index task for its batches of attributes; the function runs no Nix",
    ),
    ("NIXERY_GC_UNUSED_FOR", GC, "how long an unused image is kept (GcUnusedFor)"),
    (
        "NIXERY_GC_GRACE",
        NOWHERE,
        "the default (a day) is longer than the longest build (2 x NixTimeout + 600 s, at most 4.2 hours)",
    ),
    ("NIXERY_GC_DRY_RUN", NOWHERE, "for runs by hand"),
    ("NIXERY_MIN_FREE", WORKER, "the worker's Nix store is a cache it collects before running out of disk"),
    (
        "NIX_POPULARITY_URL",
        BOTH,
        "layering happens where images are made: in the worker's builds and the function's assemblies alike",
    ),
    ("NIXERY_HTPASSWD", FUNCTION, "the function answers requests, so it checks credentials"),
    ("NIXERY_IMAGES", FUNCTION, "the function answers pulls, so it reads the declared images"),
    ("NIXERY_PUBLIC_URL", FUNCTION, "the custom domain, which CloudFront does not pass on as Host"),
    ("NIXERY_AUTH_SCOPE", FUNCTION, "the function answers requests, so it checks credentials"),
    (
        "NIXERY_TOKEN_KEY",
        NOWHERE,
        "the default (auth/token-key) is the one key the function's role may create",
    ),
    ("NIXERY_TOKEN_TTL", NOWHERE, "the default (five minutes) covers a pull's requests"),
    (
        "NIXERY_LOGIN_FAILURES",
        NOWHERE,
        "the default (ten a minute per address) stops guessing and lets typos through",
    ),
    (
        "NIXERY_MAX_BUILDS",
        NOWHERE,
        "a worker takes one message at a time; more builds at once means more worker tasks (WorkerMaxCount)",
    ),
    (
        "NIXERY_MAX_QUEUED_BUILDS",
        NOWHERE,
        "a function instance answers one request at a time, so it has at most one build in the queue: ReservedConcurrency bounds what the function enqueues",
    ),
    (
        "NIXERY_MAX_IMAGE_SIZE",
        NOWHERE,
        "the default (8 GiB) bounds a worker's disk use and an assembly's time in the function (whose layers stream to S3 and need no disk)",
    ),
    (
        "NIXERY_NIXPKGS_API",
        NOWHERE,
        "GitHub's API, the default, is where nixpkgs lives; a mirror is for tests and private forges",
    ),
    (
        "NIXERY_ALLOWED_REFS",
        NOWHERE,
        "the default (branches and tags only) is the safe one; widening it is a deliberate choice",
    ),
];

/// Names that look like the code's settings: the template may set other
/// variables (RUST_LOG), but none of these unless the code reads it.
fn looks_like_a_setting(name: &str) -> bool {
    name.starts_with("NIXERY_")
        || name.starts_with("NIX_")
        || name.starts_with("STORAGE_")
        || name == "PORT"
}

// --- running tools -----------------------------------------------------------

fn repo() -> PathBuf {
    common::repo()
}

/// Runs a tool from the repository root; a missing tool fails the test
/// with what to install.
fn run_tool(command: &mut Command) -> (Output, std::time::Duration) {
    let started = Instant::now();
    command.current_dir(repo()).stdin(Stdio::null());
    match command.output() {
        Ok(output) => (output, started.elapsed()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{:?} is not installed: run `.ci/setup --test` (it installs cfn-lint and aws-sam-cli with pip, and Nix)",
            command.get_program()
        ),
        Err(e) => panic!("running {command:?}: {e}"),
    }
}

fn assert_success(command: &mut Command) -> String {
    let (output, took) = run_tool(command);
    assert!(
        output.status.success(),
        "{command:?} failed ({}, after {took:?}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn sam() -> Command {
    let mut command = Command::new("sam");
    command
        .env("SAM_CLI_TELEMETRY", "0")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    command
}

fn nix_command(program: &str) -> Command {
    let mut command = Command::new(program);
    command.env("NIX_CONF_DIR", common::nix_conf_dir());
    command
}

// --- the template, as JSON ---------------------------------------------------

/// cfn-lint's decoder: YAML with CloudFormation's short-form tags, as JSON.
const DECODE: &str = r#"
import json, sys
try:
    from cfnlint.decode import decode
except ImportError as e:
    sys.exit(f"cannot import cfn-lint ({e}): run .ci/setup --test")
template, errors = decode(sys.argv[1])
if errors or template is None:
    sys.exit("cannot read the template:\n" + "\n".join(str(e) for e in errors))
json.dump(template, sys.stdout)
"#;

fn template() -> &'static Value {
    static TEMPLATE_JSON: OnceLock<Value> = OnceLock::new();
    TEMPLATE_JSON.get_or_init(|| {
        let json = assert_success(Command::new("python3").args(["-c", DECODE, TEMPLATE]));
        serde_json::from_str(&json).expect("the decoded template is JSON")
    })
}

fn resources_of_type(ty: &str) -> Vec<(&'static str, &'static Value)> {
    let resources = template()["Resources"]
        .as_object()
        .expect("the template has Resources");
    resources
        .iter()
        .filter(|(_, r)| r["Type"] == ty)
        .map(|(name, r)| (name.as_str(), r))
        .collect()
}

fn only_resource(ty: &str) -> (&'static str, &'static Value) {
    let found = resources_of_type(ty);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {ty} in {TEMPLATE}, found {:?}",
        found.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    found[0]
}

fn is_no_value(v: &Value) -> bool {
    *v == json!({ "Ref": "AWS::NoValue" })
}

/// One variable as the template sets it: its value expression, and the
/// condition it depends on (`Fn::If` with `AWS::NoValue` on one side).
#[derive(Debug, Clone, PartialEq)]
struct Setting {
    value: Value,
    condition: Option<(String, bool)>,
}

/// A value that may be `Fn::If [cond, x, AWS::NoValue]` (or the reverse).
fn conditional(v: &Value) -> Vec<(Value, Option<(String, bool)>)> {
    if let Some([cond, yes, no]) = v.get("Fn::If").and_then(Value::as_array).map(Vec::as_slice) {
        let cond = cond.as_str().expect("a condition name").to_string();
        let mut out = Vec::new();
        if !is_no_value(yes) {
            out.push((yes.clone(), Some((cond.clone(), true))));
        }
        if !is_no_value(no) {
            out.push((no.clone(), Some((cond, false))));
        }
        out
    } else {
        vec![(v.clone(), None)]
    }
}

/// The registry function's environment (with SAM Globals merged in).
fn function_env() -> BTreeMap<String, Setting> {
    let (name, function) = only_resource("AWS::Serverless::Function");
    let mut env = BTreeMap::new();
    let globals = &template()["Globals"]["Function"]["Environment"]["Variables"];
    let own = &function["Properties"]["Environment"]["Variables"];
    for vars in [globals, own] {
        if vars.is_null() {
            continue;
        }
        let vars = vars
            .as_object()
            .unwrap_or_else(|| panic!("{name}: Environment.Variables must be a map"));
        for (var, value) in vars {
            for (value, condition) in conditional(value) {
                env.insert(var.clone(), Setting { value, condition });
            }
        }
    }
    env
}

/// The worker container's environment.
fn worker_env() -> BTreeMap<String, Setting> {
    task_env("WorkerTaskDefinition")
}

/// The index task's environment.
fn index_env() -> BTreeMap<String, Setting> {
    task_env("IndexTaskDefinition")
}

/// A task definition's resource by name.
fn resource(name: &str) -> &'static Value {
    let found = &template()["Resources"][name];
    assert!(!found.is_null(), "{TEMPLATE} has no resource {name}");
    found
}

/// The environment of a task definition's one container.
fn task_env(name: &str) -> BTreeMap<String, Setting> {
    let task = resource(name);
    let containers = task["Properties"]["ContainerDefinitions"]
        .as_array()
        .expect("ContainerDefinitions");
    assert_eq!(containers.len(), 1, "{name}: one container");
    let mut env = BTreeMap::new();
    for entry in containers[0]["Environment"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        for (pair, condition) in conditional(entry) {
            let var = pair["Name"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: an environment entry without a Name: {pair}"));
            env.insert(
                var.to_string(),
                Setting {
                    value: pair["Value"].clone(),
                    condition,
                },
            );
        }
    }
    env
}

fn parameter(name: &str) -> &'static Value {
    let p = &template()["Parameters"][name];
    assert!(!p.is_null(), "{TEMPLATE} has no parameter {name}");
    p
}

fn number(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().expect("a whole number"),
        Value::String(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("{s:?} is not a number")),
        other => panic!("{other} is not a number"),
    }
}

// --- the tools' checks ---------------------------------------------------------

#[test]
fn cfn_lint_passes() {
    // Exit status 0: no errors, no warnings (informational notes only).
    assert_success(Command::new("cfn-lint").arg(TEMPLATE));
}

#[test]
fn sam_validate_passes() {
    // --lint runs cfn-lint through SAM; without it SAM runs its own
    // transform (what `sam deploy` uploads), which catches other mistakes.
    // Neither needs credentials or network.
    let out = assert_success(sam().args(["validate", "--lint", "--template", TEMPLATE]));
    assert!(out.contains("is a valid SAM Template"), "{out}");
    let out = assert_success(sam().args(["validate", "--template", TEMPLATE]));
    assert!(out.contains("is a valid SAM Template"), "{out}");
}

// --- the environment contract ------------------------------------------------

/// The variables a command reads, from its clap definition.
fn read_by(command: &str) -> BTreeSet<String> {
    let cli = <Cli as clap::CommandFactory>::command();
    let sub = cli
        .find_subcommand(command)
        .unwrap_or_else(|| panic!("nixery has no command {command}"));
    sub.get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|var| var.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn the_template_sets_every_setting_the_code_reads_and_nothing_else() {
    let all = variables();
    let read: BTreeSet<&str> = all.iter().map(String::as_str).collect();
    let placed: BTreeMap<&str, &[Side]> = CONTRACT.iter().map(|(var, on, _)| (*var, *on)).collect();
    let envs: Vec<(Side, BTreeMap<String, Setting>)> =
        Side::ALL.iter().map(|side| (*side, side.env())).collect();
    let mut problems = Vec::new();

    for var in &read {
        if !placed.contains_key(var) {
            problems.push(format!(
                "the code reads {var} (nixery::config::variables()) but tests/infra.rs's CONTRACT does not say where the \
                 deployment sets it: set it in {TEMPLATE} (the function's Environment, or a task's ContainerDefinitions \
                 Environment) and add it to CONTRACT with the sides, or add it there as NOWHERE with the reason"
            ));
        }
    }
    for var in placed.keys() {
        if !read.contains(var) {
            problems.push(format!("CONTRACT lists {var}, which the code does not read (not in nixery::config::variables()): remove it from CONTRACT and {TEMPLATE}"));
        }
    }
    for (var, on) in &placed {
        for (side, env) in &envs {
            match (env.contains_key(*var), on.contains(side)) {
                (false, true) => problems.push(format!(
                    "{TEMPLATE} does not set {var} on the {} (CONTRACT: {on:?})",
                    side.name()
                )),
                (true, false) => problems.push(format!(
                    "{TEMPLATE} sets {var} on the {}, but CONTRACT says {on:?}",
                    side.name()
                )),
                _ => {}
            }
        }
        // Set in several places: to one value.
        let values: Vec<(Side, &Setting)> = envs
            .iter()
            .filter_map(|(side, env)| env.get(*var).map(|setting| (*side, setting)))
            .collect();
        if let Some((first_side, first)) = values.first() {
            for (side, setting) in &values[1..] {
                if setting != first {
                    problems.push(format!(
                        "{var} differs between the {} ({first:?}) and the {} ({setting:?})",
                        first_side.name(),
                        side.name()
                    ));
                }
            }
        }
    }
    for (side, env) in &envs {
        let command_reads = read_by(side.command());
        for var in env.keys() {
            if !looks_like_a_setting(var) {
                continue;
            }
            if !read.contains(var.as_str()) {
                problems.push(format!(
                    "{TEMPLATE} sets {var} on the {}, but the code never reads it (not in nixery::config::variables())",
                    side.name()
                ));
            } else if !command_reads.contains(var) {
                problems.push(format!(
                    "{TEMPLATE} sets {var} on the {}, which runs `nixery {}`: that command does not read it",
                    side.name(),
                    side.command()
                ));
            }
        }
        // Every side logs at the stack's level.
        assert_eq!(
            env.get("RUST_LOG").map(|s| &s.value),
            Some(&json!({ "Ref": "LogLevel" })),
            "RUST_LOG on the {}",
            side.name()
        );
    }
    assert!(
        problems.is_empty(),
        "the template and the code disagree:\n  - {}",
        problems.join("\n  - ")
    );
}

#[test]
fn the_gc_task_runs_gc_from_the_workers_image_and_writes_nothing() {
    // Its environment is in CONTRACT: the storage and its own settings.
    let task = resource("GcTaskDefinition");
    let container = &task["Properties"]["ContainerDefinitions"][0];
    assert_eq!(container["Command"], json!(["gc"]));
    assert_eq!(
        container["Image"],
        resource("WorkerTaskDefinition")["Properties"]["ContainerDefinitions"][0]["Image"]
    );
    // A role that can list, read records and delete, and write nothing;
    // nor touch the attribute indexes, which `nixery gc` leaves alone.
    let role = resource("GcTaskRole").to_string();
    for forbidden in ["s3:PutObject", "s3:*", "sqs:", "/attrs/"] {
        assert!(!role.contains(forbidden), "the gc role allows {forbidden}");
    }
}

#[test]
fn exactly_one_package_source_is_set() {
    // The code refuses to start with more than one of these; the function
    // and the index task read the same one (CONTRACT: the same values).
    for env in [function_env(), index_env()] {
        exactly_one_package_source(&env);
    }
}

fn exactly_one_package_source(env: &BTreeMap<String, Setting>) {
    let channel = env.get("NIXERY_CHANNEL").expect("NIXERY_CHANNEL");
    let repo = env.get("NIXERY_PKGS_REPO").expect("NIXERY_PKGS_REPO");
    let (Some((c1, when_channel)), Some((c2, when_repo))) = (&channel.condition, &repo.condition)
    else {
        panic!("NIXERY_CHANNEL and NIXERY_PKGS_REPO must each depend on one condition: {channel:?} {repo:?}");
    };
    assert_eq!(c1, c2, "one condition chooses the source");
    assert_ne!(
        when_channel, when_repo,
        "the channel is set exactly when the repository is not"
    );
    assert!(!env.contains_key("NIXERY_PKGS_PATH"));
}

/// The queues workers take builds from: those with a dead-letter queue.
fn build_queues() -> Vec<&'static str> {
    resources_of_type("AWS::SQS::Queue")
        .into_iter()
        .filter(|(_, q)| !q["Properties"]["RedrivePolicy"].is_null())
        .map(|(name, _)| name)
        .collect()
}

#[test]
fn timeouts_fit_together() {
    let (_, function) = only_resource("AWS::Serverless::Function");
    let function_timeout = number(&function["Properties"]["Timeout"]);
    assert!(function_timeout <= 900, "Lambda's maximum is 900 s");

    // A pull waits at most BuildTimeout for a build, and must answer before
    // Lambda stops the function.
    let env = function_env();
    assert_eq!(
        env["NIXERY_BUILD_TIMEOUT"].value,
        json!({ "Ref": "BuildTimeout" })
    );
    let build_timeout = parameter("BuildTimeout");
    let max = number(&build_timeout["MaxValue"]);
    assert!(
        max + 30 <= function_timeout,
        "BuildTimeout may reach {max} s, too close to the function's {function_timeout} s"
    );
    assert!(number(&build_timeout["Default"]) <= max);

    // The queue hides a request for longer than a build may take (two Nix
    // commands of NIX_TIMEOUT each, then packing), for every allowed value.
    let worker = worker_env();
    assert_eq!(worker["NIX_TIMEOUT"].value, json!({ "Ref": "NixTimeout" }));
    let build_queues = build_queues();
    assert!(build_queues.contains(&"BuildQueue"), "{build_queues:?}");
    for name in build_queues {
        assert_eq!(
            resource(name)["Properties"]["VisibilityTimeout"],
            json!({ "Fn::FindInMap": ["NixTimeouts", { "Ref": "NixTimeout" }, "VisibilityTimeout"] }),
            "{name}"
        );
    }
    let nix_timeout = parameter("NixTimeout");
    let allowed = nix_timeout["AllowedValues"]
        .as_array()
        .expect("NixTimeout has AllowedValues");
    assert!(allowed.contains(&nix_timeout["Default"]));
    for value in allowed {
        let secs = number(value);
        let visibility = number(
            &template()["Mappings"]["NixTimeouts"][value.as_str().unwrap()]["VisibilityTimeout"],
        );
        assert!(
            visibility >= 2 * secs + 300,
            "NIX_TIMEOUT {secs}: visibility timeout {visibility} is too short"
        );
        assert!(visibility <= 43200, "SQS allows at most 43200 s");
    }
}

#[test]
fn the_function_is_built_from_this_repository_by_cargo_lambda() {
    // cfn-lint does not check every value of SAM resources (a wrong Runtime
    // passes), so the essentials are checked here.
    let (_, function) = only_resource("AWS::Serverless::Function");
    let props = &function["Properties"];
    assert_eq!(function["Metadata"]["BuildMethod"], "rust-cargolambda");
    assert_eq!(props["Runtime"], "provided.al2023");
    assert_eq!(props["Handler"], "bootstrap");
    assert_eq!(
        props["FunctionUrlConfig"]["AuthType"], "NONE",
        "docker cannot sign requests"
    );
    let code = repo()
        .join("infra")
        .join(props["CodeUri"].as_str().expect("CodeUri"));
    let manifest = std::fs::read_to_string(code.join("Cargo.toml"))
        .expect("CodeUri is the directory of Cargo.toml");
    let binary = function["Metadata"]["BuildProperties"]["Binary"]
        .as_str()
        .unwrap_or("nixery");
    assert!(
        manifest.contains(&format!("name = \"{binary}\"")),
        "Cargo.toml has no binary {binary}"
    );
    for arch in parameter("Architecture")["AllowedValues"]
        .as_array()
        .unwrap()
    {
        assert!(
            ["x86_64", "arm64"].contains(&arch.as_str().unwrap()),
            "{arch} is not a Lambda architecture"
        );
    }
    assert!(
        !template()["Outputs"]["RegistryHost"].is_null(),
        "the stack says where to pull from"
    );
}

/// The IAM statements of the role a resource uses.
fn statements(role: &str) -> Vec<&'static Value> {
    let policies = template()["Resources"][role]["Properties"]["Policies"]
        .as_array()
        .unwrap_or_else(|| panic!("{role} has inline Policies"));
    // A statement under a condition counts as if the condition held.
    policies
        .iter()
        .flat_map(|p| p["PolicyDocument"]["Statement"].as_array().unwrap())
        .flat_map(|s| match s["Fn::If"].as_array() {
            Some(branches) => branches[1..].iter().filter(|b| !is_no_value(b)).collect(),
            None => vec![s],
        })
        .collect()
}

fn actions(statement: &Value) -> Vec<&str> {
    match &statement["Action"] {
        Value::String(a) => vec![a.as_str()],
        Value::Array(a) => a.iter().map(|a| a.as_str().unwrap()).collect(),
        other => panic!("an Action of {other}"),
    }
}

/// The registry function's role.
fn function_role() -> &'static str {
    let (function, _) = only_resource("AWS::Serverless::Function");
    role_of(function, "Role")
}

/// A role's statements as deployed with these parameter values (the
/// others at their defaults).
fn statements_given(role: &str, given: &[(&str, &str)]) -> Vec<Value> {
    let policies = resolve_ifs(&resource(role)["Properties"]["Policies"], given)
        .unwrap_or_else(|| panic!("{role} has inline Policies"));
    policies
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["PolicyDocument"]["Statement"].as_array().unwrap().clone())
        .collect()
}

/// The statement of a role with this `Sid`, under any condition.
fn statement_with_sid(role: &str, sid: &str) -> &'static Value {
    statements(role)
        .into_iter()
        .find(|s| s["Sid"] == sid)
        .unwrap_or_else(|| panic!("{role} has no statement {sid}"))
}

#[test]
fn no_role_overwrites_a_blob_or_deletes_outside_staging_but_gc() {
    for role in ["WorkerTaskRole", function_role(), "IndexTaskRole"] {
        cannot_overwrite_a_blob_or_delete_outside_staging(role);
    }
}

fn cannot_overwrite_a_blob_or_delete_outside_staging(role: &str) {
    let resources = |statement: &Value| -> Vec<String> {
        match &statement["Resource"] {
            Value::Array(items) => items.iter().map(|r| r.to_string()).collect(),
            one => vec![one.to_string()],
        }
    };
    for statement in statements(role) {
        let acts = actions(statement);
        let on: Vec<String> = resources(statement);
        let content_addressed = on
            .iter()
            .any(|r| r.contains("/blobs/") || r.contains("/manifests/") || r.contains("Arn}/*"));
        if acts.contains(&"s3:PutObject") && content_addressed {
            let condition = statement["Condition"].to_string();
            assert!(
                condition.contains("s3:if-none-match")
                    || condition.contains("s3:if-match")
                    || condition.contains("s3:ObjectCreationOperation"),
                "{role} may overwrite content-addressed objects unconditionally: {statement}"
            );
        }
        if acts.contains(&"s3:DeleteObject") {
            assert!(
                on.iter().all(|r| r.contains("/staging/")),
                "{role} may delete outside staging/: {statement}"
            );
        }
        assert!(!acts.contains(&"s3:*"), "{statement}");
    }
}

/// The fenced JSON block of a document between `<!-- name:begin -->` and
/// `<!-- name:end -->`.
fn doc_json(doc: &str, name: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(doc)).unwrap();
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let block = text
        .split_once(&begin)
        .and_then(|(_, rest)| rest.split_once(&end))
        .unwrap_or_else(|| panic!("{doc} has no {begin} ... {end} block"))
        .0;
    let json = block
        .split_once("```json")
        .and_then(|(_, rest)| rest.rsplit_once("```"))
        .unwrap_or_else(|| panic!("{doc}: the {name} block is no fenced JSON"))
        .0;
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{doc}: the {name} block: {e}"))
}

/// A template value with the bucket's ARN written as the docs write it.
fn with_bucket_placeholder(v: &Value) -> Value {
    const ARN: &str = "arn:aws:s3:::<bucket>";
    match v {
        Value::Object(o) if o.len() == 1 && o.contains_key("Fn::Sub") => {
            let sub = o["Fn::Sub"].as_str().expect("a plain Fn::Sub string");
            Value::String(sub.replace("${ImageBucket.Arn}", ARN))
        }
        Value::Object(_) if get_att(v) == Some(("ImageBucket", "Arn")) => Value::String(ARN.into()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), with_bucket_placeholder(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(with_bucket_placeholder).collect()),
        other => other.clone(),
    }
}

#[test]
fn the_docs_quote_the_workers_storage_statements_word_for_word() {
    let s3: Vec<Value> = statements("WorkerTaskRole")
        .into_iter()
        .filter(|s| actions(s).iter().all(|a| a.starts_with("s3:")))
        .map(with_bucket_placeholder)
        .collect();
    let content_addressed: Vec<Value> = s3
        .iter()
        .filter(|s| {
            actions(s).contains(&"s3:PutObject")
                && (s["Resource"].to_string().contains("/blobs/")
                    || s["Resource"].to_string().contains("/manifests/"))
        })
        .cloned()
        .collect();
    assert!(content_addressed.len() >= 2, "{s3:?}");
    assert_eq!(
        doc_json("docs/security.md", "worker-content-addressed-statements"),
        Value::Array(content_addressed),
        "docs/security.md quotes other statements than infra/template.yaml has"
    );
    let outside = doc_json("docs/deploy.md", "outside-worker-policy");
    let outside_s3: Vec<Value> = outside["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| actions(s).iter().all(|a| a.starts_with("s3:")))
        .cloned()
        .collect();
    assert_eq!(
        outside_s3, s3,
        "docs/deploy.md's policy for a worker outside AWS differs from the worker role's"
    );
}

#[test]
fn the_docs_quote_the_assembly_and_index_statements_word_for_word() {
    // The function's statements of its own for assembling (its
    // content-addressed ones are the worker's, quoted above).
    let function: Vec<Value> = [
        "ReadIndexesAndLayers",
        "WriteAssembledRecords",
        "ClaimIndexJobs",
    ]
    .iter()
    .map(|sid| with_bucket_placeholder(statement_with_sid(function_role(), sid)))
    .collect();
    assert_eq!(
        doc_json("docs/security.md", "function-assembly-statements"),
        Value::Array(function),
        "docs/security.md quotes other statements than infra/template.yaml has"
    );
    let index: Vec<Value> = statements("IndexTaskRole")
        .into_iter()
        .map(with_bucket_placeholder)
        .collect();
    assert_eq!(
        doc_json("docs/security.md", "index-task-statements"),
        Value::Array(index),
        "docs/security.md quotes other statements than infra/template.yaml has"
    );
}

#[test]
fn only_the_function_reads_the_htpasswd_file_and_the_token_key() {
    let secrets = json!({ "Fn::Sub": "${ImageBucket.Arn}/auth/*" });
    let (_, function) = only_resource("AWS::Serverless::Function");
    let function_role = function["Properties"]["Role"]["Fn::GetAtt"][0]
        .as_str()
        .unwrap();
    let reads = |role: &str| {
        statements(role).iter().any(|s| {
            s["Effect"] == "Allow"
                && actions(s).contains(&"s3:GetObject")
                && (s["Resource"] == secrets
                    || s["Resource"]
                        .as_array()
                        .is_some_and(|r| r.contains(&secrets)))
        })
    };
    assert!(reads(function_role), "the function cannot read auth/");
    // The workers (both architectures share the role) read the whole
    // bucket but auth/, denied explicitly.
    let denied = statements("WorkerTaskRole").iter().any(|s| {
        s["Effect"] == "Deny" && actions(s).contains(&"s3:GetObject") && s["Resource"] == secrets
    });
    assert!(denied, "WorkerTaskRole may read auth/");
    // Garbage collection and the index task touch only what they name,
    // and not auth/.
    for statement in statements("GcTaskRole")
        .into_iter()
        .chain(statements("IndexTaskRole"))
    {
        assert!(!statement.to_string().contains("/auth/"), "{statement}");
        assert!(!statement.to_string().contains("Arn}/*"), "{statement}");
    }
}

/// The function's statements that exist only where it assembles images
/// from the binary cache; the content-addressed ones are the worker's.
const ASSEMBLY_STATEMENTS: &[&str] = &[
    "ReadIndexesAndLayers",
    "CreateContentAddressed",
    "RepairContentAddressed",
    "UploadLayerParts",
    "AbandonLayerUploads",
    "StageLayers",
    "WriteAssembledRecords",
];
const WORKERS_CONTENT_ADDRESSED: &[&str] = &[
    "CreateContentAddressed",
    "RepairContentAddressed",
    "UploadLayerParts",
    "AbandonLayerUploads",
    "StageLayers",
];

#[test]
fn the_function_writes_only_what_it_serves_assembles_and_claims() {
    let role = function_role();
    for statement in statements(role) {
        assert_eq!(statement["Effect"], "Allow");
        let sid = statement["Sid"].as_str().unwrap_or_default();
        if WORKERS_CONTENT_ADDRESSED.contains(&sid) {
            // Assembling, it stores layers, configs and manifests exactly
            // as a worker does: created, or replacing a damaged version,
            // layers streamed through staging/.
            assert_eq!(
                statement,
                statement_with_sid("WorkerTaskRole", sid),
                "{role}'s {sid} is not the worker's"
            );
            continue;
        }
        for action in actions(statement) {
            assert!(!action.contains('*'), "{role}: wildcard action {action}");
            match action {
                "s3:GetObject" | "s3:ListBucket" | "sqs:SendMessage" | "logs:CreateLogStream" | "logs:PutLogEvents" => {}
                "s3:PutObject" if sid == "ComposeIndexes" => {
                    // Index manifests: created, never replaced.
                    assert_eq!(statement["Resource"], json!({ "Fn::Sub": "${ImageBucket.Arn}/manifests/*" }));
                    assert_eq!(statement["Condition"], json!({ "Null": { "s3:if-none-match": "false" } }));
                }
                "s3:PutObject" if sid == "CreateTokenKey" => {
                    // The token signing key: created once, never replaced.
                    assert_eq!(statement["Resource"], json!({ "Fn::Sub": "${ImageBucket.Arn}/auth/token-key" }));
                    assert_eq!(statement["Condition"], json!({ "Null": { "s3:if-none-match": "false" } }));
                }
                "s3:PutObject" if sid == "RecordIndexes" => {
                    // Index records, and the hold on the manifest each names.
                    assert_eq!(
                        statement["Resource"],
                        json!([
                            { "Fn::Sub": "${ImageBucket.Arn}/indexes/*" },
                            { "Fn::Sub": "${ImageBucket.Arn}/holds/*" }
                        ])
                    );
                }
                "s3:PutObject" if sid == "WriteAssembledRecords" => {
                    // What a build records, image records included; not
                    // sources/, which only the workers' git answers.
                    assert_eq!(
                        statement["Resource"],
                        json!([
                            { "Fn::Sub": "${ImageBucket.Arn}/images/*" },
                            { "Fn::Sub": "${ImageBucket.Arn}/layers/*" },
                            { "Fn::Sub": "${ImageBucket.Arn}/referrers/*" },
                            { "Fn::Sub": "${ImageBucket.Arn}/holds/*" }
                        ])
                    );
                }
                "s3:PutObject" if sid == "ClaimIndexJobs" => {
                    // Index claims only (attrs/<revision>/<system>/claim),
                    // without a condition: a claim older than an hour, whose
                    // job died, is written over.
                    assert_eq!(statement["Resource"], json!({ "Fn::Sub": "${ImageBucket.Arn}/attrs/*/*/claim" }));
                    assert!(statement["Condition"].is_null(), "{statement}");
                }
                "s3:PutObject" => assert_eq!(
                    statement["Resource"],
                    json!([
                        { "Fn::Sub": "${ImageBucket.Arn}/builds/*" },
                        { "Fn::Sub": "${ImageBucket.Arn}/served/*" }
                    ])
                ),
                other => panic!("{role} allows {other}: the function reads the bucket, writes builds/ and served/, what it assembles and index claims, and sends to the queue"),
            }
        }
    }
    // What it reads for an assembly: the attribute indexes, and layer
    // records (to reuse stored layers).
    assert_eq!(
        statement_with_sid(role, "ReadIndexesAndLayers")["Resource"],
        json!([
            { "Fn::Sub": "${ImageBucket.Arn}/attrs/*" },
            { "Fn::Sub": "${ImageBucket.Arn}/layers/*" }
        ])
    );

    // The assembly's rights exist only where it assembles; the claim's only
    // where it asks the workers for indexes (with first: with only, no
    // package-set code runs for a pull).
    for (given, assembles, claims) in [
        (&[][..], true, true),
        (&[("FromCache", "only")][..], true, false),
        (&[("FromCache", "never")][..], false, false),
        (&[("Substituter", "none")][..], false, false),
    ] {
        let sids: BTreeSet<String> = statements_given(role, given)
            .iter()
            .filter_map(|s| s["Sid"].as_str().map(str::to_string))
            .collect();
        for sid in ASSEMBLY_STATEMENTS {
            assert_eq!(sids.contains(*sid), assembles, "{sid} with {given:?}");
        }
        assert_eq!(
            sids.contains("ClaimIndexJobs"),
            claims,
            "ClaimIndexJobs with {given:?}"
        );
    }
}

#[test]
fn the_bucket_is_private_and_expires_staging() {
    let (_, bucket) = only_resource("AWS::S3::Bucket");
    let props = &bucket["Properties"];
    for flag in [
        "BlockPublicAcls",
        "BlockPublicPolicy",
        "IgnorePublicAcls",
        "RestrictPublicBuckets",
    ] {
        assert_eq!(
            props["PublicAccessBlockConfiguration"][flag], true,
            "{flag}"
        );
    }
    assert!(!props["BucketEncryption"].is_null());
    let rules = props["LifecycleConfiguration"]["Rules"]
        .as_array()
        .expect("lifecycle rules");
    assert!(rules.iter().any(|r| r["Prefix"] == "staging/"
        && r["ExpirationInDays"] == 1
        && r["Status"] == "Enabled"));
    assert!(rules
        .iter()
        .any(|r| !r["AbortIncompleteMultipartUpload"].is_null() && r["Status"] == "Enabled"));
}

// --- monitoring ------------------------------------------------------------------

/// The alarms that call for a person (the others scale the worker).
const MONITORING_ALARMS: &[&str] = &[
    "DeadLetterAlarm",
    "BuildFailureRateAlarm",
    "FunctionErrorsAlarm",
];
/// And those of the arm64 workers, which exist only with them.
const ARM64_MONITORING_ALARMS: &[&str] = &["Arm64DeadLetterAlarm"];

/// What the function and the worker write (src/metrics.rs), by service:
/// the function's assemblies are timed and counted as the worker's builds.
const FUNCTION_METRICS: &[&str] = &[
    metrics::REQUESTS,
    metrics::ERRORS,
    metrics::CACHE_HITS,
    metrics::CACHE_MISSES,
    metrics::BYTES_SERVED,
    metrics::BYTES_REDIRECTED,
    metrics::ASSEMBLIES,
    metrics::ASSEMBLIES_PASSED_ON,
    metrics::ASSEMBLY_FAILURES,
    metrics::BUILD_DURATION,
    metrics::LAYERS_NEW,
    metrics::LAYERS_REUSED,
    metrics::BYTES_UPLOADED,
];
const WORKER_METRICS: &[&str] = &[
    metrics::BUILDS,
    metrics::BUILD_FAILURES,
    metrics::BUILD_DURATION,
    metrics::LAYERS_NEW,
    metrics::LAYERS_REUSED,
    metrics::BYTES_UPLOADED,
];

/// The services that write a metric of the Nixery namespace.
fn services_of(metric: &str) -> Vec<&'static str> {
    let mut services = Vec::new();
    if FUNCTION_METRICS.contains(&metric) {
        services.push(metrics::SERVICE_FUNCTION);
    }
    if WORKER_METRICS.contains(&metric) {
        services.push(metrics::SERVICE_WORKER);
    }
    services
}

#[test]
fn every_metric_the_code_names_is_listed_here() {
    // The names in src/metrics.rs (the namespace and dimensions apart):
    // a metric added there must be placed in FUNCTION_METRICS or
    // WORKER_METRICS, and so on the dashboard.
    let source = std::fs::read_to_string(repo().join("src/metrics.rs")).unwrap();
    let not_metrics = [
        metrics::NAMESPACE,
        metrics::SERVICE_DIMENSION,
        metrics::SERVICE_FUNCTION,
        metrics::SERVICE_WORKER,
        metrics::ERROR_CODE_DIMENSION,
    ];
    let named: BTreeSet<&str> = source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| l.split_once(": &str = \""))
        .map(|(_, rest)| rest.trim_end_matches("\";"))
        .filter(|name| !not_metrics.contains(name))
        .collect();
    let listed: BTreeSet<&str> = FUNCTION_METRICS
        .iter()
        .chain(WORKER_METRICS)
        .copied()
        .collect();
    assert_eq!(named, listed);
}

fn alarm(name: &str) -> &'static Value {
    let alarm = resource(name);
    assert_eq!(alarm["Type"], "AWS::CloudWatch::Alarm", "{name}");
    &alarm["Properties"]
}

/// `Fn::GetAtt` in either of its forms, as (resource, attribute).
fn get_att(v: &Value) -> Option<(&str, &str)> {
    match v.get("Fn::GetAtt")? {
        Value::String(s) => s.split_once('.'),
        Value::Array(parts) => Some((parts.first()?.as_str()?, parts.get(1)?.as_str()?)),
        _ => None,
    }
}

/// A value of a condition, with the given parameter values (the others at
/// their defaults), as CloudFormation compares them: as strings.
fn condition_value(v: &Value, given: &[(&str, &str)]) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Object(o) if o.contains_key("Ref") => {
            let name = o["Ref"].as_str().expect("Ref names a parameter");
            match given.iter().find(|(p, _)| *p == name) {
                Some((_, value)) => value.to_string(),
                None => condition_value(&parameter(name)["Default"], given),
            }
        }
        other => panic!("conditions here compare parameters and literals, not {other}"),
    }
}

/// Whether a condition expression (of a condition, or of a rule) holds for
/// these parameter values.
fn expression_holds(v: &Value, given: &[(&str, &str)]) -> bool {
    let (function, arg) = v
        .as_object()
        .and_then(|o| o.iter().next())
        .unwrap_or_else(|| panic!("a condition function, not {v}"));
    let args = || {
        arg.as_array()
            .expect("the arguments of a condition function")
    };
    match function.as_str() {
        "Condition" => condition_holds(arg.as_str().expect("a condition name"), given),
        "Fn::Not" => !expression_holds(&args()[0], given),
        "Fn::And" => args().iter().all(|a| expression_holds(a, given)),
        "Fn::Or" => args().iter().any(|a| expression_holds(a, given)),
        "Fn::Equals" => condition_value(&args()[0], given) == condition_value(&args()[1], given),
        other => panic!("{other} in a condition"),
    }
}

/// Whether a condition of the template holds for these parameter values.
fn condition_holds(name: &str, given: &[(&str, &str)]) -> bool {
    let condition = &template()["Conditions"][name];
    assert!(!condition.is_null(), "{TEMPLATE} has no condition {name}");
    expression_holds(condition, given)
}

/// A value as deployed with these parameter values: each `Fn::If` replaced
/// by the branch its condition picks, `AWS::NoValue` (in a list or a map)
/// left out; `None` if the value itself is `AWS::NoValue`.
fn resolve_ifs(v: &Value, given: &[(&str, &str)]) -> Option<Value> {
    if let Some([condition, yes, no]) = v.get("Fn::If").and_then(Value::as_array).map(Vec::as_slice)
    {
        let holds = condition_holds(condition.as_str().expect("a condition name"), given);
        return resolve_ifs(if holds { yes } else { no }, given);
    }
    match v {
        _ if is_no_value(v) => None,
        Value::Array(items) => Some(Value::Array(
            items.iter().filter_map(|i| resolve_ifs(i, given)).collect(),
        )),
        Value::Object(map) => Some(Value::Object(
            map.iter()
                .filter_map(|(k, i)| resolve_ifs(i, given).map(|i| (k.clone(), i)))
                .collect(),
        )),
        other => Some(other.clone()),
    }
}

/// The rules whose assertions fail for these parameter values (the stack
/// would not deploy).
fn failing_rules(given: &[(&str, &str)]) -> Vec<&'static str> {
    let rules = template()["Rules"]
        .as_object()
        .expect("the template has Rules");
    rules
        .iter()
        .filter(|(_, rule)| {
            rule.get("RuleCondition")
                .is_none_or(|condition| expression_holds(condition, given))
        })
        .filter(|(_, rule)| {
            rule["Assertions"]
                .as_array()
                .expect("a rule's Assertions")
                .iter()
                .any(|a| !expression_holds(&a["Assert"], given))
        })
        .map(|(name, _)| name.as_str())
        .collect()
}

#[test]
fn alarms_notify_the_alarm_email_only_when_one_is_given() {
    let email = parameter("AlarmEmail");
    assert_eq!(email["Type"], "String");
    assert_eq!(email["Default"], "", "no notifications unless asked for");

    let (topic, topic_resource) = only_resource("AWS::SNS::Topic");
    let condition = topic_resource["Condition"]
        .as_str()
        .expect("the alarm topic exists only with an AlarmEmail (a Condition)");
    assert!(
        !condition_holds(condition, &[]),
        "AlarmEmail left empty must create no topic"
    );
    assert!(condition_holds(
        condition,
        &[("AlarmEmail", "ops@example.com")]
    ));
    assert_eq!(
        topic_resource["Properties"]["Subscription"],
        json!([{ "Protocol": "email", "Endpoint": { "Ref": "AlarmEmail" } }])
    );
    for (name, subscription) in resources_of_type("AWS::SNS::Subscription") {
        assert_eq!(subscription["Condition"], condition, "{name}");
    }

    for name in MONITORING_ALARMS.iter().chain(ARM64_MONITORING_ALARMS) {
        assert_eq!(
            alarm(name)["AlarmActions"],
            json!({ "Fn::If": [condition, [{ "Ref": topic }], { "Ref": "AWS::NoValue" }] }),
            "{name} notifies the topic when there is one, and nobody otherwise"
        );
    }
    // Every alarm says what it means: it is all the notification shows.
    for (name, alarm) in resources_of_type("AWS::CloudWatch::Alarm") {
        let description = alarm["Properties"]["AlarmDescription"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no AlarmDescription"));
        assert!(
            (20..=1024).contains(&description.len()),
            "{name}: {description:?}"
        );
        if MONITORING_ALARMS.contains(&name) || ARM64_MONITORING_ALARMS.contains(&name) {
            assert!(
                description.contains("logs") || description.contains("queue"),
                "{name} says where to look: {description:?}"
            );
        }
    }
}

/// The dead-letter queue of a build queue.
fn dead_letter_queue(queue: &str) -> &'static str {
    let (dead_letters, attribute) =
        get_att(&resource(queue)["Properties"]["RedrivePolicy"]["deadLetterTargetArn"])
            .unwrap_or_else(|| panic!("{queue}: the dead-letter target is a queue of the stack"));
    assert_eq!(attribute, "Arn", "{queue}");
    assert_eq!(resource(dead_letters)["Type"], "AWS::SQS::Queue", "{queue}");
    assert!(
        resource(dead_letters)["Properties"]["RedrivePolicy"].is_null(),
        "{dead_letters} keeps what it gets"
    );
    dead_letters
}

#[test]
fn the_dead_letter_alarm_watches_the_build_queues_dead_letter_queue() {
    // Each build queue's dead letters have an alarm, under the condition
    // the queue exists on.
    let pairs = [
        ("BuildQueue", "DeadLetterAlarm"),
        ("Arm64BuildQueue", "Arm64DeadLetterAlarm"),
    ];
    assert_eq!(
        build_queues().into_iter().collect::<BTreeSet<_>>(),
        pairs.iter().map(|(queue, _)| *queue).collect(),
        "every build queue has a dead-letter alarm"
    );
    for (queue, name) in pairs {
        let dead_letters = dead_letter_queue(queue);
        assert_eq!(
            resource(dead_letters)["Condition"],
            resource(queue)["Condition"],
            "{dead_letters} exists with {queue}"
        );
        assert_eq!(
            resource(name)["Condition"],
            resource(queue)["Condition"],
            "{name}"
        );
        let alarm = alarm(name);
        assert_eq!(alarm["Namespace"], "AWS/SQS");
        assert_eq!(alarm["MetricName"], "ApproximateNumberOfMessagesVisible");
        let dimensions = alarm["Dimensions"].as_array().expect("Dimensions");
        assert_eq!(dimensions.len(), 1, "{dimensions:?}");
        assert_eq!(dimensions[0]["Name"], "QueueName");
        assert_eq!(
            get_att(&dimensions[0]["Value"]),
            Some((dead_letters, "QueueName")),
            "{name}"
        );
        assert_eq!(alarm["Statistic"], "Maximum");
        assert_eq!(number(&alarm["Period"]), 300);
        assert_eq!(number(&alarm["EvaluationPeriods"]), 1);
        assert_eq!(number(&alarm["Threshold"]), 1);
        assert_eq!(alarm["ComparisonOperator"], "GreaterThanOrEqualToThreshold");
        assert_eq!(alarm["TreatMissingData"], "notBreaching");
    }
}

#[test]
fn the_build_failure_rate_alarm_divides_the_workers_failures_by_its_builds() {
    let alarm = alarm("BuildFailureRateAlarm");
    let queries = alarm["Metrics"].as_array().expect("metric math (Metrics)");
    let mut ids = BTreeMap::new();
    let mut returned = Vec::new();
    for query in queries {
        let id = query["Id"].as_str().expect("an Id");
        if let Some(stat) = query.get("MetricStat") {
            let metric = &stat["Metric"];
            assert_eq!(metric["Namespace"], metrics::NAMESPACE, "{id}");
            assert_eq!(
                metric["Dimensions"],
                json!([{ "Name": metrics::SERVICE_DIMENSION, "Value": metrics::SERVICE_WORKER }]),
                "{id}: the worker's metrics"
            );
            assert_eq!(stat["Stat"], "Sum", "{id}");
            assert_eq!(number(&stat["Period"]), 900, "{id}");
            let name = metric["MetricName"].as_str().expect("a MetricName");
            assert!(ids.insert(name, id).is_none(), "{name} twice");
        }
        // ReturnData is true unless set to false.
        if query["ReturnData"] != false {
            returned.push(query);
        }
    }
    assert_eq!(
        ids.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([metrics::BUILDS, metrics::BUILD_FAILURES])
    );
    assert_eq!(returned.len(), 1, "the alarm watches one expression");
    let expression = returned[0]["Expression"]
        .as_str()
        .expect("the alarm watches an Expression");
    let compact: String = expression.split_whitespace().collect();
    let (builds, failures) = (ids[metrics::BUILDS], ids[metrics::BUILD_FAILURES]);
    assert!(
        compact.starts_with(&format!("IF({builds}>0,")),
        "a rate only when there were builds: {expression}"
    );
    assert!(
        compact.contains(failures) && compact.contains(&format!("/{builds},")),
        "failures / builds: {expression}"
    );

    assert_eq!(
        alarm["Threshold"],
        json!({ "Ref": "BuildFailureRateThreshold" })
    );
    let threshold = parameter("BuildFailureRateThreshold");
    assert_eq!(threshold["Type"], "Number");
    assert_eq!(threshold["Default"].as_f64(), Some(0.5));
    assert_eq!(threshold["MinValue"].as_f64(), Some(0.0));
    assert_eq!(threshold["MaxValue"].as_f64(), Some(1.0), "a fraction");
    assert_eq!(alarm["ComparisonOperator"], "GreaterThanThreshold");
    assert_eq!(alarm["TreatMissingData"], "notBreaching");
}

#[test]
fn the_function_errors_alarm_watches_the_registry_function() {
    let (function, _) = only_resource("AWS::Serverless::Function");
    let alarm = alarm("FunctionErrorsAlarm");
    assert_eq!(alarm["Namespace"], "AWS/Lambda");
    assert_eq!(alarm["MetricName"], "Errors");
    assert_eq!(
        alarm["Dimensions"],
        json!([{ "Name": "FunctionName", "Value": { "Ref": function } }])
    );
    assert_eq!(alarm["Statistic"], "Sum");
    assert_eq!(number(&alarm["Period"]), 300);
    assert_eq!(number(&alarm["EvaluationPeriods"]), 2);
    if !alarm["DatapointsToAlarm"].is_null() {
        assert_eq!(number(&alarm["DatapointsToAlarm"]), 2, "both periods");
    }
    assert_eq!(number(&alarm["Threshold"]), 1);
    assert_eq!(alarm["ComparisonOperator"], "GreaterThanOrEqualToThreshold");
    assert_eq!(alarm["TreatMissingData"], "notBreaching");
}

/// A `Fn::Sub` string with each `${name}` replaced by `<name>`, and the
/// names; each must be a parameter, a resource (or its attribute), a
/// pseudo parameter or one of the Sub's own variables. A variable whose
/// value is a string, or a `Fn::Sub`, after the `Fn::If`s are decided by
/// the `given` parameter values, is put in place (itself substituted so).
fn sub_with_placeholders(sub: &Value, given: &[(&str, &str)]) -> (String, Vec<String>) {
    let (text, variables) = match sub {
        Value::String(text) => (text.as_str(), None),
        Value::Array(parts) => (
            parts[0].as_str().expect("the Sub's string"),
            parts[1].as_object(),
        ),
        other => panic!("Fn::Sub of {other}"),
    };
    let mut out = String::new();
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        rest = &rest[start + 2..];
        if let Some(literal) = rest.strip_prefix('!') {
            // `${!x}` is the literal `${x}`.
            out.push_str("${");
            rest = literal;
            continue;
        }
        let end = rest.find('}').expect("an unclosed ${");
        let name = &rest[..end];
        rest = &rest[end + 1..];
        let variable = variables.and_then(|v| v.get(name)).map(|v| {
            resolve_ifs(v, given)
                .unwrap_or_else(|| panic!("${{{name}}}: AWS::NoValue is no Sub variable"))
        });
        match &variable {
            Some(Value::String(text)) => {
                out.push_str(text);
                continue;
            }
            Some(inner) if inner.get("Fn::Sub").is_some() => {
                let (text, inner_names) = sub_with_placeholders(&inner["Fn::Sub"], given);
                out.push_str(&text);
                names.extend(inner_names);
                continue;
            }
            _ => {}
        }
        let known = variable.is_some()
            || name.starts_with("AWS::")
            || !template()["Parameters"][name].is_null()
            || !template()["Resources"][name.split('.').next().unwrap()].is_null();
        assert!(known, "${{{name}}} names nothing in {TEMPLATE}");
        out.push_str(&format!("<{name}>"));
        names.push(name.to_string());
    }
    out.push_str(rest);
    (out, names)
}

/// One metric a dashboard graph shows.
#[derive(Debug)]
struct Shown {
    namespace: String,
    name: String,
    dimensions: BTreeMap<String, String>,
    stat: Option<String>,
}

/// The metrics of a dashboard's graphs, and their math expressions.
fn dashboard_metrics(body: &Value) -> (Vec<Shown>, Vec<String>) {
    let mut shown = Vec::new();
    let mut expressions = Vec::new();
    for widget in body["widgets"].as_array().expect("widgets") {
        if widget["type"] != "metric" {
            continue;
        }
        let properties = &widget["properties"];
        assert_eq!(
            properties["region"], "<AWS::Region>",
            "every graph shows the stack's region: {widget}"
        );
        let mut previous: Vec<String> = Vec::new();
        for row in properties["metrics"].as_array().expect("metrics") {
            let row = row.as_array().expect("a metric row is an array");
            let options = row.last().and_then(Value::as_object);
            if let Some(expression) = options.and_then(|o| o.get("expression")) {
                expressions.push(expression.as_str().expect("an expression").to_string());
                continue;
            }
            // Strings, "." meaning the one above, then maybe the options.
            let mut parts: Vec<String> = Vec::new();
            for (i, part) in row.iter().take_while(|p| p.is_string()).enumerate() {
                let part = part.as_str().unwrap();
                parts.push(if part == "." {
                    previous[i].clone()
                } else {
                    part.to_string()
                });
            }
            assert!(parts.len() >= 2 && parts.len().is_multiple_of(2), "{row:?}");
            let dimensions = parts[2..]
                .chunks(2)
                .map(|pair| (pair[0].clone(), pair[1].clone()))
                .collect();
            let stat = options
                .and_then(|o| o.get("stat"))
                .or(properties.get("stat"))
                .and_then(Value::as_str)
                .map(str::to_string);
            shown.push(Shown {
                namespace: parts[0].clone(),
                name: parts[1].clone(),
                dimensions,
                stat,
            });
            previous = parts;
        }
    }
    (shown, expressions)
}

/// The values of `key="value"` in a search expression.
fn search_terms<'a>(expression: &'a str, key: &str) -> Vec<&'a str> {
    let key = format!("{key}=\"");
    expression
        .split(key.as_str())
        .skip(1)
        .map(|rest| &rest[..rest.find('"').expect("a closing quote")])
        .collect()
}

#[test]
fn the_dashboard_shows_the_metrics_the_code_writes_and_no_others() {
    let (dashboard, dashboard_resource) = only_resource("AWS::CloudWatch::Dashboard");
    let properties = &dashboard_resource["Properties"];
    let (name, _) = sub_with_placeholders(&properties["DashboardName"]["Fn::Sub"], &[]);
    // Dashboards are global to the account: the region keeps two stacks of
    // one name apart.
    assert_eq!(name, "<AWS::StackName>-<AWS::Region>");
    // With and without the arm64 workers' alarm and queues.
    for (given, arm64) in [(&[][..], false), (WITH_ARM64_WORKERS, true)] {
        check_dashboard_body(dashboard, &properties["DashboardBody"], given, arm64);
    }

    // And the stack says where it is.
    let url = template()["Outputs"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|o| o["Value"]["Fn::Sub"].as_str())
        .find(|v| v.contains(&format!("${{{dashboard}}}")))
        .expect("an Output with the dashboard's URL");
    assert!(
        url.starts_with("https://")
            && url.contains("/cloudwatch/home?region=${AWS::Region}#dashboards"),
        "{url}"
    );
}

/// The dashboard's body (a `Fn::Sub`) as deployed with these parameter
/// values, with (`arm64`) or without arm64 workers: valid JSON, widgets on
/// the grid, and the metrics, queues and alarms it must show.
fn check_dashboard_body(dashboard: &str, body: &Value, given: &[(&str, &str)], arm64: bool) {
    let (body, _) = sub_with_placeholders(&body["Fn::Sub"], given);
    let body: Value = serde_json::from_str(&body).unwrap_or_else(|e| {
        panic!("{dashboard}'s body is not JSON after substitution (arm64 workers: {arm64}): {e}")
    });

    // Every widget on the 24-column grid, none over another.
    let widgets = body["widgets"].as_array().expect("widgets");
    let boxes: Vec<[u64; 4]> = widgets
        .iter()
        .map(|w| ["x", "y", "width", "height"].map(|k| number(&w[k])))
        .collect();
    for (i, [x, y, w, h]) in boxes.iter().enumerate() {
        assert!(x + w <= 24, "{}", widgets[i]);
        for [x2, y2, w2, h2] in &boxes[i + 1..] {
            let apart = x + w <= *x2 || x2 + w2 <= *x || y + h <= *y2 || y2 + h2 <= *y;
            assert!(apart, "{} overlaps another widget", widgets[i]);
        }
    }

    let (shown, expressions) = dashboard_metrics(&body);
    // Each (metric, service) shown.
    let mut nixery = BTreeSet::new();
    for metric in &shown {
        if metric.namespace != metrics::NAMESPACE {
            continue;
        }
        let services = services_of(&metric.name);
        assert!(
            !services.is_empty(),
            "the dashboard shows {}, which nixery::metrics does not name",
            metric.name
        );
        let service = metric
            .dimensions
            .get(metrics::SERVICE_DIMENSION)
            .map(String::as_str)
            .unwrap_or_default();
        assert!(
            services.contains(&service),
            "{metric:?}: written by {services:?}"
        );
        assert_eq!(metric.dimensions.len(), 1, "{metric:?}");
        nixery.insert((metric.name.as_str(), service));
    }
    // Searches (errors by code) name metrics and dimensions too.
    let mut by_code = false;
    for expression in &expressions {
        let Some(schema) = expression
            .split_once('{')
            .and_then(|(_, rest)| rest.split_once('}'))
            .map(|(schema, _)| schema)
        else {
            continue;
        };
        let mut schema = schema.split(',').map(str::trim);
        if schema.next() != Some(metrics::NAMESPACE) {
            continue;
        }
        let dimensions: BTreeSet<&str> = schema.collect();
        for dimension in &dimensions {
            assert!(
                [metrics::SERVICE_DIMENSION, metrics::ERROR_CODE_DIMENSION].contains(dimension),
                "{expression}: no metric has the dimension {dimension}"
            );
        }
        let names = search_terms(expression, "MetricName");
        assert!(!names.is_empty(), "{expression}: name the metric");
        for name in names {
            let services = services_of(name);
            assert!(
                !services.is_empty(),
                "{expression}: nixery::metrics does not name {name}"
            );
            let service = match search_terms(expression, metrics::SERVICE_DIMENSION)[..] {
                [one] if services.contains(&one) => one,
                ref other => panic!("{expression}: Service {other:?}, written by {services:?}"),
            };
            if dimensions.contains(metrics::ERROR_CODE_DIMENSION) {
                assert_eq!(name, metrics::ERRORS, "only Errors has an ErrorCode");
                by_code = true;
            }
            nixery.insert((name, service));
        }
    }
    assert!(by_code, "the dashboard shows errors by code");
    let written: BTreeSet<(&str, &str)> = FUNCTION_METRICS
        .iter()
        .map(|m| (*m, metrics::SERVICE_FUNCTION))
        .chain(WORKER_METRICS.iter().map(|m| (*m, metrics::SERVICE_WORKER)))
        .collect();
    assert_eq!(
        nixery, written,
        "the dashboard shows every metric the code writes, for each service that writes it"
    );

    for service in [metrics::SERVICE_WORKER, metrics::SERVICE_FUNCTION] {
        let duration: BTreeSet<&str> = shown
            .iter()
            .filter(|m| m.namespace == metrics::NAMESPACE && m.name == metrics::BUILD_DURATION)
            .filter(|m| {
                m.dimensions
                    .get(metrics::SERVICE_DIMENSION)
                    .map(String::as_str)
                    == Some(service)
            })
            .filter_map(|m| m.stat.as_deref())
            .collect();
        for stat in ["p50", "p90", "Maximum"] {
            assert!(
                duration.contains(stat),
                "{service}: build duration {stat}: {duration:?}"
            );
        }
    }

    // The queues and the function, by the stack's own names.
    let shows = |namespace: &str, name: &str, dimension: &str, value: &str| {
        assert!(
            shown.iter().any(|m| m.namespace == namespace
                && m.name == name
                && m.dimensions == BTreeMap::from([(dimension.to_string(), value.to_string())])),
            "the dashboard does not show {namespace} {name} of {value}"
        );
    };
    let depth = "ApproximateNumberOfMessagesVisible";
    let mut queues = vec!["BuildQueue"];
    if arm64 {
        queues.push("Arm64BuildQueue");
    }
    for queue in queues {
        shows(
            "AWS/SQS",
            depth,
            "QueueName",
            &format!("<{queue}.QueueName>"),
        );
        shows(
            "AWS/SQS",
            "ApproximateNumberOfMessagesNotVisible",
            "QueueName",
            &format!("<{queue}.QueueName>"),
        );
        shows(
            "AWS/SQS",
            depth,
            "QueueName",
            &format!("<{}.QueueName>", dead_letter_queue(queue)),
        );
    }
    if !arm64 {
        assert!(
            !body.to_string().contains("Arm64"),
            "without arm64 workers the dashboard names none of their resources"
        );
    }
    let (function, _) = only_resource("AWS::Serverless::Function");
    for name in ["Duration", "Errors", "Throttles"] {
        shows("AWS/Lambda", name, "FunctionName", &format!("<{function}>"));
    }

    // The alarms that call for a person, at the top.
    let arm64_alarms = if arm64 { ARM64_MONITORING_ALARMS } else { &[] };
    let alarms: Vec<String> = MONITORING_ALARMS
        .iter()
        .chain(arm64_alarms)
        .map(|a| format!("<{a}.Arn>"))
        .collect();
    assert!(
        widgets
            .iter()
            .any(|w| w["type"] == "alarm" && w["properties"]["alarms"] == json!(alarms)),
        "an alarm widget with {alarms:?}"
    );
}

// --- platforms and the arm64 workers ---------------------------------------------

/// Parameter values that give the stack arm64 workers.
const WITH_ARM64_WORKERS: &[(&str, &str)] = &[(
    "Arm64WorkerImageUri",
    "123456789012.dkr.ecr.us-east-1.amazonaws.com/nixery-worker:arm64",
)];

/// The condition every resource of the arm64 workers exists on.
const ARM64_CONDITION: &str = "HasArm64Workers";

/// The arm64 workers' resources, each with the x86_64 one it mirrors.
const ARM64_TWINS: &[(&str, &str)] = &[
    ("Arm64BuildDeadLetterQueue", "BuildDeadLetterQueue"),
    ("Arm64BuildQueue", "BuildQueue"),
    ("Arm64WorkerTaskDefinition", "WorkerTaskDefinition"),
    ("Arm64WorkerService", "WorkerService"),
    ("Arm64WorkerScalableTarget", "WorkerScalableTarget"),
    ("Arm64WorkerScaleOutPolicy", "WorkerScaleOutPolicy"),
    ("Arm64WorkerScaleInPolicy", "WorkerScaleInPolicy"),
    ("Arm64BuildsWaitingAlarm", "BuildsWaitingAlarm"),
    ("Arm64WorkersIdleAlarm", "WorkersIdleAlarm"),
    ("Arm64DeadLetterAlarm", "DeadLetterAlarm"),
];

/// Where an arm64 resource may differ from its twin (JSON pointers), beyond
/// naming the arm64 resources where the twin names the x86_64 ones.
const ARM64_DIFFERENCES: &[(&str, &str)] = &[
    ("Arm64WorkerTaskDefinition", "/Properties/Family"),
    (
        "Arm64WorkerTaskDefinition",
        "/Properties/RuntimePlatform/CpuArchitecture",
    ),
    (
        "Arm64WorkerTaskDefinition",
        "/Properties/ContainerDefinitions/0/Image",
    ),
    (
        "Arm64WorkerTaskDefinition",
        "/Properties/ContainerDefinitions/0/LogConfiguration/Options/awslogs-stream-prefix",
    ),
    // Fargate Spot runs no ARM64 tasks.
    (
        "Arm64WorkerService",
        "/Properties/CapacityProviderStrategy/0/CapacityProvider",
    ),
    ("Arm64WorkerScaleOutPolicy", "/Properties/PolicyName"),
    ("Arm64WorkerScaleInPolicy", "/Properties/PolicyName"),
    ("Arm64BuildsWaitingAlarm", "/Properties/AlarmDescription"),
    ("Arm64WorkersIdleAlarm", "/Properties/AlarmDescription"),
    ("Arm64DeadLetterAlarm", "/Properties/AlarmDescription"),
];

/// A value with every arm64 resource's name replaced by its twin's (in
/// `Ref`, `Fn::GetAtt` and `Fn::Sub` alike).
fn as_twin(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(
            ARM64_TWINS
                .iter()
                .fold(s.clone(), |s, (arm64, x86)| s.replace(arm64, x86)),
        ),
        Value::Array(items) => Value::Array(items.iter().map(as_twin).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), as_twin(v))).collect())
        }
        other => other.clone(),
    }
}

#[test]
fn the_platforms_the_template_allows_are_ones_the_code_accepts() {
    let platforms = parameter("Platforms");
    assert_eq!(
        platforms["Default"], "amd64",
        "amd64 images only, as before"
    );
    let allowed: Vec<&str> = platforms["AllowedValues"]
        .as_array()
        .expect("Platforms has AllowedValues")
        .iter()
        .map(|v| v.as_str().expect("a string"))
        .collect();
    assert_eq!(allowed, ["amd64", "amd64,arm64", "arm64"]);
    for value in allowed {
        let cli = <Cli as clap::Parser>::try_parse_from(["nixery", "serve", "--platforms", value])
            .unwrap_or_else(|e| panic!("Platforms={value}: the code refuses it: {e}"));
        let Some(CliCommand::Serve(args)) = cli.command else {
            panic!("not serve");
        };
        let parsed = &args.image.platforms.0;
        let want: Vec<Arch> = value
            .split(',')
            .map(|p| {
                if p == "amd64" {
                    Arch::Amd64
                } else {
                    Arch::Arm64
                }
            })
            .collect();
        assert_eq!(parsed, &want, "Platforms={value}");
    }
    assert_eq!(
        function_env().get("NIXERY_PLATFORMS"),
        Some(&Setting {
            value: json!({ "Ref": "Platforms" }),
            condition: None,
        })
    );
}

#[test]
fn arm64_workers_exist_exactly_when_an_arm64_image_is_given() {
    let image = parameter("Arm64WorkerImageUri");
    assert_eq!(image["Type"], "String");
    assert_eq!(image["Default"], "", "no arm64 workers unless asked for");
    assert!(!condition_holds(ARM64_CONDITION, &[]));
    assert!(condition_holds(ARM64_CONDITION, WITH_ARM64_WORKERS));

    let resources = template()["Resources"].as_object().unwrap();
    let twins: BTreeSet<&str> = ARM64_TWINS.iter().map(|(arm64, _)| *arm64).collect();
    let conditional: BTreeSet<&str> = resources
        .iter()
        .filter(|(_, r)| r["Condition"] == ARM64_CONDITION)
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(conditional, twins, "the resources of the arm64 workers");
    let named: BTreeSet<&str> = resources
        .keys()
        .map(String::as_str)
        .filter(|name| name.starts_with("Arm64"))
        .collect();
    assert_eq!(named, twins);

    // Their outputs, likewise.
    for (name, output) in template()["Outputs"].as_object().unwrap() {
        if output.to_string().contains("Arm64") {
            assert_eq!(output["Condition"], ARM64_CONDITION, "{name}");
        }
    }
}

#[test]
fn the_arm64_workers_mirror_the_x86_64_workers() {
    for (arm64, x86) in ARM64_TWINS {
        let mut mirrored = as_twin(resource(arm64));
        let twin = resource(x86);
        assert!(twin["Condition"].is_null(), "{x86} always exists");
        assert_eq!(
            mirrored
                .as_object_mut()
                .unwrap()
                .remove("Condition")
                .as_ref()
                .and_then(Value::as_str),
            Some(ARM64_CONDITION),
            "{arm64}"
        );
        for (_, pointer) in ARM64_DIFFERENCES.iter().filter(|(name, _)| name == arm64) {
            let theirs = twin
                .pointer(pointer)
                .unwrap_or_else(|| panic!("{x86} has no {pointer}"));
            let ours = mirrored
                .pointer_mut(pointer)
                .unwrap_or_else(|| panic!("{arm64} has no {pointer}"));
            assert_ne!(
                ours, theirs,
                "{arm64}{pointer} is the same as {x86}'s: not a difference"
            );
            *ours = theirs.clone();
        }
        assert_eq!(
            &mirrored, twin,
            "{arm64} differs from {x86} beyond ARM64_DIFFERENCES: change both, or list the difference"
        );
    }
}

#[test]
fn the_arm64_workers_run_on_graviton_and_take_builds_from_their_own_queue() {
    let task = resource("Arm64WorkerTaskDefinition");
    assert_eq!(task["Condition"], ARM64_CONDITION);
    let properties = &task["Properties"];
    assert_eq!(
        properties["RuntimePlatform"],
        json!({ "CpuArchitecture": "ARM64", "OperatingSystemFamily": "LINUX" })
    );
    assert_eq!(properties["RequiresCompatibilities"], json!(["FARGATE"]));
    assert_eq!(
        properties["ContainerDefinitions"][0]["Image"],
        json!({ "Ref": "Arm64WorkerImageUri" })
    );
    let service = &resource("Arm64WorkerService")["Properties"];
    assert_eq!(
        service["TaskDefinition"],
        json!({ "Ref": "Arm64WorkerTaskDefinition" })
    );
    assert_eq!(
        service["CapacityProviderStrategy"],
        json!([{ "CapacityProvider": "FARGATE", "Weight": 1 }]),
        "Fargate Spot runs no ARM64 tasks"
    );

    // The arm64 workers read their queue, and the function sends arm64
    // builds to that same queue, exactly when it exists.
    let env = task_env("Arm64WorkerTaskDefinition");
    let queue = env["NIXERY_QUEUE_URL"].value["Ref"]
        .as_str()
        .expect("NIXERY_QUEUE_URL is a queue of the stack");
    assert_eq!(env["NIXERY_QUEUE_URL"].condition, None);
    assert_eq!(queue, "Arm64BuildQueue");
    assert_eq!(resource(queue)["Type"], "AWS::SQS::Queue");
    assert_eq!(resource(queue)["Condition"], ARM64_CONDITION);
    assert_eq!(
        function_env().get("NIXERY_ARM64_QUEUE_URL"),
        Some(&Setting {
            value: json!({ "Ref": queue }),
            condition: Some((ARM64_CONDITION.to_string(), true)),
        }),
        "the function sends aarch64-linux builds to the arm64 workers' queue, and only when there is one"
    );
    assert_eq!(
        worker_env()["NIXERY_QUEUE_URL"].value,
        json!({ "Ref": "BuildQueue" }),
        "the x86_64 workers keep the other queue"
    );

    // With a dead-letter queue of its own, as the x86_64 queue has.
    let dead_letters = dead_letter_queue(queue);
    assert_ne!(dead_letters, dead_letter_queue("BuildQueue"));
    assert_eq!(resource(dead_letters)["Condition"], ARM64_CONDITION);
    assert_eq!(
        resource(queue)["Properties"]["RedrivePolicy"]["maxReceiveCount"],
        json!({ "Ref": "MaxReceiveCount" })
    );
}

/// Whether a role allows an action on the `Arn` of a resource of the
/// stack, when deployed with these parameter values.
fn allows(role: &str, action: &str, target: &str, given: &[(&str, &str)]) -> bool {
    statements(role).iter().any(|statement| {
        let Some(statement) = resolve_ifs(statement, given) else {
            return false;
        };
        let resources = match &statement["Resource"] {
            Value::Array(items) => items.clone(),
            one => vec![one.clone()],
        };
        statement["Effect"] == "Allow"
            && actions(&statement).contains(&action)
            && resources
                .iter()
                .any(|r| get_att(r) == Some((target, "Arn")))
    })
}

/// The role a resource's property names by its `Arn`.
fn role_of(resource_name: &str, property: &str) -> &'static str {
    match get_att(&resource(resource_name)["Properties"][property]) {
        Some((role, "Arn")) => role,
        other => panic!("{resource_name}.{property} is not a role of the stack: {other:?}"),
    }
}

#[test]
fn the_worker_role_takes_and_the_function_sends_arm64_builds_only_with_arm64_workers() {
    let worker_role = role_of("Arm64WorkerTaskDefinition", "TaskRoleArn");
    assert_eq!(
        worker_role,
        role_of("WorkerTaskDefinition", "TaskRoleArn"),
        "the arm64 workers share the x86_64 workers' role"
    );
    let (function, _) = only_resource("AWS::Serverless::Function");
    let function_role = role_of(function, "Role");
    let take = [
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
    ];
    for (given, arm64) in [(&[][..], false), (WITH_ARM64_WORKERS, true)] {
        for action in take {
            assert!(allows(worker_role, action, "BuildQueue", given), "{action}");
            assert_eq!(
                allows(worker_role, action, "Arm64BuildQueue", given),
                arm64,
                "{worker_role}: {action} on Arm64BuildQueue (arm64 workers: {arm64})"
            );
            assert!(
                !allows(function_role, action, "Arm64BuildQueue", given),
                "{function_role} only sends"
            );
        }
        assert!(allows(
            function_role,
            "sqs:SendMessage",
            "BuildQueue",
            given
        ));
        assert_eq!(
            allows(function_role, "sqs:SendMessage", "Arm64BuildQueue", given),
            arm64,
            "{function_role}: sqs:SendMessage on Arm64BuildQueue (arm64 workers: {arm64})"
        );
        assert!(!allows(
            worker_role,
            "sqs:SendMessage",
            "Arm64BuildQueue",
            given
        ));
    }
    // Without arm64 workers no policy names their queue at all (it would
    // not deploy: the queue does not exist).
    for role in [worker_role, function_role] {
        let resolved = resolve_ifs(resource(role), &[]).unwrap().to_string();
        assert!(!resolved.contains("Arm64"), "{role}: {resolved}");
    }
}

#[test]
fn rules_allow_arm64_images_without_arm64_workers() {
    // Platforms with arm64 and no arm64 workers deploys: the x86_64
    // workers download aarch64-linux packages from the binary cache
    // (docs/deploy.md says what that cannot build).
    let platforms: Vec<&str> = parameter("Platforms")["AllowedValues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for value in platforms {
        assert_eq!(
            failing_rules(&[("Platforms", value)]),
            Vec::<&str>::new(),
            "{value}"
        );
        let with_workers: Vec<(&str, &str)> = WITH_ARM64_WORKERS
            .iter()
            .copied()
            .chain([("Platforms", value)])
            .collect();
        assert_eq!(
            failing_rules(&with_workers),
            Vec::<&str>::new(),
            "{value} with arm64 workers"
        );
    }
    // arm64 workers are beside x86_64 ones, not instead of them.
    let arm64_only: Vec<(&str, &str)> = WITH_ARM64_WORKERS
        .iter()
        .copied()
        .chain([("WorkerArchitecture", "ARM64")])
        .collect();
    assert_eq!(failing_rules(&arm64_only), ["Arm64WorkersBesideX86Workers"]);
    assert_eq!(
        failing_rules(&[("WorkerArchitecture", "ARM64")]),
        Vec::<&str>::new(),
        "ARM64 workers alone are still fine"
    );
}

// --- cold pulls from the binary cache --------------------------------------------

/// The registry's configuration with these cache settings, as the
/// function is deployed (S3, builds on workers); the code's answer.
fn function_config(
    from_cache: &str,
    substituter: &str,
) -> Result<nixery::config::ServeConfig, String> {
    let cli = <Cli as clap::Parser>::try_parse_from([
        "nixery",
        "serve",
        "--storage-backend",
        "s3",
        "--s3-bucket",
        "bucket",
        "--builder",
        "sqs",
        "--queue-url",
        "https://sqs.us-east-1.amazonaws.com/123456789012/builds",
        "--from-cache",
        from_cache,
        "--substituter",
        substituter,
    ])
    .map_err(|e| e.to_string())?;
    match cli.mode(false).map_err(|e| e.to_string())? {
        nixery::config::Mode::Serve(config) => Ok(*config),
        other => panic!("serve gave {other:?}"),
    }
}

/// The values a clap argument of `serve` accepts, and its default.
fn serve_arg(id: &str) -> (Vec<String>, Vec<String>) {
    let cli = <Cli as clap::CommandFactory>::command();
    let serve = cli.find_subcommand("serve").unwrap();
    let arg = serve
        .get_arguments()
        .find(|a| a.get_id() == id)
        .unwrap_or_else(|| panic!("serve has no argument {id}"));
    (
        arg.get_possible_values()
            .iter()
            .map(|v| v.get_name().to_string())
            .collect(),
        arg.get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect(),
    )
}

fn string_default(name: &str) -> String {
    parameter(name)["Default"]
        .as_str()
        .unwrap_or_else(|| panic!("{name}'s Default is a string"))
        .to_string()
}

#[test]
fn the_function_gets_the_binary_cache_settings_with_the_codes_defaults() {
    let env = function_env();
    for (var, parameter_name) in [
        ("NIXERY_FROM_CACHE", "FromCache"),
        ("NIXERY_SUBSTITUTER", "Substituter"),
        ("NIXERY_TRUSTED_KEYS", "TrustedKeys"),
    ] {
        assert_eq!(
            env.get(var),
            Some(&Setting {
                value: json!({ "Ref": parameter_name }),
                condition: None,
            }),
            "{var}"
        );
    }
    // The defaults are the code's: cache.nixos.org, its key, first.
    assert_eq!(
        string_default("Substituter"),
        nixery::config::DEFAULT_SUBSTITUTER
    );
    assert_eq!(
        string_default("TrustedKeys"),
        nixery::binary_cache::CACHE_NIXOS_ORG_KEY
    );
    let (modes, default_mode) = serve_arg("from_cache");
    assert_eq!(vec![string_default("FromCache")], default_mode);
    let allowed: Vec<String> = parameter("FromCache")["AllowedValues"]
        .as_array()
        .expect("FromCache has AllowedValues")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(allowed, modes, "FromCache allows the code's modes");

    // Every combination the template deploys, the code starts with; the
    // one it refuses, a rule refuses first. And the conditions the roles,
    // the sizes and the index task depend on say what the code does.
    for mode in &allowed {
        for substituter in [string_default("Substituter"), "none".to_string()] {
            let given = [
                ("FromCache", mode.as_str()),
                ("Substituter", substituter.as_str()),
            ];
            let rules = failing_rules(&given);
            match function_config(mode, &substituter) {
                Err(refused) => assert_eq!(
                    rules,
                    ["OnlyNeedsASubstituter"],
                    "{given:?}: the code refuses it ({refused}), so must a rule"
                ),
                Ok(config) => {
                    assert_eq!(rules, Vec::<&str>::new(), "{given:?}");
                    assert_eq!(
                        condition_holds("AssemblesInFunction", &given),
                        config.assembly.is_some(),
                        "AssemblesInFunction with {given:?}"
                    );
                    let sends_index_jobs = config
                        .assembly
                        .as_ref()
                        .is_some_and(|(cache, _)| cache.mode == nixery::assembly::FromCache::First);
                    assert_eq!(
                        condition_holds("SendsIndexJobs", &given),
                        sends_index_jobs,
                        "SendsIndexJobs with {given:?}"
                    );
                }
            }
        }
    }
    assert!(condition_holds("AssemblesInFunction", &[]), "on by default");
}

/// What a parameter's AllowedPattern says of these values (Python's re,
/// which agrees with CloudFormation's on the patterns used here).
fn pattern_matches(pattern: &str, values: &[&str]) -> Vec<bool> {
    const MATCH: &str = r#"
import json, re, sys
pattern = sys.argv[1]
print(json.dumps([re.fullmatch(pattern, v) is not None for v in sys.argv[2:]]))
"#;
    let out = assert_success(
        Command::new("python3")
            .args(["-c", MATCH, pattern])
            .args(values),
    );
    serde_json::from_str(&out).unwrap()
}

#[test]
fn every_parameters_default_matches_its_pattern() {
    for (name, p) in template()["Parameters"].as_object().unwrap() {
        let (Some(pattern), Some(default)) = (p["AllowedPattern"].as_str(), p["Default"].as_str())
        else {
            continue;
        };
        assert_eq!(
            pattern_matches(pattern, &[default]),
            [true],
            "{name}: {default:?}"
        );
    }
    // The cache: http(s) or none (the function has no file system to share).
    let substituter = parameter("Substituter")["AllowedPattern"].as_str().unwrap();
    assert_eq!(
        pattern_matches(
            substituter,
            &[
                "https://cache.nixos.org",
                "http://10.0.0.1:8080",
                "none",
                "file:///cache",
                ""
            ]
        ),
        [true, true, true, false, false]
    );
    // Popularity data both the workers and the function can read.
    let popularity = parameter("PopularityUrl")["AllowedPattern"]
        .as_str()
        .unwrap();
    assert_eq!(
        pattern_matches(
            popularity,
            &[
                "",
                "https://example.org/popularity.json",
                "s3://bucket/attrs/5f/x86_64-linux/popularity",
                "s3://bucket/popularity.json",
                "s3://bucket/auth/popularity.json",
            ]
        ),
        [true, true, true, false, false]
    );
}

#[test]
fn the_function_is_sized_for_assembly_and_reaches_the_cache() {
    let (name, function) = only_resource("AWS::Serverless::Function");
    let props = &function["Properties"];
    // Packing runs on every core: Lambda gives a second core above 1,769
    // MB, and CPU in proportion to memory.
    assert_eq!(props["MemorySize"], json!({ "Ref": "FunctionMemory" }));
    let memory = number(&parameter("FunctionMemory")["Default"]);
    assert!(
        (1770..=3008).contains(&memory),
        "FunctionMemory {memory}: two cores, within what any account may set"
    );
    // An assembly has BuildTimeout (less than this) and then is handed
    // over: Lambda's maximum leaves room for the hand-over.
    assert_eq!(number(&props["Timeout"]), 900, "{name}");
    // Layers stream to S3 as they are packed: /tmp holds small objects
    // only, and Lambda's default ephemeral storage (billed by the GB-s
    // above it) is enough whatever NIXERY_MAX_IMAGE_SIZE says.
    assert!(
        props["EphemeralStorage"].is_null(),
        "{name} pays for ephemeral storage it does not use"
    );
    // Outside any VPC, it reaches the binary cache on the internet (in a
    // VPC it would need a NAT gateway: docs/deploy.md).
    assert!(props["VpcConfig"].is_null(), "{name} is in a VPC");
}

/// Seconds between two runs of an EventBridge `rate(...)` expression.
fn rate_seconds(expression: &str) -> u64 {
    let inner = expression
        .strip_prefix("rate(")
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{expression:?} is not a rate expression"));
    let (n, unit) = inner.split_once(' ').expect("rate(<n> <unit>)");
    let n: u64 = n.parse().expect("a whole number");
    n * match unit {
        "minute" | "minutes" => 60,
        "hour" | "hours" => 3600,
        "day" | "days" => 86400,
        other => panic!("unit {other}"),
    }
}

/// Where the function assembles: the index task's resources exist then.
const INDEX_CONDITION: &str = "AssemblesInFunction";
const INDEX_RESOURCES: &[&str] = &[
    "IndexTaskRole",
    "IndexTaskDefinition",
    "IndexScheduleRole",
    "IndexRule",
];

#[test]
fn the_index_task_runs_nixery_index_below_the_tag_ttl_with_memory_for_nixpkgs() {
    for name in INDEX_RESOURCES {
        assert_eq!(resource(name)["Condition"], INDEX_CONDITION, "{name}");
    }
    let task = &resource("IndexTaskDefinition")["Properties"];
    let container = &task["ContainerDefinitions"][0];
    // `nixery index` of the worker's image (which has Nix and git).
    assert_eq!(
        container["Image"],
        resource("WorkerTaskDefinition")["Properties"]["ContainerDefinitions"][0]["Image"]
    );
    assert_eq!(container["EntryPoint"], json!(["/bin/nixery"]));
    let mut argv = vec!["nixery".to_string()];
    argv.extend(
        container["Command"]
            .as_array()
            .expect("a Command")
            .iter()
            .map(|a| a.as_str().unwrap().to_string()),
    );
    let cli =
        <Cli as clap::Parser>::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let Some(CliCommand::Index(args)) = cli.command else {
        panic!("{argv:?} is not `nixery index`");
    };
    assert_eq!(args.tag, "latest", "the source as it is now");
    assert!(
        !args.popularity,
        "--popularity fetches every narinfo of every package on each run"
    );
    // The same architecture and network as the other tasks.
    assert_eq!(
        task["RuntimePlatform"],
        resource("GcTaskDefinition")["Properties"]["RuntimePlatform"]
    );
    assert_eq!(
        resource("IndexRule")["Properties"]["Targets"][0]["EcsParameters"]["NetworkConfiguration"],
        resource("GcRule")["Properties"]["Targets"][0]["EcsParameters"]["NetworkConfiguration"]
    );

    // Memory for evaluating nixpkgs: 8 GiB or more, each a Fargate pair
    // with its CPU (2 vCPU: 4-16 GiB in steps of 1 GiB).
    assert_eq!(task["Cpu"], "2048");
    assert_eq!(task["Memory"], json!({ "Ref": "IndexMemory" }));
    let memory = parameter("IndexMemory");
    let allowed = memory["AllowedValues"]
        .as_array()
        .expect("IndexMemory has AllowedValues");
    assert!(allowed.contains(&memory["Default"]));
    for value in allowed {
        let mib = number(value);
        assert!(mib >= 8192, "{mib} MiB is too little to evaluate nixpkgs");
        assert!(
            (4096..=16384).contains(&mib) && mib.is_multiple_of(1024),
            "{mib} MiB with 2 vCPU"
        );
    }

    // Scheduled often enough that an index of a moving source is younger
    // than the tag TTL when pulls read it, a run's time (allowed an hour)
    // included: in first mode an older one is not used.
    let rule = &resource("IndexRule")["Properties"];
    assert_eq!(
        rule["ScheduleExpression"],
        json!({ "Ref": "IndexSchedule" })
    );
    let every = rate_seconds(&string_default("IndexSchedule"));
    let tag_ttl = number(&parameter("TagTtl")["Default"]);
    assert!(
        every + 3600 <= tag_ttl,
        "IndexSchedule every {every} s, plus an hour's run, is not below TagTtl ({tag_ttl} s)"
    );
    let pattern = parameter("IndexSchedule")["AllowedPattern"]
        .as_str()
        .unwrap();
    assert_eq!(
        pattern_matches(
            pattern,
            &[
                "rate(4 hours)",
                "rate(90 minutes)",
                "cron(0 * * * ? *)",
                "rate(1 day)"
            ]
        ),
        [true, true, false, false],
        "rates in minutes or hours only, so that the period is plain"
    );

    // Run by its own role, on the workers' cluster.
    let target = &rule["Targets"][0];
    assert_eq!(get_att(&target["Arn"]), Some(("WorkerCluster", "Arn")));
    assert_eq!(
        get_att(&target["RoleArn"]),
        Some(("IndexScheduleRole", "Arn"))
    );
    assert_eq!(
        target["EcsParameters"]["TaskDefinitionArn"],
        json!({ "Ref": "IndexTaskDefinition" })
    );
    let may = statements("IndexScheduleRole");
    assert_eq!(may.len(), 2, "{may:?}");
    assert_eq!(may[0]["Action"], "ecs:RunTask");
    assert_eq!(may[0]["Resource"], json!({ "Ref": "IndexTaskDefinition" }));
    assert_eq!(may[1]["Action"], "iam:PassRole");
    let passed: BTreeSet<_> = may[1]["Resource"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(get_att)
        .collect();
    assert_eq!(
        passed,
        BTreeSet::from([("WorkerExecutionRole", "Arn"), ("IndexTaskRole", "Arn")])
    );
    assert_eq!(
        role_of("IndexTaskDefinition", "TaskRoleArn"),
        "IndexTaskRole"
    );

    // Without assembly there is no index to keep.
    for given in [
        &[("FromCache", "never")][..],
        &[("Substituter", "none")][..],
    ] {
        assert!(!condition_holds(INDEX_CONDITION, given), "{given:?}");
    }
}

#[test]
fn the_index_task_writes_attrs_and_nothing_else() {
    let attrs = json!({ "Fn::Sub": "${ImageBucket.Arn}/attrs/*" });
    let statements = statements("IndexTaskRole");
    assert!(!statements.is_empty());
    for statement in &statements {
        assert_eq!(statement["Effect"], "Allow", "{statement}");
        assert_eq!(actions(statement), ["s3:PutObject"], "{statement}");
        assert_eq!(statement["Resource"], attrs, "{statement}");
    }
    // The workers make the indexes the function asks them for.
    assert!(statements_given("WorkerTaskRole", &[]).iter().any(|s| {
        s["Effect"] == "Allow"
            && actions(s).contains(&"s3:PutObject")
            && s["Resource"].as_array().is_some_and(|r| r.contains(&attrs))
    }));
}

// --- the deployment guide ----------------------------------------------------------

/// A row of docs/deploy.md's settings table.
struct GuideRow {
    /// The parameters it is about.
    parameters: Vec<String>,
    /// The variables it says they set, with the sides (`function`,
    /// `worker`, `gc`, `index`, comma separated; `both` is the function
    /// and the worker).
    sets: Vec<(String, String)>,
}

/// The rows of docs/deploy.md's settings table.
fn documented_parameters() -> Vec<GuideRow> {
    let guide = std::fs::read_to_string(repo().join("docs/deploy.md")).unwrap();
    let mut lines = guide
        .lines()
        .skip_while(|l| !l.starts_with("| parameter | default | sets | meaning |"));
    assert!(
        lines.next().is_some(),
        "docs/deploy.md has no settings table (| parameter | default | sets | meaning |)"
    );
    lines
        .skip(1) // |---|---|
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cells: Vec<&str> = row
                .trim()
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect();
            assert_eq!(cells.len(), 4, "docs/deploy.md: {row}");
            // `A`, or `A` / `B`, or `A`, `B`, `C`: the odd pieces between backticks.
            let quoted = |cell: &str| -> Vec<String> {
                cell.split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_string)
                    .collect()
            };
            let sets = cell_pairs(cells[2])
                .unwrap_or_else(|| panic!("docs/deploy.md: `VARIABLE` (side) in {row}"));
            GuideRow {
                parameters: quoted(cells[0]),
                sets,
            }
        })
        .collect()
}

/// `` `VAR` (side) `` pairs of a cell; None if the cell has anything else.
fn cell_pairs(cell: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut rest = cell.trim();
    while !rest.is_empty() {
        let after = rest.strip_prefix('`')?;
        let (var, after) = after.split_once('`')?;
        let after = after.trim_start().strip_prefix('(')?;
        let (side, after) = after.split_once(')')?;
        pairs.push((var.to_string(), side.to_string()));
        rest = after.trim_start().trim_start_matches(',').trim_start();
    }
    Some(pairs)
}

/// Whether a setting's value names a parameter, or the setting is there
/// only when a condition on the parameter holds (a parameter that turns a
/// feature on): what the parameter's row must list.
fn set_from(setting: &Setting, parameter: &str) -> bool {
    let reference = json!({ "Ref": parameter }).to_string();
    setting.value.to_string().contains(&reference)
        || matches!(&setting.condition, Some((condition, true))
            if template()["Conditions"][condition].to_string().contains(&reference))
}

/// Whether a setting's value, or the condition it is set under, names a
/// parameter.
fn depends_on(setting: &Setting, parameter: &str) -> bool {
    let reference = json!({ "Ref": parameter }).to_string();
    set_from(setting, parameter)
        || setting.condition.as_ref().is_some_and(|(condition, _)| {
            template()["Conditions"][condition]
                .to_string()
                .contains(&reference)
        })
}

#[test]
fn the_deploy_guide_lists_every_parameter_and_what_it_sets() {
    let rows = documented_parameters();
    let mut documented = BTreeSet::new();
    for row in &rows {
        let names = &row.parameters;
        assert!(
            !names.is_empty(),
            "a row of docs/deploy.md's table names no parameter"
        );
        for name in names {
            assert!(
                documented.insert(name.as_str()),
                "docs/deploy.md lists {name} twice"
            );
        }
    }
    let parameters: BTreeSet<&str> = template()["Parameters"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        documented, parameters,
        "docs/deploy.md's settings table and the template's parameters"
    );

    let sides: Vec<(Side, BTreeMap<String, Setting>)> =
        Side::ALL.iter().map(|side| (*side, side.env())).collect();
    let env_of = |side: &str| {
        &sides
            .iter()
            .find(|(s, _)| s.name() == side)
            .unwrap_or_else(|| {
                panic!("docs/deploy.md names a side {side}: function, worker, both, gc or index")
            })
            .1
    };
    for row in &rows {
        let names = &row.parameters;
        // `(both)` is the function and the worker; `(a, b)` each of them.
        let sets: BTreeSet<(String, String)> = row
            .sets
            .iter()
            .flat_map(|(var, sides)| {
                sides
                    .split(',')
                    .map(str::trim)
                    .flat_map(|side| match side {
                        "both" => vec!["function", "worker"],
                        one => vec![one],
                    })
                    .map(|side| (var.clone(), side.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect();
        // What the guide says is set, is, from one of the row's parameters.
        for (var, side) in &sets {
            let setting = env_of(side).get(var).unwrap_or_else(|| {
                panic!(
                    "docs/deploy.md: {names:?} set {var} on the {side}, but the template does not"
                )
            });
            assert!(
                names.iter().any(|name| depends_on(setting, name)),
                "docs/deploy.md: {var} on the {side} does not come from {names:?}: {setting:?}"
            );
        }
        // And every variable a parameter sets is in its row.
        for name in names {
            for (side, env) in &sides {
                for (var, setting) in env {
                    if set_from(setting, name) {
                        assert!(
                            sets.contains(&(var.clone(), side.name().to_string())),
                            "docs/deploy.md: the row of {name} does not say it sets `{var}` ({})",
                            side.name()
                        );
                    }
                }
            }
        }
    }
}

// --- Nix: the worker image -------------------------------------------------------

fn nix_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("nix"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "nix"))
        .collect();
    files.sort();
    files
}

fn eval_json(expr: &str) -> Value {
    let out = assert_success(
        nix_command("nix-instantiate").args(["--eval", "--strict", "--json", "--expr", expr]),
    );
    serde_json::from_str(&out).expect("nix-instantiate prints JSON")
}

#[test]
fn every_nix_expression_parses() {
    let files = nix_files();
    for required in [
        "worker.nix",
        "package.nix",
        "worker-nix-conf.nix",
        "worker-image-config.nix",
    ] {
        assert!(
            files.iter().any(|f| f.ends_with(required)),
            "nix/{required} is missing"
        );
    }
    for file in files {
        assert_success(nix_command("nix-instantiate").arg("--parse").arg(&file));
    }
}

#[test]
fn the_worker_image_uses_the_pure_parts_tested_here() {
    let worker = std::fs::read_to_string(repo().join("nix/worker.nix")).unwrap();
    for part in [
        "./worker-nix-conf.nix",
        "./worker-image-config.nix",
        "./worker-users.nix",
        "./package.nix",
    ] {
        assert!(worker.contains(part), "nix/worker.nix does not use {part}");
    }
}

#[test]
fn the_worker_image_has_the_build_users_its_nix_conf_names() {
    let users = eval_json(&format!(
        "import {}/nix/worker-users.nix {{ }}",
        repo().display()
    ));
    let group = users["group"].as_str().unwrap();
    let passwd = users["passwd"].as_str().unwrap();
    let nixbld = group
        .lines()
        .find(|l| l.starts_with("nixbld:"))
        .expect("a nixbld group");
    let gid = nixbld.split(':').nth(2).unwrap();
    let members: Vec<&str> = nixbld.split(':').nth(3).unwrap().split(',').collect();
    assert!(members.len() >= 4, "{nixbld}");
    for member in members {
        let entry = passwd
            .lines()
            .find(|l| l.starts_with(&format!("{member}:")))
            .unwrap_or_else(|| panic!("{member} is in the group but not in passwd"));
        let fields: Vec<&str> = entry.split(':').collect();
        assert_ne!(fields[2], "0", "{member} must not be root");
        assert_eq!(fields[3], gid, "{member}");
        assert_eq!(fields[6], "/bin/false", "{member} needs no shell");
    }
}

#[test]
fn the_worker_nix_conf_is_accepted_by_nix() {
    let conf = eval_json(&format!(
        "import {}/nix/worker-nix-conf.nix {{ }}",
        repo().display()
    ));
    let conf = conf.as_str().expect("nix.conf text").to_string();
    let settings: BTreeMap<&str, &str> = conf
        .lines()
        .map(|l| {
            l.split_once('=')
                .unwrap_or_else(|| panic!("not a setting: {l:?}"))
        })
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    assert_eq!(
        settings["build-users-group"], "nixbld",
        "builders must not run as root beside the task's credentials"
    );
    assert_eq!(
        settings["sandbox"], "true",
        "sandboxed where the host allows"
    );
    assert_eq!(
        settings["sandbox-fallback"], "true",
        "Fargate has no user namespaces: build without the sandbox there"
    );
    assert!(settings["substituters"]
        .split(' ')
        .any(|s| s == "https://cache.nixos.org"));
    assert!(settings["trusted-public-keys"]
        .split(' ')
        .any(|k| k.starts_with("cache.nixos.org-1:")));
    assert!(settings["experimental-features"]
        .split(' ')
        .any(|f| f == "nix-command"));
    assert_eq!(settings["max-jobs"], "auto");

    // A real Nix reads it and knows every setting.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("nix.conf"), &conf).unwrap();
    let (output, _) = run_tool(
        Command::new("nix")
            .args([
                "--extra-experimental-features",
                "nix-command",
                "show-config",
                "--json",
            ])
            .env("NIX_CONF_DIR", dir.path())
            .env("NIX_USER_CONF_FILES", dir.path().join("nix.conf")),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "nix show-config failed: {stderr}");
    assert!(
        !stderr.contains("unknown setting"),
        "Nix does not know a setting of nix/worker-nix-conf.nix:\n{stderr}"
    );
    let shown: Value = serde_json::from_slice(&output.stdout).expect("nix show-config --json");
    assert_eq!(shown["sandbox"]["value"], true);
    assert_eq!(shown["build-users-group"]["value"], "nixbld");
    assert_eq!(
        shown["substituters"]["value"],
        json!(["https://cache.nixos.org"])
    );
}

#[test]
fn the_worker_image_runs_nixery_worker() {
    let config = eval_json(&format!(
        "import {}/nix/worker-image-config.nix",
        repo().display()
    ));
    // The entrypoint keeps builders off the host's own services where it
    // may, then is `nixery worker`.
    assert_eq!(config["Entrypoint"], json!(["/bin/nixery-worker-start"]));
    let start = std::fs::read_to_string(repo().join("nix/worker-start.sh")).unwrap();
    let lines: Vec<&str> = start
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines,
        [
            "/bin/isolate-builders nixbld || true",
            "exec /bin/nixery worker \"$@\""
        ]
    );
    let worker = std::fs::read_to_string(repo().join("nix/worker.nix")).unwrap();
    for installed in [
        "${./isolate-builders.sh} $out/bin/isolate-builders",
        "${./worker-start.sh} $out/bin/nixery-worker-start",
        "pkgs.iptables",
    ] {
        assert!(
            worker.contains(installed),
            "nix/worker.nix lacks {installed}"
        );
    }
    for script in ["nix/worker-start.sh", "nix/isolate-builders.sh"] {
        assert_success(Command::new("sh").arg("-n").arg(repo().join(script)));
    }
    let env: Vec<&str> = config["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for expected in [
        "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt",
        "NIX_SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt",
        "USER=root",
    ] {
        assert!(
            env.contains(&expected),
            "the image's Env lacks {expected}: {env:?}"
        );
    }
    assert!(env.iter().any(|e| e.starts_with("PATH=")));
    // No store paths: the config must hold without nixpkgs.
    assert!(!config.to_string().contains("/nix/store"));

    // The worker's task definition runs the image's entrypoint as it is.
    let task = resource("WorkerTaskDefinition");
    let container = &task["Properties"]["ContainerDefinitions"][0];
    assert!(
        container["EntryPoint"].is_null() && container["Command"].is_null(),
        "the worker's command comes from the image"
    );
}

#[test]
fn the_nixery_package_includes_every_file_the_binary_embeds() {
    // nix/package.nix builds from a file set; a file embedded with
    // include_str! from outside src/ must be in it, or the build fails on
    // a machine with nixpkgs (CI cannot build it).
    let package = std::fs::read_to_string(repo().join("nix/package.nix")).unwrap();
    let mut missing = Vec::new();
    visit_rs(&repo().join("src"), &mut |file, text| {
        for macro_name in ["include_str!(\"", "include_bytes!(\""] {
            for part in text.split(macro_name).skip(1) {
                let relative = &part[..part.find('"').unwrap()];
                let target = normalise(&file.parent().unwrap().join(relative));
                let from_repo = target
                    .strip_prefix(repo())
                    .unwrap_or_else(|_| panic!("{relative} in {file:?} is outside the repository"));
                if !from_repo.starts_with("src")
                    && !package.contains(&format!("../{}", from_repo.display()))
                {
                    missing.push(from_repo.display().to_string());
                }
            }
        }
    });
    assert!(
        missing.is_empty(),
        "nix/package.nix's file set lacks embedded files: {missing:?}"
    );
}

fn visit_rs(dir: &Path, f: &mut dyn FnMut(&Path, &str)) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            visit_rs(&path, f);
        } else if path.extension().is_some_and(|e| e == "rs") {
            f(&path, &std::fs::read_to_string(&path).unwrap());
        }
    }
}

fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}
