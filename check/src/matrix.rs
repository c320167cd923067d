//! Every check as one variant of [`Check`], declared once in the table below: its name (kept stable:
//! tests and docs use it), its group, the matrix it belongs to and the one function that runs it.

use super::{base, envelope, protocol24, restart, signing, stream, wire, Ctx, Run};

/// The matrices a check belongs to, run in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matrix {
    /// Workflow, adversarial probes and refusals: every binding.
    Base,
    /// The protocol 2.4.0 checks.
    Protocol24,
    /// Wire refusals: replays, encoded paths, ticket times.
    Wire,
    /// Asymmetric bindings only.
    Envelope,
    /// Only with a restart command ([`crate::CheckOptions::restart_cmd`]).
    Restart,
    /// Only with a service the webhook may proxy to the checker's loopback upstream
    /// ([`crate::CheckOptions::stream_service`]).
    Stream,
}

macro_rules! checks {
    ($($matrix:ident $list:ident { $($variant:ident = $name:literal, $group:literal, $run:path, $doc:literal;)* })*) => {
        /// One check of the conformance matrix.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Check {
            $($(#[doc = $doc] $variant,)*)*
        }

        $(
            #[doc = concat!("The checks of [`Matrix::", stringify!($matrix), "`], in the order they run.")]
            pub const $list: &[Check] = &[$(Check::$variant,)*];
        )*

        impl Check {
            /// Every check, in the order they run.
            pub const ALL: &'static [Check] = &[$($(Check::$variant,)*)*];

            /// The check's stable name.
            pub fn name(self) -> &'static str {
                match self { $($(Check::$variant => $name,)*)* }
            }

            /// Its group in the report.
            pub fn group(self) -> &'static str {
                match self { $($(Check::$variant => $group,)*)* }
            }

            /// The matrix it belongs to.
            pub fn matrix(self) -> Matrix {
                match self { $($(Check::$variant => Matrix::$matrix,)*)* }
            }

            /// What it checks.
            pub fn description(self) -> &'static str {
                match self { $($(Check::$variant => $doc,)*)* }
            }

            pub(crate) async fn run(self, ctx: &Ctx, run: &mut Run) -> Result<(), String> {
                match self { $($(Check::$variant => $run(ctx, run).await,)*)* }
            }
        }
    };
}

