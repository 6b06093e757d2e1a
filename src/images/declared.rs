//! Declared images (`NIXERY_IMAGES`): names an operator gives to package
//! sets, with the image config they should run with. A declared name is
//! pulled like any other (`docker pull <host>/team/api-base`) and wins over
//! reading the same name as a package list.
//!
//! ```json
//! {"images": {"team/api-base": {
//!   "packages": ["shell", "curl"],
//!   "config": {"Cmd": ["bash"], "Env": ["MODE=prod"], "WorkingDir": "/srv",
//!              "User": "1000:1000", "ExposedPorts": {"8080/tcp": {}},
//!              "Labels": {"team": "api"}}}}}
//! ```
//!
//! The file is read once, at start; anything wrong in it stops the start
//! with a message naming the image and the field.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::Value;

use crate::oci::manifest::ConfigOverrides;
use crate::oci::name::{validate_name, Arch, ImageSpec, SHELL_PACKAGES};

/// Most packages in one declared image, as in a name.
const MAX_PACKAGES: usize = 64;
/// The largest declarations file read.
const MAX_FILE: usize = 1 << 20;

/// What is wrong with a declarations file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeclarationError {
    #[error("the file is not a JSON object with an \"images\" object: {0}")]
    File(String),
    #[error("image {image:?}: {field}: {reason}")]
    Image {
        image: String,
        field: String,
        reason: String,
    },
}

/// One declared image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    /// The packages, `shell` expanded, sorted.
    pub packages: BTreeSet<String>,
    pub arch: Arch,
    /// Whether `arm64` chose the platform.
    pub arch_given: bool,
    pub config: ConfigOverrides,
}

impl Declared {
    /// The image spec of a pull of this image as `name:tag`.
    pub fn spec(&self, name: &str, tag: &str) -> ImageSpec {
        ImageSpec {
            name: name.to_string(),
            packages: self.packages.clone(),
            arch: self.arch,
            tag: tag.to_string(),
            arch_given: self.arch_given,
            config: Some(self.config.clone()),
        }
    }
}

/// Every declared image, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declarations {
    images: BTreeMap<String, Declared>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    images: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageFormat {
    packages: Vec<String>,
    #[serde(default)]
    config: ConfigOverrides,
}

impl Declarations {
    /// Parses and checks a declarations file.
    pub fn parse(bytes: &[u8]) -> Result<Declarations, DeclarationError> {
        if bytes.len() > MAX_FILE {
            return Err(DeclarationError::File(format!(
                "{} bytes; the limit is {MAX_FILE}",
                bytes.len()
            )));
        }
        let file: FileFormat =
            serde_json::from_slice(bytes).map_err(|e| DeclarationError::File(e.to_string()))?;
        let mut images = BTreeMap::new();
        for (name, value) in file.images {
            let error = |field: &str, reason: String| DeclarationError::Image {
                image: name.clone(),
                field: field.to_string(),
                reason,
            };
            validate_name(&name).map_err(|e| error("name", e.to_string()))?;
            let format: ImageFormat =
                serde_json::from_value(value).map_err(|e| error("declaration", e.to_string()))?;
            let (packages, arch) = packages(&format.packages).map_err(|r| error("packages", r))?;
            format.config.check().map_err(|(field, reason)| {
                let field = match field {
                    "config" => "config".to_string(),
                    field => format!("config.{field}"),
                };
                error(&field, reason)
            })?;
            images.insert(
                name,
                Declared {
                    packages,
                    arch,
                    arch_given: arch == Arch::Arm64,
                    config: format.config,
                },
            );
        }
        Ok(Declarations { images })
    }

    /// The declared image of this name, if any.
    pub fn get(&self, name: &str) -> Option<&Declared> {
        self.images.get(name)
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }
}

