//! The built-in egress catalogue of mode `known`: which origins a credential may be sent to, keyed
//! by the credential's own shape (its prefix, read from the sealed value, which the platform cannot
//! change). The owner extends it per service with `keyholder egress allow SERVICE ORIGIN`.

/// One provider: the prefixes its credentials carry and the origins it is known to use.
#[derive(Debug, PartialEq, Eq)]
pub struct Provider {
    /// Short name shown in refusals and logs.
    pub name: &'static str,
    /// Credential prefixes (case-sensitive, as the provider issues them).
    pub prefixes: &'static [&'static str],
    /// Origins (`https://host`, or `https://*.suffix` for any subdomain; port 443) for API calls.
    pub origins: &'static [&'static str],
    /// Further origins only for token endpoints (minting, OAuth refresh).
    pub token_endpoints: &'static [&'static str],
}

/// GitHub: token prefixes from https://github.blog/2021-04-05-behind-githubs-new-authentication-token-formats/
/// (`ghp_` personal, `gho_` OAuth, `ghu_` user-to-server, `ghs_` server-to-server / App
/// installation, `ghr_` refresh) and fine-grained PATs `github_pat_`
/// (https://github.blog/2022-10-18-introducing-fine-grained-personal-access-tokens-for-github/).
/// API https://docs.github.com/en/rest, uploads https://docs.github.com/en/rest/releases/assets,
/// Copilot https://docs.github.com/en/copilot; OAuth token endpoint `https://github.com/login/oauth/access_token`
/// (https://docs.github.com/en/apps/oauth-apps/building-oauth-apps/authorizing-oauth-apps).
pub const GITHUB: Provider = Provider {
    name: "GitHub",
    prefixes: &["ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"],
    origins: &[
        "https://api.github.com",
        "https://uploads.github.com",
        "https://api.githubcopilot.com",
    ],
    token_endpoints: &["https://github.com"],
};

/// Google OAuth access tokens start `ya29.`
/// (https://cloud.google.com/docs/authentication/token-types#access); APIs live on
/// `*.googleapis.com` (https://cloud.google.com/apis/docs/overview), the token endpoint is
/// `https://oauth2.googleapis.com/token` (https://developers.google.com/identity/protocols/oauth2).
pub const GOOGLE: Provider = Provider {
    name: "Google",
    prefixes: &["ya29."],
    origins: &["https://*.googleapis.com"],
    token_endpoints: &["https://oauth2.googleapis.com"],
};

/// AWS (credentials of `tokenType: "aws"`, signed with SigV4; recognised by their sealed
/// `secretAccessKey`, not by a prefix): every API endpoint is `<service>.<region>.amazonaws.com`
/// or a global `<service>.amazonaws.com` (https://docs.aws.amazon.com/general/latest/gr/rande.html),
/// STS included. The owner's `sign-config --aws-region` narrows this to one region.
pub const AWS: Provider = Provider {
    name: "AWS",
    prefixes: &[],
    origins: &["https://*.amazonaws.com"],
    token_endpoints: &[],
};

