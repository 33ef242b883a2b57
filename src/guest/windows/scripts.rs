//! The scripts the guest runs: `install.cmd` (cmd.exe, first logon), `bootstrap.sh` (Cygwin
//! bash, right after) and the share mapping (Cygwin bash, over SSH at the suspend stage).
//!
//! Before SSH works the serial console is the host's only window into the guest, so the
//! install reports each step there as a line starting with [`INSTALL_MARKER_PREFIX`], and its
//! last act on success is [`INSTALL_OK_LINE`]. The install stage treats a powered-off guest
//! without that line as a failed install and shows the serial log.

use super::cygwin::REQUIRED_PACKAGES;
use super::media::names;
use super::{
    WindowsOptions, CONTROLLER_IP, CYGWIN_ROOT, FIREWALL_RULE_NAME, FIRST_NIC_ALIAS, GUEST_IP, INSTALL_MARKER_PREFIX,
    NETWORK_MASK, NETWORK_PREFIX_LEN, SSH_USER,
};

pub const INSTALL_OK_LINE: &str = "nix-winvm-install: ok";

/// Where install.cmd keeps its log and its copy of the Cygwin packages.
pub const INSTALL_WORK_DIR: &str = r"C:\nix-winvm";
/// The bootstrap's copy inside the installed Cygwin, left there for debugging.
pub const BOOTSTRAP_PATH_IN_CYGWIN: &str = "/etc/nix-winvm/bootstrap.sh";

/// (share name, Cygwin mount point)
/// The folders of the controller's session share and where Cygwin mounts them.
pub const SHARES: [(&str, &str); 2] = [("winvm/store", "/nix/store"), ("winvm/xchg", "/tmp/xchg")];

/// Cygwin's package database: one line per installed package, its name first.
pub const CYGWIN_INSTALLED_DB: &str = "/etc/setup/installed.db";

/// Cygwin's setup exits with this (its message id IDS_REBOOT_REQUIRED) when it left files in
/// use to be replaced at the next restart; it never returns Windows' 3010.
pub const CYGWIN_SETUP_REBOOT_EXIT: u32 = 118;

/// The guest's folders Defender leaves alone: Cygwin, the install's own folder, the
/// controller's session share by UNC path (the store and the exchange folder are folders of
/// it), and the builds' temporary folder (TMPDIR=/tmp in Cygwin, under its root).
pub fn defender_exclusions() -> Vec<String> {
    vec![
        CYGWIN_ROOT.to_string(),
        INSTALL_WORK_DIR.to_string(),
        format!(r"\\{CONTROLLER_IP}\{}", crate::spec::SESSION_SHARE),
        format!(r"{CYGWIN_ROOT}\tmp"),
    ]
}

/// (registry key, DWORD value name, value) the bootstrap sets and reads back.
pub const MACHINE_DWORDS: [(&str, &str, u32); 2] = [
    // Win32 paths longer than MAX_PATH (260) for programs that declare longPathAware: a store
    // path through the share's UNC name already takes about 60 of them.
    (r"HKLM\SYSTEM\CurrentControlSet\Control\FileSystem", "LongPathsEnabled", 1),
    // No automatic maintenance: the clock jumps forward at every revive, and the Task
    // Scheduler would run the maintenance it believes it missed during the build.
    (r"HKLM\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Schedule\Maintenance", "MaintenanceDisabled", 1),
];

/// What install.cmd asks Cygwin's setup for besides the Base category, and what the bootstrap
/// then finds in [`CYGWIN_INSTALLED_DB`]: [`REQUIRED_PACKAGES`] and the image's
/// `cygwinPackages`, sorted, each once.
pub fn requested_packages(opts: &WindowsOptions) -> Vec<&str> {
    let mut packages: Vec<&str> = REQUIRED_PACKAGES.to_vec();
    packages.extend(opts.cygwin_packages.iter().map(String::as_str));
    packages.sort_unstable();
    packages.dedup();
    packages
}

