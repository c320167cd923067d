//! The rules of a custody policy as the owner writes them (`--hours 'Mon-Fri 08:00-18:00'`,
//! `--rate 10/min`, ...), stored as JSON text, and compiled once per owner change into the form
//! the hot path checks.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::vault::VaultError;

/// How a credential under the policy may travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// Only ever injected by `/v1/proxy` (and used for refresh and minting): never handed out.
    InjectOnly,
    /// Handed out as today (the default).
    HandOut,
}

impl Delivery {
    /// The owner's spelling.
    pub fn parse(text: &str) -> Result<Delivery, VaultError> {
        match text {
            "inject-only" => Ok(Delivery::InjectOnly),
            "hand-out" => Ok(Delivery::HandOut),
            other => Err(invalid(format!(
                "--delivery '{other}': expected inject-only or hand-out"
            ))),
        }
    }
}

/// What a usage cap counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    /// Per calendar day in the policy's time zone.
    Day,
    /// Over the policy's lifetime.
    Total,
}

/// A policy's rules as stored (owner input, already validated by [`Rules::compile`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rules {
    /// `inject-only` or `hand-out`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// Allowed windows such as `Mon-Fri 08:00-18:00` (any one of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hours: Vec<String>,
    /// IANA time zone of the windows and of daily caps (UTC if unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Allowed client networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_ip: Vec<String>,
    /// `N/s`, `N/min` or `N/h` (token bucket per target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    /// Usage cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u64>,
    /// What the usage cap counts over (`day` or `total`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<Per>,
    /// Allowed agent ids (the ticket's `aid`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// Allowed countries of the client address (ISO 3166-1 alpha-2, from `serve --geoip-db`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub geo: Vec<String>,
    /// Each use waits for the owner's approval.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approval: bool,
    /// Seconds a use waits for the owner (default 60); then it is denied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_timeout: Option<u64>,
}

/// How long a use waits for the owner's approval unless the policy says otherwise.
pub const DEFAULT_APPROVAL_TIMEOUT_SECS: u64 = 60;

fn invalid(text: String) -> VaultError {
    VaultError::Invalid(text)
}

/// One allowed window: days of the week (Monday = 0) and minutes since midnight, `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    days: [bool; 7],
    start: u16,
    end: u16,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day_index(text: &str) -> Option<usize> {
    let lower = text.trim().to_ascii_lowercase();
    DAYS.iter().position(|d| lower == *d)
}

fn minutes(text: &str) -> Option<u16> {
    let (h, m) = text.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: u16 = h.parse().ok()?;
    let m: u16 = m.parse().ok()?;
    if m > 59 || h > 24 || (h == 24 && m != 0) {
        return None;
    }
    Some(h * 60 + m)
}

impl Window {
    /// Parses `Mon-Fri 08:00-18:00`, `Sat,Sun 10:00-12:00` or `Fri-Mon 00:00-24:00`.
    pub fn parse(text: &str) -> Result<Window, VaultError> {
        let bad = || {
            invalid(format!(
                "--hours '{text}': expected days and a time range such as 'Mon-Fri 08:00-18:00'"
            ))
        };
        let mut parts = text.split_whitespace();
        let (Some(day_spec), Some(time_spec), None) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let mut days = [false; 7];
        for item in day_spec.split(',') {
            match item.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (day_index(a).ok_or_else(bad)?, day_index(b).ok_or_else(bad)?);
                    let mut d = a;
                    loop {
                        days[d] = true;
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                }
                None => days[day_index(item).ok_or_else(bad)?] = true,
            }
        }
        let (start, end) = time_spec.split_once('-').ok_or_else(bad)?;
        let (start, end) = (
            minutes(start).ok_or_else(bad)?,
            minutes(end).ok_or_else(bad)?,
        );
        if end <= start {
            return Err(invalid(format!(
                "--hours '{text}': the end must be after the start (split a window across midnight in two)"
            )));
        }
        Ok(Window { days, start, end })
    }

    fn contains(&self, weekday: usize, minute: u16) -> bool {
        self.days.get(weekday).copied().unwrap_or(false)
            && minute >= self.start
            && minute < self.end
    }
}

/// A rate: `count` uses per `per_secs` seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Uses allowed per period (also the burst).
    pub count: u32,
    /// The period, seconds.
    pub per_secs: f64,
}

