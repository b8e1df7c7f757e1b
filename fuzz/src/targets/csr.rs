//! CSR validation at the CA (`ambit_hbone::csr::validate`), the check between a caller's
//! request and a certificate that names an identity.
//!
//! Inputs: CSRs signed for real (P-256, P-384, Ed25519 keys) whose subjectAltNames are
//! generated: near-valid SPIFFE URIs, DNS names, IPs, e-mail addresses, several of them;
//! valid CSRs (those plus the RSA and P-521 fixtures in `corpus/csr/`) with their DER
//! mutated; and PEM text mutated around them.
//!
//! Properties: nothing panics; a CSR is accepted exactly when its only SAN is one URI that
//! parses as an identity in the CA's trust domain, and then it names that identity; a
//! mutated CSR that is still accepted names the identity and key of the one it came from
//! (the signature covers them).

use proptest::prelude::*;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateSigningRequestDer;

use ambit_hbone::csr::{validate, validate_der, ValidCsr};
use ambit_hbone::Identity;

use crate::mutate;

const TD: &str = "cluster.local";
const ALICE: &str = "spiffe://cluster.local/ns/default/sa/alice";

/// Keys generated once: key generation is the slow part of making a CSR.
fn keys() -> &'static [KeyPair] {
    static KEYS: std::sync::OnceLock<Vec<KeyPair>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ]
        .into_iter()
        .map(|alg| KeyPair::generate_for(alg).unwrap_or_else(|e| panic!("key: {e}")))
        .collect()
    })
}

/// Valid CSRs (DER) for ALICE with each key, and the fixtures.
fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut out: Vec<Vec<u8>> = keys()
            .iter()
            .map(|k| der(&csr_pem(vec![uri(ALICE)], None, k)))
            .collect();
        for pem in [
            include_str!("../../corpus/csr/csr-rsa2048.pem"),
            include_str!("../../corpus/csr/csr-rsa1024.pem"),
            include_str!("../../corpus/csr/csr-p521.pem"),
        ] {
            out.push(der(pem));
        }
        out
    })
}

fn der(pem: &str) -> Vec<u8> {
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap_or_else(|e| panic!("seed CSR: {e}"))
        .as_ref()
        .to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap_or_else(|e| panic!("{s}: {e}")))
}

fn csr_pem(sans: Vec<SanType>, common_name: Option<&str>, key: &KeyPair) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(cn) = common_name {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    params.subject_alt_names = sans;
    params
        .serialize_request(key)
        .and_then(|c| c.pem())
        .unwrap_or_else(|e| panic!("CSR: {e}"))
}

fn uri_text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(
            &[
                ALICE,
                "spiffe://cluster.local/ns/default/sa/alice/",
                "spiffe://Cluster.Local/ns/default/sa/alice",
                "spiffe://cluster.local/ns/default/sa/",
                "spiffe://cluster.local//ns/default/sa/alice",
                "SPIFFE://cluster.local/ns/default/sa/alice",
                "spiffe://cluster.local/ns/default/sa/alice?x=1",
                "spiffe://cluster.local/ns/default/sa/alice#f",
                "spiffe://cluster.local/ns/%64efault/sa/alice",
                "spiffe://other.example/ns/default/sa/alice",
                "spiffe://cluster.local/ns/default/sa/alice\u{0}",
                "spiffe://cluster.local:443/ns/default/sa/alice",
                "spiffe://user@cluster.local/ns/default/sa/alice",
                "spiffe://cluster.local/ns/../sa/alice",
                "spiffe://cluster.local/ns/default/sa/alice bob",
                "https://cluster.local/ns/default/sa/alice",
                "",
            ][..]
        )
        .prop_map(str::to_string),
        "spiffe://[a-z.:_-]{0,12}/ns/[a-z0-9.%_-]{0,6}/sa/[a-zA-Z0-9.%/_-]{0,6}",
    ]
}

fn san() -> impl Strategy<Value = SanType> {
    prop_oneof![
        6 => uri_text().prop_filter_map("not IA5", |s| s.try_into().ok().map(SanType::URI)),
        1 => "[a-z.*-]{0,12}".prop_filter_map("not IA5", |s| s.try_into().ok().map(SanType::DnsName)),
        1 => any::<[u8; 4]>().prop_map(|b| SanType::IpAddress(b.into())),
        1 => "[a-z]{0,4}@[a-z.]{0,8}".prop_filter_map("not IA5", |s| s.try_into().ok().map(SanType::Rfc822Name)),
    ]
}

