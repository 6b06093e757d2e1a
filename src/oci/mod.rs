//! The OCI vocabulary, with no I/O: image names and the specs they parse
//! into ([`name`]), manifests and image configs ([`manifest`]), and digests
//! ([`digest`]). Everything above this module speaks in these types.

pub mod digest;
pub mod manifest;
pub mod name;
