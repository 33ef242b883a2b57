//! Samba's configuration for the controller: writable shares behind one real account, every
//! state folder in a private tmpfs.
//!
//! Guests log on as `Administrator` with the image's password
//! ([`crate::spec::WindowsOptions::ADMIN_PASSWORD`]), in authenticated, signed sessions. No
//! guest access: Windows refuses unsigned guest sessions (Windows 11 24H2 requires signing),
//! and a Windows logon made by Cygwin's sshd only reaches a share with real credentials.
//!
//! smbd runs chrooted into the builder's view of the file system, which has no smbpasswd or
//! pdbedit and whose /etc/passwd knows only a few users (root among them). So the account is
//! written here as an smbpasswd file (the NT hash is MD4 of the UTF-16LE password), and a
//! username map makes the client's `Administrator` the unix user `root`.

use crate::format::md4;
use crate::protocol::Share;
use std::io;
use std::path::{Path, PathBuf};

/// The account guests authenticate as: the guests' SSH user, the Windows built-in account.
pub const ACCOUNT: &str = "Administrator";
/// The unix user the account is mapped to; every sandbox's /etc/passwd has it.
const UNIX_USER: &str = "root";
const UNIX_UID: u32 = 0;

/// Files next to smb.conf in the run folder.
const SMBPASSWD: &str = "private/smbpasswd";
const USERNAME_MAP: &str = "username.map";
const SMB_CONF: &str = "smb.conf";

pub const STATE_DIRS: &[&str] = &["private", "lock", "state", "cache", "pid", "ncalrpc", "binddns"];

/// The share of the store alone, which the guest only reads.
const STORE_SHARE: &str = "nixstore";

/// Every share but the store's is served without oplocks or leases: what the guest writes
/// last before it is killed (a verdict, `layer-failed`) must be on the controller's disk when
/// its write returns, not in the guest's cache behind a write lease or an exclusive oplock.
/// The exchange folder is the `xchg` share in a direct run and a folder of the session share
/// in a ready pair, which carries the store as well: Samba can switch oplocks off only per
/// share or per file name (`veto oplock files` matches a path's last component), so that share
/// loses the Windows guest's read cache of the store too. (The standin's client caches reads
/// whatever the oplocks, and sends each write at once where it holds no write lease: see its
/// mount options, `guest::standin`.)
///
/// `oplocks` and `level2 oplocks` are share parameters. `smb2 leases` is global only (testparm
/// says "Global parameter smb2 leases found in service section!"), and Samba grants a lease
/// only where oplocks are on: with `oplocks = no` smbd drops every oplock and lease request on
/// the share's opens (source3/smbd/open.c). So leases stay on globally, for the store's share.
fn guest_may_cache(share: &Share) -> bool {
    share.name == STORE_SHARE
}

/// Writes everything smbd needs into `run_dir` (its state folders, the account, the username
/// map and smb.conf) and returns the path of smb.conf. Errors name the file.
pub fn write_config(shares: &[Share], run_dir: &Path) -> io::Result<PathBuf> {
    let named = |path: &Path, what: &str| {
        let shown = path.display().to_string();
        let what = what.to_owned();
        move |e: io::Error| io::Error::new(e.kind(), format!("{what} {shown}: {e}"))
    };
    for d in STATE_DIRS {
        let dir = run_dir.join(d);
        std::fs::create_dir_all(&dir).map_err(named(&dir, "creating"))?;
    }
    let smbpasswd = run_dir.join(SMBPASSWD);
    write_private(&smbpasswd, smbpasswd_line(crate::spec::WindowsOptions::ADMIN_PASSWORD).as_bytes())
        .map_err(named(&smbpasswd, "writing"))?;
    let map = run_dir.join(USERNAME_MAP);
    std::fs::write(&map, username_map()).map_err(named(&map, "writing"))?;
    let conf = run_dir.join(SMB_CONF);
    std::fs::write(&conf, smb_conf(shares, run_dir)).map_err(named(&conf, "writing"))?;
    Ok(conf)
}

/// Readable by root alone, like any password file (smbd runs as root).
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(bytes)
}

