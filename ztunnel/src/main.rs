//! The ztunnel binary. Not built yet.

fn main() -> std::process::ExitCode {
    eprintln!("ztunnel: not implemented yet");
    std::process::ExitCode::from(2)
}
