//! Where the platform v1 ciphertexts imported from the reference webhook belong. A v1 field has no
//! associated data, so the ciphertext alone cannot say which service it was sealed for; a platform
//! that saw it before the migration could write it into another service's document with `storage
//! set`. At import the keyholder records, for every v1 field of every imported credential, the
//! SHA-256 of its ciphertext bytes (`document::platform_v1_field_digest`) with the service and field
//! it was imported as (table `imported_v1_fields`, in the owner's database, out of the platform's
//! reach). The key ring opens a v1 field only where that triple was recorded: the same ciphertext
//! written back to its own service still opens (so `rewrap` can convert it); anywhere else, or any
//! v1 ciphertext that was never imported, does not. One ciphertext in two places of the reference's
//! files is a copy (every field has a fresh IV), so the import refuses it rather than bind the copy.
//! Retiring the reference key empties the table.

use std::collections::HashMap;

use keyholder_protocol::document::{field_key_version, platform_v1_field_digest, FieldFormat};
use serde_json::Value;

use crate::storage::ImportedField;

/// The imported v1 ciphertexts, by digest, with the (service, field) places each was imported as.
#[derive(Debug, Default)]
pub struct ImportedV1Fields {
    places: HashMap<[u8; 32], Vec<(String, String)>>,
}

impl ImportedV1Fields {
    /// Whether the ciphertext with `digest` was imported as field `field` of service `service`.
    pub fn allows(&self, service: &str, field: &str, digest: &[u8; 32]) -> bool {
        self.places
            .get(digest)
            .is_some_and(|places| places.iter().any(|(s, f)| s == service && f == field))
    }
}

impl ImportedV1Fields {
    /// The places recorded in storage.
    pub fn from_fields(fields: &[ImportedField]) -> ImportedV1Fields {
        let mut out = ImportedV1Fields::default();
        for f in fields {
            out.places
                .entry(f.digest)
                .or_default()
                .push((f.service.clone(), f.field.clone()));
        }
        out
    }
}

/// The v1 fields of a credential document: (field name, ciphertext digest). A field whose text is
/// not a v1 ciphertext is left out (opening the document reports it).
pub fn v1_fields(doc: &Value) -> Vec<(String, [u8; 32])> {
    let Some(fields) = doc.get("fields").and_then(Value::as_object) else {
        return Vec::new();
    };
    fields
        .iter()
        .filter_map(|(field, value)| {
            let text = value.as_str()?;
            if !matches!(field_key_version(text), Ok(FieldFormat::PlatformV1)) {
                return None;
            }
            platform_v1_field_digest(text)
                .ok()
                .map(|digest| (field.clone(), digest))
        })
        .collect()
}
