//! Measurement helpers shared by Ambit's benchmarks (`bench/src/bin/*`).