/// The catalogue, most specific prefixes first where two could overlap.
pub const CATALOGUE: &[Provider] = &[
    GITHUB,
    // GitLab personal access tokens `glpat-`: https://docs.gitlab.com/ee/security/token_overview.html
    // (API and OAuth token endpoint on https://gitlab.com: https://docs.gitlab.com/ee/api/oauth2.html).
    Provider {
        name: "GitLab",
        prefixes: &["glpat-"],
        origins: &["https://gitlab.com"],
        token_endpoints: &[],
    },
    // Slack bot/user/app-level tokens `xoxb-` `xoxp-` `xoxa-` `xapp-`:
    // https://api.slack.com/authentication/token-types (Web API and oauth.v2.access on https://slack.com).
    Provider {
        name: "Slack",
        prefixes: &["xoxb-", "xoxp-", "xoxa-", "xapp-"],
        origins: &["https://slack.com"],
        token_endpoints: &[],
    },
    // Stripe secret and restricted keys: https://docs.stripe.com/keys (API https://api.stripe.com).
    Provider {
        name: "Stripe",
        prefixes: &["sk_live_", "sk_test_", "rk_live_", "rk_test_"],
        origins: &["https://api.stripe.com"],
        token_endpoints: &[],
    },
    GOOGLE,
    // OpenAI project keys `sk-proj-`: https://platform.openai.com/docs/api-reference/authentication
    Provider {
        name: "OpenAI",
        prefixes: &["sk-proj-"],
        origins: &["https://api.openai.com"],
        token_endpoints: &[],
    },
    // Anthropic API keys `sk-ant-`: https://docs.anthropic.com/en/api/getting-started
    Provider {
        name: "Anthropic",
        prefixes: &["sk-ant-"],
        origins: &["https://api.anthropic.com"],
        token_endpoints: &[],
    },
    // Notion integration tokens `ntn_` (and the older `secret_`):
    // https://developers.notion.com/docs/authorization (API and OAuth token on https://api.notion.com).
    Provider {
        name: "Notion",
        prefixes: &["ntn_", "secret_"],
        origins: &["https://api.notion.com"],
        token_endpoints: &[],
    },
    // Linear personal API keys `lin_api_`: https://developers.linear.app/docs/graphql/working-with-the-graphql-api
    // (API and OAuth token endpoint on https://api.linear.app).
    Provider {
        name: "Linear",
        prefixes: &["lin_api_"],
        origins: &["https://api.linear.app"],
        token_endpoints: &[],
    },
];

/// The provider whose credentials look like `credential`, if any.
pub fn provider_for(credential: &str) -> Option<&'static Provider> {
    CATALOGUE.iter().find(|p| {
        p.prefixes
            .iter()
            .any(|prefix| credential.starts_with(prefix))
    })
}

/// Whether a catalogue origin (`https://host` or `https://*.suffix`, port 443) covers a normalized
/// origin (`scheme://host:port`, see `egress::origin_of`).
fn covers(pattern: &str, origin: &str) -> bool {
    let Some(host) = origin.strip_prefix("https://") else {
        return false;
    };
    let Some(host) = host.strip_suffix(":443") else {
        return false;
    };
    let Some(want) = pattern.strip_prefix("https://") else {
        return false;
    };
    match want.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => host == want,
    }
}

impl Provider {
    /// An API origin this provider is known to use.
    pub fn knows_api(&self, origin: &str) -> bool {
        self.origins.iter().any(|p| covers(p, origin))
    }

    /// A token endpoint origin of this provider (its API origins count too).
    pub fn knows_token_endpoint(&self, origin: &str) -> bool {
        self.knows_api(origin) || self.token_endpoints.iter().any(|p| covers(p, origin))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_origins() {
        assert_eq!(provider_for("ghp_abc").unwrap().name, "GitHub");
        assert_eq!(provider_for("github_pat_11A").unwrap().name, "GitHub");
        assert_eq!(provider_for("ya29.a0").unwrap().name, "Google");
        assert_eq!(provider_for("sk-ant-x").unwrap().name, "Anthropic");
        assert_eq!(provider_for("sk-proj-x").unwrap().name, "OpenAI");
        assert!(provider_for("sk-x").is_none());
        assert!(provider_for("Ghp_abc").is_none());
        assert!(provider_for("token").is_none());
        let g = provider_for("ghs_x").unwrap();
        assert!(g.knows_api("https://api.github.com:443"));
        assert!(g.knows_api("https://uploads.github.com:443"));
        assert!(!g.knows_api("https://api.github.com:8443"));
        assert!(!g.knows_api("http://api.github.com:80"));
        assert!(!g.knows_api("https://github.com:443"));
        assert!(g.knows_token_endpoint("https://github.com:443"));
        assert!(!g.knows_api("https://api.github.com.evil.example:443"));
        let google = provider_for("ya29.x").unwrap();
        assert!(google.knows_api("https://storage.googleapis.com:443"));
        assert!(!google.knows_api("https://googleapis.com:443"));
        assert!(!google.knows_api("https://evilgoogleapis.com:443"));
        assert!(!google.knows_api("https://x.googleapis.com.evil:443"));
        assert!(google.knows_token_endpoint("https://oauth2.googleapis.com:443"));
    }
}
