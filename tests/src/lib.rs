//! Test harness: starts the real keyholder in process on `127.0.0.1:0` with its own temporary
//! data folder, and plays the platform, the browser and the agent with the protocol crate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

pub mod bench;
pub mod certs;
pub mod faulty;
pub mod mmdb;
pub mod mtls;
pub mod python;
pub mod replicas;
pub mod sigv4;
pub mod webdriver;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use keyholder::config::{Config, DataArgs};
use keyholder::RunningServer;
use keyholder_protocol::paths::*;
use keyholder_protocol::signing::signature_header_value;
use keyholder_protocol::ticket::encode_ticket;
use keyholder_protocol::{HmacSecret, Purpose, TicketClaims};
use serde_json::{json, Value};

pub mod upstream;

pub const PUBLIC_URL: &str = "https://keyholder.test.example";

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A fresh random hex string (nonces, request ids).
pub fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A keyholder under test.
pub struct Keyholder {
    pub server: Option<RunningServer>,
    pub data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    pub http: reqwest::Client,
    pub base: String,
    pub secret: Option<HmacSecret>,
    pub config: Config,
}

/// An HTTP answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn error_code(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
    /// Asserts a 200, showing the body otherwise.
    #[track_caller]
    pub fn assert_ok(&self) {
        assert_eq!(
            self.status,
            200,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
    }
    /// Asserts an error status and wire code.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(
            self.error_code(),
            code,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert!(self.json()["message"].is_string());
    }
}

/// Reads an answer whole; a streamed body cut by the server keeps what arrived before the cut.
pub async fn read(mut resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        body.extend_from_slice(&chunk);
    }
    Answer {
        status,
        headers,
        body,
    }
}

/// The SDK's retry policy with short delays (the platform's 1 s and 3 s would only slow tests).
pub fn fast_retry() -> keyholder_client::RetryPolicy {
    keyholder_client::RetryPolicy::with_delays([
        std::time::Duration::from_millis(10),
        std::time::Duration::from_millis(30),
    ])
}

impl Keyholder {
    /// An SDK client builder for this keyholder (plain http on loopback, fast retries).
    pub fn sdk_builder(&self) -> keyholder_client::ClientBuilder {
        keyholder_client::ClientBuilder::new(self.base.clone())
            .danger_allow_http()
            .retry(fast_retry())
            .timeout(std::time::Duration::from_secs(10))
    }

    /// Default test configuration on a new temporary folder.
    pub fn config_in(dir: &Path) -> Config {
        let mut config = Config::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
        config.public_url = Some(PUBLIC_URL.into());
        config.workers = Some(2);
        config
    }

    /// Starts a keyholder on a new temporary data folder.
    pub async fn start() -> Keyholder {
        Self::start_with(|_| {}).await
    }

