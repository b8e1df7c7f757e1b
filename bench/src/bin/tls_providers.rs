//! TLS crypto providers side by side: rustls with ring (what Ambit links) and with
//! aws-lc-rs (what Istio's ztunnel links by default), on the two costs a node proxy pays for
//! TLS: bulk records (AES-GCM seal and open of 16 KiB records, TLS 1.3, the suite each
//! provider negotiates first) and mutual-TLS handshakes (ECDSA P-256 certificates on both
//! sides, X25519, as the mesh's workload certificates are).
//!
//! Client and server run in memory in one thread (no sockets, no scheduler), so the figures
//! are the providers' and rustls's, not the network's. Rounds alternate the providers and
//! the ratio aws-lc-rs / ring is printed per figure with the spread over rounds. A
//! measurement, not a test: nothing asserts on timing.
//!
//! Run: `cargo run --release -p ambit-bench --bin tls_providers [-- --mib 512 --rounds 5]`.

use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConnection, RootCertStore, ServerConnection};

#[derive(Parser, Debug)]
struct Args {
    /// MiB sent through each provider's connection per round.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Mutual-TLS handshakes per provider per round.
    #[arg(long, default_value_t = 2_000)]
    handshakes: usize,
    /// Rounds; each measures both providers, in the opposite order of the round before.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// A CA and two leaves it signed (server `server.mesh.test`, and a client), as DER.
struct Pki {
    roots: RootCertStore,
    server: (Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>),
    client: (Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>),
}

fn pki() -> anyhow::Result<Pki> {
    let ca = ambit_testing::pki::WebCa::new()?;
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der.clone()))?;
    let leaf = |name: &str| -> anyhow::Result<_> {
        let leaf = ca.leaf(name)?;
        Ok((
            vec![CertificateDer::from(leaf.cert)],
            PrivatePkcs8KeyDer::from(leaf.key),
        ))
    };
    Ok(Pki {
        roots,
        server: leaf("server.mesh.test")?,
        client: leaf("client.mesh.test")?,
    })
}

/// Client and server configs of one provider, mutual TLS, TLS 1.3 only (as HBONE).
struct Configs {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    suite: String,
}

fn configs(pki: &Pki, provider: CryptoProvider) -> anyhow::Result<Configs> {
    let provider = Arc::new(provider);
    let suite = format!("{:?}", provider.cipher_suites[0].suite());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(pki.roots.clone()),
        provider.clone(),
    )
    .build()?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            pki.server.0.clone(),
            PrivateKeyDer::from(pki.server.1.clone_key()),
        )?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(pki.roots.clone())
        .with_client_auth_cert(
            pki.client.0.clone(),
            PrivateKeyDer::from(pki.client.1.clone_key()),
        )?;
    Ok(Configs {
        client: Arc::new(client),
        server: Arc::new(server),
        suite,
    })
}

/// Moves every pending TLS byte from one side to the other until neither has any.
fn pump(
    c: &mut ClientConnection,
    s: &mut ServerConnection,
    wire: &mut Vec<u8>,
) -> anyhow::Result<()> {
    loop {
        let mut moved = false;
        while c.wants_write() {
            wire.clear();
            c.write_tls(wire)?;
            let mut rd = &wire[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd)?;
                s.process_new_packets()?;
            }
            moved = true;
        }
        while s.wants_write() {
            wire.clear();
            s.write_tls(wire)?;
            let mut rd = &wire[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd)?;
                c.process_new_packets()?;
            }
            moved = true;
        }
        if !moved {
            return Ok(());
        }
    }
}

fn connect(
    cfg: &Configs,
    wire: &mut Vec<u8>,
) -> anyhow::Result<(ClientConnection, ServerConnection)> {
    let name = ServerName::try_from("server.mesh.test")?;
    let mut c = ClientConnection::new(cfg.client.clone(), name)?;
    let mut s = ServerConnection::new(cfg.server.clone())?;
    pump(&mut c, &mut s, wire)?;
    if c.is_handshaking() || s.is_handshaking() {
        bail!("the handshake did not complete");
    }
    Ok((c, s))
}

