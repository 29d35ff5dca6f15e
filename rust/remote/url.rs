//! The remote's URL: parsed (scheme, credentials percent-decoded, hosts,
//! database) and shown without its password.

use super::Node;
use crate::error::{Error, Result};

/// `url` parsed.
pub(super) struct Parsed {
    pub(super) cluster: bool,
    pub(super) tls: bool,
    pub(super) user: Option<String>,
    /// Percent-decoded.
    pub(super) password: Option<String>,
    /// As written in the URL (to scrub it from messages too).
    pub(super) password_raw: Option<String>,
    pub(super) hosts: Vec<Node>,
    pub(super) db: i64,
}

/// Percent-decoding of a URL's user or password.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub(super) fn parse_url(url: &str) -> Result<Parsed> {
    let bad = |why: &str| {
        Error::InvalidArgument(format!(
            "remote must be redis://[user:password@]host:port[/db], rediss://... (TLS) or \
             redis+cluster://host:port[,host:port...]; {why}"
        ))
    };
    let encode = "percent-encode the user and password (in Python: \
                  urllib.parse.quote(password, safe=''))";
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let (cluster, tls) = match scheme {
        "redis" => (false, false),
        "rediss" => (false, true),
        "redis+cluster" => (true, false),
        "rediss+cluster" => (true, true),
        other => return Err(bad(&format!("the scheme is {other:?}"))),
    };
    // The authority ends at the first '/': a '/' in a raw password ends it early.
    let (authority, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if tail.contains('@') {
        return Err(bad(&format!(
            "the user or password holds a '/' (or the part after the host holds '@'): {encode}"
        )));
    }
    let (auth, hostpart) = match authority.split_once('@') {
        Some((_, r)) if r.contains('@') => {
            return Err(bad(&format!("the user or password holds an '@': {encode}")))
        }
        Some((a, r)) => (Some(a), r),
        None => (None, authority),
    };
    let decode = |what: &str, s: &str| {
        percent_decode(s).ok_or_else(|| {
            bad(&format!(
                "the {what} is not percent-encoded (a '%' not followed by two hex digits): {encode}"
            ))
        })
    };
    let (user, password, password_raw) = match auth {
        None => (None, None, None),
        Some(a) => match a.split_once(':') {
            Some((u, p)) => (
                (!u.is_empty()).then(|| decode("user", u)).transpose()?,
                Some(decode("password", p)?),
                Some(p.to_string()),
            ),
            None => (Some(decode("user", a)?), None, None),
        },
    };
    let mut hosts = Vec::new();
    for h in hostpart.split(',').filter(|h| !h.is_empty()) {
        let Some((host, port)) = h.rsplit_once(':') else {
            return Err(bad(&format!("{h:?} has no port")));
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match port.parse::<u16>() {
            Ok(port) if !host.is_empty() => hosts.push((host.to_string(), port)),
            _ => return Err(bad(&format!("{h:?} is not host:port"))),
        }
    }
    if hosts.is_empty() {
        return Err(bad("no host"));
    }
    if !cluster && hosts.len() > 1 {
        return Err(bad("several hosts need redis+cluster://"));
    }
    let db = match tail.trim_start_matches('/') {
        "" => 0,
        d => match d.parse::<i64>() {
            Ok(n) if n >= 0 => n,
            _ => return Err(bad(&format!("the database {d:?} is not a number"))),
        },
    };
    if cluster && db != 0 {
        return Err(bad("a cluster has database 0 only"));
    }
    Ok(Parsed {
        cluster,
        tls,
        user,
        password,
        password_raw,
        hosts,
        db,
    })
}

/// `url` with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let (auth, host) = rest.rsplit_once('@').expect("has @");
            let user = auth.split_once(':').map_or(auth, |(u, _)| u);
            if auth.contains(':') {
                format!("{scheme}://{user}:***@{host}")
            } else {
                format!("{scheme}://{user}@{host}")
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_redact() {
        let p = parse_url("redis://alice:s3cret@127.0.0.1:6379/2").unwrap();
        assert!(!p.cluster && !p.tls);
        assert_eq!(p.user.as_deref(), Some("alice"));
        assert_eq!(p.password.as_deref(), Some("s3cret"));
        assert_eq!(p.hosts, vec![("127.0.0.1".to_string(), 6379)]);
        assert_eq!(p.db, 2);
        let c = parse_url("redis+cluster://h1:7000,h2:7001").unwrap();
        assert!(c.cluster && c.hosts.len() == 2);
        assert!(parse_url("rediss://:pw@h:1").unwrap().tls);
        for bad in [
            "http://h:1",
            "redis://",
            "redis://h",
            "redis://h:x",
            "redis://a:1,b:2",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert_eq!(
            redact("redis://alice:s3cret@h:1/0"),
            "redis://alice:***@h:1/0"
        );
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        // A password is percent-decoded; raw '/' or '@' in it is refused, saying to encode it.
        let p = parse_url("redis://default:pa%3Ass%40w%2Frd%25@127.0.0.1:1").unwrap();
        assert_eq!(p.password.as_deref(), Some("pa:ss@w/rd%"));
        for raw in [
            "redis://default:pa:ss@w/rd%@127.0.0.1:1",
            "redis://u:a@b@h:1",
            "redis://u:a%zz@h:1",
        ] {
            let e = parse_url(raw).err().expect(raw).to_string();
            assert!(e.contains("percent-encode"), "{raw}: {e}");
        }
        assert!(parse_url("redis://h:1/x").is_err());
        assert!(parse_url("redis+cluster://h:1/2").is_err());
    }
}
