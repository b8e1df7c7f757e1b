//! Shared fixtures for Ambit's end-to-end tests: a builder of nodes and pods as network
//! namespaces, cleaned up when the test ends (also when it panics).
