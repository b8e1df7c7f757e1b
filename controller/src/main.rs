//! The controller binary. Not built yet.

fn main() -> std::process::ExitCode {
    eprintln!("controller: not implemented yet");
    std::process::ExitCode::from(2)
}
