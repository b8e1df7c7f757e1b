//! `ambitctl`'s library side: what other crates reuse from the command-line tool.
//!
//! Only the local mesh's building blocks live here ([`local`]): the network plumbing that
//! makes nodes and pods out of network namespaces is shared with the end-to-end test fixture
//! (`ambit-tests`), so the namespaces `ambitctl up` builds and the ones tests build are made by
//! the same code. The subcommands themselves stay in the binary.

pub mod local;
