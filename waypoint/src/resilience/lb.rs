//! Endpoint selection: round robin, least request (power of two choices), random, and
//! consistent hashing on a header (rendezvous hashing: each endpoint scores
//! `hash(key, endpoint)` and the best wins, so removing one endpoint moves only its keys).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The algorithm of a service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Algorithm {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    /// Hash on this (lower-case) header; requests without it fall back to round robin.
    HeaderHash(String),
}

/// A candidate endpoint as the picker sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub addr: SocketAddr,
    /// Requests in flight to it.
    pub active: usize,
}

/// The candidates as the picker reads them, one at a time, so that a caller holding its
/// endpoints in another shape need not copy them per pick.
pub trait Candidates {
    /// How many there are.
    fn count(&self) -> usize;
    /// The address of candidate `i` (`i < count()`).
    fn addr(&self, i: usize) -> SocketAddr;
    /// Requests in flight to candidate `i`.
    fn active(&self, i: usize) -> usize;
}

impl Candidates for [Candidate] {
    fn count(&self) -> usize {
        self.len()
    }
    fn addr(&self, i: usize) -> SocketAddr {
        self[i].addr
    }
    fn active(&self, i: usize) -> usize {
        self[i].active
    }
}

/// Picks an index into `candidates` (non-empty). `rr` is the service's round-robin counter,
/// `draws` two uniform random numbers, `hash_key` the header value when hashing.
pub fn pick<C: Candidates + ?Sized>(
    algorithm: &Algorithm,
    candidates: &C,
    rr: &AtomicUsize,
    draws: (usize, usize),
    hash_key: Option<&[u8]>,
) -> usize {
    let n = candidates.count();
    if n == 0 {
        return 0;
    }
    match algorithm {
        Algorithm::RoundRobin => rr.fetch_add(1, Ordering::Relaxed) % n,
        Algorithm::Random => draws.0 % n,
        Algorithm::LeastRequest => {
            let (a, b) = (draws.0 % n, draws.1 % n);
            if candidates.active(b) < candidates.active(a) {
                b
            } else {
                a
            }
        }
        Algorithm::HeaderHash(_) => match hash_key {
            None => rr.fetch_add(1, Ordering::Relaxed) % n,
            Some(key) => (0..n)
                .max_by_key(|&i| {
                    let mut h = DefaultHasher::new();
                    key.hash(&mut h);
                    candidates.addr(i).hash(&mut h);
                    h.finish()
                })
                .unwrap_or(0),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(actives: &[usize]) -> Vec<Candidate> {
        actives
            .iter()
            .enumerate()
            .map(|(i, a)| Candidate {
                addr: SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)),
                active: *a,
            })
            .collect()
    }

    #[test]
    fn algorithms() {
        let rr = AtomicUsize::new(0);
        let c = cands(&[5, 0, 9]);
        let picks: Vec<_> = (0..4)
            .map(|_| pick(&Algorithm::RoundRobin, &c[..], &rr, (0, 0), None))
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0]);
        assert_eq!(pick(&Algorithm::LeastRequest, &c[..], &rr, (0, 1), None), 1);
        assert_eq!(pick(&Algorithm::LeastRequest, &c[..], &rr, (2, 0), None), 0);
        assert_eq!(pick(&Algorithm::Random, &c[..], &rr, (7, 0), None), 1);
        let h = Algorithm::HeaderHash("x-user".into());
        let first = pick(&h, &c[..], &rr, (0, 0), Some(b"alice"));
        for _ in 0..10 {
            assert_eq!(pick(&h, &c[..], &rr, (3, 1), Some(b"alice")), first);
        }
        // Removing another endpoint keeps alice where she was.
        let fewer: Vec<_> = c
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != (first + 1) % 3)
            .map(|(_, c)| *c)
            .collect();
        let again = pick(&h, &fewer[..], &rr, (0, 0), Some(b"alice"));
        assert_eq!(fewer[again].addr, c[first].addr);
    }
}
