//! Request path normalization before routing (`listeners[].normalize_path`,
//! `merge_slashes`), so that a route's `path_prefix`, its rate limit and the endpoint
//! statistics see one spelling of each path, and the backend receives that same
//! spelling (Envoy's `normalize_path` and `merge_slashes`; nginx normalizes before
//! matching `location`s too).
//!
//! Without it, `/x/../admin`, `/./admin` or `/%61dmin` do not start with `/admin` but
//! reach `/admin` on any backend that resolves them, bypassing a route or rate limit
//! meant for that prefix.
//!
//! Normalization is RFC 3986's, which keeps a URI's meaning:
//! - percent-encoding normalization (§6.2.2.2): an encoded unreserved character
//!   (`A-Z a-z 0-9 - . _ ~`) is decoded, other encodings get upper-case hex digits
//!   (`%2f` → `%2F`; an encoded `/` stays encoded, so it never becomes a separator);
//! - dot-segment removal (§5.2.4, `remove_dot_segments`): `.` and `..` segments are
//!   resolved, `..` never climbing above the root.
//!
//! Merging slashes (`//` → `/`) changes a URI's meaning under RFC 3986, so it is a
//! separate opt-in, as in Envoy. The query is never changed. Paths already normal —
//! nearly all of them — are detected by one scan and left untouched, without
//! allocating.

use http::Uri;
use http::uri::PathAndQuery;

/// What to normalize (a listener's settings).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathNormalization {
    /// RFC 3986 normalization: percent-encoding of unreserved characters, case of
    /// percent-encodings, dot segments.
    pub normalize: bool,
    /// Runs of `/` become one.
    pub merge_slashes: bool,
}

impl PathNormalization {
    /// Rewrites `uri`'s path in normal form, keeping its scheme, authority and query.
    /// Returns whether it changed. Origin-form paths only: `*` (`OPTIONS *`) and
    /// authority-form targets are left alone.
    pub fn apply(self, uri: &mut Uri) -> bool {
        if !self.normalize && !self.merge_slashes {
            return false;
        }
        let path = uri.path();
        if !path.starts_with('/') || !self.needed(path.as_bytes()) {
            return false;
        }
        let mut normal = self.normal_path(path);
        if let Some(query) = uri.query() {
            normal.push('?');
            normal.push_str(query);
        }
        let Ok(path_and_query) = PathAndQuery::try_from(normal) else {
            return false;
        };
        let mut parts = std::mem::take(uri).into_parts();
        parts.path_and_query = Some(path_and_query);
        match Uri::from_parts(parts) {
            Ok(normalized) => {
                *uri = normalized;
                true
            }
            // Unreachable for a path that parsed before (same characters, fewer of
            // them); the request then keeps an empty URI and fails to route.
            Err(_) => false,
        }
    }

    /// Whether `path` may change: it holds a `%`, a `.` segment, or (with
    /// `merge_slashes`) `//`. One pass, no allocation.
    fn needed(self, path: &[u8]) -> bool {
        let mut previous = b'/';
        for (i, &b) in path.iter().enumerate() {
            match b {
                b'%' if self.normalize => return true,
                b'/' if previous == b'/' && self.merge_slashes && i > 0 => return true,
                b'.' if self.normalize && previous == b'/' => {
                    // `/.` followed by the end, `/` or `./`/`.` end: a dot segment.
                    let rest = &path[i + 1..];
                    if rest.is_empty()
                        || rest[0] == b'/'
                        || (rest[0] == b'.' && (rest.len() == 1 || rest[1] == b'/'))
                    {
                        return true;
                    }
                }
                _ => {}
            }
            previous = b;
        }
        false
    }

    /// `path` (starting with `/`) in normal form.
    fn normal_path(self, path: &str) -> String {
        let decoded = if self.normalize {
            normalize_percent(path)
        } else {
            path.to_owned()
        };
        let mut segments: Vec<&str> = Vec::new();
        // The segments after the leading `/`. A trailing empty segment (`/a/`) is kept.
        for segment in decoded[1..].split('/') {
            match segment {
                "." if self.normalize => {}
                ".." if self.normalize => {
                    segments.pop();
                }
                "" if self.merge_slashes => {}
                _ => segments.push(segment),
            }
        }
        // A path ending in a dot segment, or (merged) a slash, names a directory: keep
        // its trailing `/` (RFC 3986 §5.2.4: `/a/b/..` → `/a/`).
        let ends_in_directory = {
            let last = decoded.rsplit('/').next().unwrap_or("");
            (self.normalize && (last == "." || last == ".."))
                || (self.merge_slashes && decoded.len() > 1 && decoded.ends_with('/'))
        };
        let mut out = String::with_capacity(decoded.len());
        for segment in &segments {
            out.push('/');
            out.push_str(segment);
        }
        if out.is_empty() || (ends_in_directory && !out.ends_with('/')) {
            out.push('/');
        }
        out
    }
}

