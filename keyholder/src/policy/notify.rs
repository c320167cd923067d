//! Push notifications to the owner (`serve --notify-url URL`): an ntfy-compatible JSON POST for
//! each use held for approval (with the one-time link to the keyholder's own approval page) and,
//! with `--notify-on refusals|all`, for policy refusals. The URL is the owner's, so it is called
//! directly (not through the egress guard); calls are off the request path, time-limited and
//! rate-limited, so a flood of requests cannot spam the owner.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

/// Which events are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyOn {
    /// Uses held for approval (the default).
    Approvals,
    /// Policy refusals.
    Refusals,
    /// Both.
    All,
}

impl NotifyOn {
    /// Parses `refusals`, `approvals` or `all`.
    pub fn parse(text: &str) -> Option<NotifyOn> {
        match text {
            "approvals" => Some(NotifyOn::Approvals),
            "refusals" => Some(NotifyOn::Refusals),
            "all" => Some(NotifyOn::All),
            _ => None,
        }
    }
}

/// At most this many notifications per minute of each kind (a burst of the same size).
const PER_MINUTE: f64 = 10.0;

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * PER_MINUTE / 60.0;
        self.tokens = (self.tokens + refill).min(PER_MINUTE);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The owner's notification endpoint, if configured.
pub struct Notifier {
    url: Option<String>,
    on: NotifyOn,
    http: reqwest::Client,
    approvals: Mutex<Bucket>,
    refusals: Mutex<Bucket>,
}

fn topic_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| {
            u.path_segments()
                .and_then(|mut s| s.next_back().map(str::to_string))
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "keyholder".into())
}

impl Notifier {
    /// A notifier posting to `url` (none: notifications off).
    pub fn new(url: Option<String>, on: NotifyOn) -> Notifier {
        let full = || Bucket {
            tokens: PER_MINUTE,
            at: Instant::now(),
        };
        Notifier {
            url,
            on,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            approvals: Mutex::new(full()),
            refusals: Mutex::new(full()),
        }
    }

    fn send(&self, body: serde_json::Value) {
        let Some(url) = self.url.clone() else {
            return;
        };
        let http = self.http.clone();
        tokio::spawn(async move {
            match http.post(&url).json(&body).send().await {
                Ok(resp) if resp.status().is_success() => {}
                Ok(resp) => tracing::warn!(
                    status = resp.status().as_u16(),
                    "owner notification refused"
                ),
                Err(err) => tracing::warn!(error = %err, "owner notification failed"),
            }
        });
    }

    fn allowed(bucket: &Mutex<Bucket>) -> bool {
        bucket.lock().map(|mut b| b.take()).unwrap_or(false)
    }

    /// A use waits for approval at `link` (a one-time page on this keyholder).
    pub fn approval(&self, id: &str, service: &str, agent: &str, client: &str, link: &str) {
        if self.url.is_none() || self.on == NotifyOn::Refusals || !Self::allowed(&self.approvals) {
            return;
        }
        let url = self.url.as_deref().unwrap_or_default();
        self.send(json!({
            "topic": topic_of(url),
            "title": format!("Keyholder: approve use of {service}?"),
            "message": format!(
                "Agent {} from {} asks for {service}. Open the link to approve or deny ({id}), or run `keyholder approve {id}`.",
                if agent.is_empty() { "(none)" } else { agent },
                if client.is_empty() { "(unknown)" } else { client },
            ),
            "priority": 4,
            "tags": ["key"],
            "click": link,
            "actions": [{"action": "view", "label": "Approve or deny", "url": link, "clear": true}],
            "keyholder": {"event": "approval", "id": id, "service": service, "agent": agent, "client": client, "link": link},
        }));
    }

    /// A use was refused by a rule.
    pub fn refusal(&self, service: &str, rule: &str, policy: &str) {
        if self.url.is_none() || self.on == NotifyOn::Approvals || !Self::allowed(&self.refusals) {
            return;
        }
        let url = self.url.as_deref().unwrap_or_default();
        self.send(json!({
            "topic": topic_of(url),
            "title": format!("Keyholder: use of {service} refused"),
            "message": format!("Refused by policy '{policy}' (rule {rule})."),
            "priority": 3,
            "tags": ["no_entry"],
            "keyholder": {"event": "refusal", "service": service, "rule": rule, "policy": policy},
        }));
    }
}