    /// Starts one with an adjusted configuration.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Keyholder {
        let temp = tempfile::tempdir().unwrap();
        let mut config = Self::config_in(temp.path());
        adjust(&mut config);
        let mut kh = Self::start_config(config).await;
        kh._temp = Some(temp);
        kh
    }

    /// Starts one with exactly this configuration.
    pub async fn start_config(config: Config) -> Keyholder {
        let server = keyholder::start(config.clone())
            .await
            .expect("server starts");
        let base = server.url();
        Keyholder {
            data_dir: config.data_dir.clone(),
            server: Some(server),
            _temp: None,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base,
            secret: None,
            config,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.as_ref().unwrap().addr
    }

    /// Stops and starts the server again on the same data folder (and port 0).
    pub async fn restart(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        let server = keyholder::start(self.config.clone())
            .await
            .expect("server restarts");
        self.base = server.url();
        self.server = Some(server);
    }

    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }

    pub fn data_args(&self) -> DataArgs {
        use keyholder::vault::master::MasterKeySource;
        let (master_key_file, passphrase_file) = match &self.config.master_key {
            MasterKeySource::File(p) => (Some(p.clone()), None),
            MasterKeySource::Passphrase(p) => (None, Some(p.clone())),
            MasterKeySource::DataFolder | MasterKeySource::Pkcs11(_) => (None, None),
        };
        let pkcs11 = match &self.config.master_key {
            MasterKeySource::Pkcs11(c) => keyholder::config::Pkcs11Args {
                master_key_pkcs11: Some(c.uri.clone()),
                pkcs11_module: c.module.clone(),
                pkcs11_pin_file: c.pin_file.clone(),
            },
            _ => Default::default(),
        };
        DataArgs {
            data_dir: self.data_dir.clone(),
            master_key_file,
            passphrase_file,
            pkcs11,
            database_url: None,
            database_password_file: None,
            node_id: None,
        }
    }

    /// `keyholder bind` as the owner runs it (same code path as the CLI).
    pub fn issue_code(&self, rebind: bool) -> keyholder::vault::binding::IssuedCode {
        let args = keyholder::cli::bind::BindArgs {
            data: self.data_args(),
            public_url: None,
            frontend_url: DEFAULT_FRONTEND.into(),
            rebind,
            platform_key: None,
            json: true,
        };
        keyholder::cli::bind::bind(&args).expect("bind code issued")
    }

    /// The platform's exchange call.
    pub async fn exchange(&self, code: &str) -> Answer {
        read(
            self.http
                .post(self.url(PATH_EXCHANGE))
                .json(&json!({ "code": code }))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Issues a code and exchanges it; keeps the secret for signing.
    pub async fn bind(&mut self) -> HmacSecret {
        let code = self.issue_code(false);
        let answer = self.exchange(&code.code).await;
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        let secret =
            HmacSecret::from_base64(answer.json()["hmacSecret"].as_str().unwrap()).unwrap();
        self.secret = Some(HmacSecret::from_bytes(*secret.expose()));
        secret
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The platform HMAC secret of the binding (panics when unbound).
    pub fn secret(&self) -> &HmacSecret {
        self.secret.as_ref().expect("bound")
    }

    /// A signed platform POST as the platform sends it: a fresh timestamp, and the request id in
    /// the body's `requestId` and in the header (a fresh one added to an object body without one,
    /// so that two calls with the same body are not the same signed bytes).
    pub async fn signed(&self, path: &str, body: &Value) -> Answer {
        let mut body = body.clone();
        if let Some(map) = body.as_object_mut() {
            map.entry("requestId")
                .or_insert_with(|| json!(format!("req_{}", random_hex(12))));
        }
        let raw = serde_json::to_vec(&body).unwrap();
        let request_id = body["requestId"]
            .as_str()
            .map_or_else(|| format!("req_{}", random_hex(12)), str::to_string);
        self.signed_raw(path, &raw, now(), &request_id).await
    }

    /// A signed platform POST with every part chosen by the caller.
    pub async fn signed_raw(&self, path: &str, raw: &[u8], ts: i64, request_id: &str) -> Answer {
        self.signed_raw_with(self.secret(), path, raw, ts, request_id)
            .await
    }

    /// A platform POST signed with the given secret (a forger's, in refusal tests).
    pub async fn signed_raw_with(
        &self,
        secret: &HmacSecret,
        path: &str,
        raw: &[u8],
        ts: i64,
        request_id: &str,
    ) -> Answer {
        let sig = signature_header_value(secret, ts, raw);
        read(
            self.http
                .post(self.url(path))
                .header("content-type", "application/json")
                .header(HEADER_SIGNATURE, sig)
                .header(HEADER_TIMESTAMP, ts.to_string())
                .header(HEADER_PLATFORM_REQUEST_ID, request_id)
                .body(raw.to_vec())
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// A storage call.
    pub async fn storage(&self, body: Value) -> Answer {
        self.signed(PATH_STORAGE, &body).await
    }

    /// Claims for a fresh ticket (60 s, random nonce).
    pub fn claims(&self, purpose: Purpose, service: &str) -> TicketClaims {
        let n = now();
        TicketClaims::new("user_test", service, purpose, n, n + 60, random_hex(16))
    }

    /// A fresh signed ticket.
    pub fn ticket(&self, purpose: Purpose, service: &str) -> String {
        encode_ticket(self.secret(), &self.claims(purpose, service))
    }

    pub fn ticket_from(&self, claims: &TicketClaims) -> String {
        encode_ticket(self.secret(), claims)
    }

    /// The browser's `/v1/store`.
    pub async fn store(&self, service: &str, token_data: Value) -> Answer {
        let ticket = self.ticket(Purpose::Store, service);
        self.store_with(&ticket, service, token_data).await
    }

    pub async fn store_with(&self, ticket: &str, service: &str, token_data: Value) -> Answer {
        read(
            self.http
                .post(self.url(PATH_STORE))
                .json(&json!({ "ticket": ticket, "service": service, "tokenData": token_data }))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// The published identity (`GET /v1/identity`).
    pub async fn identity(&self) -> keyholder_protocol::IdentityDocument {
        let answer = read(self.http.get(self.url(PATH_IDENTITY)).send().await.unwrap()).await;
        serde_json::from_value(answer.json()).unwrap()
    }

    /// The agent's `GET /v1/credential` (following the platform's redirect).
    pub async fn credential(&self, service: &str) -> Answer {
        let ticket = self.ticket(Purpose::AgentCredential, service);
        self.credential_with(&ticket, service).await
    }

    pub async fn credential_with(&self, ticket: &str, service: &str) -> Answer {
        let url = reqwest::Url::parse_with_params(
            &self.url(PATH_CREDENTIAL),
            &[("ticket", ticket), ("service", service)],
        )
        .unwrap();
        read(self.http.get(url).send().await.unwrap()).await
    }

    /// The platform's signed `/v1/proxy` call with a fresh `proxy` ticket for `service`.
    pub async fn proxy(&self, service: &str, upstream: Value, templates: Value) -> Answer {
        let ticket = self.ticket(Purpose::Proxy, service);
        self.signed(
            PATH_PROXY,
            &json!({
                "ticket": ticket,
                "service": service,
                "upstream": upstream,
                "headerTemplates": templates,
                "requestId": format!("req_{}", random_hex(8)),
            }),
        )
        .await
    }

    /// The platform's signed `/v1/proxy` call, its answer not read: the response (to read as a
    /// stream) and the request id the keyholder signs it for.
    pub async fn proxy_streaming(
        &self,
        service: &str,
        upstream: Value,
        templates: Value,
    ) -> (reqwest::Response, String) {
        let request_id = format!("req_{}", random_hex(8));
        let ticket = self.ticket(Purpose::Proxy, service);
        let raw = serde_json::to_vec(&json!({
            "ticket": ticket,
            "service": service,
            "upstream": upstream,
            "headerTemplates": templates,
            "requestId": request_id,
        }))
        .unwrap();
        let ts = now();
        let response = self
            .http
            .post(self.url(PATH_PROXY))
            .header("content-type", "application/json")
            .header(
                HEADER_SIGNATURE,
                signature_header_value(self.secret(), ts, &raw),
            )
            .header(HEADER_TIMESTAMP, ts.to_string())
            .header(HEADER_PLATFORM_REQUEST_ID, &request_id)
            .body(raw)
            .send()
            .await
            .unwrap();
        (response, request_id)
    }

    /// `proxy` with `Authorization: Bearer ${TOKEN}` and a GET to `url`.
    pub async fn proxy_get(&self, service: &str, url: &str) -> Answer {
        self.proxy(
            service,
            json!({ "url": url, "method": "GET" }),
            json!({ "Authorization": "Bearer ${TOKEN}" }),
        )
        .await
    }

    /// `keyholder egress ...` as the owner runs it; then the server picks the change up at once
    /// (as its quarter-second poll would).
    pub async fn egress(
        &self,
        action: &str,
        service: &str,
        entries: &[&str],
        any: bool,
    ) -> keyholder::vault::egress::EgressPolicy {
        use keyholder::cli::egress::{EgressAction, EgressArgs};
        let data = self.data_args();
        let service = service.to_string();
        let action = match action {
            "show" => EgressAction::Show {
                data,
                service,
                json: true,
            },
            "allow" => EgressAction::Allow {
                data,
                service,
                entries: entries.iter().map(|e| e.to_string()).collect(),
                any,
            },
            "reset" => EgressAction::Reset { data, service },
            "set" => EgressAction::Set {
                data,
                service,
                mode: entries[0].parse().unwrap(),
            },
            other => panic!("unknown egress action {other}"),
        };
        let policy = keyholder::cli::egress::egress(&EgressArgs { action })
            .expect("egress command")
            .0;
        if let Some(server) = self.server.as_ref() {
            server
                .state
                .reload
                .follow_owner_changes()
                .await
                .expect("server follows the owner's change");
        }
        policy
    }

    /// `keyholder egress set SERVICE --mode MODE` as the owner runs it.
    pub async fn egress_mode(&self, service: &str, mode: &str) {
        self.egress("set", service, &[mode], false).await;
    }

    /// `keyholder COMMAND ARGS --data-dir ...` on the data folder, `run` parsing the argument
    /// vector with the real CLI definition; then a running server follows the change (as its
    /// quarter-second poll would).
    pub async fn owner_command<T: Send + 'static>(
        &self,
        command: &str,
        args: &[&str],
        run: impl FnOnce(Vec<String>) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let mut argv = vec![command.to_string()];
        argv.extend(args.iter().map(|a| a.to_string()));
        argv.push("--data-dir".into());
        argv.push(self.data_dir.display().to_string());
        let out = tokio::task::spawn_blocking(move || run(argv))
            .await
            .unwrap()?;
        if let Some(server) = self.server.as_ref() {
            server.state.reload.follow_owner_changes().await.unwrap();
        }
        Ok(out)
    }

    /// The audit trail of `service` (every service when `None`) as the owner lists it, after the
    /// queued entries of a running server are written.
    pub async fn audit_entries(&self, service: Option<&str>) -> Vec<keyholder::audit::AuditEntry> {
        if let Some(server) = self.server.as_ref() {
            server.state.audit.flush().await;
        }
        let args = keyholder::cli::audit::AuditListArgs {
            data: self.data_args(),
            service: service.map(str::to_owned),
            since: None,
            limit: None,
            json: true,
        };
        tokio::task::spawn_blocking(move || keyholder::cli::audit::audit_list(&args))
            .await
            .unwrap()
            .unwrap()
    }

    /// `keyholder egress pending --json` as the owner runs it.
    pub fn egress_pending(&self) -> Vec<keyholder::vault::egress::PendingEgress> {
        keyholder::cli::egress::egress_pending(&self.data_args()).expect("egress pending")
    }

    /// `keyholder oauth set PROVIDER ...` as the owner runs it.
    pub fn oauth_set(&self, provider: &str, token_url: &str, client_id: &str, secret: &str) {
        use keyholder::cli::oauth::{OAuthAction, OAuthArgs};
        let file = self.data_dir.join(format!("{provider}.secret"));
        std::fs::write(&file, format!("{secret}\n")).unwrap();
        keyholder::cli::oauth::oauth(&OAuthArgs {
            action: OAuthAction::Set {
                data: self.data_args(),
                provider: provider.into(),
                token_url: token_url.into(),
                client_id: client_id.into(),
                client_secret_file: Some(file.clone()),
            },
        })
        .expect("oauth set");
        std::fs::remove_file(file).unwrap();
    }
}