impl Rate {
    /// Parses `N/s`, `N/min` or `N/h`.
    pub fn parse(text: &str) -> Result<Rate, VaultError> {
        let bad = || invalid(format!("--rate '{text}': expected N/s, N/min or N/h"));
        let (n, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let per_secs = match unit.trim() {
            "s" => 1.0,
            "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        if count == 0 || count > 1_000_000 {
            return Err(bad());
        }
        Ok(Rate { count, per_secs })
    }
}

/// Rules ready for the hot path.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The owner's rules, for display and the refusal messages.
    pub rules: Rules,
    /// `true` for `--delivery inject-only`.
    pub inject_only: bool,
    /// Allowed windows (empty: any time).
    pub windows: Vec<Window>,
    /// Time zone of the windows and the daily cap.
    pub tz: jiff::tz::TimeZone,
    /// Allowed client networks (empty: any).
    pub nets: Vec<IpNet>,
    /// Rate per target.
    pub rate: Option<Rate>,
    /// Usage cap.
    pub max_uses: Option<(u64, Per)>,
    /// Allowed agent ids (empty: any).
    pub agents: BTreeSet<String>,
    /// Seconds to wait for the owner's approval (None: no approval needed).
    pub approval: Option<u64>,
    /// Allowed client countries (empty: any).
    pub countries: BTreeSet<String>,
}

fn parse_net(text: &str) -> Result<IpNet, VaultError> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| invalid(format!("--client-ip '{text}': expected an address or CIDR")))
}

impl Rules {
    /// Validates and compiles the rules (every error names the flag at fault).
    pub fn compile(&self) -> Result<Compiled, VaultError> {
        let windows = self
            .hours
            .iter()
            .map(|h| Window::parse(h))
            .collect::<Result<Vec<_>, _>>()?;
        let tz = match self.time_zone.as_deref() {
            None => jiff::tz::TimeZone::UTC,
            Some(name) => jiff::tz::db().get(name).map_err(|_| {
                invalid(format!(
                    "--time-zone '{name}': not an IANA time zone name (e.g. Europe/Berlin)"
                ))
            })?,
        };
        let nets = self
            .client_ip
            .iter()
            .map(|n| parse_net(n))
            .collect::<Result<Vec<_>, _>>()?;
        let rate = self.rate.as_deref().map(Rate::parse).transpose()?;
        let max_uses = match (self.max_uses, self.per) {
            (None, None) => None,
            (Some(n), per) if n > 0 => Some((n, per.unwrap_or(Per::Total))),
            (Some(_), _) => return Err(invalid("--max-uses must be at least 1".into())),
            (None, Some(_)) => return Err(invalid("--per needs --max-uses".into())),
        };
        let agents: BTreeSet<String> = self.agents.iter().map(|a| a.trim().to_string()).collect();
        if agents.iter().any(String::is_empty) {
            return Err(invalid("--agents: an empty agent id".into()));
        }
        let approval = match (self.approval, self.approval_timeout) {
            (false, None) => None,
            (false, Some(_)) => return Err(invalid("--approval-timeout needs --approval".into())),
            (true, Some(secs)) if !(1..=3600).contains(&secs) => {
                return Err(invalid(
                    "--approval-timeout must be 1 to 3600 seconds".into(),
                ))
            }
            (true, secs) => Some(secs.unwrap_or(DEFAULT_APPROVAL_TIMEOUT_SECS)),
        };
        let mut countries = BTreeSet::new();
        for code in &self.geo {
            let code = code.trim().to_ascii_uppercase();
            if code.len() != 2 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(invalid(format!(
                    "--geo '{code}': expected ISO 3166-1 alpha-2 country codes such as DE,FR"
                )));
            }
            countries.insert(code);
        }
        Ok(Compiled {
            countries,
            approval,
            rules: self.clone(),
            inject_only: self.delivery == Some(Delivery::InjectOnly),
            windows,
            tz,
            nets,
            rate,
            max_uses,
            agents,
        })
    }

    /// One line per rule, as the owner wrote it (for `policy show` and `status`).
    pub fn describe(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(d) = self.delivery {
            lines.push(format!(
                "delivery {}",
                match d {
                    Delivery::InjectOnly => "inject-only",
                    Delivery::HandOut => "hand-out",
                }
            ));
        }
        for h in &self.hours {
            lines.push(format!(
                "hours {h} {}",
                self.time_zone.as_deref().unwrap_or("UTC")
            ));
        }
        if !self.client_ip.is_empty() {
            lines.push(format!("client-ip {}", self.client_ip.join(",")));
        }
        if let Some(r) = &self.rate {
            lines.push(format!("rate {r}"));
        }
        if let Some(n) = self.max_uses {
            let per = match self.per.unwrap_or(Per::Total) {
                Per::Day => "day",
                Per::Total => "total",
            };
            lines.push(format!("max-uses {n} per {per}"));
        }
        if !self.agents.is_empty() {
            lines.push(format!("agents {}", self.agents.join(",")));
        }
        if !self.geo.is_empty() {
            lines.push(format!("geo {}", self.geo.join(",")));
        }
        if self.approval {
            lines.push(format!(
                "approval (timeout {} s)",
                self.approval_timeout
                    .unwrap_or(DEFAULT_APPROVAL_TIMEOUT_SECS)
            ));
        }
        lines
    }
}

