//! `POST /v1/refresh-notify` (the webhook refreshes an OAuth token itself) and the opt-in `POST
//! /v1/refresh` ("tv-refresh": hand the refresh token to the platform, then store the new tokens).

use keyholder_protocol::paths::{PATH_REFRESH, PATH_REFRESH_NOTIFY};
use keyholder_protocol::wire::{
    RefreshGetResponse, RefreshHint, RefreshNotifyRequest, RefreshNotifyResponse, RefreshRequest,
    RefreshTokens, RefreshUpdateResponse,
};
use serde_json::{Map, Value};

use crate::error::Error;
use crate::platform::Platform;
use crate::secret::SecretString;

/// The answer of a `tv-refresh` `get`.
#[derive(Debug)]
pub struct RefreshGet {
    /// `ok`, `no_token` or `no_refresh_token`.
    pub status: String,
    /// The refresh token (with `ok`).
    pub refresh_token: Option<SecretString>,
    /// The token's meta.
    pub meta: Option<Map<String, Value>>,
}

impl Platform {
    /// `POST /v1/refresh-notify`: ask the webhook to refresh `service`'s token at the provider.
    pub async fn refresh_notify(
        &self,
        service: &str,
        reason: &str,
        hint: Option<&RefreshHint>,
    ) -> Result<RefreshNotifyResponse, Error> {
        self.signed(PATH_REFRESH_NOTIFY, |request_id| RefreshNotifyRequest {
            request_id: Some(request_id.to_owned()),
            service: Some(service.to_owned()),
            reason: Some(reason.to_owned()),
            refresh_hint: hint.cloned(),
        })
        .await
    }

    /// `POST /v1/refresh` `get`: the refresh token (only when the owner enabled `tv-refresh`).
    pub async fn refresh_get(&self, service: &str) -> Result<RefreshGet, Error> {
        let mut resp: RefreshGetResponse = self
            .signed(PATH_REFRESH, |request_id| RefreshRequest {
                request_id: Some(request_id.to_owned()),
                action: Some("get".into()),
                service: Some(service.to_owned()),
                tokens: None,
            })
            .await?;
        Ok(RefreshGet {
            status: std::mem::take(&mut resp.status),
            refresh_token: resp.refresh_token.take().map(SecretString::new),
            meta: resp.meta.take(),
        })
    }

    /// `POST /v1/refresh` `update`: store the tokens the platform obtained.
    pub async fn refresh_update(
        &self,
        service: &str,
        tokens: &RefreshTokens,
    ) -> Result<RefreshUpdateResponse, Error> {
        self.signed(PATH_REFRESH, |request_id| RefreshRequest {
            request_id: Some(request_id.to_owned()),
            action: Some("update".into()),
            service: Some(service.to_owned()),
            tokens: Some(tokens.clone()),
        })
        .await
    }
}
