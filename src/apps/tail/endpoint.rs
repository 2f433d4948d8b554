//! Where tail connects and what it subscribes to: the URL of `/ws/events` with SPEC §5's
//! query parameters.

use tokio_tungstenite::tungstenite::http::Uri;

use super::{TailError, invalid};
use crate::model::Severity;

/// The WebSocket address of a server: `ws[s]://host[:port][/prefix]/ws/events`, no query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Endpoint(String);

impl Endpoint {
    /// Accepts a base URL or the full endpoint URL; http:// means ws://, https:// wss://.
    pub(super) fn parse(url: &str) -> Result<Self, TailError> {
        let url = url.trim();
        let (scheme, rest) = url.split_once("://").unwrap_or(("ws", url));
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "ws" | "http" => "ws",
            "wss" | "https" => "wss",
            _ => {
                return Err(invalid(
                    "url",
                    "the scheme must be ws://, wss://, http:// or https://",
                ));
            }
        };
        // The URL is not repeated in these errors: it may hold a password.
        if rest.contains(['?', '#']) {
            return Err(invalid(
                "url",
                "no query or fragment, please: filters go in --type, --organization-id, \
                 --domain-id, --severity, --where, --since and --history",
            ));
        }
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.contains('@') {
            return Err(invalid("url", "credentials in the URL are not supported; use --token"));
        }
        let path = path.trim_end_matches('/');
        let path = path.strip_suffix("/ws/events").unwrap_or(path);
        let endpoint = format!("{scheme}://{authority}{path}/ws/events");
        let uri: Uri =
            endpoint.parse().map_err(|_| invalid("url", "not a valid host, port or path"))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(invalid("url", "no host"));
        }
        // `Uri` accepts any digits as a port; one that is not a u16 would silently become 80.
        let after_host = authority.rsplit_once(']').map_or(authority, |(_, after)| after);
        if after_host.contains(':') && uri.port_u16().is_none_or(|port| port == 0) {
            return Err(invalid("url", "the port must be a number from 1 to 65535"));
        }
        Ok(Self(endpoint))
    }

    pub(super) fn as_str(&self) -> &str {
        &self.0
    }

    pub(super) fn is_tls(&self) -> bool {
        self.0.starts_with("wss://")
    }

    pub(super) fn with_query(&self, query: &str) -> String {
        format!("{}?{query}", self.0)
    }
}

/// The subscription: SPEC §5's connect-time query parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Filter {
    pub(super) types: Vec<String>,
    pub(super) organization_ids: Vec<String>,
    pub(super) domain_ids: Vec<String>,
    pub(super) severity: Option<Severity>,
    /// `where` predicates in their query form, `path:op[:value]`.
    pub(super) predicates: Vec<String>,
}

impl Filter {
    /// The query subscribing with this filter after `since`, or with the last `history`
    /// events. Lists are repeated parameters, encoded as the server decodes them
    /// (`application/x-www-form-urlencoded`).
    pub(super) fn query(&self, since: Option<u64>, history: Option<usize>) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        if self.types.is_empty() {
            // Explicit, so that the connection has a subscription even without filters.
            query.append_pair("type", "*");
        }
        let lists = [
            ("type", &self.types),
            ("organization_id", &self.organization_ids),
            ("domain_id", &self.domain_ids),
            ("where", &self.predicates),
        ];
        for (key, values) in lists {
            query.extend_pairs(values.iter().map(|value| (key, value)));
        }
        if let Some(severity) = self.severity {
            query.append_pair("severity", severity.as_str());
        }
        match (since, history) {
            (Some(since), _) => query.append_pair("since", &since.to_string()),
            (None, Some(history)) => query.append_pair("history", &history.to_string()),
            (None, None) => &mut query,
        };
        query.finish()
    }
}