/// Runs once, as Administrator, right after Cygwin is installed. Ends by powering the VM off,
/// whether it succeeded or not, so the install stage never waits for a timeout.
pub fn bootstrap_sh(authorized_key: &str, opts: &WindowsOptions) -> String {
    let mut script = String::new();
    let quoted_key = crate::shell::quote(authorized_key);
    let quoted_password = crate::shell::quote(WindowsOptions::ADMIN_PASSWORD);
    let ok_word = INSTALL_OK_LINE.strip_prefix(INSTALL_MARKER_PREFIX).map_or(INSTALL_OK_LINE, str::trim);
    let prefix = INSTALL_MARKER_PREFIX;
    let guest_address = GUEST_IP;
    let prefix_len = NETWORK_PREFIX_LEN;
    let mask = NETWORK_MASK;
    let cygwin_root = CYGWIN_ROOT;
    script.push_str(&format!(
        r#"#!/bin/bash
# nix-winvm bootstrap: configures sshd and the network once, at the first logon after Windows
# Setup, as Administrator in Cygwin's login bash. Generated; the same options give the same bytes.
set -Eeuo pipefail

readonly AUTHORIZED_KEY={quoted_key}
# The answer file gave {user} this password; Cygwin's logons use it (see store_logon_password).
readonly ADMIN_PASSWORD={quoted_password}
readonly LOG=/var/log/nix-winvm-bootstrap.log
SYSTEM32=$(cygpath -S)
readonly SYSTEM32
readonly POWERSHELL="$SYSTEM32/WindowsPowerShell/v1.0/powershell.exe"
mkdir -p /var/log

report() {{
    local line
    line="{prefix} $*"
    printf '%s\n' "$line" | tee -a "$LOG"
    # COM1 is the host's only view of the guest until SSH works; never let it block us.
    printf '%s\r\n' "$line" | timeout 5 dd of=/dev/ttyS0 status=none 2>/dev/null || true
}}

# Windows' own shutdown.exe: a Cygwin "shutdown" package would take other arguments.
power_off() {{
    sync
    "$SYSTEM32/shutdown.exe" /s /t 0 /f
}}

fail() {{
    trap - ERR
    report "failed: $*"
    power_off
    exit 1
}}

on_error() {{
    local status=$? line=$1
    fail "bootstrap line $line exited with status $status"
}}
trap 'on_error $LINENO' ERR

report "bootstrap started"

# Cygwin's setup exits 0 even when a package it was asked for is not on the medium (it only
# logs it), so each one is looked up in its package database, as the layers do.
check_installed_packages() {{
    local p missing=''
    for p in "$@"; do
        awk -v p="$p" '$1 == p {{ found = 1 }} END {{ exit !found }}' {installed_db} || missing="$missing $p"
    done
    [ -z "$missing" ] ||
        fail "Cygwin's setup finished, but these packages are not installed:$missing (see /var/log/setup.log.full)"
}}
check_installed_packages {requested}
report "Cygwin packages installed: {requested}"

# The controller logs in as this account with the key generated for this image.
home=${{HOME:-/home/$(id -un)}}
mkdir -p "$home/.ssh"
printf '%s\n' "$AUTHORIZED_KEY" >"$home/.ssh/authorized_keys"
chmod go-w "$home"
chmod 700 "$home/.ssh"
chmod 600 "$home/.ssh/authorized_keys"

# A key login gives Cygwin's sshd no password, so it switches to the user with an S4U logon,
# which carries no network credentials: the controller's shares would refuse every build.
# With the password in the LSA's private data (passwd -R), Cygwin logs the user on with it
# instead, and the logon reaches the shares as {user}. passwd asks twice, on the terminal
# when there is one: setsid leaves it none, so it reads the two lines from stdin. Without
# setsid it would read the console's /dev/tty until the time-out: no setsid, no install.
store_logon_password() {{
    local output status=0
    command -v setsid >/dev/null ||
        fail "setsid (Cygwin's util-linux package) is not installed: passwd -R would wait for the console; add util-linux to cygwinPackages"
    output=$(printf '%s\n%s\n' "$ADMIN_PASSWORD" "$ADMIN_PASSWORD" |
        timeout 60 setsid passwd -R {user} 2>&1) || status=$?
    printf '%s\n' "$output" >>"$LOG"
    [ "$status" = 0 ] || fail "passwd -R {user} exited with status $status (see $LOG)"
    # It reports a mismatch of the two entries with status 0.
    case $output in
        *"not identical"* | *"failed"*) fail "passwd -R {user} did not store the password (see $LOG)" ;;
    esac
}}
store_logon_password
report "{user}'s password stored for Cygwin's logons"

# sshd runs as SYSTEM with privilege separation; --yes answers every question. Its exit
# status is its count of warnings, not a verdict: the output goes to the log, and the service
# query and the port probe below decide.
if ! cygrunsrv --query cygsshd >/dev/null 2>&1; then
    config_status=0
    ssh-host-config --yes </dev/null >>"$LOG" 2>&1 || config_status=$?
    [ "$config_status" = 0 ] || report "note: ssh-host-config reported $config_status warnings (see $LOG)"
fi
# Windows ACLs inherited from {cygwin_root} can look group-writable to StrictModes, and this
# single-user VM without outside network gains nothing from the check.
sed -i -e '/^[#[:space:]]*StrictModes[[:space:]]/d' /etc/sshd_config
sed -i -e '1i StrictModes no' /etc/sshd_config

"$SYSTEM32/netsh.exe" advfirewall firewall delete rule name={rule} >/dev/null 2>&1 || true
"$SYSTEM32/netsh.exe" advfirewall firewall add rule name={rule} dir=in action=allow \
    protocol=TCP localport=22 profile=any >/dev/null || fail "firewall rule for sshd"

state=$(cygrunsrv --query cygsshd) || fail "cygsshd service is not installed"
case $state in
    *Running*) ;;
    *) cygrunsrv --start cygsshd || fail "cygrunsrv --start cygsshd" ;;
esac
timeout 30 bash -c 'until (exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null; do sleep 1; done' ||
    fail "sshd is not listening on port 22"
report "sshd is running"

# The image outlives the password's maximum age (42 days by default). Once the password has
# expired, Cygwin's logon with the stored password fails, sshd falls back to S4U, which has no
# network credentials, and every share refuses the builds.
# shellcheck disable=SC2016 # a PowerShell value, not a shell one.
"$POWERSHELL" -NoProfile -NonInteractive -Command \
    'Set-LocalUser -Name {user} -PasswordNeverExpires $true' </dev/null >>"$LOG" 2>&1 ||
    fail "Set-LocalUser -Name {user} -PasswordNeverExpires exited with status $? (see $LOG)"
# What net.exe says of the account: "Password expires" then "Never". Its words follow the
# display language; without that English line the account's own property decides.
password_never_expires() {{
    local listing line
    listing=$("$SYSTEM32/net.exe" user {user} 2>&1 | tr -d '\r') || return 1
    printf '%s\n' "$listing" >>"$LOG"
    while IFS= read -r line; do
        case $line in
            "Password expires "*) [ "${{line##* }}" = Never ]; return ;;
        esac
    done <<<"$listing"
    # shellcheck disable=SC2016 # PowerShell code, not shell.
    "$POWERSHELL" -NoProfile -NonInteractive -Command \
        'if ((Get-LocalUser -Name {user}).PasswordExpires) {{ exit 1 }} else {{ exit 0 }}' </dev/null >>"$LOG" 2>&1
}}
password_never_expires || fail "net user {user} does not say that the password never expires (see $LOG)"
report "{user}'s password never expires"

# The answer file sets the address only when the adapter had a driver and the alias
# "{nic}" during Setup; check the persistent configuration, which exists even while the
# link is down, and set the address here otherwise.
has_static_address() {{
    "$POWERSHELL" -NoProfile -NonInteractive -Command \
        'if (Get-NetIPAddress -IPAddress {guest_address} -PolicyStore PersistentStore -ErrorAction SilentlyContinue) {{ exit 0 }} else {{ exit 1 }}' \
        </dev/null >/dev/null 2>&1
}}
if ! has_static_address; then
    report "the answer file did not set {guest_address}; setting it with netsh"
    # shellcheck disable=SC2016 # PowerShell variables, not shell ones.
    "$SYSTEM32/netsh.exe" interface ipv4 set address name={nic} static {guest_address} {mask} ||
        "$POWERSHELL" -NoProfile -NonInteractive -Command \
            '$a = Get-NetAdapter -Physical | Sort-Object -Property ifIndex | Select-Object -First 1; Set-NetIPInterface -InterfaceIndex $a.ifIndex -Dhcp Disabled; New-NetIPAddress -InterfaceIndex $a.ifIndex -IPAddress {guest_address} -PrefixLength {prefix_len} | Out-Null' \
            </dev/null || true
    has_static_address || fail "could not give the first network adapter {guest_address}"
fi
report "network address {guest_address} configured"

