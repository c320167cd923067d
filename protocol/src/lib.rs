//! Keyholder protocol: every byte that crosses the wire between the platform, the keyholder and its clients.
//! Pure types and functions (no HTTP, storage or async), shared by the server, the client and the tests.
#![warn(missing_docs)]

pub mod binding;
pub mod document;
pub mod envelope;
pub mod error;
pub mod paths;
pub mod request_id;
pub mod response_sig;
pub mod secret;
pub mod signing;
pub mod ticket;
pub mod ticket_kh2;
pub mod vectors;
pub mod wire;

mod hex;

pub use envelope::{PlatformPublicKey, PlatformSigningKey};
pub use error::{ErrorBody, ErrorCode};
pub use response_sig::{IdentityDocument, IdentityKey};
pub use secret::{DataKey, HmacSecret};
pub use ticket::{Purpose, TicketClaims, TicketError};
