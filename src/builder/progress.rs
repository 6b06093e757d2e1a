//! How far a running build is: [`StepProgress`], which the builder updates
//! as it goes and the build status carries to everyone watching, and
//! [`NixLog`], which reads Nix's own progress (`--log-format
//! internal-json`) while it realises: how many derivations there are to
//! build or fetch, how many are done, which one runs now, and the last
//! lines of the log.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::step::Step;

/// The most log lines a status keeps (the last ones), and of each line.
pub const LOG_LINES: usize = 12;
const LOG_LINE_CHARS: usize = 300;

/// What a running build is doing now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepProgress {
    /// The step under way (none before the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<Step>,
    /// A line for people: what runs now ("building hello-2.12").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Units of the step done and expected: derivations built or fetched
    /// (realising), layers stored (packing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Bytes of the layers stored so far (packing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// The last lines of Nix's log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
}

impl StepProgress {
    /// A step just started: nothing known of it yet but its name (the log
    /// so far stays: it tells what led here).
    pub fn start(&mut self, step: Step) {
        *self = StepProgress {
            step: Some(step),
            log: std::mem::take(&mut self.log),
            ..StepProgress::default()
        };
    }
}

/// Nix's activity types (`ActivityType` in Nix's logging.hh).
const ACT_COPY_PATHS: u64 = 103;
const ACT_BUILDS: u64 = 104;
const ACT_BUILD: u64 = 105;
const ACT_SUBSTITUTE: u64 = 108;
/// Nix's result types (`ResultType`).
const RES_BUILD_LOG_LINE: u64 = 101;
const RES_PROGRESS: u64 = 105;
/// Messages above this verbosity (informational chatter) are not kept.
const LEVEL_INFO: u64 = 3;

/// Reads `@nix {...}` lines of one Nix command.
#[derive(Debug, Default)]
pub struct NixLog {
    /// Activity id -> its type.
    activities: BTreeMap<u64, u64>,
    /// Builds and substitutions running now, by activity id.
    running: BTreeMap<u64, String>,
    /// (done, expected) derivations built, and paths fetched.
    builds: (u64, u64),
    fetches: (u64, u64),
    tail: VecDeque<String>,
}

impl NixLog {
    /// Takes one line of stderr. Returns the text it stands for (a
    /// message, a builder's output line), for error messages; `None` for
    /// progress only.
    pub fn line(&mut self, line: &str) -> Option<String> {
        let Some(json) = line.strip_prefix("@nix ") else {
            // Not structured (a builder writing to Nix's stderr directly).
            self.keep(line);
            return Some(line.to_string());
        };
        let Ok(event) = serde_json::from_str::<Value>(json) else {
            return None;
        };
        let id = event["id"].as_u64().unwrap_or(0);
        let ty = event["type"].as_u64().unwrap_or(0);
        let fields = event["fields"].as_array();
        let field_str = |i: usize| fields.and_then(|f| f.get(i)).and_then(Value::as_str);
        match event["action"].as_str().unwrap_or("") {
            "start" => {
                self.activities.insert(id, ty);
                let what = match ty {
                    ACT_BUILD => field_str(0).map(|drv| format!("building {}", store_name(drv))),
                    ACT_SUBSTITUTE => {
                        field_str(0).map(|path| format!("fetching {}", store_name(path)))
                    }
                    _ => None,
                };
                if let Some(what) = what {
                    self.running.insert(id, what);
                }
                None
            }
            "stop" => {
                self.activities.remove(&id);
                self.running.remove(&id);
                None
            }
            "result" => match ty {
                RES_PROGRESS => {
                    let n = |i: usize| fields.and_then(|f| f.get(i)).and_then(Value::as_u64);
                    let counts = (n(0).unwrap_or(0), n(1).unwrap_or(0));
                    match self.activities.get(&id) {
                        Some(&ACT_BUILDS) => self.builds = counts,
                        Some(&ACT_COPY_PATHS) => self.fetches = counts,
                        _ => {}
                    }
                    None
                }
                RES_BUILD_LOG_LINE => {
                    let text = strip_ansi(field_str(0)?);
                    self.keep(&text);
                    Some(text)
                }
                _ => None,
            },
            "msg" => {
                if event["level"].as_u64().unwrap_or(0) > LEVEL_INFO {
                    return None;
                }
                let text = strip_ansi(event["msg"].as_str()?);
                if !text.starts_with("warning:") {
                    self.keep(&text);
                }
                Some(text)
            }
            _ => None,
        }
    }

