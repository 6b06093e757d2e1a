//! Image names: from the repository name and tag of a pull to an [`ImageSpec`].
//!
//! The repository name is the package list: every `/`-separated component
//! is a nixpkgs attribute path (`hello`, `python3packages.numpy`), and a
//! leading run of *meta* components changes how the image is built:
//!
//! ```
//! use nixery::oci::name::{Arch, ImageSpec};
//! let spec = ImageSpec::parse("arm64/shell/hello", "latest").unwrap();
//! assert_eq!(spec.arch, Arch::Arm64);
//! assert!(spec.packages.contains("bashInteractive"));
//! assert!(spec.packages.contains("hello"));
//! ```
//!
//! * `arm64` (only in the leading run) builds an `aarch64-linux` image.
//! * `shell` (anywhere) stands for `bashInteractive coreutils moreutils nano`,
//!   as in Nixery.
//!
//! Packages are a sorted set, so `hello/shell` and `shell/hello` are the same
//! image. Names are checked against the repository-name grammar of the OCI
//! distribution spec ("Pulling manifests": `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
//! per component) and against limits of our own, before anything reaches Nix.
//! This module does no I/O.

use std::collections::BTreeSet;

use super::manifest::ConfigOverrides;
use std::fmt;

/// The longest repository name accepted, in bytes (Docker's own limit).
pub const MAX_NAME_LEN: usize = 255;
/// The most packages (after meta-package expansion) one image may ask for.
pub const MAX_PACKAGES: usize = 64;
/// The longest tag accepted (the spec's tag grammar allows 128 characters).
pub const MAX_TAG_LEN: usize = 128;

/// The packages the `shell` meta-package stands for.
pub const SHELL_PACKAGES: [&str; 4] = ["bashInteractive", "coreutils", "moreutils", "nano"];

/// Target architecture of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// The Nix system double that builds for this architecture.
    pub fn nix_system(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-linux",
            Arch::Arm64 => "aarch64-linux",
        }
    }

    /// The name used in OCI image configs (`architecture`).
    pub fn oci_name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = String;

    /// `amd64` or `arm64`, as OCI names them.
    fn from_str(name: &str) -> Result<Arch, String> {
        match name {
            "amd64" => Ok(Arch::Amd64),
            "arm64" => Ok(Arch::Arm64),
            other => Err(format!("{other:?} is not a platform (amd64 or arm64)")),
        }
    }
}

/// What is wrong with a repository name or tag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("repository name is empty")]
    Empty,
    #[error("repository name is {len} bytes long; the limit is {MAX_NAME_LEN}")]
    TooLong { len: usize },
    #[error("path component {component:?} does not match [a-z0-9]+((.|_|__|-+)[a-z0-9]+)*")]
    BadComponent { component: String },
    #[error("the image asks for {count} packages; the limit is {MAX_PACKAGES}")]
    TooManyPackages { count: usize },
    #[error("the name has only meta-packages ({name}); add at least one package")]
    NoPackages { name: String },
    #[error("tag {tag:?} does not match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
    BadTag { tag: String },
}

/// A parsed, validated request for an image. Two specs are equal when they
/// ask for the same image, however their names were written.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The repository name as given (for people: build status, logs).
    pub name: String,
    /// nixpkgs attribute paths, sorted and deduplicated, meta-packages expanded.
    pub packages: BTreeSet<String>,
    pub arch: Arch,
    /// The tag as given; how it selects a package source is the source's business.
    pub tag: String,
    /// Whether the name chose the architecture (a leading `arm64`): such
    /// an image is for that platform only, whatever the registry serves.
    pub arch_given: bool,
    /// What a declared image sets in its config (none for package lists).
    pub config: Option<ConfigOverrides>,
}

impl PartialEq for ImageSpec {
    fn eq(&self, other: &ImageSpec) -> bool {
        (&self.packages, self.arch, &self.tag, &self.config)
            == (&other.packages, other.arch, &other.tag, &other.config)
    }
}

impl Eq for ImageSpec {}

impl ImageSpec {
    /// Parses a repository name and a tag.
    pub fn parse(name: &str, tag: &str) -> Result<ImageSpec, NameError> {
        validate_name(name)?;
        validate_tag(tag)?;
        let mut arch = Arch::Amd64;
        let mut packages = BTreeSet::new();
        let mut leading = true;
        for component in name.split('/') {
            if leading && component == "arm64" {
                arch = Arch::Arm64;
                continue;
            }
            if component == "shell" {
                packages.extend(SHELL_PACKAGES.iter().map(|p| p.to_string()));
            } else {
                packages.insert(component.to_string());
            }
            leading = false;
        }
        if packages.is_empty() {
            return Err(NameError::NoPackages {
                name: name.to_string(),
            });
        }
        if packages.len() > MAX_PACKAGES {
            return Err(NameError::TooManyPackages {
                count: packages.len(),
            });
        }
        Ok(ImageSpec {
            name: name.to_string(),
            packages,
            arch,
            tag: tag.to_string(),
            arch_given: arch == Arch::Arm64,
            config: None,
        })
    }