# Repeated from the answer file, whose commands fail silently: a sleeping guest drops SSH.
"$SYSTEM32/powercfg.exe" /hibernate off || report "note: powercfg /hibernate off failed"
"$SYSTEM32/powercfg.exe" /change standby-timeout-ac 0 || report "note: powercfg standby failed"
# Scanning every file Cygwin, the store and the builds touch makes builds several times
# slower. Add-MpPreference takes UNC paths. Without Defender (removed, or another product)
# there is nothing to exclude from.
# shellcheck disable=SC2016 # PowerShell code, not shell.
"$POWERSHELL" -NoProfile -NonInteractive -Command {defender} </dev/null >>"$LOG" 2>&1 ||
    report "note: Defender settings not applied (see $LOG)"

# A DWORD under HKLM, set and read back.
set_machine_dword() {{
    local key=$1 name=$2 value=$3 listing found='' n t v
    "$SYSTEM32/reg.exe" add "$key" /v "$name" /t REG_DWORD /d "$value" /f >>"$LOG" 2>&1 ||
        fail "reg add $key /v $name exited with status $?"
    listing=$("$SYSTEM32/reg.exe" query "$key" /v "$name" 2>>"$LOG" | tr -d '\r') ||
        fail "reg query $key /v $name exited with status $?"
    while read -r n t v; do
        if [ "$n" = "$name" ] && [ "$t" = REG_DWORD ] && [ "$v" = "$(printf '0x%x' "$value")" ]; then found=1; fi
    done <<<"$listing"
    [ -n "$found" ] || fail "$key\\$name is not $value after reg add: $listing"
    report "$name = $value"
}}
{registry}
run_install_command() {{
    local index=$1 command=$2
    report "install command $index"
    bash -c "$command" </dev/null || fail "install command $index exited with status $?"
}}
"#,
        rule = FIREWALL_RULE_NAME,
        nic = FIRST_NIC_ALIAS,
        user = SSH_USER,
        installed_db = CYGWIN_INSTALLED_DB,
        requested = requested_packages(opts).iter().map(|name| crate::shell::quote(name)).collect::<Vec<_>>().join(" "),
        defender = crate::shell::quote(&defender_command()),
        registry = MACHINE_DWORDS
            .iter()
            .map(|(key, name, value)| format!("set_machine_dword {} {name} {value}\n", crate::shell::quote(key)))
            .collect::<String>(),
    ));
    for (index, command) in opts.install_commands.iter().enumerate() {
        // The command is data here; its own `$` and backquotes are for the inner bash.
        script.push_str("# shellcheck disable=SC2016\n");
        script.push_str(&format!("run_install_command {} {}\n", index + 1, crate::shell::quote(command)));
    }
    script.push_str(&format!(
        r#"
report "bootstrap finished"
report {ok_word}
power_off
"#
    ));
    script
}

/// The PowerShell command of the Defender settings: no scheduled scan (day 8 is "never"), and
/// [`defender_exclusions`], each a single-quoted PowerShell string.
fn defender_command() -> String {
    let paths: Vec<String> =
        defender_exclusions().iter().map(|path| format!("'{}'", path.replace('\'', "''"))).collect();
    format!("Set-MpPreference -ScanScheduleDay 8; Add-MpPreference -ExclusionPath {}", paths.join(","))
}

/// The guest's prepare command (see `Profile::prepare_command`): run by the controller at the
/// suspend stage, over the SSH connection it keeps open, as the account builds run as, in the
/// logon the builds run in.
pub fn map_shares_sh() -> String {
    let mut script = format!(
        r#"#!/bin/bash
# nix-winvm: makes the controller's Samba shares Cygwin mounts, by UNC path. Generated.
set -euo pipefail
SYSTEM32=$(cygpath -S)
readonly SYSTEM32

# Whether Cygwin lists the mount at $1 with the notexec option (in /proc/mounts: source,
# mount point, type, options).
mounted_notexec() {{
    local at options
    while read -r _ at _ options _; do
        [ "$at" = "$1" ] || continue
        case ",$options," in
            *,notexec,*) return 0 ;;
        esac
    done </proc/mounts
    return 1
}}

map_share() {{
    local share=$1 mount_point=$2
    local unc="//{controller}/$share"
    local fstab_line="$unc $mount_point smbfs binary,noacl 0 0"
    # No drive letter: letters belong to one logon session. The folder itself is not opened
    # here: the controller is saved with empty folders where each build mounts its own.
    # Cygwin's mount only records the path. -f: without it, mount gives a network share the
    # notexec option by itself, and then only .exe and .lnk files there are executable (a
    # script in the store would be "command not found" through PATH). The mount is made here,
    # in the logon the builds run in: Cygwin reads /etc/fstab once per user session.
    mkdir -p "$mount_point"
    umount "$mount_point" 2>/dev/null || true
    mount -f -o binary,noacl "$unc" "$mount_point"
    if mounted_notexec "$mount_point"; then
        echo "nix-winvm: Cygwin mounted $unc at $mount_point with notexec: scripts there would not run" >&2
        exit 1
    fi
    # For later sessions of the user (a new SSH logon), which read /etc/fstab at their start.
    if ! grep -qxF "$fstab_line" /etc/fstab; then
        printf '%s\n' "$fstab_line" >>/etc/fstab
    fi
}}

# The session share proves the logon can reach the controller with its own credentials:
# {user} and the password the bootstrap gave Cygwin (passwd -R). Without it sshd's logon has
# none, and Windows refuses the share.
session="//{controller}/{session_share}"
if ! ls -d "$session/." >/dev/null; then
    echo "nix-winvm: this SSH logon of $(id -un) cannot open $session; a logon without network" \
        "credentials (S4U: passwd -R did not store {user}'s password, or it is not the" \
        "account's password) or a refused SMB session (see the controller's smbd.log)" >&2
    exit 1
fi
# Held by this logon, which is the SSH connection the controller keeps open for the builds:
# the SMB session stays logged on, with this share's tree, across the save; each build's store
# and exchange folder are folders of it.
"$SYSTEM32/net.exe" use '\\{controller}\{session_share}' >/dev/null

"#,
        controller = CONTROLLER_IP,
        user = SSH_USER,
        session_share = crate::spec::SESSION_SHARE,
    );
    for (share, mount_point) in SHARES {
        script.push_str(&format!("map_share {share} {mount_point}\n"));
    }
    script
}