/// What a generated CSR should come to.
fn expected(sans: &[SanType]) -> Option<Identity> {
    match sans {
        [SanType::URI(u)] => u
            .as_str()
            .parse::<Identity>()
            .ok()
            .filter(|i| i.trust_domain() == TD),
        _ => None,
    }
}

#[derive(Debug, Clone)]
enum Input {
    /// SANs, a common name, which key: signed for real.
    Generated(Vec<SanType>, Option<String>, usize),
    /// A seed's DER with edits.
    MutatedDer(usize, Vec<u8>),
    /// PEM text as sent, edited.
    Pem(String),
}

fn inputs() -> impl Strategy<Value = Input> {
    let generated = (
        prop::collection::vec(san(), 0..4),
        prop::option::of("[a-zA-Z0-9 =,+]{0,12}"),
        0..keys().len(),
    )
        .prop_map(|(sans, cn, k)| Input::Generated(sans, cn, k));
    let n = seeds().len();
    let mutated = (0..n).prop_flat_map(|s| {
        mutate::mutated(vec![seeds()[s].clone()], DER_WORDS, 3)
            .prop_map(move |d| Input::MutatedDer(s, d))
    });
    let pem = mutate::mutated(
        vec![include_bytes!("../../corpus/csr/csr-rsa2048.pem").to_vec()],
        &[
            b"-----BEGIN CERTIFICATE REQUEST-----\n",
            b"-----END CERTIFICATE REQUEST-----\n",
            b"=",
            b"\n",
            b"-----BEGIN X-----\n",
        ],
        4,
    )
    .prop_map(|b| Input::Pem(String::from_utf8_lossy(&b).into_owned()));
    prop_oneof![3 => generated, 3 => mutated, 1 => pem]
}

/// DER pieces: lengths and tags that make parsers read past ends or nest.
const DER_WORDS: &[&[u8]] = &[
    b"\x30\x80",
    b"\x30\x00",
    b"\x81\xff",
    b"\x84\xff\xff\xff\xff",
    b"\x05\x00",
    b"\x06\x03\x55\x1d\x11",
    b"\xa0\x00",
    b"\x86\x05spiff",
];

fn same_request(a: &ValidCsr, b: &ValidCsr) -> bool {
    a.identity() == b.identity() && a.key_type() == b.key_type()
}

fn check(input: Input) -> Result<(), TestCaseError> {
    match input {
        Input::Generated(sans, cn, k) => {
            let want = expected(&sans);
            let pem = csr_pem(sans.clone(), cn.as_deref(), &keys()[k]);
            match (validate(&pem, TD, None), want) {
                (Ok(valid), Some(want)) => {
                    prop_assert_eq!(valid.identity(), &want);
                    // What the certificate will say parses back to the same identity.
                    let again: Identity = valid
                        .identity()
                        .to_string()
                        .parse()
                        .map_err(|e| TestCaseError::fail(format!("{e}")))?;
                    prop_assert_eq!(&again, valid.identity());
                }
                (Ok(valid), None) => {
                    return Err(TestCaseError::fail(format!(
                        "accepted {:?} for SANs {sans:?}",
                        valid.identity()
                    )))
                }
                (Err(e), Some(want)) => {
                    return Err(TestCaseError::fail(format!(
                        "refused a CSR for {want}: {e}"
                    )))
                }
                (Err(_), None) => {}
            }
        }
        Input::MutatedDer(s, der) => {
            let original = validate_der(
                &CertificateSigningRequestDer::from(seeds()[s].as_slice()),
                TD,
                None,
            );
            if let Ok(mutant) = validate_der(
                &CertificateSigningRequestDer::from(der.as_slice()),
                TD,
                None,
            ) {
                let Ok(original) = original else {
                    return Err(TestCaseError::fail(format!(
                        "a mutant of a refused CSR was accepted as {}",
                        mutant.identity()
                    )));
                };
                prop_assert!(
                    same_request(&original, &mutant),
                    "a mutant names {} ({}), its seed {} ({})",
                    mutant.identity(),
                    mutant.key_type(),
                    original.identity(),
                    original.key_type()
                );
            }
        }
        Input::Pem(text) => {
            let _ = validate(&text, TD, None);
        }
    }
    Ok(())
}

#[test]
fn csr_validation() {
    crate::fuzz("csr", 1500, inputs(), check);
}