    fn keep(&mut self, line: &str) {
        let line = line.trim_end();
        if line.is_empty() {
            return;
        }
        let mut line = crate::source::redact_urls(line);
        if let Some((cut, _)) = line.char_indices().nth(LOG_LINE_CHARS) {
            line.truncate(cut);
            line.push_str(" [...]");
        }
        if self.tail.len() == LOG_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// Where realising stands, into `progress` (its step name stays).
    pub fn report(&self, progress: &mut StepProgress) {
        let (built, to_build) = self.builds;
        let (fetched, to_fetch) = self.fetches;
        let counts = format!("{built} of {to_build} built, {fetched} of {to_fetch} fetched");
        progress.detail = Some(match self.running.values().next_back() {
            Some(now) => format!("{now} ({counts})"),
            None => counts,
        });
        progress.done = Some(built + fetched);
        progress.total = Some(to_build + to_fetch);
        progress.log = self.tail.iter().cloned().collect();
    }
}

/// `hello-2.12` of `/nix/store/<hash>-hello-2.12.drv`.
fn store_name(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    let name = base.split_once('-').map_or(base, |(_, name)| name);
    name.strip_suffix(".drv").unwrap_or(name)
}

/// Removes terminal colour sequences (`ESC [ ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Nix 2.8 prints for one build that fails (shortened).
    const FAILED_BUILD: &[&str] = &[
        r#"@nix {"action":"msg","level":3,"msg":"this derivation will be built:"}"#,
        r#"@nix {"action":"start","id":10,"level":0,"text":"","type":104}"#,
        r#"@nix {"action":"start","id":11,"level":0,"text":"","type":103}"#,
        r#"@nix {"action":"result","fields":[0,2,0,0],"id":10,"type":105}"#,
        r#"@nix {"action":"result","fields":[1,3,0,0],"id":11,"type":105}"#,
        r#"@nix {"action":"start","fields":["/nix/store/cb3sa7m9pfjj8wcryyzdqfkpr4h8x4zk-b-2.0.drv","",1,1],"id":12,"level":3,"text":"building","type":105}"#,
        r#"@nix {"action":"result","fields":["compiling \u001b[1mb\u001b[0m"],"id":12,"type":101}"#,
        r#"@nix {"action":"msg","level":1,"msg":"\u001b[35;1mwarning:\u001b[0m unable to download 'https://cache.nixos.org/nix-cache-info'"}"#,
        r#"@nix {"action":"msg","level":5,"msg":"chatter"}"#,
    ];

    #[test]
    fn counts_the_running_build_and_the_log() {
        let mut log = NixLog::default();
        let texts: Vec<Option<String>> = FAILED_BUILD.iter().map(|l| log.line(l)).collect();
        let mut progress = StepProgress::default();
        progress.start(Step::Realising);
        log.report(&mut progress);
        assert_eq!(progress.step, Some(Step::Realising));
        assert_eq!(
            progress.detail.as_deref(),
            Some("building b-2.0 (0 of 2 built, 1 of 3 fetched)")
        );
        assert_eq!((progress.done, progress.total), (Some(1), Some(5)));
        // Colours gone; warnings and chatter are not the log's tail.
        assert_eq!(
            progress.log,
            ["this derivation will be built:", "compiling b"]
        );
        assert_eq!(texts[6].as_deref(), Some("compiling b"));
        assert!(texts[7].as_deref().unwrap().starts_with("warning: unable"));
        assert_eq!(texts[8], None);
        // The build stops: nothing runs now.
        log.line(r#"@nix {"action":"stop","id":12}"#);
        log.report(&mut progress);
        assert_eq!(
            progress.detail.as_deref(),
            Some("0 of 2 built, 1 of 3 fetched")
        );
    }

    #[test]
    fn hostile_lines_are_bounded_and_redacted() {
        let mut log = NixLog::default();
        assert_eq!(log.line("@nix {not json"), None);
        assert_eq!(
            log.line(r#"@nix {"action":"result","id":1,"type":105}"#),
            None
        );
        let long = format!(
            r#"@nix {{"action":"result","fields":["{}"],"id":1,"type":101}}"#,
            "x".repeat(10_000)
        );
        log.line(&long);
        for i in 0..100 {
            log.line(&format!("plain line {i} https://user:secret@example.org/x"));
        }
        let mut progress = StepProgress::default();
        log.report(&mut progress);
        assert_eq!(progress.log.len(), LOG_LINES);
        assert!(progress.log.iter().all(|l| l.chars().count() <= 310));
        assert!(progress.log.iter().all(|l| !l.contains("secret")));
        assert!(progress.log.last().unwrap().starts_with("plain line 99"));
    }

    #[test]
    fn names_and_colours() {
        assert_eq!(
            store_name("/nix/store/6zqm84s34ar2sknyjjs5ds8gdy3c2gzq-a-1.0.drv"),
            "a-1.0"
        );
        assert_eq!(store_name("weird"), "weird");
        assert_eq!(strip_ansi("\u{1b}[31;1merror:\u{1b}[0m x"), "error: x");
        assert_eq!(strip_ansi("trailing \u{1b}"), "trailing ");
    }
}