pub fn smb_conf(shares: &[Share], run_dir: &Path) -> String {
    let d = |sub: &str| run_dir.join(sub).display().to_string();
    let mut s = format!(
        "[global]\n\
         security = user\n\
         server role = standalone server\n\
         passdb backend = smbpasswd:{smbpasswd}\n\
         username map = {username_map}\n\
         # Only the account: unknown users and bad passwords fail, nobody becomes a guest.\n\
         map to guest = Never\n\
         restrict anonymous = 2\n\
         ntlm auth = ntlmv2-only\n\
         # Windows 11 24H2 requires signed sessions; every client here signs.\n\
         server signing = mandatory\n\
         server min protocol = SMB2\n\
         workgroup = WORKGROUP\n\
         interfaces = {controller}/24 lo\n\
         bind interfaces only = no\n\
         disable netbios = yes\n\
         smb ports = 445\n\
         load printers = no\n\
         printing = bsd\n\
         printcap name = /dev/null\n\
         disable spoolss = yes\n\
         private dir = {private}\n\
         lock directory = {lock}\n\
         state directory = {state}\n\
         cache directory = {cache}\n\
         pid directory = {pid}\n\
         ncalrpc dir = {ncalrpc}\n\
         binddns dir = {binddns}\n\
         log file = {log}\n\
         log level = 1\n\
         # Large outputs: let the client write big blocks.\n\
         use sendfile = yes\n\
         strict sync = no\n\
         \n",
        smbpasswd = d(SMBPASSWD),
        username_map = d(USERNAME_MAP),
        controller = crate::spec::CONTROLLER_IP,
        private = d("private"),
        lock = d("lock"),
        state = d("state"),
        cache = d("cache"),
        pid = d("pid"),
        ncalrpc = d("ncalrpc"),
        binddns = d("binddns"),
        log = d("smbd.log"),
    );
    for share in shares {
        s.push_str(&format!(
            "[{}]\n path = {}\n read only = no\n valid users = {UNIX_USER}\n force user = {UNIX_USER}\n create mask = 0644\n directory mask = 0755\n",
            share.name,
            share.path.display()
        ));
        if !guest_may_cache(share) {
            s.push_str(" oplocks = no\n level2 oplocks = no\n");
        }
        s.push('\n');
    }
    s
}

/// Samba looks the client's name up in this map before its password database.
fn username_map() -> String {
    format!("{UNIX_USER} = {ACCOUNT}\n")
}

/// The account's line of an smbpasswd file: name, uid, LM hash (none: 32 'X'), NT hash,
/// account flags (U: a user; X: the password never expires) and the last change, which must
/// not be 0 (Samba reads 0 as "must change the password at the next logon").
fn smbpasswd_line(password: &str) -> String {
    let nt = nt_hash(password).iter().map(|b| format!("{b:02X}")).collect::<String>();
    format!("{UNIX_USER}:{UNIX_UID}:{}:{nt}:[UX         ]:LCT-{PASSWORD_SET_AT:08X}:\n", "X".repeat(32))
}

/// 2024-01-01T00:00:00Z, a fixed "password last set" time: the file is the same at every start.
const PASSWORD_SET_AT: u32 = 1_704_067_200;

