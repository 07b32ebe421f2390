//! Images by URL, when the server is started with `--allow-image-urls`: a blocking HTTP(S) GET
//! under one deadline for the whole fetch (redirects and body included), a byte limit checked
//! against `Content-Length` before the body and again while reading it, and a bounded number of
//! redirects. Every host the fetch connects to — the first and each redirect's — is resolved by
//! [`checked_addrs`], which refuses private, loopback, link-local and other non-public addresses
//! unless `--allow-private-image-urls` is given; the client connects only to the addresses that
//! check returned, so a name cannot be resolved again to another address between the check and
//! the connection. No proxy from the environment is used (it would connect in our place).

use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use super::openai::ApiError;

/// Redirects followed before a fetch fails.
pub const MAX_REDIRECTS: u32 = 5;

/// What `--allow-image-urls` and its companions set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageUrls {
    /// Fetch from private, loopback and link-local addresses too (`--allow-private-image-urls`).
    pub allow_private: bool,
    /// The whole fetch, redirects and body included (`--image-url-timeout`).
    pub timeout: Duration,
}

impl Default for ImageUrls {
    fn default() -> Self {
        ImageUrls {
            allow_private: false,
            timeout: Duration::from_secs(10),
        }
    }
}

/// The server's one HTTP client for images.
pub struct ImageFetcher {
    agent: ureq::Agent,
    opts: ImageUrls,
    max_bytes: usize,
}

/// The resolver's refusal of an address, found again in the client's error chain.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl ImageFetcher {
    pub fn new(opts: ImageUrls, max_bytes: usize) -> Self {
        let allowed: fn(IpAddr) -> bool = if opts.allow_private {
            |_| true
        } else {
            is_public
        };
        Self::with_policy(opts, max_bytes, allowed)
    }

    /// A fetcher that connects only to addresses `allowed` accepts (tests narrow it to tell one
    /// loopback address from another).
    fn with_policy(opts: ImageUrls, max_bytes: usize, allowed: fn(IpAddr) -> bool) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout(opts.timeout)
            .redirects(MAX_REDIRECTS)
            .try_proxy_from_env(false)
            .user_agent(concat!("fastrm/", env!("CARGO_PKG_VERSION")))
            .resolver(move |netloc: &str| checked_addrs(netloc, allowed))
            .build();
        ImageFetcher {
            agent,
            opts,
            max_bytes,
        }
    }

    /// The image's bytes; `param` names the request field the URL came from.
    pub fn fetch(&self, url: &str, param: &str) -> Result<Vec<u8>, ApiError> {
        let failed = |msg: String| {
            ApiError::invalid(
                Some(param.to_string()),
                "image_url_failed",
                format!("fetching the image at {url:?} failed: {msg}"),
            )
        };
        let too_large = || {
            ApiError::too_large(
                Some(param.to_string()),
                "image_too_large",
                format!("the image is over the limit of {} bytes", self.max_bytes),
            )
        };
        let timeout = self.opts.timeout.as_secs_f64();
        let resp = match self.agent.get(url).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, _)) => {
                return Err(failed(format!("the server answered HTTP {code}")))
            }
            Err(e) => {
                if let Some(r) = refusal(&e) {
                    return Err(ApiError::invalid(
                        Some(param.to_string()),
                        "image_url_refused",
                        r,
                    ));
                }
                return Err(failed(match e.kind() {
                    ureq::ErrorKind::TooManyRedirects => {
                        format!("more than {MAX_REDIRECTS} redirects")
                    }
                    ureq::ErrorKind::UnknownScheme | ureq::ErrorKind::InvalidUrl => {
                        "only http:// and https:// URLs are fetched".into()
                    }
                    _ if timed_out(&e) => format!("it took longer than {timeout} s"),
                    _ => e.to_string(),
                }));
            }
        };
        if resp.status() != 200 {
            return Err(failed(format!(
                "the server answered HTTP {} (200 expected)",
                resp.status()
            )));
        }
        let declared = resp
            .header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_bytes as u64) {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(self.max_bytes as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| {
                if is_timeout(&e) {
                    failed(format!("it took longer than {timeout} s"))
                } else {
                    failed(format!("reading the body: {e}"))
                }
            })?;
        if bytes.len() > self.max_bytes {
            return Err(too_large());
        }
        if bytes.is_empty() {
            return Err(failed("the body is empty".into()));
        }
        Ok(bytes)
    }
}

