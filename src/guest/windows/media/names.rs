//! Names on the second install medium (`cygwin.img`). They are the contract between the
//! media assembly, which puts the files there, the answer file, which finds the medium by
//! [`MARKER`], and the scripts, which find their siblings next to themselves; keeping them
//! apart from the assembly lets the generators use them without depending on it.

pub const MARKER: &str = "nix-winvm-cygwin.marker";
pub const INSTALL_CMD: &str = "install.cmd";
pub const BOOTSTRAP_SH: &str = "bootstrap.sh";
pub const CYGWIN_SETUP_EXE: &str = "setup-x86_64.exe";
pub const CYGWIN_PACKAGES_DIR: &str = "cygwin-packages";
