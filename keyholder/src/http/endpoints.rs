//! The endpoint table: every route the keyholder serves, with its methods and handlers, its body
//! limit, whether browsers may call it (CORS) and whether its uses go to the audit trail. Routing
//! ([`super::configure`]), the response layers, the extractors and the OpenAPI test
//! (`tests/e2e/openapi.rs`) all read this one table; a path string appears nowhere else.

use actix_web::http::Method;
use actix_web::{web, Route};
use keyholder_protocol::paths::*;

use super::{
    admin, approval_page, bind_page, credential, exchange, health, proxy, refresh, storage,
    store_page,
};

/// An HTTP method an endpoint answers (besides the CORS preflight, implied by [`Endpoint::cors`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `GET`.
    Get,
    /// `HEAD`.
    Head,
    /// `POST`.
    Post,
}

impl Verb {
    /// The method as actix matches it.
    pub fn method(self) -> Method {
        match self {
            Verb::Get => Method::GET,
            Verb::Head => Method::HEAD,
            Verb::Post => Method::POST,
        }
    }

    /// The method's name, as in an `Allow` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Head => "HEAD",
            Verb::Post => "POST",
        }
    }
}

/// Builds the route of one method (its handler; the method guard is added from the [`Verb`]).
pub type Handler = fn() -> Route;

/// One served path and everything the server knows about it.
#[derive(Debug)]
pub struct Endpoint {
    /// The path, exactly as routed.
    pub route: &'static str,
    /// The methods answered, each with its handler.
    pub methods: &'static [(Verb, Handler)],
    /// The most request-body bytes read (checked before and while reading).
    pub body_limit: usize,
    /// For endpoints the owner's browser calls from the platform's origin: the methods it is told it
    /// may use (`Access-Control-Allow-Methods`). CORS headers go on the answers to those methods,
    /// and `OPTIONS` is answered as the preflight.
    pub cors: Option<&'static str>,
    /// Whether every use and refusal goes to the audit trail.
    pub audited: bool,
    /// Whether the endpoint reads a form and a query string with the extractors of actix (their
    /// errors are answered as `invalid_request`, the form capped at `body_limit`).
    pub form: bool,
}

/// The body limit of every endpoint not given a larger one.
pub const DEFAULT_BODY_LIMIT: usize = 16 * 1024;

const fn endpoint(route: &'static str, methods: &'static [(Verb, Handler)]) -> Endpoint {
    Endpoint {
        route,
        methods,
        body_limit: DEFAULT_BODY_LIMIT,
        cors: None,
        audited: false,
        form: false,
    }
}

