//! Starting `nixery serve`: bad settings stop it with a message naming the
//! variable; good ones take effect.

mod common;

use std::process::{Command, Stdio};

fn start_error(env: &[(&str, &str)]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nixery"));
    command
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap());
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success(), "nixery started with {env:?}");
    assert!(out.stdout.is_empty(), "it announced a listener");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_settings_stop_the_start_naming_the_variable() {
    // Checked at start only: a directory with a default.nix, never built.
    let pkgs = common::repo().join("tests/fixtures/pkgs");
    let pkgs = pkgs.to_str().unwrap();
    let storage = tempfile::tempdir().unwrap();
    let storage = storage.path().to_str().unwrap();
    let cases: [(&[(&str, &str)], &str); 5] = [
        (
            &[
                ("STORAGE_PATH", storage),
                ("NIXERY_PKGS_PATH", pkgs),
                ("NIXERY_PKGS_REPO", "/repo"),
            ],
            "NIXERY_PKGS_REPO",
        ),
        (&[("NIXERY_PKGS_PATH", pkgs)], "STORAGE_PATH"),
        (
            &[
                ("NIXERY_PKGS_PATH", pkgs),
                ("STORAGE_PATH", storage),
                ("PORT", "eighty"),
            ],
            "PORT",
        ),
        (
            &[
                ("NIXERY_PKGS_PATH", pkgs),
                ("STORAGE_PATH", storage),
                ("NIX_TIMEOUT", "-1"),
            ],
            "NIX_TIMEOUT",
        ),
        (
            &[
                ("NIXERY_PKGS_PATH", pkgs),
                ("STORAGE_PATH", storage),
                ("NIXERY_STORAGE_BACKEND", "tape"),
            ],
            "NIXERY_STORAGE_BACKEND",
        ),
    ];
    for (env, var) in cases {
        let stderr = start_error(env);
        assert!(stderr.contains(var), "{env:?}: {stderr}");
    }
    let usage = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&usage.stderr);
    assert!(
        stderr.contains("unrecognized subcommand 'frobnicate'") && stderr.contains("Usage: nixery"),
        "{stderr}"
    );
}

#[tokio::test]
#[cfg(feature = "integration")]
async fn the_layer_budget_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        common::Server::start_with(&dir.path().join("storage"), &[("NIXERY_LAYER_BUDGET", "2")]);
    let manifest: serde_json::Value = reqwest::get(server.url("/v2/shell/hello/manifests/latest"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Two for the closure (six store paths), one customisation layer.
    assert_eq!(
        manifest["layers"].as_array().unwrap().len(),
        3,
        "{manifest}"
    );
}

/// The README's configuration table is the command-line definition's.
#[test]
fn the_readme_lists_every_setting_as_the_cli_defines_it() {
    let readme = std::fs::read_to_string(common::repo().join("README.md")).unwrap();
    let begin = "<!-- settings:begin -->\n";
    let start = readme
        .find(begin)
        .expect("README has a settings:begin marker")
        + begin.len();
    let end = readme
        .find("<!-- settings:end -->")
        .expect("README has a settings:end marker");
    let expected = nixery::config::markdown_table();
    assert!(
        readme[start..end] == expected,
        "README.md's configuration table is out of date; put this between the markers:\n{expected}"
    );
}

#[test]
fn help_lists_every_setting_with_its_variable() {
    for command in ["serve", "worker", "popularity"] {
        let out = Command::new(env!("CARGO_BIN_EXE_nixery"))
            .args([command, "--help"])
            .env_clear()
            .output()
            .unwrap();
        assert!(out.status.success(), "{command} --help");
        let help = String::from_utf8_lossy(&out.stdout);
        let wanted: &[&str] = match command {
            "serve" => &[
                "NIXERY_LISTEN",
                "NIXERY_PKGS_PATH",
                "STORAGE_PATH",
                "NIXERY_BUILDER",
                "[default: 94]",
            ],
            "worker" => &["NIXERY_QUEUE_URL", "NIXERY_S3_BUCKET", "NIX_TIMEOUT"],
            _ => &["NIXERY_CHANNEL", "<PACKAGE>"],
        };
        for want in wanted {
            assert!(
                help.contains(want),
                "{command} --help lacks {want}:\n{help}"
            );
        }
    }
    let version = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("nixery {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn an_invalid_declared_image_stops_the_start_naming_image_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let pkgs = common::repo().join("tests/fixtures/pkgs");
    let storage = dir.path().join("storage");
    let file = dir.path().join("images.json");
    for (declaration, says) in [
        (
            r#"{"images": {"team/api": {"packages": ["hello"], "config": {"WorkingDir": "srv"}}}}"#,
            r#"image "team/api": config.WorkingDir: "srv" is not an absolute path"#,
        ),
        (
            r#"{"images": {"team/api": {"packages": ["hello"], "config": {"Cmdd": ["x"]}}}}"#,
            "image \"team/api\": declaration: unknown field `Cmdd`",
        ),
        (
            r#"{"images": {"Team": {"packages": ["hello"]}}}"#,
            "image \"Team\": name",
        ),
    ] {
        std::fs::write(&file, declaration).unwrap();
        let error = start_error(&[
            ("STORAGE_PATH", storage.to_str().unwrap()),
            ("NIXERY_PKGS_PATH", pkgs.to_str().unwrap()),
            ("NIXERY_IMAGES", file.to_str().unwrap()),
        ]);
        assert!(error.contains("NIXERY_IMAGES"), "{error}");
        assert!(error.contains(says), "{error}");
    }
    let missing = start_error(&[
        ("STORAGE_PATH", storage.to_str().unwrap()),
        ("NIXERY_PKGS_PATH", pkgs.to_str().unwrap()),
        ("NIXERY_IMAGES", "/nonexistent/images.json"),
    ]);
    assert!(missing.contains("NIXERY_IMAGES"), "{missing}");
}
