//! The builder of nix-winvm's derivations. See `nix_winvm::builder`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match nix_winvm::builder::main_with_args(&args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("nix-winvm-builder: error: {e}");
            std::process::exit(1);
        }
    }
}