/// Package attribute names, `shell` expanded and a leading `arm64` taken
/// as the platform, as in a name.
fn packages(names: &[String]) -> Result<(BTreeSet<String>, Arch), String> {
    let mut arch = Arch::Amd64;
    let mut found = BTreeSet::new();
    for (i, name) in names.iter().enumerate() {
        let plain = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !plain {
            return Err(format!(
                "{name:?} is not a package attribute (letters, digits, '-', '.' and '_')"
            ));
        }
        match name.as_str() {
            "arm64" if i == 0 => arch = Arch::Arm64,
            "shell" => found.extend(SHELL_PACKAGES.iter().map(|p| p.to_string())),
            _ => {
                found.insert(name.clone());
            }
        }
    }
    if found.is_empty() {
        return Err("no packages".to_string());
    }
    if found.len() > MAX_PACKAGES {
        return Err(format!(
            "{} packages; the limit is {MAX_PACKAGES}",
            found.len()
        ));
    }
    Ok((found, arch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declaration_becomes_an_image_spec_with_its_config() {
        let file = br#"{"images": {"team/api-base": {
            "packages": ["shell", "curl"],
            "config": {"Cmd": ["bash"], "Entrypoint": ["/bin/env"], "Env": ["MODE=prod"],
                       "WorkingDir": "/srv", "User": "1000:1000",
                       "ExposedPorts": {"8080/tcp": {}}, "Labels": {"team": "api"}}},
            "arm/tool": {"packages": ["arm64", "hello"]}}}"#;
        let declared = Declarations::parse(file).unwrap();
        assert_eq!(declared.len(), 2);
        let spec = declared
            .get("team/api-base")
            .unwrap()
            .spec("team/api-base", "v1");
        assert!(spec.packages.contains("curl") && spec.packages.contains("coreutils"));
        assert_eq!((spec.arch, spec.arch_given), (Arch::Amd64, false));
        let config = spec.config.unwrap();
        assert_eq!(config.working_dir.as_deref(), Some("/srv"));
        assert_eq!(config.labels["team"], "api");
        let arm = declared.get("arm/tool").unwrap();
        assert_eq!((arm.arch, arm.arch_given), (Arch::Arm64, true));
        assert!(declared.get("team/other").is_none());
    }

    #[test]
    fn mistakes_name_the_image_and_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"images": {"Bad Name": {"packages": ["hello"]}}}"#,
                r#"image "Bad Name": name:"#,
            ),
            (
                r#"{"images": {"a": {"packages": []}}}"#,
                r#"image "a": packages: no packages"#,
            ),
            (
                r#"{"images": {"a": {"packages": ["$(rm -rf /)"]}}}"#,
                r#"image "a": packages:"#,
            ),
            (
                r#"{"images": {"a": {"packages": ["hello"], "confg": {}}}}"#,
                r#"image "a": declaration: unknown field `confg`"#,
            ),
            (
                r#"{"images": {"a": {"packages": ["hello"], "config": {"Workdir": "/"}}}}"#,
                r#"image "a": declaration: unknown field `Workdir`"#,
            ),
            (
                r#"{"images": {"a": {"packages": ["hello"], "config": {"WorkingDir": "srv"}}}}"#,
                r#"image "a": config.WorkingDir:"#,
            ),
            (
                r#"{"images": {"a": {"packages": ["hello"], "config": {"Env": ["NOVALUE"]}}}}"#,
                r#"image "a": config.Env:"#,
            ),
            (
                r#"{"images": {"a": {"packages": ["hello"], "config": {"ExposedPorts": {"http": {}}}}}}"#,
                r#"image "a": config.ExposedPorts:"#,
            ),
            (
                r#"{"images": {"a": {"packages": ["hello"], "config": {"ExposedPorts": {"70000/tcp": {}}}}}}"#,
                r#"image "a": config.ExposedPorts:"#,
            ),
            (
                r#"{"images": {"a": {"packages": ["hello"], "config": {"User": "a b"}}}}"#,
                r#"image "a": config.User:"#,
            ),
            (
                r#"{"images": {"a": {"packages": ["hello"], "config": {"ExposedPorts": {"+80/tcp": {}}}}}}"#,
                r#"image "a": config.ExposedPorts:"#,
            ),
            (
                r#"{"images": {"a": {"packages": ["hello"], "config": {"Env": ["A=\u001b[2J"]}}}}"#,
                r#"image "a": config.Env: control"#,
            ),
            (
                r#"{"images": {"a": {"packages": ["hello"], "config": {"Labels": {"k": "v\u0000"}}}}}"#,
                r#"image "a": config.Labels: control"#,
            ),
            (
                r#"{"images": {"a": {"packages": ["hello"], "config": {"Cmd": "bash"}}}}"#,
                r#"image "a": declaration:"#,
            ),
            (r#"{"imgs": {}}"#, "the file is not"),
            (r#"[1]"#, "the file is not"),
        ];
        for (file, says) in cases {
            let error = Declarations::parse(file.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(error.starts_with(says), "{file}: {error}");
        }
        let huge = format!(
            r#"{{"images": {{"a": {{"packages": ["hello"], "config": {{"Labels": {{"k": "{}"}}}}}}}}}}"#,
            "x".repeat(20_000)
        );
        let error = Declarations::parse(huge.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(error.starts_with(r#"image "a": config: "#), "{error}");
    }
}