checks! {
    Base MATRIX {
        HealthPublic = "health_public", "workflow", base::health_public, "GET /v1/health answers healthy.";
        HealthHead = "health_head", "workflow", base::health_head, "HEAD /v1/health answers 200 (load balancers and uptime probes use HEAD).";
        HealthSigned = "health_signed", "workflow", base::health_signed, "Signed POST /v1/health: keyConfigured, capabilities as in the exchange.";
        StorageList = "storage_list", "workflow", base::storage_list, "list tokens.";
        StorageWrite = "storage_write", "workflow", base::storage_write, "set a vault_config document.";
        StorageReadBack = "storage_read_back", "workflow", base::storage_read_back, "get it back.";
        StorageListBatch = "storage_list_batch", "workflow", base::storage_list_batch, "list_batch over tokens and vault_config lists it.";
        StorageListLimit = "storage_list_limit", "workflow", base::storage_list_limit, "list with limit=1 answers one item and a pagination cursor that reaches the next.";
        StorageDelete = "storage_delete", "workflow", base::storage_delete, "delete it; get answers null.";
        AgentStoreAndFetch = "agent_store_and_fetch", "workflow", base::agent_store_and_fetch, "store with a store ticket, fetch with a credential ticket.";
        ForgedCredentialTicket = "forged_credential_ticket", "adversarial", base::forged_credential_ticket, "A credential ticket signed with a foreign key: 401 ticket_invalid.";
        PlatformAddressRefused = "platform_address_refused", "adversarial", base::platform_address_refused, "A valid ticket from the platform's egress address: 403 forbidden.";
        ForgedStoreTicket = "forged_store_ticket", "adversarial", base::forged_store_ticket, "A store ticket signed with a foreign key: 401 ticket_invalid.";
        StaleTimestamp = "stale_timestamp", "refusal", base::stale_timestamp, "A signature 600 s old: 401 auth_failed.";
        ForgedSignature = "forged_signature", "refusal", base::forged_signature, "A signature with a foreign secret or key: 401 auth_failed.";
        DuplicateRequestId = "duplicate_request_id", "refusal", base::duplicate_request_id, "The same request id twice: 401 auth_failed.";
        WrongPurpose = "wrong_purpose", "refusal", base::wrong_purpose, "A store ticket on /v1/credential: 401 ticket_invalid.";
        ProxyTicketOnCredential = "proxy_ticket_on_credential", "refusal", base::proxy_ticket_on_credential, "A proxy ticket on /v1/credential: 401 ticket_invalid.";
        WrongService = "wrong_service", "refusal", base::wrong_service, "A ticket for another service: 401 ticket_invalid.";
        ReplayedNonce = "replayed_nonce", "refusal", base::replayed_nonce, "The same ticket twice: 401 ticket_invalid.";
        ExpiredTicket = "expired_ticket", "refusal", base::expired_ticket, "An expired ticket: 401 ticket_expired.";
        UnsignedProxy = "unsigned_proxy", "refusal", base::unsigned_proxy, "An unsigned proxy call is refused and never reaches the upstream.";
        NonUtf8Body = "non_utf8_body", "refusal", base::non_utf8_body, "A correctly signed body that is not UTF-8: a 4xx JSON error, never a 5xx.";
        StorageSetNonObject = "storage_set_non_object", "refusal", base::storage_set_non_object, "set with data that is not an object: 400.";
        AwsSecretSealed = "aws_secret_sealed", "adversarial", signing::aws_secret_sealed, "An AWS key's secretAccessKey and sessionToken never appear in what the platform reads.";
    }
    Protocol24 PROTOCOL_24_MATRIX {
        Version240 = "version_2_4_0", "protocol-2.4.0", protocol24::version_2_4_0, "Health reports protocol 2.4.0.";
        Capabilities240 = "capabilities_2_4_0", "protocol-2.4.0", protocol24::capabilities_2_4_0, "The 2.4.0 capability list, in canonical order.";
        StaleCreation = "stale_creation", "protocol-2.4.0", protocol24::stale_creation, "A store ticket's cid is recorded; a ticket whose cid no longer matches: 409 stale_creation.";
        StoreConstraints = "store_constraints", "protocol-2.4.0", protocol24::store_constraints, "Store tickets with a bad mode or a non-string cid are refused.";
        TotpUriSealed = "totp_uri_sealed", "protocol-2.4.0", protocol24::totp_uri_sealed, "A stored totpUri never appears in any answer.";
        TotpCodeOnCredential = "totp_code_on_credential", "protocol-2.4.0", protocol24::totp_code_on_credential, "The credential path gives TOTP codes, not seeds.";
    }
    Wire WIRE_MATRIX {
        BodyRequestIdMismatch = "body_request_id_mismatch", "wire", wire::body_request_id_mismatch, "Body requestId differing from the header: refused.";
        SignedBytesWithNewRequestId = "signed_bytes_with_new_request_id", "wire", wire::signed_bytes_with_new_request_id, "Signed bytes replayed under a new request id: refused.";
        SignedBytesOnOtherEndpoint = "signed_bytes_on_other_endpoint", "wire", wire::signed_bytes_on_other_endpoint, "Signed bytes replayed on another endpoint: refused.";
        PercentEncodedCredentialPath = "percent_encoded_credential_path", "wire", wire::percent_encoded_credential_path, "A percent-encoded /v1/credential is not routed.";
        PercentEncodedProxyPath = "percent_encoded_proxy_path", "wire", wire::percent_encoded_proxy_path, "A percent-encoded /v1/proxy is not routed.";
        TicketIatInFuture = "ticket_iat_in_future", "wire", wire::ticket_iat_in_future, "A ticket issued in the future: refused.";
        TicketIatAfterExp = "ticket_iat_after_exp", "wire", wire::ticket_iat_after_exp, "A ticket with iat after exp: refused.";
        TicketExpBeyondCapOldIat = "ticket_exp_beyond_cap_old_iat", "wire", wire::ticket_exp_beyond_cap_old_iat, "A ticket living longer than the cap: refused.";
        TicketExpI64Max = "ticket_exp_i64_max", "wire", wire::ticket_exp_i64_max, "A ticket with exp = 2^63-1: refused without overflow.";
    }
    Envelope ENVELOPE_MATRIX {
        UnknownPlatformKey = "unknown_platform_key", "envelope", envelope::unknown_platform_key, "An envelope from an unknown key: 401 auth_failed.";
        ReplayedEnvelopeNonce = "replayed_envelope_nonce", "envelope", envelope::replayed_envelope_nonce, "An envelope nonce used twice: 401 auth_failed.";
        BodySwapped = "body_swapped", "envelope", envelope::body_swapped, "A body swapped under a valid envelope: 401 auth_failed.";
        HmacSignatureRefused = "hmac_signature_refused", "envelope", envelope::hmac_signature_refused, "HMAC signatures in an asymmetric binding: 401 auth_failed.";
        HmacTicketRefused = "hmac_ticket_refused", "envelope", envelope::hmac_ticket_refused, "HMAC tickets in an asymmetric binding: 401 ticket_invalid.";
        RemovedPlatformKey = "removed_platform_key", "envelope", envelope::removed_platform_key, "An envelope from a removed key: 401 auth_failed.";
    }
    Restart RESTART_MATRIX {
        ReplayAfterRestart = "replay_after_restart", "restart", restart::replay_after_restart, "A request id and a ticket nonce used before a restart are refused after it.";
    }
    Stream STREAM_MATRIX {
        StreamedAnswer = "streamed_answer", "streaming", stream::streamed_answer, "A proxied event stream: head signed in the streamed form, body verified as it arrives up to a valid end frame, events intact.";
    }
}

impl Check {
    /// The check named `name`.
    pub fn from_name(name: &str) -> Option<Check> {
        Check::ALL.iter().copied().find(|c| c.name() == name)
    }

    /// Whether it runs in this session (envelope checks need an asymmetric binding, the removed-key
    /// check a removed key, the restart check a restart command).
    pub(crate) fn applies(self, ctx: &Ctx) -> bool {
        match self.matrix() {
            Matrix::Base | Matrix::Protocol24 | Matrix::Wire => true,
            Matrix::Envelope => {
                ctx.asymmetric && (self != Check::RemovedPlatformKey || ctx.removed.is_some())
            }
            Matrix::Restart => ctx.restart_cmd.is_some(),
            Matrix::Stream => ctx.stream_service.is_some(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for c in Check::ALL {
            assert!(seen.insert(c.name()), "duplicate name {}", c.name());
            assert_eq!(Check::from_name(c.name()), Some(*c));
        }
        let listed = MATRIX.len()
            + PROTOCOL_24_MATRIX.len()
            + WIRE_MATRIX.len()
            + ENVELOPE_MATRIX.len()
            + RESTART_MATRIX.len()
            + STREAM_MATRIX.len();
        assert_eq!(listed, Check::ALL.len());
    }
}
