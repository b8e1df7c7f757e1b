//! Fuzzing of the code that reads what a peer, an operator's file or the network hands
//! Ambit, on stable Rust, as ordinary tests.
//!
//! Each target (`src/targets/`) is a property over generated inputs: it must never panic,
//! and what it accepts must mean what it says (an accepted CSR names the identity that was
//! signed, a policy that fails to convert is enforced closed, a CONNECT that gets 200 names
//! the address the handler saw...). Generation is structure-aware where that reaches
//! deeper than random bytes: valid seeds from `corpus/` and from the code's own builders
//! are mutated (bytes flipped, cut, spliced; fields replaced by values near their edges),
//! and inputs are also built field by field from the schema.
//!
//! This is proptest, not a coverage-guided fuzzer: it runs anywhere `cargo test` does, with
//! no nightly toolchain or instrumentation, and its inputs shrink to a minimal failing case.
//! Coverage guidance would find deep paths faster; structured generation is how these
//! targets reach them instead.
//!
//! Two modes, one code path ([`fuzz`]):
//! - `cargo test -p ambit-fuzz`: each target runs a fixed number of cases from a fixed
//!   seed (a few seconds each), so the suite is deterministic.
//! - `AMBIT_FUZZ_SECONDS=600 cargo test -p ambit-fuzz --release -- --test-threads 1`: each
//!   target runs for that long (wall clock) from fresh random seeds, printing how many
//!   cases it ran; a failure prints its seed and the shrunk input.
//!
//! Found bugs become plain regression tests beside the code they fixed.

use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

pub mod mutate;
#[cfg(test)]
mod targets;

/// Cases per batch in long runs (each batch has its own seed, printed on failure).
const BATCH: u32 = 512;

/// Runs `test` over inputs from `strategy`: `cases` of them from a fixed seed, or, with
/// `AMBIT_FUZZ_SECONDS` set, batches from random seeds until that many seconds passed.
/// Panics with the seed and the shrunk input on the first failure.
pub fn fuzz<S, F>(name: &str, cases: u32, strategy: S, test: F)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
    F: Fn(S::Value) -> Result<(), TestCaseError>,
{
    let budget = std::env::var("AMBIT_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64);
    let Some(budget) = budget else {
        run_batch(
            name,
            cases,
            *b"ambit-fuzz: short, reproducible.",
            &strategy,
            &test,
        );
        return;
    };
    let start = Instant::now();
    let mut total = 0u64;
    while start.elapsed() < budget {
        let seed = random_seed();
        run_batch(name, BATCH, seed, &strategy, &test);
        total += u64::from(BATCH);
    }
    eprintln!(
        "fuzz {name}: {total} cases in {:.0} s",
        start.elapsed().as_secs_f64()
    );
}

fn run_batch<S, F>(name: &str, cases: u32, seed: [u8; 32], strategy: &S, test: &F)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
    F: Fn(S::Value) -> Result<(), TestCaseError>,
{
    let config = Config {
        cases,
        failure_persistence: None,
        // Shrinking a large input can take long; a bounded shrink still points at the bug.
        max_shrink_iters: 2048,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    if let Err(e) = runner.run(strategy, test) {
        panic!("fuzz target {name} failed (seed {seed:02x?}): {e}");
    }
}

/// 32 bytes that differ between calls and runs (std's per-process random hash keys).
fn random_seed() -> [u8; 32] {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut out = [0u8; 32];
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    for chunk in out.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(nanos);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}
