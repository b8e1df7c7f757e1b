//! The waypoint binary. Not built yet: see the waypoint issue.

fn main() -> std::process::ExitCode {
    eprintln!(
        "waypoint: the L7 proxy is not implemented yet; Ambit runs without waypoints for now"
    );
    std::process::ExitCode::from(2)
}