/// The first answer `look` finds in the client error's chain of sources.
fn in_chain<T>(
    e: &ureq::Error,
    look: impl Fn(&(dyn std::error::Error + 'static)) -> Option<T>,
) -> Option<T> {
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(t) = look(s) {
            return Some(t);
        }
        src = s.source();
    }
    None
}

/// The resolver's refusal, when that is why the fetch failed.
fn refusal(e: &ureq::Error) -> Option<String> {
    in_chain(e, |s| {
        let inner = s.downcast_ref::<io::Error>().and_then(|io| io.get_ref());
        let r = s
            .downcast_ref::<Refused>()
            .or_else(|| inner?.downcast_ref::<Refused>());
        r.map(|r| r.0.clone())
    })
}

/// An I/O error that is the deadline passing (a socket read or write timed out).
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

fn timed_out(e: &ureq::Error) -> bool {
    in_chain(e, |s| {
        s.downcast_ref::<io::Error>()
            .filter(|io| is_timeout(io))
            .map(|_| ())
    })
    .is_some()
}

/// `host:port` resolved, refused as a whole when any address it resolves to is not `allowed`: a
/// name that also points inside the network is not fetched from.
fn checked_addrs(netloc: &str, allowed: fn(IpAddr) -> bool) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
    if let Some(a) = addrs.iter().find(|a| !allowed(a.ip())) {
        let host = netloc.rsplit_once(':').map_or(netloc, |(h, _)| h);
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            Refused(format!(
                "{host} resolves to {}, a private, loopback, link-local or reserved address: \
                 images are fetched only from public addresses unless the server is started \
                 with --allow-private-image-urls",
                a.ip()
            )),
        ));
    }
    Ok(addrs)
}

/// Whether an address is on the public internet: not loopback, private (RFC 1918, unique
/// local), link-local, shared (carrier-grade NAT), unspecified, multicast, broadcast,
/// documentation, benchmarking or reserved. IPv6 forms that embed an IPv4 address (mapped,
/// NAT64, 6to4) are judged by that address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            // 64:ff9b::/96 (NAT64) carries an IPv4 address in its last 32 bits.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_public_v4(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ));
            }
            // 2002::/16 (6to4) carries one in bits 16..48.
            if s[0] == 0x2002 {
                return is_public_v4(Ipv4Addr::new(
                    (s[1] >> 8) as u8,
                    s[1] as u8,
                    (s[2] >> 8) as u8,
                    s[2] as u8,
                ));
            }
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation 2001:db8::/32
                || (s[0] == 0x2001 && s[1] == 0) // Teredo 2001::/32
                || s[..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible ::/96 (deprecated)
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_unspecified()
        || o[0] == 0 // "this network" 0.0.0.0/8
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared address space 100.64.0.0/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments 192.0.0.0/24
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18.0.0/15
        || o[0] >= 240) // reserved 240.0.0.0/4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for private in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "100.127.255.254",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "198.19.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "2001:0:4136:e378::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
        ] {
            let ip: IpAddr = private.parse().unwrap();
            assert!(!is_public(ip), "{private} passed as public");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "198.17.255.255",
            "198.20.0.1",
            "223.255.255.254",
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            let ip: IpAddr = public.parse().unwrap();
            assert!(is_public(ip), "{public} refused as private");
        }
    }

    #[test]
    fn a_name_with_any_private_address_is_refused_by_name() {
        let e = checked_addrs("localhost:80", is_public).unwrap_err();
        let msg = e.get_ref().unwrap().to_string();
        assert!(msg.contains("localhost resolves to"), "{msg}");
        assert!(msg.contains("--allow-private-image-urls"), "{msg}");
        assert!(!checked_addrs("127.0.0.1:80", |_| true).unwrap().is_empty());
    }

    /// One connection on 127.0.0.1 answered with `response`; the port.
    fn answer_once(response: String) -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            let (s, _) = l.accept().unwrap();
            let mut r = io::BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            (&s).write_all(response.as_bytes()).unwrap();
        });
        port
    }

    /// A redirect is checked as the first address is: with only 127.0.0.1 allowed, a redirect from
    /// it to 127.0.0.2 is refused before anything connects there.
    #[test]
    fn every_redirect_is_checked_again() {
        let only_first: fn(IpAddr) -> bool = |ip| ip == IpAddr::from([127, 0, 0, 1]);
        let f = ImageFetcher::with_policy(ImageUrls::default(), 1000, only_first);
        let body = "0123456789";
        let ok = answer_once(format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ));
        let got = f
            .fetch(&format!("http://127.0.0.1:{ok}/a.png"), "p")
            .unwrap();
        assert_eq!(got, body.as_bytes());
        let hop = answer_once(
            "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.2:9/b.png\r\nContent-Length: 0\r\n\r\n"
                .into(),
        );
        let e = f
            .fetch(&format!("http://127.0.0.1:{hop}/a.png"), "p")
            .unwrap_err();
        assert_eq!(e.code, Some("image_url_refused"), "{}", e.message);
        assert!(e.message.contains("127.0.0.2"), "{}", e.message);
    }
}
