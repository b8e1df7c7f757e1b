//! ambitctl. Not built yet.

fn main() -> std::process::ExitCode {
    eprintln!("ambitctl: not implemented yet");
    std::process::ExitCode::from(2)
}