/// The NT hash of a password: MD4 of its UTF-16LE encoding.
pub fn nt_hash(password: &str) -> [u8; 16] {
    let utf16: Vec<u8> = password.encode_utf16().flat_map(u16::to_le_bytes).collect();
    md4::digest(&utf16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn nt_hash_is_md4_of_utf16le() {
        // The well-known NT hash of "password".
        assert_eq!(hex(&nt_hash("password")), "8846f7eaee8fb117ad06bdd830b7586c");
        // Beyond ASCII: UTF-16LE, not the UTF-8 bytes.
        assert_eq!(nt_hash("é"), md4::digest(&[0xe9, 0x00]));
    }

    #[test]
    fn the_account_is_root_with_the_images_password_and_no_lm_hash() {
        let line = smbpasswd_line(crate::spec::WindowsOptions::ADMIN_PASSWORD);
        let fields: Vec<&str> = line.trim_end().split(':').collect();
        assert_eq!(fields.len(), 7, "{line}");
        assert_eq!(&fields[..2], ["root", "0"]);
        assert_eq!(fields[2], "X".repeat(32));
        assert_eq!(fields[3], hex(&nt_hash(crate::spec::WindowsOptions::ADMIN_PASSWORD)).to_uppercase());
        assert_eq!(fields[4], "[UX         ]", "11 flag characters between the brackets");
        assert_eq!(fields[5], "LCT-65920080");
        assert_eq!(fields[6], "");
        assert_eq!(username_map(), "root = Administrator\n");
    }

    #[test]
    fn shares_need_the_account_and_signing() {
        let conf = smb_conf(&[Share { name: "nixstore".into(), path: "/nix/store".into() }], Path::new("/run/x"));
        assert!(
            conf.contains("[nixstore]\n path = /nix/store\n read only = no\n valid users = root\n force user = root\n")
        );
        assert!(conf.contains("\npassdb backend = smbpasswd:/run/x/private/smbpasswd\n"));
        assert!(conf.contains("\nusername map = /run/x/username.map\n"));
        assert!(conf.contains("\nmap to guest = Never\n"));
        assert!(conf.contains("\nserver signing = mandatory\n"));
        assert!(conf.contains("\nserver min protocol = SMB2\n"));
        assert!(!conf.contains("guest ok"));
        assert!(!conf.contains("guest account"));
        assert!(conf.contains("private dir = /run/x/private"));
    }

    #[test]
    fn write_config_writes_every_file_it_names() {
        let run = tempfile::tempdir().unwrap();
        let conf = write_config(&[Share { name: "xchg".into(), path: "/tmp/xchg".into() }], run.path()).unwrap();
        assert_eq!(conf, run.path().join("smb.conf"));
        let text = std::fs::read_to_string(&conf).unwrap();
        for key in ["passdb backend = smbpasswd:", "username map = "] {
            let line = text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key}"));
            assert!(Path::new(&line[key.len()..]).is_file(), "{line}");
        }
        for d in STATE_DIRS {
            assert!(run.path().join(d).is_dir(), "{d}");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(run.path().join(SMBPASSWD)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn write_config_errors_name_the_file() {
        let run = tempfile::tempdir().unwrap();
        let blocker = run.path().join("file");
        std::fs::write(&blocker, "").unwrap();
        let err = write_config(&[], &blocker).unwrap_err();
        assert!(err.to_string().starts_with(&format!("creating {}/private: ", blocker.display())), "{err}");
    }

    /// Item: the guest's last write to the exchange folder must reach the controller's disk
    /// before the guest is killed: no oplock or lease may let the guest cache it.
    #[test]
    fn the_exchange_is_served_without_oplocks_or_leases() {
        let shares = [
            Share { name: "nixstore".into(), path: "/nix/store".into() },
            Share { name: "xchg".into(), path: "/tmp/xchg".into() },
            Share { name: crate::spec::SESSION_SHARE.into(), path: "/srv".into() },
            Share { name: "out".into(), path: "/out".into() },
        ];
        let conf = smb_conf(&shares, Path::new("/run/x"));
        let section = |name: &str| {
            let start = conf.find(&format!("[{name}]\n")).unwrap_or_else(|| panic!("no [{name}]"));
            let end = conf[start..].find("\n\n").map_or(conf.len(), |end| start + end + 1);
            conf[start..end].to_string()
        };
        for name in ["xchg", "winvm", "out"] {
            assert!(section(name).ends_with(" directory mask = 0755\n oplocks = no\n level2 oplocks = no\n"), "{conf}");
        }
        assert!(!section("nixstore").contains("oplocks"), "{conf}");
        // Global only, and implied on these shares by `oplocks = no`: never in a share.
        assert!(!conf.contains("smb2 leases"), "{conf}");

        // Samba's own reading of the file, where its tool is at hand.
        let found = std::process::Command::new("sh")
            .args(["-c", "command -v testparm >/dev/null 2>&1"])
            .status()
            .is_ok_and(|status| status.success());
        if crate::tools::test_requires("testparm", found) {
            let run = tempfile::tempdir().unwrap();
            let path = run.path().join("smb.conf");
            std::fs::write(&path, &conf).unwrap();
            let value = |section: &str, parameter: &str| {
                let output = std::process::Command::new("testparm")
                    .args(["-s", "--section-name", section, "--parameter-name", parameter])
                    .arg(&path)
                    .output()
                    .expect("testparm runs");
                String::from_utf8_lossy(&output.stdout).trim().to_string()
            };
            assert_eq!(
                [value("winvm", "oplocks"), value("winvm", "level2 oplocks"), value("nixstore", "oplocks")],
                ["No", "No", "Yes"]
            );
        }
    }

    /// The password travels inside mount options (standin) and shell words: keep it plain.
    #[test]
    fn the_password_needs_no_quoting_anywhere() {
        let p = crate::spec::WindowsOptions::ADMIN_PASSWORD;
        assert!(p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{p}");
    }
}
