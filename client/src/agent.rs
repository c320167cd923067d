//! The agent and browser side: fetch a credential with a ticket (or by following the platform's redirect),
//! store one with a `store` ticket as the owner's browser does, and read a TOTP code.

use std::sync::Arc;

use keyholder_protocol::paths::{PATH_CREDENTIAL, PATH_STORE, PATH_TOTP_CODE};
use keyholder_protocol::wire::{StoreResponse, TotpCodeResponse};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value};
use url::Url;

use crate::error::Error;
use crate::retry::Idempotence;
use crate::secret::{Credential, SecretString, TokenDataWire, TotpCode};
use crate::transport::{Outgoing, Transport};
use crate::TokenData;

/// An agent's (or the owner's browser's) handle on one webhook. Holds no secret of its own: every call
/// carries a single-use ticket the platform issued.
///
/// ```no_run
/// # async fn demo(location: &str) -> Result<(), keyholder_client::Error> {
/// use keyholder_client::ClientBuilder;
///
/// let agent = ClientBuilder::new("https://keyholder.example.org").agent()?;
/// // `location` is the platform's 307 target: <webhook>/v1/credential?ticket=..&service=..
/// let credential = agent.credential_from_redirect(location).await?;
/// if let Some(token) = credential.access_token() {
///     let _authorization = format!("Bearer {}", token.expose());
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Agent {
    pub(crate) transport: Arc<Transport>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("base_url", &self.transport.base().as_str())
            .finish()
    }
}

#[derive(Deserialize)]
struct CredentialAnswer {
    token: Map<String, Value>,
}

impl Agent {
    pub(crate) fn from_transport(transport: Arc<Transport>) -> Self {
        Agent { transport }
    }

    /// The webhook's base URL.
    pub fn base_url(&self) -> &Url {
        self.transport.base()
    }

    fn ticket_query(ticket: &str, service: &str) -> Vec<(String, String)> {
        vec![
            ("ticket".to_owned(), ticket.to_owned()),
            ("service".to_owned(), service.to_owned()),
        ]
    }

    /// `GET /v1/credential?ticket=..&service=..`.
    pub async fn credential(&self, ticket: &str, service: &str) -> Result<Credential, Error> {
        let resp = self
            .transport
            .send(Idempotence::SingleUse, |_| {
                let mut out = Outgoing::new(Method::GET, PATH_CREDENTIAL);
                out.query = Self::ticket_query(ticket, service);
                Ok(out)
            })
            .await?;
        let answer: CredentialAnswer = resp.json()?;
        Ok(Credential::from_token(service, answer.token))
    }

    /// Follow the platform's redirect: `location` must be this webhook's `/v1/credential` URL with `ticket`
    /// and `service` in the query (anything else is refused, so a ticket never goes elsewhere).
    pub async fn credential_from_redirect(&self, location: &str) -> Result<Credential, Error> {
        let url = Url::parse(location)
            .map_err(|e| Error::Config(format!("redirect URL does not parse: {e}")))?;
        let base = self.transport.base();
        let expected_path = format!("{}{PATH_CREDENTIAL}", base.path().trim_end_matches('/'));
        if url.origin() != base.origin() || url.path() != expected_path {
            return Err(Error::Config(
                "the redirect does not point at this webhook's /v1/credential".into(),
            ));
        }
        let mut ticket = None;
        let mut service = None;
        for (name, value) in url.query_pairs() {
            match name.as_ref() {
                "ticket" => ticket = Some(SecretString::new(value.into_owned())),
                "service" => service = Some(value.into_owned()),
                _ => {}
            }
        }
        match (ticket, service) {
            (Some(ticket), Some(service)) => self.credential(ticket.expose(), &service).await,
            _ => Err(Error::Config(
                "the redirect URL lacks ticket or service".into(),
            )),
        }
    }

    /// `POST /v1/store` with a `store` ticket, as the owner's browser does. Returns the stored meta (never
    /// a secret).
    pub async fn store(
        &self,
        ticket: &str,
        service: &str,
        token_data: &TokenData,
    ) -> Result<StoreResponse, Error> {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Body<'a> {
            ticket: &'a str,
            service: &'a str,
            token_data: TokenDataWire<'a>,
        }
        let body = zeroize::Zeroizing::new(
            serde_json::to_vec(&Body {
                ticket,
                service,
                token_data: TokenDataWire(token_data),
            })
            .map_err(|e| Error::Protocol(format!("store body: {e}")))?,
        );
        self.transport
            .send(Idempotence::SingleUse, |_| {
                let mut out = Outgoing::new(Method::POST, PATH_STORE);
                out.body = Some(body.to_vec());
                Ok(out)
            })
            .await?
            .json()
    }

    /// `GET /v1/totp-code` with a `totp_code`, `agent_credential` or `user_reveal` ticket.
    pub async fn totp_code(&self, ticket: &str, service: &str) -> Result<TotpCode, Error> {
        let resp = self
            .transport
            .send(Idempotence::SingleUse, |_| {
                let mut out = Outgoing::new(Method::GET, PATH_TOTP_CODE);
                out.query = Self::ticket_query(ticket, service);
                Ok(out)
            })
            .await?;
        let answer: TotpCodeResponse = resp.json()?;
        Ok(TotpCode {
            code: SecretString::new(answer.code),
            remaining_seconds: answer.remaining_seconds,
            period: answer.period,
            digits: answer.digits,
        })
    }

    /// Send one prepared request once (the checker's probes).
    pub(crate) async fn send_once(
        &self,
        out: &Outgoing,
    ) -> Result<crate::transport::RawResponse, Error> {
        let id = keyholder_protocol::request_id::new_request_id();
        self.transport.send_once(out, &id).await
    }
}
