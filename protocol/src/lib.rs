//! Keyholder protocol: every byte that crosses the wire between the platform, the keyholder and its clients.
//! Pure types and functions (no HTTP, storage or async), shared by the server, the client and the tests.
//!
//! Besides the platform's protocol (HMAC request signatures in [`signing`], tickets in [`ticket`]), the
//! Keyholder extensions are specified byte for byte in their modules: response signatures
//! ([`response_sig`], batches over [`merkle`] trees), the `kh1` field format ([`document`]) and the asymmetric binding's Ed25519 request
//! envelopes ([`envelope`]) and `kh2` tickets ([`ticket_kh2`]). Protocol 2.4.0 adds the ticket
//! constraints ([`ticket`]) and the strict `otpauth://totp/` parser that seals TOTP links ([`otpauth`]).
//! Every format has named valid and invalid cases in `protocol/vectors/`, run by [`vectors`].
//!
//! Versioning: this crate's public API and the wire formats it defines follow semver: a change to a
//! wire format is a breaking change (see `CHANGELOG.md` in the repository).
#![warn(missing_docs)]

pub mod binding;
pub mod document;
pub mod envelope;
pub mod error;
pub mod merkle;
pub mod otpauth;
pub mod paths;
pub mod request_id;
pub mod response_sig;
pub mod response_stream;
pub mod secret;
pub mod signing;
pub mod ticket;
pub mod ticket_kh2;
pub mod vectors;
pub mod wire;

mod compact;
mod hex;

pub use envelope::{PlatformPublicKey, PlatformSigningKey};
pub use error::{ErrorBody, ErrorCode};
pub use response_sig::{IdentityDocument, IdentityKey};
pub use secret::{DataKey, HmacSecret};
pub use ticket::{ConstraintError, Purpose, StoreConstraints, TicketClaims, TicketError};