/// `*`, `entity.*`, `*.action` or `entity.action` (SPEC §5), checked before connecting so a
/// typo is an error at once rather than a quiet terminal.
pub(super) fn check_pattern(pattern: &str) -> Result<(), TailError> {
    let part_ok = |part: &str| {
        part == "*"
            || (!part.is_empty() && !part.contains('*') && !part.contains(char::is_whitespace))
    };
    let ok = pattern == "*"
        || pattern.split_once('.').is_some_and(|(entity, action)| {
            part_ok(entity) && part_ok(action) && !action.contains('.')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "type",
            format!("{pattern:?} is not a pattern (*, entity.*, *.action or entity.action)"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(url: &str) -> Result<String, String> {
        Endpoint::parse(url).map(|endpoint| endpoint.0).map_err(|err| err.to_string())
    }

    #[test]
    fn endpoints() {
        let local = Ok("ws://127.0.0.1:8080/ws/events".to_owned());
        for url in [
            "ws://127.0.0.1:8080",
            "ws://127.0.0.1:8080/",
            "http://127.0.0.1:8080",
            "HTTP://127.0.0.1:8080/ws/events",
            "ws://127.0.0.1:8080/ws/events/",
            "127.0.0.1:8080",
            " ws://127.0.0.1:8080 ",
        ] {
            assert_eq!(endpoint(url), local, "{url}");
        }
        assert_eq!(endpoint("ws://[::1]:9000/"), Ok("ws://[::1]:9000/ws/events".into()));
        assert_eq!(endpoint("http://example.com"), Ok("ws://example.com/ws/events".into()));
        assert_eq!(
            endpoint("http://example.com/rowcast/"),
            Ok("ws://example.com/rowcast/ws/events".into())
        );
    }

    #[test]
    fn tls_endpoints() {
        let secure = Ok("wss://example.com/ws/events".to_owned());
        for url in ["wss://example.com", "https://example.com/ws/events", "WSS://example.com/"] {
            assert_eq!(endpoint(url), secure, "{url}");
        }
        assert_eq!(
            endpoint("wss://example.com:8443/rowcast"),
            Ok("wss://example.com:8443/rowcast/ws/events".into())
        );
        assert!(Endpoint::parse("https://example.com").expect("endpoint").is_tls());
        assert!(!Endpoint::parse("http://example.com").expect("endpoint").is_tls());
    }

    #[test]
    fn refused_endpoints() {
        for (url, words) in [
            ("ftp://example.com", "scheme"),
            ("ws://", "host"),
            ("ws:///ws/events", "host"),
            ("ws://:8080", "host"),
            ("ws://example.com:99999", "port"),
            ("ws://example.com:0", "port"),
            ("ws://example.com:http", "valid"),
            ("ws://example.com/ws/events?type=agent.*", "--type"),
            ("ws://example.com/#top", "query"),
            ("ws://exa mple.com", "valid"),
        ] {
            let err = endpoint(url).expect_err(url);
            assert!(err.starts_with("invalid --url") && err.contains(words), "{url}: {err}");
        }
        // A password in the URL is refused without being repeated.
        let err = endpoint("ws://me:hunter2@example.com").expect_err("credentials");
        assert!(err.contains("--token") && !err.contains("hunter2"), "{err}");
    }

    #[test]
    fn queries() {
        let filter = Filter::default();
        assert_eq!(filter.query(None, None), "type=*");
        assert_eq!(filter.query(Some(0), None), "type=*&since=0");
        assert_eq!(filter.query(None, Some(20)), "type=*&history=20");
        assert_eq!(filter.query(Some(3), Some(20)), "type=*&since=3", "a cursor wins");
        let filter = Filter {
            types: vec!["agent.*".into(), "*.failed".into()],
            organization_ids: vec!["quant".into(), "a&b=c d".into()],
            domain_ids: vec!["démo/1".into()],
            severity: Some(Severity::Warning),
            predicates: vec!["status:in:failed,error".into(), "old.status:changed".into()],
        };
        assert_eq!(
            filter.query(Some(42), None),
            "type=agent.*&type=*.failed&organization_id=quant&organization_id=a%26b%3Dc+d\
             &domain_id=d%C3%A9mo%2F1&where=status%3Ain%3Afailed%2Cerror\
             &where=old.status%3Achanged&severity=warning&since=42"
        );
        // What the server reads back (it decodes with form_urlencoded too).
        let query = filter.query(None, None);
        let pairs: Vec<(String, String)> =
            form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        let values = |key: &str| -> Vec<&str> {
            pairs.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
        };
        assert_eq!(values("organization_id"), ["quant", "a&b=c d"]);
        assert_eq!(values("domain_id"), ["démo/1"]);
        assert_eq!(values("type"), ["agent.*", "*.failed"]);
        let url =
            Endpoint::parse("ws://h:1").expect("endpoint").with_query(&filter.query(None, None));
        assert!(url.parse::<Uri>().is_ok(), "{url}");
    }

    #[test]
    fn patterns() {
        for pattern in ["*", "agent.*", "*.failed", "agent.created", "agent.status_changed", "*.*"]
        {
            assert!(check_pattern(pattern).is_ok(), "{pattern}");
        }
        for pattern in ["", "agent", ".created", "agent.", "a.b.c", "ag*.created", "agent.cr eated"]
        {
            assert!(check_pattern(pattern).is_err(), "{pattern:?}");
        }
    }
}