/// Decodes percent-encoded unreserved characters and upper-cases the hex digits of the
/// others (RFC 3986 §6.2.2.1–2). A `%` not followed by two hex digits is kept as is.
fn normalize_percent(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|b| hex(*b)),
                bytes.get(i + 2).and_then(|b| hex(*b)),
            )
        {
            let c = hi << 4 | lo;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(c));
            } else {
                out.push('%');
                out.push(char::from(bytes[i + 1].to_ascii_uppercase()));
                out.push(char::from(bytes[i + 2].to_ascii_uppercase()));
            }
            i += 3;
        } else {
            // Paths are ASCII (the URI parser admits nothing else), so byte = char.
            out.push(char::from(bytes[i]));
            i += 1;
        }
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(path: &str, normalize: bool, merge_slashes: bool) -> String {
        let mut uri: Uri = path.parse().expect("a valid target");
        PathNormalization {
            normalize,
            merge_slashes,
        }
        .apply(&mut uri);
        uri.to_string()
    }

    #[test]
    fn dot_segments_resolve_as_rfc_3986_says() {
        // RFC 3986 §5.2.4's examples, and the climbs above the root it implies.
        for (path, expected) in [
            ("/a/b/c/./../../g", "/a/g"),
            ("/mid/content=5/../6", "/mid/6"),
            ("/x/../admin", "/admin"),
            ("/./admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/..", "/"),
            ("/.", "/"),
            ("/a/.b/..c/", "/a/.b/..c/"),
            ("/a/b/", "/a/b/"),
        ] {
            assert_eq!(normal(path, true, false), expected, "{path}");
        }
    }

    #[test]
    fn unreserved_characters_are_decoded_and_other_encodings_upper_cased() {
        for (path, expected) in [
            ("/%61dmin", "/admin"),
            ("/%7Euser/%2d%5f", "/~user/-_"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb/../c", "/c"),
            ("/%2e%2e/admin", "/admin"),
            ("/x/%2E/y", "/x/y"),
            ("/100%", "/100%"),
            ("/%zz/a", "/%zz/a"),
            ("/caf%c3%a9", "/caf%C3%A9"),
        ] {
            assert_eq!(normal(path, true, false), expected, "{path}");
        }
    }

    #[test]
    fn slashes_merge_only_when_asked_and_the_query_is_kept() {
        assert_eq!(normal("//admin//x", true, false), "//admin//x");
        assert_eq!(normal("//admin//x/", true, true), "/admin/x/");
        assert_eq!(normal("/a//../b", false, true), "/a/../b");
        assert_eq!(normal("/a//../b", true, true), "/b");
        assert_eq!(
            normal("/x/../a?next=/../b&c=%2e", true, false),
            "/a?next=/../b&c=%2e"
        );
        assert_eq!(
            normal("http://h.example/x/./a?q", true, false),
            "http://h.example/x/a?q"
        );
    }

    #[test]
    fn normal_paths_are_left_untouched() {
        let on = PathNormalization {
            normalize: true,
            merge_slashes: true,
        };
        for path in [
            "/",
            "/a/b.c",
            "/a/.well-known/x",
            "/a/..b",
            "/v1/users/42?x=/../y",
        ] {
            let mut uri: Uri = path.parse().expect("valid");
            assert!(!on.apply(&mut uri), "{path}");
            assert_eq!(uri.to_string(), path);
        }
        let mut star: Uri = "*".parse().expect("valid");
        assert!(!on.apply(&mut star));
        let off = PathNormalization::default();
        let mut uri: Uri = "/x/../a".parse().expect("valid");
        assert!(!off.apply(&mut uri));
    }

    proptest::proptest! {
        /// Normal form is a fixed point, holds no dot segment, no encoded unreserved
        /// character and (merged) no `//`, whatever the path.
        #[test]
        fn normal_form_is_idempotent_and_free_of_dot_segments(
            segments in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(".".to_owned()),
                    proptest::strategy::Just("..".to_owned()),
                    proptest::strategy::Just("".to_owned()),
                    proptest::strategy::Just("%2e".to_owned()),
                    proptest::strategy::Just("%2F".to_owned()),
                    proptest::strategy::Just("%41b".to_owned()),
                    "[a-z.]{1,3}",
                ],
                0..8,
            ),
            merge in proptest::bool::ANY,
        ) {
            let path = format!("/{}", segments.join("/"));
            let once = normal(&path, true, merge);
            proptest::prop_assert_eq!(&normal(&once, true, merge), &once);
            let inner: Vec<&str> = once[1..].split('/').collect();
            proptest::prop_assert!(
                !inner.iter().any(|s| *s == "." || *s == ".."),
                "{} -> {}", path, once
            );
            proptest::prop_assert!(!once.contains("%2e") && !once.contains("%41"));
            if merge {
                proptest::prop_assert!(!once.contains("//"), "{} -> {}", path, once);
            }
        }
    }
}
