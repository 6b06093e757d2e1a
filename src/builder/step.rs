//! The steps of a build, by the names people watching it see: one enum
//! that the builder reports, the build status stores, `/api/builds`
//! serialises and the build pages read. A build from a Nix store runs
//! evaluating, realising, grouping, packing, customising, uploading; an
//! image assembled from a binary cache runs resolving, grouping,
//! fetching, customising, uploading.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// Evaluating the package set: which packages exist, their outputs.
    Evaluating,
    /// Building or fetching the outputs into the Nix store.
    Realising,
    /// Looking the packages up in the attribute index, and their closure
    /// in the binary cache.
    Resolving,
    /// Grouping the closure into layers.
    Grouping,
    /// Packing each layer not stored yet from the Nix store.
    Packing,
    /// Streaming each layer not stored yet from the binary cache's NARs.
    Fetching,
    /// The customisation layer (`/bin`, `/etc`, `/tmp`, ...).
    Customising,
    /// The config, the manifest, the SBOM and the image record.
    Uploading,
    /// Waiting to be tried again after a fault of the builder (not of the
    /// image); the status's detail says which.
    Retrying,
}

impl Step {
    /// The step's name, as serialised.
    pub fn label(self) -> &'static str {
        match self {
            Step::Evaluating => "evaluating",
            Step::Realising => "realising",
            Step::Resolving => "resolving",
            Step::Grouping => "grouping",
            Step::Packing => "packing",
            Step::Fetching => "fetching",
            Step::Customising => "customising",
            Step::Uploading => "uploading",
            Step::Retrying => "retrying",
        }
    }

    /// What the progress's `done` and `total` count during this step, if
    /// anything: the pages say "3 of 7 layers".
    pub fn unit(self) -> Option<&'static str> {
        match self {
            Step::Packing => Some("layers"),
            Step::Fetching => Some("store paths"),
            Step::Resolving => Some("narinfos"),
            Step::Evaluating
            | Step::Realising
            | Step::Grouping
            | Step::Customising
            | Step::Uploading
            | Step::Retrying => None,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_what_is_serialised() {
        for step in [
            Step::Evaluating,
            Step::Realising,
            Step::Resolving,
            Step::Grouping,
            Step::Packing,
            Step::Fetching,
            Step::Customising,
            Step::Uploading,
            Step::Retrying,
        ] {
            let json = serde_json::to_string(&step).unwrap();
            assert_eq!(json, format!("\"{}\"", step.label()));
            assert_eq!(serde_json::from_str::<Step>(&json).unwrap(), step);
        }
    }
}