/// The `.cmd` at the root of the Cygwin medium. It copies the packages to the disk (Setup may
/// write beside them, which a CD refuses), installs Cygwin offline and runs the bootstrap.
/// Package names are validated by [`WindowsOptions::validate`]; they are escaped for cmd.exe
/// here as well, so an unvalidated name cannot run a command.
pub fn install_cmd(opts: &WindowsOptions) -> String {
    let package_list = requested_packages(opts).iter().map(|name| cmd_escape(name)).collect::<Vec<_>>().join(",");
    let work = INSTALL_WORK_DIR;
    let packages_dir = names::CYGWIN_PACKAGES_DIR;
    let setup_exe = names::CYGWIN_SETUP_EXE;
    let bootstrap = names::BOOTSTRAP_SH;
    let bootstrap_in_cygwin = BOOTSTRAP_PATH_IN_CYGWIN;
    let bootstrap_dir_windows = format!(r"{CYGWIN_ROOT}\etc\nix-winvm");
    let prefix = INSTALL_MARKER_PREFIX;
    let text = format!(
        r#"@echo off
rem nix-winvm: installs Cygwin offline from this medium, then runs the bootstrap, which powers
rem the VM off. Generated. Started from the answer file's first-logon commands.
setlocal
set "MEDIA=%~d0"
set "WORK={work}"
set "LOG=%WORK%\install.log"
if not exist "%WORK%" mkdir "%WORK%"
call :report started from %MEDIA%

xcopy "%MEDIA%\{packages_dir}" "%WORK%\{packages_dir}" /E /I /Q /Y >>"%LOG%" 2>&1
if errorlevel 1 goto copy_failed
copy /Y "%MEDIA%\{setup_exe}" "%WORK%\{setup_exe}" >>"%LOG%" 2>&1
if errorlevel 1 goto copy_failed

call :report installing Cygwin
rem --no-verify: the packages and setup.ini on this medium are pinned by hash on the host.
start "" /wait "%WORK%\{setup_exe}" --quiet-mode --no-verify --local-install --local-package-dir "%WORK%\{packages_dir}" --root "{root}" --packages {package_list} --no-desktop --no-shortcuts --no-startmenu
set "SETUP_EXIT=%ERRORLEVEL%"
rem Setup exits 0 even when a package failed (the bootstrap checks its database), and
rem {reboot} when it left files in use for a restart, which a fresh install never needs.
if "%SETUP_EXIT%"=="{reboot}" goto setup_restart
if not "%SETUP_EXIT%"=="0" goto setup_failed
if not exist "{root}\bin\bash.exe" goto setup_failed

if not exist "{bootstrap_dir_windows}" mkdir "{bootstrap_dir_windows}"
copy /Y "%MEDIA%\{bootstrap}" "{bootstrap_dir_windows}\bootstrap.sh" >>"%LOG%" 2>&1
if errorlevel 1 goto copy_failed
call :report running the bootstrap
"{root}\bin\bash.exe" --login {bootstrap_in_cygwin} >>"%LOG%" 2>&1
set "BOOTSTRAP_EXIT=%ERRORLEVEL%"
rem On success the bootstrap has already started the shutdown; only report a failure.
if not "%BOOTSTRAP_EXIT%"=="0" call :report failed: the bootstrap exited with code %BOOTSTRAP_EXIT%
exit /b %BOOTSTRAP_EXIT%

:copy_failed
call :report failed: copying from %MEDIA% to %WORK%, see %LOG%
exit /b 1

:setup_failed
call :report failed: Cygwin setup exited with code %SETUP_EXIT%, see {root}\var\log\setup.log.full
exit /b 1

:setup_restart
call :report failed: Cygwin setup exited with code {reboot}: it left files in use to be replaced at a restart, see {root}\var\log\setup.log.full
exit /b 1

:report
echo {prefix} %*
>>"%LOG%" echo {prefix} %*
rem COM1 is the host's only view of the guest until SSH works.
2>nul >COM1 echo {prefix} %*
exit /b 0
"#,
        root = CYGWIN_ROOT,
        reboot = CYGWIN_SETUP_REBOOT_EXIT,
    );
    // cmd.exe mis-parses labels and `goto` in files with bare LF line endings.
    text.replace('\n', "\r\n")
}

