//! The builder of nix-winvm's derivations. See `src/builder`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match nix_winvm::main_with_args(&args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // Which stage failed leads: a build log may hold several.
            let what = nix_winvm::Subcommand::parse(&args).map(|sub| format!(" {}", sub.doing())).unwrap_or_default();
            eprintln!("nix-winvm-builder: error{what}: {e}");
            std::process::exit(e.exit_code());
        }
    }
}
