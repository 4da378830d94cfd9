//! Endpoint identity: a request's method and path, with the identifier segments replaced
//! by `{id}`, so `GET /v1/users/42` and `GET /v1/users/7` are one endpoint
//! (`GET /v1/users/{id}`) whose duration statistics predict both.
//!
//! The proxy computes [`endpoint_hash`] for every request before forwarding it, so the hash
//! streams the normalised bytes through FNV-1a without building the key; the key string
//! itself ([`endpoint_key`]) is built only the first time an endpoint is seen.
//!
//! A segment (the text between two `/`) is an identifier, and becomes `{id}`, when it is
//!
//! * all ASCII digits (`42`),
//! * a UUID, 8-4-4-4-12 hex digits in either case (`3F2504E0-4F89-11D3-9A0C-0305E82C3301`),
//! * a hex token of at least [`MIN_HEX_ID_LEN`] characters (object ids, hashes, trace ids),
//! * longer than [`MAX_SEGMENT_LEN`] bytes (tokens, base64 blobs: nothing an operator wants
//!   to read as an endpoint name).
//!
//! Nothing else changes: empty segments (`//`), a trailing slash, percent-encoding and case
//! are kept, so distinct routes stay distinct. The query string is not part of the path:
//! callers pass the path without it.
//!
//! The normalised path is bounded, so that a client sending long random paths cannot make
//! each tracked endpoint (and the API listing them) arbitrarily large: after
//! [`MAX_SEGMENTS`] segments, or where the next segment would take it over
//! [`MAX_PATH_BYTES`] bytes, the rest of the path becomes one [`REST_SEGMENT`]
//! (`/a/b/…/p/{rest}`). Hashing stops there too.

/// What an identifier segment is replaced with.
pub const ID_SEGMENT: &str = "{id}";

/// Segments longer than this many bytes are identifiers.
pub const MAX_SEGMENT_LEN: usize = 64;

/// Hex-only segments at least this many characters long are identifiers (a 64-bit id in
/// hex has 16).
pub const MIN_HEX_ID_LEN: usize = 16;

/// What the rest of a path beyond the bounds becomes.
pub const REST_SEGMENT: &str = "{rest}";

/// Segments of a normalised path after its first `/` (`/a/b` has two) before the rest
/// becomes [`REST_SEGMENT`].
pub const MAX_SEGMENTS: usize = 16;

/// Bytes of a normalised path, separators included, that segments may fill before the
/// rest becomes [`REST_SEGMENT`] (which may take the path 7 bytes over).
pub const MAX_PATH_BYTES: usize = 256;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Appends the normalised form of `path` to `out` (which is not cleared first): each
/// identifier segment (see the module docs) becomes `{id}`, everything else is copied.
/// Never fails; allocates only to grow `out`.
///
/// ```
/// let mut out = String::new();
/// fulcrum_stats::path::normalize_path("/v1/users/42/orders/", &mut out);
/// assert_eq!(out, "/v1/users/{id}/orders/");
/// ```
pub fn normalize_path(path: &str, out: &mut String) {
    for_each_path_piece(path, |piece| out.push_str(piece));
}

/// The endpoint key of a request: `method`, a space, and the normalised `path`, e.g.
/// `"GET /v1/users/{id}"`. Allocates the returned string; never fails.
pub fn endpoint_key(method: &str, path: &str) -> String {
    let mut key = String::with_capacity(method.len() + 1 + path.len());
    for_each_piece(method, path, |piece| key.push_str(piece));
    key
}

/// The 64-bit FNV-1a hash (Fowler, Noll, Vo) of `endpoint_key(method, path)`, computed
/// without allocating: the normalised pieces are streamed through the hasher.
///
/// FNV-1a has fixed parameters, so the value is stable across processes, builds and Rust
/// versions (unlike `std`'s `DefaultHasher`, whose algorithm is unspecified); it is not
/// collision-resistant against a chosen-input attacker, so tables keyed by it must still
/// compare keys (as [`crate::endpoint::EndpointTable`] does).
///
/// Always equals [`key_hash`]`(&endpoint_key(method, path))`.
pub fn endpoint_hash(method: &str, path: &str) -> u64 {
    let mut hash = FNV_OFFSET;
    for_each_piece(method, path, |piece| hash = fnv1a(hash, piece.as_bytes()));
    hash
}

