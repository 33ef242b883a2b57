//! Samba's configuration for the controller: the shares as the historic design had them
//! (guest access mapped to root, writable), every state folder in a private tmpfs.

use super::Share;
use std::path::Path;

pub fn smb_conf(shares: &[Share], run_dir: &Path) -> String {
    let d = |sub: &str| run_dir.join(sub).display().to_string();
    let mut s = format!(
        "[global]\n\
         security = user\n\
         map to guest = Bad User\n\
         guest account = root\n\
         server min protocol = SMB2\n\
         server role = standalone server\n\
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
            "[{}]\n path = {}\n read only = no\n guest ok = yes\n force user = root\n create mask = 0644\n directory mask = 0755\n\n",
            share.name,
            share.path.display()
        ));
    }
    s
}

pub const STATE_DIRS: &[&str] = &["private", "lock", "state", "cache", "pid", "ncalrpc", "binddns"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_guest_writable() {
        let conf = smb_conf(&[Share { name: "nixstore".into(), path: "/nix/store".into() }], Path::new("/run/x"));
        assert!(conf.contains("[nixstore]\n path = /nix/store\n read only = no\n guest ok = yes"));
        assert!(conf.contains("guest account = root"));
        assert!(conf.contains("private dir = /run/x/private"));
    }
}
