//! Routing: what a request asks for, as a pure function of its path and query string
//! ([`route`], [`query_params`]), and the parsing of a state filter.
//!
//! Invariant: a path either names a route with a job id of the project's syntax
//! ([`valid_id`]: a job number or an image_id of `[A-Za-z0-9._-]`, not starting with a dot; a
//! number is always a job number, handed on as `#N`),
//! or is refused ([`Route::BadPath`]): `.`/`..` segments, encoded slashes, backslashes and NULs
//! never reach a handler, and no path on disk is ever built from a request.

use crate::domain::State;

/// What a request asks for (a pure function of its path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Index,
    Job(String),
    JobLog(String),
    JobLogStream(String),
    ApiJobs,
    ApiJob(String),
    ApiHosts,
    Metrics,
    Healthz,
    LiveJs,
    NotFound,
    /// A path with `.`/`..` segments, encoded slashes or an id of another syntax.
    BadPath(String),
}

/// Is `s` a job id as the project writes them: a job number, or an image_id made of
/// `[A-Za-z0-9._-]` (not starting with a dot), at most 200 bytes?
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The route of a (percent-encoded) path.
pub fn route(path: &str) -> Route {
    let mut segs = Vec::new();
    for raw in path.split('/').skip(1) {
        let Ok(seg) = percent_encoding::percent_decode_str(raw).decode_utf8() else {
            return Route::BadPath("a path segment is not UTF-8".into());
        };
        if seg == "." || seg == ".." || seg.contains(['/', '\\', '\0']) {
            return Route::BadPath(format!("{seg:?} is not allowed in a path"));
        }
        segs.push(seg.into_owned());
    }
    // A number in a path is a job number (`#N`, `%23N` too), never an image_id: a page's link
    // to job N always shows job N.
    let id = |s: &String, r: fn(String) -> Route| {
        let digits = s.strip_prefix('#').unwrap_or(s);
        if s.is_empty() {
            Route::NotFound
        } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            match digits.parse::<u64>() {
                Ok(n) => r(format!("#{n}")),
                Err(_) => Route::BadPath(format!("{s:?} is not a job number")),
            }
        } else if valid_id(s) {
            r(s.clone())
        } else {
            Route::BadPath(format!(
                "{s:?} is not a job id (a job number, or an image_id of [A-Za-z0-9._-])"
            ))
        }
    };
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    match s.as_slice() {
        [""] => Route::Index,
        ["jobs", _] => id(&segs[1], Route::Job),
        ["jobs", _, "log"] => id(&segs[1], Route::JobLog),
        ["jobs", _, "log", "stream"] => id(&segs[1], Route::JobLogStream),
        ["api", "jobs"] => Route::ApiJobs,
        ["api", "jobs", _] => id(&segs[2], Route::ApiJob),
        ["api", "hosts"] => Route::ApiHosts,
        ["metrics"] => Route::Metrics,
        ["healthz"] => Route::Healthz,
        ["live.js"] => Route::LiveJs,
        _ => Route::NotFound,
    }
}

/// The query string's parameters, decoded.
pub fn query_params(q: Option<&str>) -> Vec<(String, String)> {
    let dec = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (dec(k), dec(v)),
            None => (dec(p), String::new()),
        })
        .collect()
}

pub(super) fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

pub(super) fn parse_state(s: &str) -> Result<State, String> {
    State::parse(s).ok_or_else(|| {
        format!(
            "unknown state {s:?}: one of {}",
            State::ALL.map(|s| s.as_str()).join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/"), Route::Index);
        assert_eq!(route("/jobs/17"), Route::Job("#17".into()));
        assert_eq!(route("/jobs/%2317"), Route::Job("#17".into()));
        assert_eq!(route("/jobs/0017"), Route::Job("#17".into()));
        assert!(matches!(route("/jobs/%23x"), Route::BadPath(_)));
        assert!(matches!(
            route("/jobs/99999999999999999999999"),
            Route::BadPath(_)
        ));
        assert_eq!(
            route("/jobs/nightly-4.2_x"),
            Route::Job("nightly-4.2_x".into())
        );
        assert_eq!(route("/jobs/17/log"), Route::JobLog("#17".into()));
        assert_eq!(
            route("/jobs/17/log/stream"),
            Route::JobLogStream("#17".into())
        );
        assert_eq!(route("/api/jobs/17"), Route::ApiJob("#17".into()));
        assert_eq!(route("/api/jobs"), Route::ApiJobs);
        assert_eq!(route("/api/jobs/a-1"), Route::ApiJob("a-1".into()));
        assert_eq!(route("/metrics"), Route::Metrics);
        assert_eq!(route("/healthz"), Route::Healthz);
        assert_eq!(route("/jobs/"), Route::NotFound);
        assert_eq!(route("/nope"), Route::NotFound);
        assert_eq!(route("/api/jobs/"), Route::NotFound);
        for bad in [
            "/jobs/..",
            "/jobs/%2e%2e",
            "/jobs/..%2Fetc%2Fpasswd",
            "/jobs/a%2Fb",
            "/jobs/.hidden",
            "/jobs/a%00b",
            "/jobs/a%5cb",
            "/api/jobs/%3Cscript%3E",
            "/jobs/../../etc/passwd",
            "/api/jobs/%ff",
        ] {
            assert!(
                matches!(route(bad), Route::BadPath(_)),
                "{bad}: {:?}",
                route(bad)
            );
        }
        assert!(valid_id(&"a".repeat(200)) && !valid_id(&"a".repeat(201)));
    }

    #[test]
    fn query_strings() {
        let p = query_params(Some("state=done&limit=5&x&name=a+b%21"));
        assert_eq!(param(&p, "state"), Some("done"));
        assert_eq!(param(&p, "limit"), Some("5"));
        assert_eq!(param(&p, "x"), Some(""));
        assert_eq!(param(&p, "name"), Some("a b!"));
        assert_eq!(param(&p, "y"), None);
        assert!(query_params(None).is_empty());
    }
}