/// The 64-bit FNV-1a hash of an endpoint key string (see [`endpoint_hash`]).
pub fn key_hash(key: &str) -> u64 {
    fnv1a(FNV_OFFSET, key.as_bytes())
}

/// Whether `key` is `endpoint_key(method, path)`, compared without allocating.
pub(crate) fn key_matches(key: &str, method: &str, path: &str) -> bool {
    let mut rest = key.as_bytes();
    let mut equal = true;
    for_each_piece(method, path, |piece| {
        if equal {
            match rest.strip_prefix(piece.as_bytes()) {
                Some(tail) => rest = tail,
                None => equal = false,
            }
        }
    });
    equal && rest.is_empty()
}

#[inline]
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// Calls `f` with the pieces of the endpoint key in order; their concatenation is the key.
/// The single definition of the key, shared by [`endpoint_key`], [`endpoint_hash`] and
/// [`key_matches`] so they cannot disagree.
#[inline]
fn for_each_piece(method: &str, path: &str, mut f: impl FnMut(&str)) {
    f(method);
    f(" ");
    for_each_path_piece(path, f);
}

#[inline]
fn for_each_path_piece(path: &str, mut f: impl FnMut(&str)) {
    let mut rest = path;
    let (mut segments, mut bytes) = (0, 0);
    loop {
        let (segment, tail) = match rest.as_bytes().iter().position(|&b| b == b'/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let piece = if is_id(segment) { ID_SEGMENT } else { segment };
        // The first segment (before the first `/`, empty in an origin-form path) is at
        // most MAX_SEGMENT_LEN bytes and not counted: the bound never cuts it.
        if segments > MAX_SEGMENTS || bytes + piece.len() > MAX_PATH_BYTES {
            f(REST_SEGMENT);
            return;
        }
        f(piece);
        segments += 1;
        bytes += piece.len();
        match tail {
            Some(tail) => {
                f("/");
                bytes += 1;
                rest = tail;
            }
            None => return,
        }
    }
}

/// Whether a segment is an identifier (see the module docs); one pass over its bytes.
#[inline]
fn is_id(segment: &str) -> bool {
    let b = segment.as_bytes();
    if b.len() > MAX_SEGMENT_LEN {
        return true;
    }
    if b.is_empty() || !b[0].is_ascii_hexdigit() {
        // Every identifier form starts with a hex digit; most route names fail here.
        return false;
    }
    let (mut digits, mut hex) = (true, true);
    for &c in b {
        digits &= c.is_ascii_digit();
        hex &= c.is_ascii_hexdigit();
    }
    digits || (hex && b.len() >= MIN_HEX_ID_LEN) || is_uuid(b)
}

fn is_uuid(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(path: &str) -> String {
        let mut out = String::new();
        normalize_path(path, &mut out);
        out
    }

    #[test]
    fn identifiers_become_id() {
        assert_eq!(norm("/v1/users/42"), "/v1/users/{id}");
        assert_eq!(
            norm("/o/3F2504E0-4F89-11D3-9A0C-0305E82C3301/items/7/"),
            "/o/{id}/items/{id}/"
        );
        assert_eq!(norm("/o/3f2504e0-4f89-11d3-9a0c-0305e82c3301"), "/o/{id}");
        assert_eq!(norm("/blob/deadbeefcafebabe"), "/blob/{id}");
        assert_eq!(norm(&format!("/t/{}", "x".repeat(65))), "/t/{id}");
    }

    #[test]
    fn other_segments_are_kept() {
        for p in [
            "",
            "/",
            "//a//b/",
            "/v1/users",
            "/v2/deadbeef",               // short hex: a word, not an id
            "/x/3f2504e0_4f89_11d3_9a0c", // not a UUID
            "/file/123.json",
            "/a%20b/Users",
            "relative/path",
        ] {
            assert_eq!(norm(p), p);
        }
        let s64 = format!("/t/{}", "x".repeat(64));
        assert_eq!(norm(&s64), s64);
    }

    #[test]
    fn normalize_appends() {
        let mut out = String::from("GET ");
        normalize_path("/a/1", &mut out);
        assert_eq!(out, "GET /a/{id}");
    }

    #[test]
    fn key_format_and_matching() {
        assert_eq!(endpoint_key("GET", "/v1/users/9"), "GET /v1/users/{id}");
        assert!(key_matches("GET /v1/users/{id}", "GET", "/v1/users/123"));
        assert!(!key_matches("GET /v1/users/{id}", "POST", "/v1/users/123"));
        assert!(!key_matches("GET /v1/users/{id}", "GET", "/v1/users/123/x"));
        assert!(!key_matches("GET /v1/users/{id}/x", "GET", "/v1/users/123"));
    }

    #[test]
    fn hash_is_fnv1a_of_the_key() {
        // Reference value of FNV-1a 64 for "a" (from the FNV test suite).
        assert_eq!(key_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            endpoint_hash("GET", "/v1/users/42"),
            key_hash("GET /v1/users/{id}")
        );
        assert_ne!(endpoint_hash("GET", "/a"), endpoint_hash("POST", "/a"));
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z]{0,8}",
            "[0-9]{1,12}",
            "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
            "[0-9a-f]{14,20}",
            "[a-zA-Z0-9%._~-]{0,80}",
            Just("{id}".to_string()),
        ]
    }

    fn path() -> impl Strategy<Value = String> {
        proptest::collection::vec(segment(), 0..24).prop_map(|s| s.join("/"))
    }

    #[test]
    fn long_paths_are_cut_to_a_bounded_key() {
        let many: String = (0..5000).map(|i| format!("/seg{}x", i % 7)).collect();
        let key = endpoint_key("GET", &many);
        // Sixteen segments, then the rest.
        assert_eq!(key, format!("GET {}/{{rest}}", &many[..16 * 6]));
        let sixteen: String = (0..16).map(|i| format!("/s{i}")).collect();
        assert_eq!(norm(&sixteen), sixteen);
        assert_eq!(norm(&format!("{sixteen}/x")), format!("{sixteen}/{{rest}}"));
        let wide: String = (0..100).map(|_| format!("/{}", "a".repeat(60))).collect();
        let key = endpoint_key("GET", &wide);
        assert!(
            key.len() <= "GET ".len() + MAX_PATH_BYTES + "/{rest}".len(),
            "{key}"
        );
        assert!(key.ends_with("/{rest}"), "{key}");
        assert_eq!(norm(&norm(&wide)), norm(&wide));
        // Short paths are untouched.
        assert_eq!(norm("/a/b/c/"), "/a/b/c/");
    }

    proptest! {
        #[test]
        fn hash_matches_key_and_normalisation_is_idempotent(
            method in "[A-Z]{3,7}",
            p in path(),
        ) {
            let key = endpoint_key(&method, &p);
            prop_assert_eq!(endpoint_hash(&method, &p), key_hash(&key));
            prop_assert!(key_matches(&key, &method, &p));
            let normalised = norm(&p);
            prop_assert_eq!(&key, &format!("{method} {normalised}"));
            prop_assert_eq!(norm(&normalised), normalised.clone());
            prop_assert_eq!(endpoint_hash(&method, &p), endpoint_hash(&method, &normalised));
            prop_assert!(normalised.len() <= MAX_PATH_BYTES + REST_SEGMENT.len() + 1);
        }

        #[test]
        fn numeric_ids_collide(
            prefix in "(/[a-z]{1,6}){0,3}",
            a in 0u64..u64::MAX,
            b in 0u64..u64::MAX,
            suffix in "(/[a-z]{1,6}){0,3}/?",
        ) {
            let pa = format!("{prefix}/{a}{suffix}");
            let pb = format!("{prefix}/{b}{suffix}");
            prop_assert_eq!(endpoint_key("GET", &pa), endpoint_key("GET", &pb));
            prop_assert_eq!(endpoint_hash("GET", &pa), endpoint_hash("GET", &pb));
        }
    }
}
