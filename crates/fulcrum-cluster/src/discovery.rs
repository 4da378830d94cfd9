//! Backend discovery by DNS (hickory-resolver): A/AAAA records of a `host:port` name, or
//! SRV records (RFC 2782) carrying target, port and weight. Re-resolved on an interval by
//! the control plane ([`crate::runtime`]); a failed resolution keeps the last answer, so
//! a DNS outage does not empty a pool.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use fulcrum_config::{BackendConfig, DnsRecord};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

/// A DNS resolver using the system configuration (`/etc/resolv.conf`).
#[derive(Clone)]
pub struct Dns {
    resolver: TokioResolver,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns").finish_non_exhaustive()
    }
}

impl Dns {
    /// A resolver asking `nameservers` in order (over UDP, then TCP for truncated
    /// answers), or the system's name servers when it is empty.
    ///
    /// # Errors
    /// The resolver's message when the system configuration cannot be read or the
    /// resolver cannot be built.
    pub fn new(nameservers: &[SocketAddr]) -> Result<Dns, String> {
        if nameservers.is_empty() {
            return Self::system();
        }
        let servers = nameservers
            .iter()
            .map(|server| {
                let mut udp = ConnectionConfig::udp();
                udp.port = server.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = server.port();
                NameServerConfig::new(server.ip(), true, vec![udp, tcp])
            })
            .collect();
        let resolver = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
        .build()
        .map_err(|e| format!("cannot build the DNS resolver: {e}"))?;
        Ok(Dns { resolver })
    }

    /// A resolver from the system configuration.
    ///
    /// # Errors
    /// The resolver's message when the system configuration cannot be read.
    pub fn system() -> Result<Dns, String> {
        let resolver = TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?
            .build()
            .map_err(|e| format!("cannot build the DNS resolver: {e}"))?;
        Ok(Dns { resolver })
    }

    /// Resolves `name` as `record` into backends, sorted by address: for `a`, every A
    /// and AAAA address of the `host:port` name with weight 1; for `srv`, every target's
    /// addresses with the record's port and weight (at least 1), keeping only the
    /// records of the lowest priority, as RFC 2782 asks.
    ///
    /// # Errors
    /// A message naming the name and the resolver's error; an answer without records.
    pub async fn resolve(
        &self,
        name: &str,
        record: DnsRecord,
    ) -> Result<Vec<BackendConfig>, String> {
        let mut out: BTreeMap<SocketAddr, u32> = BTreeMap::new();
        match record {
            DnsRecord::A => {
                let (host, port) = split_host_port(name)
                    .ok_or_else(|| format!("dns name `{name}` is not host:port"))?;
                if let Ok(ip) = host.parse::<std::net::IpAddr>() {
                    out.insert(SocketAddr::new(ip, port), 1);
                } else {
                    let answer = self
                        .resolver
                        .lookup_ip(host)
                        .await
                        .map_err(|e| format!("dns `{host}`: {e}"))?;
                    for ip in answer.iter() {
                        out.insert(SocketAddr::new(ip, port), 1);
                    }
                }
            }
            DnsRecord::Srv => {
                let answer = self
                    .resolver
                    .srv_lookup(name)
                    .await
                    .map_err(|e| format!("dns SRV `{name}`: {e}"))?;
                let srvs: Vec<(u16, u16, u16, String)> = answer
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::SRV(srv) => {
                            Some((srv.priority, srv.weight, srv.port, srv.target.to_ascii()))
                        }
                        _ => None,
                    })
                    .collect();
                let best = srvs.iter().map(|s| s.0).min();
                for (priority, weight, port, target) in &srvs {
                    if Some(*priority) != best {
                        continue;
                    }
                    let target = target.trim_end_matches('.');
                    let ips = self
                        .resolver
                        .lookup_ip(target)
                        .await
                        .map_err(|e| format!("dns `{target}` (SRV target of `{name}`): {e}"))?;
                    for ip in ips.iter() {
                        out.insert(SocketAddr::new(ip, *port), u32::from(*weight).max(1));
                    }
                }
            }
        }
        if out.is_empty() {
            return Err(format!("dns `{name}`: no records"));
        }
        Ok(out
            .into_iter()
            .map(|(addr, weight)| BackendConfig {
                address: addr.to_string(),
                weight,
                tags: BTreeMap::new(),
                max_requests: 0,
            })
            .collect())
    }
}

/// Splits `host:port` (`[v6]:port` too); `None` without a valid port.
fn split_host_port(name: &str) -> Option<(&str, u16)> {
    let (host, port) = name.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literal_and_localhost_resolve() {
        let dns = Dns::system().expect("system resolver");
        let literal = dns
            .resolve("127.0.0.1:8080", DnsRecord::A)
            .await
            .expect("literal");
        assert_eq!(literal[0].address, "127.0.0.1:8080");
        // `localhost` comes from /etc/hosts, which the system resolver reads.
        let local = dns
            .resolve("localhost:9000", DnsRecord::A)
            .await
            .expect("localhost resolves");
        assert!(
            local.iter().all(|b| b.address.ends_with(":9000")),
            "{local:?}"
        );
        assert!(dns.resolve("no-port", DnsRecord::A).await.is_err());
    }

    #[tokio::test]
    async fn srv_records_from_a_configured_name_server() {
        use crate::testutil::DnsServer;
        let server = DnsServer::start(&[
            "srv-host=_http._tcp.app.test,b1.app.test,8081,0,3",
            "srv-host=_http._tcp.app.test,b2.app.test,8082,0,1",
            // A higher priority value: a fallback, not used while priority 0 answers.
            "srv-host=_http._tcp.app.test,b3.app.test,8083,1,5",
            "host-record=b1.app.test,127.0.0.1",
            "host-record=b2.app.test,127.0.0.2",
            "host-record=b3.app.test,127.0.0.3",
            "host-record=web.app.test,127.0.0.9",
        ]);
        let dns = Dns::new(&[server.address()]).expect("resolver");
        let srv = dns
            .resolve("_http._tcp.app.test", DnsRecord::Srv)
            .await
            .expect("SRV answer");
        let got: Vec<(&str, u32)> = srv.iter().map(|b| (b.address.as_str(), b.weight)).collect();
        assert_eq!(got, [("127.0.0.1:8081", 3), ("127.0.0.2:8082", 1)]);
        let a = dns
            .resolve("web.app.test:9000", DnsRecord::A)
            .await
            .expect("A answer");
        assert_eq!(a[0].address, "127.0.0.9:9000");
        let missing = dns
            .resolve("_http._tcp.none.test", DnsRecord::Srv)
            .await
            .expect_err("no such name");
        assert!(missing.contains("_http._tcp.none.test"), "{missing}");
    }
}