/// Handshakes per second.
fn handshakes(cfg: &Configs, n: usize) -> anyhow::Result<f64> {
    let mut wire = Vec::with_capacity(64 * 1024);
    let start = Instant::now();
    for _ in 0..n {
        connect(cfg, &mut wire)?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// MB/s through one connection, client to server: 16 KiB application writes, each sealed,
/// moved and opened, and read out.
fn bulk(cfg: &Configs, mib: usize) -> anyhow::Result<f64> {
    let mut wire = Vec::with_capacity(64 * 1024);
    let (mut c, mut s) = connect(cfg, &mut wire)?;
    let chunk = vec![0x5au8; 16 * 1024];
    let mut out = vec![0u8; 64 * 1024];
    let total = mib * 1024 * 1024;
    let (mut sent, mut received) = (0usize, 0usize);
    let start = Instant::now();
    while sent < total {
        c.writer().write_all(&chunk)?;
        sent += chunk.len();
        pump(&mut c, &mut s, &mut wire)?;
        loop {
            match s.reader().read(&mut out) {
                Ok(0) => break,
                Ok(n) => received += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("reading plaintext"),
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if received != sent {
        bail!("sent {sent} bytes, received {received}");
    }
    Ok(sent as f64 / secs / 1e6)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pki = pki()?;
    let ring = configs(&pki, rustls::crypto::ring::default_provider())?;
    let aws = configs(&pki, rustls::crypto::aws_lc_rs::default_provider())?;
    let (mut ring_bulk, mut aws_bulk, mut ring_hs, mut aws_hs) = (vec![], vec![], vec![], vec![]);
    let (mut bulk_ratio, mut hs_ratio) = (vec![], vec![]);
    for round in 0..args.rounds {
        let order: [(&Configs, bool); 2] = if round % 2 == 0 {
            [(&ring, false), (&aws, true)]
        } else {
            [(&aws, true), (&ring, false)]
        };
        let (mut rb, mut ab, mut rh, mut ah) = (0.0, 0.0, 0.0, 0.0);
        for (cfg, is_aws) in order {
            let b = bulk(cfg, args.mib)?;
            let h = handshakes(cfg, args.handshakes)?;
            if is_aws {
                (ab, ah) = (b, h);
            } else {
                (rb, rh) = (b, h);
            }
        }
        eprintln!(
            "round {}: bulk ring {rb:.0} MB/s, aws-lc-rs {ab:.0} MB/s; handshakes ring {rh:.0}/s, aws-lc-rs {ah:.0}/s",
            round + 1
        );
        ring_bulk.push(rb);
        aws_bulk.push(ab);
        ring_hs.push(rh);
        aws_hs.push(ah);
        bulk_ratio.push(ab / rb);
        hs_ratio.push(ah / rh);
    }
    let spread = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        format!("{lo:.2}–{hi:.2}")
    };
    println!(
        "TLS 1.3 in memory, one thread, {} round(s); suites: ring {}, aws-lc-rs {}",
        args.rounds, ring.suite, aws.suite
    );
    println!(
        "{:<34}{:>12}{:>12}{:>16}{:>14}",
        "figure", "ring", "aws-lc-rs", "aws-lc/ring", "ratio spread"
    );
    println!(
        "{:<34}{:>12.0}{:>12.0}{:>16.2}{:>14}",
        format!("bulk, 16 KiB records, MB/s ({} MiB)", args.mib),
        median(&mut ring_bulk),
        median(&mut aws_bulk),
        median(&mut bulk_ratio.clone()),
        spread(&bulk_ratio)
    );
    println!(
        "{:<34}{:>12.0}{:>12.0}{:>16.2}{:>14}",
        "mTLS handshakes/s (P-256, X25519)",
        median(&mut ring_hs),
        median(&mut aws_hs),
        median(&mut hs_ratio.clone()),
        spread(&hs_ratio)
    );
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!(
            "load average: {}",
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}