/// Every endpoint. `/v1/health` is public (with CORS) only for `GET`: its `POST` is the signed
/// platform call and `HEAD` a liveness probe (PROTOCOL §3, §5), neither meant for a browser.
pub static ENDPOINTS: &[Endpoint] = &[
    endpoint(
        PATH_EXCHANGE,
        &[(Verb::Post, || web::route().to(exchange::exchange))],
    ),
    Endpoint {
        cors: Some("GET, OPTIONS"),
        ..endpoint(
            PATH_HEALTH,
            &[
                (Verb::Get, || web::route().to(health::health_public)),
                (Verb::Head, || web::route().to(health::health_public)),
                (Verb::Post, || web::route().to(health::health_signed)),
            ],
        )
    },
    Endpoint {
        cors: Some("GET, OPTIONS"),
        ..endpoint(
            PATH_IDENTITY,
            &[(Verb::Get, || web::route().to(health::identity))],
        )
    },
    Endpoint {
        body_limit: 1024 * 1024,
        ..endpoint(
            PATH_STORAGE,
            &[(Verb::Post, || web::route().to(storage::storage))],
        )
    },
    Endpoint {
        body_limit: 64 * 1024,
        cors: Some("GET, POST, OPTIONS"),
        audited: true,
        ..endpoint(
            PATH_STORE,
            &[(Verb::Post, || web::route().to(credential::store))],
        )
    },
    Endpoint {
        cors: Some("GET, POST, OPTIONS"),
        audited: true,
        ..endpoint(
            PATH_CREDENTIAL,
            &[
                (Verb::Get, || web::route().to(credential::credential)),
                (Verb::Post, || web::route().to(credential::credential)),
            ],
        )
    },
    Endpoint {
        cors: Some("GET, POST, OPTIONS"),
        audited: true,
        ..endpoint(
            PATH_TOTP_CODE,
            &[
                (Verb::Get, || web::route().to(credential::totp_code)),
                (Verb::Post, || web::route().to(credential::totp_code)),
            ],
        )
    },
    Endpoint {
        body_limit: 8 * 1024 * 1024,
        audited: true,
        ..endpoint(
            PATH_PROXY,
            &[(Verb::Post, || web::route().to(proxy::proxy))],
        )
    },
    Endpoint {
        audited: true,
        ..endpoint(
            PATH_REFRESH_NOTIFY,
            &[(Verb::Post, || web::route().to(refresh::refresh_notify))],
        )
    },
    Endpoint {
        audited: true,
        ..endpoint(
            PATH_REFRESH,
            &[(Verb::Post, || web::route().to(refresh::refresh))],
        )
    },
    Endpoint {
        audited: true,
        ..endpoint(
            PATH_ADMIN_MIGRATE,
            &[(Verb::Post, || web::route().to(admin::admin_migrate))],
        )
    },
    endpoint(
        PATH_BIND,
        &[(Verb::Get, || web::route().to(bind_page::bind_page))],
    ),
    endpoint(
        PATH_STORE_PAGE,
        &[(Verb::Get, || web::route().to(store_page::store_page))],
    ),
    Endpoint {
        body_limit: 4096,
        form: true,
        ..endpoint(
            PATH_APPROVAL_PAGE,
            &[
                (Verb::Get, || web::route().to(approval_page::approval_page)),
                (Verb::Post, || {
                    web::route().to(approval_page::approval_decide)
                }),
            ],
        )
    },
    endpoint(
        PATH_STORE_PAGE_SCRIPT,
        &[(Verb::Get, || web::route().to(store_page::store_script))],
    ),
];

/// The endpoint served at `path` (the path as the router matches it, percent-decoded).
pub fn find(path: &str) -> Option<&'static Endpoint> {
    ENDPOINTS.iter().find(|e| e.route == path)
}

impl Endpoint {
    /// Whether `method` is answered with CORS headers (`OPTIONS` being the preflight).
    pub fn answers_cors(&self, method: &Method) -> bool {
        match self.cors {
            Some(methods) => {
                method == Method::OPTIONS || methods.split(", ").any(|m| m == method.as_str())
            }
            None => false,
        }
    }

    /// The methods this endpoint serves, as a 405's `Allow` header lists them (RFC 9110).
    pub fn allow(&self) -> String {
        let mut names: Vec<&str> = self.methods.iter().map(|(verb, _)| verb.as_str()).collect();
        if self.cors.is_some() {
            names.push("OPTIONS");
        }
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_listed_once_with_distinct_methods() {
        for (i, endpoint) in ENDPOINTS.iter().enumerate() {
            assert!(
                ENDPOINTS[i + 1..].iter().all(|e| e.route != endpoint.route),
                "{} twice",
                endpoint.route
            );
            let verbs: Vec<Verb> = endpoint.methods.iter().map(|(v, _)| *v).collect();
            for (j, verb) in verbs.iter().enumerate() {
                assert!(!verbs[j + 1..].contains(verb), "{}", endpoint.route);
            }
        }
    }

    #[test]
    fn allow_lists_the_methods_and_the_preflight() {
        let allow = |path| find(path).map(Endpoint::allow);
        assert_eq!(
            allow(PATH_HEALTH).as_deref(),
            Some("GET, HEAD, POST, OPTIONS")
        );
        assert_eq!(allow(PATH_STORE).as_deref(), Some("POST, OPTIONS"));
        assert_eq!(allow(PATH_APPROVAL_PAGE).as_deref(), Some("GET, POST"));
        assert_eq!(allow(PATH_PROXY).as_deref(), Some("POST"));
    }
}
