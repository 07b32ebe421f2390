//! The `fastrm` command: everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    fastrm::cli::main()
}