/// Escapes a bare (unquoted) word in a batch file: `%` doubles, other metacharacters take `^`.
fn cmd_escape(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    for c in word.chars() {
        match c {
            '%' => out.push_str("%%"),
            '^' | '&' | '|' | '<' | '>' | '(' | ')' | '"' => {
                out.push('^');
                out.push(c);
            }
            '\r' | '\n' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::windows::test_util::{temp_path, tool_available};
    use std::process::Command;

    const KEY: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBHx= o'brien@host";

    fn run_checked(tool: &str, args: &[&str], script: &str) {
        let path = temp_path("script.sh");
        std::fs::write(&path, script).expect("write temp script");
        let output = Command::new(tool).args(args).arg(&path).output();
        let _ = std::fs::remove_file(&path);
        let output = output.unwrap_or_else(|err| panic!("{tool} did not run: {err}"));
        assert!(
            output.status.success(),
            "{tool} {args:?} rejected the script:\n{}{}\n{script}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn check_shell(script: &str) {
        run_checked("bash", &["-n"], script);
        if tool_available("shellcheck") {
            run_checked("shellcheck", &["-s", "bash"], script);
        }
    }

    /// Runs one line of a generated script in a real bash, with `$1` printed back.
    fn bash_eval(prelude: &str, snippet: &str) -> String {
        let output = Command::new("bash").arg("-c").arg(format!("{prelude}\n{snippet}")).output().expect("bash runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).expect("utf-8")
    }

    /// The text of the shell function `name` in `script`, from `name() {` to its closing brace.
    fn function<'a>(script: &'a str, name: &str) -> &'a str {
        let start = script.find(&format!("\n{name}() {{\n")).unwrap_or_else(|| panic!("no function {name}")) + 1;
        let end = script[start..].find("\n}\n").expect("function end") + start + 3;
        &script[start..end]
    }

    /// A folder standing in for Windows' System32: each (name, body) becomes an executable
    /// shell script there. Removed when dropped.
    fn fake_system32(programs: &[(&str, &str)]) -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, body) in programs {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        dir
    }

    /// Runs `snippet` after `prelude` in bash and returns its exit status and stdout.
    fn bash_status(prelude: &str, snippet: &str) -> (i32, String) {
        let output = Command::new("bash").arg("-c").arg(format!("{prelude}\n{snippet}")).output().expect("bash runs");
        (output.status.code().unwrap_or(-1), String::from_utf8(output.stdout).expect("utf-8"))
    }

    /// A `fail` that prints its sentence and exits 1, as the bootstrap's ends the install.
    const FAKE_FAIL: &str = "fail() { echo \"FAIL: $*\"; exit 1; }\nreport() { echo \"REPORT: $*\"; }";

    fn options_with_tricky_commands() -> WindowsOptions {
        let mut opts = WindowsOptions::new("Windows 11 Pro");
        opts.install_commands = vec![
            "echo 'single' \"double\" $HOME `date` \\ end".to_string(),
            "cd /tmp &&\n  touch it's-here".to_string(),
        ];
        opts
    }

    #[test]
    fn bootstrap_is_valid_bash_and_passes_shellcheck() {
        check_shell(&bootstrap_sh(KEY, &options_with_tricky_commands()));
        check_shell(&bootstrap_sh(KEY, &WindowsOptions::new("Windows 10 Pro")));
    }

    #[test]
    fn bootstrap_embeds_the_key_verbatim() {
        let script = bootstrap_sh(KEY, &WindowsOptions::new("Windows 10 Pro"));
        let line = script.lines().find(|line| line.starts_with("readonly AUTHORIZED_KEY=")).expect("key line");
        assert_eq!(bash_eval(line, r#"printf '%s' "$AUTHORIZED_KEY""#), KEY);
    }

    #[test]
    fn bootstrap_reports_to_its_log_and_the_serial_port() {
        let script = bootstrap_sh(KEY, &WindowsOptions::new("Windows 10 Pro"));
        let start = script.find("report() {").expect("report function");
        let end = script[start..].find("\n}\n").expect("function end") + start + 3;
        let log = temp_path("bootstrap.log");
        let serial = temp_path("ttyS0");
        let function = script[start..end].replace("/dev/ttyS0", &serial.display().to_string());
        let printed = bash_eval(&format!("LOG={}\n{function}", log.display()), "report \"sshd is running\"");
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        let on_serial = std::fs::read_to_string(&serial).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_file(&serial);
        assert_eq!(printed, "nix-winvm-install: sshd is running\n");
        assert_eq!(logged, printed);
        assert_eq!(on_serial, "nix-winvm-install: sshd is running\r\n");
    }

    #[test]
    fn bootstrap_passes_install_commands_through_unchanged() {
        let opts = options_with_tricky_commands();
        let script = bootstrap_sh(KEY, &opts);
        let calls: Vec<&str> = script.lines().filter(|line| line.starts_with("run_install_command ")).collect();
        // The second command spans two lines; re-join the script's own call text.
        let start = script.find("run_install_command 1 ").expect("first call");
        let end = script[start..].find("\n\nreport \"bootstrap finished\"").expect("end") + start;
        assert_eq!(calls.len(), 2);
        let printed = bash_eval(r#"run_install_command() { printf '<%s:%s>' "$1" "$2"; }"#, &script[start..end]);
        assert_eq!(printed, format!("<1:{}><2:{}>", opts.install_commands[0], opts.install_commands[1]));
    }

    #[test]
    fn ssh_host_configs_warning_count_is_logged_not_fatal() {
        let script = bootstrap_sh(KEY, &options_with_tricky_commands());
        assert!(script.contains("ssh-host-config --yes </dev/null >>\"$LOG\" 2>&1 || config_status=$?\n"));
        assert!(!script.contains("fail \"ssh-host-config\""));
        // What decides instead: the service, then the port.
        let query = script.find("state=$(cygrunsrv --query cygsshd) || fail").expect("service check");
        let probe = script.find("fail \"sshd is not listening on port 22\"").expect("port probe");
        assert!(script.find("ssh-host-config --yes").unwrap() < query && query < probe);
    }

    #[test]
    fn the_guest_keeps_its_smb_session_in_the_saved_pair_and_its_password_never_expires() {
        let script = bootstrap_sh(KEY, &options_with_tricky_commands());
        assert!(!script.contains("autodisconnect"), "configures the guest's own server, not its client");
        assert!(script.contains("'Set-LocalUser -Name Administrator -PasswordNeverExpires $true'"));
        let map = map_shares_sh();
        // The session share is opened and held by this logon (the one the builds run in).
        let probe = map.find("if ! ls -d \"$session/.\" >/dev/null; then").expect("probe");
        let held = map.find("\"$SYSTEM32/net.exe\" use '\\\\192.168.0.2\\winvm' >/dev/null").expect("held");
        assert!(probe < held, "{map}");
        assert!(!map.contains("/delete"), "the session is kept");
    }

    #[test]
    fn bootstrap_does_the_steps_in_order() {
        let script = bootstrap_sh(KEY, &options_with_tricky_commands());
        let order = [
            "authorized_keys",
            "\nstore_logon_password\n",
            "ssh-host-config --yes",
            "cygrunsrv --start cygsshd",
            "PasswordNeverExpires $true",
            "interface ipv4 set address name=Ethernet static 192.168.0.1 255.255.255.0",
            "run_install_command 1 ",
            "report \"bootstrap finished\"",
        ];
        let positions: Vec<usize> =
            order.iter().map(|needle| script.find(needle).unwrap_or_else(|| panic!("missing {needle}"))).collect();
        assert!(positions.windows(2).all(|pair| pair[0] < pair[1]), "{positions:?}");
        assert!(script.contains("\"$SYSTEM32/shutdown.exe\" /s /t 0 /f"));
        assert!(script.ends_with("report \"bootstrap finished\"\nreport ok\npower_off\n"));
        assert_eq!(INSTALL_OK_LINE, format!("{INSTALL_MARKER_PREFIX} ok"));
    }

    #[test]
    fn map_shares_is_valid_and_mounts_both_shares_by_unc_path_without_opening_them() {
        let script = map_shares_sh();
        check_shell(&script);
        assert!(script.contains("map_share winvm/store /nix/store\n"));
        assert!(script.contains("map_share winvm/xchg /tmp/xchg\n"));
        assert_eq!(SHARES[0].0, format!("{}/{}", crate::spec::SESSION_SHARE, crate::spec::SESSION_STORE));
        assert_eq!(SHARES[1].0, format!("{}/{}", crate::spec::SESSION_SHARE, crate::spec::SESSION_XCHG));
        assert!(script.contains("    local unc=\"//192.168.0.2/$share\"\n"));
        assert!(script.contains("    mount -f -o binary,noacl \"$unc\" \"$mount_point\"\n"));
        assert!(script.contains("grep -qxF \"$fstab_line\" /etc/fstab"));
        // The store and exchange shares are not opened before the save: each build's
        // controller serves new folders under those names.
        let body = function(&script, "map_share");
        assert!(!body.contains("ls "), "{body}");
        // The logon's own credentials are proven on the session share, and a failure says why.
        let probe = script.find("session=\"//192.168.0.2/winvm\"").expect("session share");
        assert!(probe < script.find("\nmap_share winvm/store").unwrap());
        assert!(script.contains("passwd -R did not store Administrator's password"));
    }

    #[test]
    fn map_shares_uses_no_drive_letter() {
        let script = map_shares_sh();
        let net_use: Vec<&str> = script.lines().filter(|line| line.contains("net.exe\" use")).collect();
        assert_eq!(
            net_use,
            ["\"$SYSTEM32/net.exe\" use '\\\\192.168.0.2\\winvm' >/dev/null"],
            "the session share alone"
        );
        assert!(!script.contains("/persistent"));
        assert!(!script.contains(":\\"), "no drive letter");
    }

    #[test]
    fn bootstrap_stores_the_password_for_cygwins_logons_before_sshd() {
        let script = bootstrap_sh(KEY, &WindowsOptions::new("Windows 11 Pro"));
        let line = script.lines().find(|line| line.starts_with("readonly ADMIN_PASSWORD=")).expect("password line");
        assert_eq!(bash_eval(line, r#"printf '%s' "$ADMIN_PASSWORD""#), WindowsOptions::ADMIN_PASSWORD);
        assert!(script.contains("timeout 60 setsid passwd -R Administrator 2>&1"));
        let stored = script.find("\nstore_logon_password\n").expect("called");
        assert!(stored < script.find("ssh-host-config --yes").unwrap());
        assert!(stored < script.find("cygrunsrv --start cygsshd").unwrap());
    }

    /// What the bootstrap feeds `passwd -R`, run against a stand-in that reads like Cygwin's
    /// getpass without a terminal: two lines from stdin, compared.
    #[test]
    fn bootstrap_gives_passwd_the_password_twice_and_catches_its_quiet_failures() {
        let script = bootstrap_sh(KEY, &WindowsOptions::new("Windows 11 Pro"));
        let start = script.find("store_logon_password() {").expect("function");
        let end = script[start..].find("\n}\n").expect("function end") + start + 3;
        let function = &script[start..end];
        let log = temp_path("passwd.log");
        let prelude = format!(
            "LOG={log}\nADMIN_PASSWORD={password}\nfail() {{ echo \"FAIL: $*\"; exit 1; }}\n{function}",
            log = log.display(),
            password = crate::shell::quote(WindowsOptions::ADMIN_PASSWORD),
        );
        // Shell functions only: no real timeout, setsid or passwd runs on the test machine.
        let fake =
            |body: &str| format!("timeout() {{ shift; \"$@\"; }}\nsetsid() {{ \"$@\"; }}\npasswd() {{ {body}; }}\n");
        let honest = fake(
            r#"[ "$1 $2" = "-R Administrator" ] || exit 9; read -r a; read -r b; [ "$a" = "$b" ] && echo "stored $a""#,
        );
        let output = bash_eval(&prelude, &format!("{honest}store_logon_password; echo done"));
        assert_eq!(output, "done\n");
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(logged, format!("stored {}\n", WindowsOptions::ADMIN_PASSWORD));
        let mismatch = fake("echo 'Password is not identical.' >&2");
        let output = bash_eval(&prelude, &format!("{mismatch}(store_logon_password) || true"));
        assert!(output.starts_with("FAIL: passwd -R Administrator did not store the password"), "{output}");
        let refused = fake("echo 'Storing password failed: Permission denied' >&2; return 1");
        let output = bash_eval(&prelude, &format!("{refused}(store_logon_password) || true"));
        assert!(output.starts_with("FAIL: passwd -R Administrator exited with status 1"), "{output}");
        let _ = std::fs::remove_file(&log);
    }

    #[test]
    fn map_shares_fstab_append_is_idempotent() {
        let script = map_shares_sh();
        let start = script.find("    local fstab_line=").expect("fstab line");
        let fstab_line_def = script[start..].lines().next().expect("line").trim();
        let fstab = temp_path("fstab");
        std::fs::write(&fstab, "none /cygdrive cygdrive binary,posix=0,user 0 0\n").expect("write");
        let append = format!(
            "unc=//192.168.0.2/nixstore; mount_point=/nix/store; {}\n\
             for _ in 1 2; do grep -qxF \"$fstab_line\" {f} || printf '%s\\n' \"$fstab_line\" >>{f}; done",
            fstab_line_def.trim_start_matches("local "),
            f = fstab.display()
        );
        bash_eval("", &append);
        let written = std::fs::read_to_string(&fstab).expect("read");
        let _ = std::fs::remove_file(&fstab);
        assert_eq!(
            written,
            "none /cygdrive cygdrive binary,posix=0,user 0 0\n\
             //192.168.0.2/nixstore /nix/store smbfs binary,noacl 0 0\n"
        );
    }

    #[test]
    fn install_cmd_runs_setup_offline_with_the_package_list() {
        let mut opts = WindowsOptions::new("Windows 10 Pro");
        opts.cygwin_packages = vec!["make".into(), "openssh".into(), "gcc-core".into()];
        let cmd = install_cmd(&opts);
        assert!(cmd.contains(
            r#"start "" /wait "%WORK%\setup-x86_64.exe" --quiet-mode --no-verify --local-install --local-package-dir "%WORK%\cygwin-packages" --root "C:\cygwin64" --packages cygrunsrv,gcc-core,make,openssh --no-desktop --no-shortcuts --no-startmenu"#
        ));
        assert!(cmd.contains(r#""C:\cygwin64\bin\bash.exe" --login /etc/nix-winvm/bootstrap.sh"#));
        assert!(cmd.contains(r#"copy /Y "%MEDIA%\bootstrap.sh""#));
        assert!(!cmd.replace("\r\n", "").contains('\n'), "CRLF line endings only");
        assert!(cmd.ends_with("exit /b 0\r\n"));
    }

    #[test]
    fn install_cmd_escapes_unvalidated_names() {
        let mut opts = WindowsOptions::new("Windows 10 Pro");
        opts.cygwin_packages = vec!["evil&calc".into(), "100%".into()];
        let cmd = install_cmd(&opts);
        assert!(cmd.contains("--packages 100%%,cygrunsrv,evil^&calc,openssh "));
    }

    /// Item: the store share mounted notexec. Cygwin's mount gives a network share `notexec`
    /// unless `-f` is given (winsup/utils/mount.cc, do_mount), and the mount made in the kept
    /// logon is the one builds see: fstab is read once per session.
    #[test]
    fn every_share_is_mounted_with_f_so_that_its_scripts_run() {
        let script = map_shares_sh();
        let mounts: Vec<&str> =
            script.lines().map(str::trim).filter(|line| line.split_whitespace().next() == Some("mount")).collect();
        assert_eq!(mounts, ["mount -f -o binary,noacl \"$unc\" \"$mount_point\""], "{script}");
        // The mount is unconditional and comes before /etc/fstab is touched: nothing relies
        // on fstab for the mount or its options.
        let body = function(&script, "map_share");
        let mount = body.find("    mount -f ").expect("mount");
        assert!(mount < body.find("grep -qxF \"$fstab_line\" /etc/fstab").expect("fstab"), "{body}");
        assert!(
            body[..mount].lines().map(str::trim).all(|line| line.starts_with('#') || !line.starts_with("if ")),
            "{body}"
        );
        assert!(!script.contains("notexec 0 0") && !script.contains("mount -a"), "{script}");
        // The outputs' own mounts in the build carry it too.
        assert!(super::super::outputs::REDIRECT_OUTPUTS.contains("mount -f -o binary "));

        // A mount that got notexec anyway stops the prepare command, read from Cygwin's
        // /proc/mounts; another mount's notexec does not.
        let check = function(&script, "mounted_notexec");
        let mounts = temp_path("mounts");
        std::fs::write(
            &mounts,
            "C:/cygwin64/bin /usr/bin ntfs binary,auto 1 1\n\
             //192.168.0.2/winvm/xchg /tmp/xchg smbfs binary,notexec,noacl,user 1 1\n\
             //192.168.0.2/winvm/store /nix/store smbfs binary,noacl,user 1 1\n",
        )
        .expect("write");
        let check = check.replace("/proc/mounts", &mounts.display().to_string());
        let answer = |at: &str| bash_status(&check, &format!("mounted_notexec {at}")).0;
        assert_eq!((answer("/nix/store"), answer("/tmp/xchg"), answer("/usr/bin")), (1, 0, 1));
        let _ = std::fs::remove_file(&mounts);
        let call = body.find("if mounted_notexec \"$mount_point\"; then").expect("checked");
        assert!(mount < call && body[call..].contains("exit 1"), "{body}");
    }

    /// Item: a failed Set-LocalUser was only a note. Now it ends the install, and `net user`
    /// must say "Never".
    #[test]
    fn the_password_never_expires_or_the_install_fails() {
        let script = bootstrap_sh(KEY, &WindowsOptions::new("Windows 11 Pro"));
        assert!(!script.contains("note: could not make"), "{script}");
        assert!(script.contains(
            "'Set-LocalUser -Name Administrator -PasswordNeverExpires $true' </dev/null >>\"$LOG\" 2>&1 ||\n    fail \"Set-LocalUser -Name Administrator -PasswordNeverExpires exited with status $? (see $LOG)\"\n"
        ));
        assert!(script.contains(
            "\npassword_never_expires || fail \"net user Administrator does not say that the password never expires (see $LOG)\"\n"
        ));
        let check = function(&script, "password_never_expires");
        let run = |net_output: &str, powershell_status: i32| {
            let system32 = fake_system32(&[
                ("net.exe", &format!("[ \"$1 $2\" = \"user Administrator\" ] || exit 9\nprintf '{net_output}'")),
                ("powershell.exe", &format!("echo powershell >&2; exit {powershell_status}")),
            ]);
            let log = temp_path("net.log");
            let prelude = format!(
                "SYSTEM32={}\nPOWERSHELL=$SYSTEM32/powershell.exe\nLOG={}\n{check}",
                system32.path().display(),
                log.display()
            );
            let (status, _) = bash_status(&prelude, "password_never_expires");
            let logged = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            (status, logged)
        };
        let listing = |expires: &str| {
            format!(
                "User name                    Administrator\\r\\nPassword last set            12/7/2026 1:02:03 AM\\r\\n\
                 Password expires             {expires}\\r\\nPassword changeable          12/7/2026 1:02:03 AM\\r\\n"
            )
        };
        let (status, logged) = run(&listing("Never"), 1);
        assert_eq!(status, 0, "{logged}");
        assert!(logged.contains("Password expires             Never\n"), "the listing is logged without CR: {logged}");
        assert_ne!(run(&listing("1/18/2027 1:02:03 AM"), 0).0, 0, "a date: it expires");
        // Another display language: the account's property decides.
        let german = "Benutzername                 Administrator\\r\\nKennwort l\\303\\244uft ab            Nie\\r\\n";
        assert_eq!(run(german, 0).0, 0);
        assert_ne!(run(german, 1).0, 0);
    }

    /// Item: setsid was used only if found; without it `passwd -R` reads the console.
    #[test]
    fn no_setsid_no_install() {
        let script = bootstrap_sh(KEY, &WindowsOptions::new("Windows 11 Pro"));
        let function = function(&script, "store_logon_password");
        assert!(!function.contains("detach"), "{function}");
        let log = temp_path("passwd.log");
        let prelude = format!(
            "LOG={}\nADMIN_PASSWORD=x\n{FAKE_FAIL}\ntimeout() {{ shift; \"$@\"; }}\npasswd() {{ cat >/dev/null; }}\n{function}",
            log.display()
        );
        // No setsid anywhere on PATH (the host's own util-linux included).
        let (status, output) = bash_status(&prelude, "PATH=/nonexistent; store_logon_password; echo stored");
        assert_eq!(status, 1);
        assert!(
            output.starts_with("FAIL: setsid (Cygwin's util-linux package) is not installed: passwd -R would wait for the console; add util-linux to cygwinPackages"),
            "{output}"
        );
        let (status, output) = bash_status(&prelude, "setsid() { \"$@\"; }; store_logon_password; echo stored");
        assert_eq!((status, output.as_str()), (0, "stored\n"));
        let _ = std::fs::remove_file(&log);
    }

    /// Items: long paths on, automatic maintenance off, each set with reg.exe and read back.
    #[test]
    fn long_paths_and_no_maintenance_are_set_and_read_back() {
        let script = bootstrap_sh(KEY, &options_with_tricky_commands());
        assert!(script.contains(
            "\nset_machine_dword 'HKLM\\SYSTEM\\CurrentControlSet\\Control\\FileSystem' LongPathsEnabled 1\n\
             set_machine_dword 'HKLM\\SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion\\Schedule\\Maintenance' MaintenanceDisabled 1\n"
        ));
        // Before the user's install commands, which may need either.
        assert!(script.find("set_machine_dword 'HKLM").unwrap() < script.find("\nrun_install_command 1 ").unwrap());
        let set = function(&script, "set_machine_dword");
        let run = |query_value: &str| {
            let calls = temp_path("reg-calls");
            let system32 = fake_system32(&[(
                "reg.exe",
                &format!(
                    "echo \"$*\" >>{calls}\n\
                     if [ \"$1\" = query ]; then printf '\\r\\n%s\\r\\n    %s    REG_DWORD    {query_value}\\r\\n\\r\\n' \"$2\" \"$4\"; fi",
                    calls = calls.display()
                ),
            )]);
            let prelude = format!("SYSTEM32={}\nLOG=/dev/null\n{FAKE_FAIL}\n{set}", system32.path().display());
            let result = bash_status(
                &prelude,
                "set_machine_dword 'HKLM\\SYSTEM\\CurrentControlSet\\Control\\FileSystem' LongPathsEnabled 1",
            );
            let called = std::fs::read_to_string(&calls).unwrap_or_default();
            let _ = std::fs::remove_file(&calls);
            (result, called)
        };
        let ((status, output), called) = run("0x1");
        assert_eq!((status, output.as_str()), (0, "REPORT: LongPathsEnabled = 1\n"));
        assert_eq!(
            called,
            "add HKLM\\SYSTEM\\CurrentControlSet\\Control\\FileSystem /v LongPathsEnabled /t REG_DWORD /d 1 /f\n\
             query HKLM\\SYSTEM\\CurrentControlSet\\Control\\FileSystem /v LongPathsEnabled\n"
        );
        for wrong in ["0x0", "0x10"] {
            let ((status, output), _) = run(wrong);
            assert_eq!(status, 1, "{wrong}");
            assert!(
                output.starts_with(
                    "FAIL: HKLM\\SYSTEM\\CurrentControlSet\\Control\\FileSystem\\LongPathsEnabled is not 1 after reg add"
                ),
                "{output}"
            );
        }
    }

    /// Item: Cygwin's setup exits 0 when packages failed, 118 when it needs a restart.
    #[test]
    fn setup_results_are_checked_in_its_database() {
        let mut opts = WindowsOptions::new("Windows 10 Pro");
        opts.cygwin_packages = vec!["make".into(), "gcc-core".into()];
        let cmd = install_cmd(&opts);
        assert!(!cmd.contains("3010"), "{cmd}");
        assert!(cmd.contains(
            "if \"%SETUP_EXIT%\"==\"118\" goto setup_restart\r\nif not \"%SETUP_EXIT%\"==\"0\" goto setup_failed\r\n"
        ));
        assert!(cmd.contains(":setup_restart\r\ncall :report failed: Cygwin setup exited with code 118: "));
        let script = bootstrap_sh(KEY, &opts);
        assert!(script.contains("\ncheck_installed_packages cygrunsrv gcc-core make openssh\n"), "{script}");
        // First: nothing else runs on a Cygwin that lacks what was asked for.
        assert!(script.find("\ncheck_installed_packages ").unwrap() < script.find("\nstore_logon_password\n").unwrap());
        let check = function(&script, "check_installed_packages");
        let db = temp_path("installed.db");
        std::fs::write(
            &db,
            "INSTALLED.DB 3\nbash bash-5.2.21-1-x86_64.tar.xz 0\ncygrunsrv cygrunsrv-1.62-1.tar.xz 1\n\
             gcc-core-extra gcc-core-extra-1.tar.xz 1\nopenssh openssh-9.9p1-1-x86_64.tar.xz 1\n",
        )
        .expect("write");
        let prelude = format!("{FAKE_FAIL}\n{}", check.replace(CYGWIN_INSTALLED_DB, &db.display().to_string()));
        let (status, output) = bash_status(&prelude, "check_installed_packages cygrunsrv gcc-core make openssh");
        assert_eq!(status, 1);
        assert_eq!(
            output,
            "FAIL: Cygwin's setup finished, but these packages are not installed: gcc-core make (see /var/log/setup.log.full)\n"
        );
        assert_eq!(bash_status(&prelude, "check_installed_packages openssh cygrunsrv bash").0, 0);
        let _ = std::fs::remove_file(&db);
    }

    /// Item: background work during builds.
    #[test]
    fn defender_leaves_the_store_the_install_and_the_temp_folder_alone() {
        assert_eq!(
            defender_exclusions(),
            [r"C:\cygwin64", r"C:\nix-winvm", r"\\192.168.0.2\winvm", r"C:\cygwin64\tmp"]
        );
        let script = bootstrap_sh(KEY, &WindowsOptions::new("Windows 11 Pro"));
        let line = script
            .lines()
            .find(|line| line.starts_with("\"$POWERSHELL\"") && line.contains("Add-MpPreference"))
            .unwrap_or_else(|| panic!("no Add-MpPreference in {script}"));
        assert_eq!(
            line,
            r#""$POWERSHELL" -NoProfile -NonInteractive -Command 'Set-MpPreference -ScanScheduleDay 8; Add-MpPreference -ExclusionPath '\''C:\cygwin64'\'','\''C:\nix-winvm'\'','\''\\192.168.0.2\winvm'\'','\''C:\cygwin64\tmp'\''' </dev/null >>"$LOG" 2>&1 ||"#
        );
        // What PowerShell receives, once bash has taken its quotes off.
        let argument = bash_eval(
            "",
            &format!("printf '%s' {}", &line[line.find("-Command ").unwrap() + 9..line.find(" </dev/null").unwrap()]),
        );
        assert_eq!(
            argument,
            r"Set-MpPreference -ScanScheduleDay 8; Add-MpPreference -ExclusionPath 'C:\cygwin64','C:\nix-winvm','\\192.168.0.2\winvm','C:\cygwin64\tmp'"
        );
        assert!(script.contains("set_machine_dword 'HKLM\\SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion\\Schedule\\Maintenance' MaintenanceDisabled 1\n"));
    }

    #[test]
    fn quoted_words_round_trip_through_bash() {
        for value in ["", "plain", "it's", "'", "a'b'c", "$(rm -rf /) `x` \\ \"q\"", "line\nbreak"] {
            let printed = bash_eval("", &format!("printf '%s' {}", crate::shell::quote(value)));
            assert_eq!(printed, value);
        }
    }

    #[test]
    fn scripts_are_deterministic() {
        let opts = options_with_tricky_commands();
        assert_eq!(bootstrap_sh(KEY, &opts), bootstrap_sh(KEY, &opts.clone()));
        assert_eq!(install_cmd(&opts), install_cmd(&opts.clone()));
        assert_eq!(map_shares_sh(), map_shares_sh());
    }
}
