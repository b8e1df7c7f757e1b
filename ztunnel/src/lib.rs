//! Ambit's node proxy: captures enrolled pods' traffic and carries it between nodes over HBONE, enforcing L4 policy.