impl Compiled {
    /// Whether `now` falls in one of the windows (true when there are none).
    pub fn within_hours(&self, now: jiff::Timestamp) -> bool {
        if self.windows.is_empty() {
            return true;
        }
        let local = now.to_zoned(self.tz.clone());
        let weekday = local.weekday().to_monday_zero_offset() as usize;
        let minute = (local.hour() as u16) * 60 + local.minute() as u16;
        self.windows.iter().any(|w| w.contains(weekday, minute))
    }

    /// The windows as the owner wrote them, with the zone (for a refusal's message).
    pub fn hours_text(&self) -> String {
        format!(
            "{} {}",
            self.rules.hours.join(", "),
            self.rules.time_zone.as_deref().unwrap_or("UTC")
        )
    }

    /// The period a usage count falls in now (`total`, or the local date) and the seconds until it ends.
    pub fn period(&self, now: jiff::Timestamp) -> (String, u64) {
        match self.max_uses.map(|(_, per)| per) {
            Some(Per::Day) => {
                let local = now.to_zoned(self.tz.clone());
                let date = local.date();
                let left = date
                    .tomorrow()
                    .ok()
                    .and_then(|d| d.to_zoned(self.tz.clone()).ok())
                    .map(|next| (next.timestamp().as_second() - now.as_second()).max(1) as u64)
                    .unwrap_or(86_400);
                (date.to_string(), left)
            }
            _ => ("total".into(), 86_400),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_refuse() {
        let w = Window::parse("Mon-Fri 08:00-18:00").unwrap();
        assert!(w.contains(0, 8 * 60));
        assert!(w.contains(4, 18 * 60 - 1));
        assert!(!w.contains(4, 18 * 60));
        assert!(!w.contains(5, 9 * 60));
        let wrap = Window::parse("Fri-Mon 00:00-24:00").unwrap();
        assert!(wrap.contains(6, 0) && wrap.contains(0, 1439) && !wrap.contains(1, 600));
        let list = Window::parse("sat,Sun 10:00-12:00").unwrap();
        assert!(list.contains(5, 600) && !list.contains(4, 600));
        for bad in [
            "",
            "Mon-Fri",
            "Mon-Fri 8:00-18:00",
            "Mon-Fri 18:00-08:00",
            "Mon-Fri 08:00-24:01",
            "Funday 08:00-09:00",
            "Mon 08:00-09:00 extra",
            "Mon 08:60-09:00",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates_and_rules_compile() {
        assert_eq!(Rate::parse("10/min").unwrap().per_secs, 60.0);
        for bad in ["0/s", "x/s", "10/day", "10", "-1/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
        let rules = Rules {
            time_zone: Some("Europe/Berlin".into()),
            hours: vec!["Mon-Fri 08:00-18:00".into()],
            client_ip: vec!["10.0.0.0/8".into(), "192.0.2.7".into()],
            max_uses: Some(5),
            per: Some(Per::Day),
            ..Rules::default()
        };
        let c = rules.compile().unwrap();
        assert_eq!(c.nets.len(), 2);
        assert_eq!(c.hours_text(), "Mon-Fri 08:00-18:00 Europe/Berlin");
        // 2026-12-01 is a Tuesday; 07:30 UTC is 08:30 in Berlin (CET, UTC+1).
        let inside: jiff::Timestamp = "2026-12-01T07:30:00Z".parse().unwrap();
        let before: jiff::Timestamp = "2026-12-01T06:30:00Z".parse().unwrap();
        let saturday: jiff::Timestamp = "2026-12-05T10:00:00Z".parse().unwrap();
        assert!(c.within_hours(inside));
        assert!(!c.within_hours(before));
        assert!(!c.within_hours(saturday));
        let (period, left) = c.period(inside);
        assert_eq!(period, "2026-12-01");
        assert_eq!(left, 15 * 3600 + 30 * 60);
        let bad_zone = Rules {
            time_zone: Some("Mars/Olympus".into()),
            ..Rules::default()
        };
        assert!(bad_zone.compile().is_err());
        let bad_ip = Rules {
            client_ip: vec!["10.0.0.0/33".into()],
            ..Rules::default()
        };
        assert!(bad_ip.compile().is_err());
    }
}