    /// The same image for another platform.
    pub fn for_arch(&self, arch: Arch) -> ImageSpec {
        ImageSpec {
            arch,
            ..self.clone()
        }
    }
}

impl fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let packages: Vec<&str> = self.packages.iter().map(String::as_str).collect();
        write!(
            f,
            "{}:{} ({})",
            packages.join("/"),
            self.tag,
            self.arch.oci_name()
        )
    }
}

/// Checks a repository name against the distribution spec's grammar and our
/// length limit, without interpreting it.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    for component in name.split('/') {
        if !valid_component(component) {
            return Err(NameError::BadComponent {
                component: component.to_string(),
            });
        }
    }
    Ok(())
}

/// Checks a tag against `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), NameError> {
    let bytes = tag.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_TAG_LEN
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes[1..]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NameError::BadTag {
            tag: tag.to_string(),
        })
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`: alphanumeric runs joined by one
/// separator (`.`, `_`, `__` or any run of `-`).
fn valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    loop {
        // One alphanumeric run.
        let start = i;
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        // One separator.
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < bytes.len() && bytes[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < bytes.len() && bytes[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn order_and_duplicates_do_not_matter() {
        let a = ImageSpec::parse("hello/shell", "latest").unwrap();
        let b = ImageSpec::parse("shell/hello/hello", "latest").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.packages.len(), 5);
    }

    #[test]
    fn arm64_counts_only_in_the_leading_run() {
        assert_eq!(
            ImageSpec::parse("arm64/hello", "latest").unwrap().arch,
            Arch::Arm64
        );
        assert_eq!(
            ImageSpec::parse("shell/arm64/hello", "latest")
                .unwrap()
                .arch,
            Arch::Amd64
        );
        let later = ImageSpec::parse("hello/arm64", "latest").unwrap();
        assert_eq!(later.arch, Arch::Amd64);
        assert!(later.packages.contains("arm64"));
        assert_eq!(
            ImageSpec::parse("arm64", "latest"),
            Err(NameError::NoPackages {
                name: "arm64".into()
            })
        );
    }

    #[test]
    fn dotted_and_digit_names_are_accepted() {
        let spec = ImageSpec::parse("python3packages.numpy/7zip", "latest").unwrap();
        assert!(spec.packages.contains("python3packages.numpy"));
        assert!(spec.packages.contains("7zip"));
    }

    #[test]
    fn bad_names_are_rejected() {
        for name in [
            "", "Hello", "a//b", "/a", "a/", "a..b", "-a", "a-", "a___b", "a b", "a/../b", "a;rm",
        ] {
            assert!(
                ImageSpec::parse(name, "latest").is_err(),
                "{name:?} was accepted"
            );
        }
        let long = vec!["a"; 200].join("/");
        assert!(matches!(
            ImageSpec::parse(&long, "latest"),
            Err(NameError::TooLong { .. })
        ));
        let many: Vec<String> = (0..70u8)
            .map(|i| format!("{}{}", (b'a' + i / 26) as char, (b'a' + i % 26) as char))
            .collect();
        assert!(matches!(
            ImageSpec::parse(&many.join("/"), "latest"),
            Err(NameError::TooManyPackages { count: 70 })
        ));
    }

    #[test]
    fn tags_follow_the_grammar() {
        for tag in ["latest", "_x", "A.b-c_d", "0123abc"] {
            assert!(validate_tag(tag).is_ok(), "{tag}");
        }
        for tag in ["", ".x", "-x", "a:b", "a/b", &"x".repeat(129)] {
            assert!(validate_tag(tag).is_err(), "{tag}");
        }
    }

    proptest! {
        #[test]
        fn grammar_matches_a_reference_regex(component in "[a-z0-9._\\-]{0,12}") {
            // Reference: a direct transcription of the spec's regex.
            fn reference(s: &str) -> bool {
                let mut rest = s;
                let run = |r: &str| r.len() - r.trim_start_matches(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()).len();
                let n = run(rest);
                if n == 0 { return false; }
                rest = &rest[n..];
                while !rest.is_empty() {
                    let sep = if rest.starts_with("__") { 2 }
                        else if rest.starts_with('_') || rest.starts_with('.') { 1 }
                        else if rest.starts_with('-') { rest.len() - rest.trim_start_matches('-').len() }
                        else { return false };
                    rest = &rest[sep..];
                    let n = run(rest);
                    if n == 0 { return false; }
                    rest = &rest[n..];
                }
                true
            }
            prop_assert_eq!(valid_component(&component), reference(&component));
        }

        #[test]
        fn parsing_is_order_insensitive(mut parts in proptest::collection::vec("[a-z][a-z0-9]{0,6}", 1..8)) {
            parts.retain(|p| p != "arm64");
            prop_assume!(!parts.is_empty());
            let a = ImageSpec::parse(&parts.join("/"), "latest").unwrap();
            parts.reverse();
            let b = ImageSpec::parse(&parts.join("/"), "latest").unwrap();
            prop_assert_eq!(a, b);
        }
    }
}
