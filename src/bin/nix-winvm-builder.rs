//! The builder of nix-winvm's derivations. See `nix_winvm::builder`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match nix_winvm::builder::main_with_args(&args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // Which stage failed leads: a build log may hold several.
            let what = match args.first().map(String::as_str) {
                Some(stage @ ("media" | "install" | "suspend" | "layer" | "pin" | "build")) => {
                    format!(" in the {stage} stage")
                }
                Some(
                    command @ ("run" | "rerun" | "shell" | "agent" | "agent-ready" | "state-read" | "state-write"),
                ) => {
                    format!(" in '{command}'")
                }
                _ => String::new(),
            };
            eprintln!("nix-winvm-builder: error{what}: {e}");
            std::process::exit(e.exit_code());
        }
    }
}
