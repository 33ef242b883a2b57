//! Tests with several machines (nix/default.nix's `windowsTest`): the `test` stage, and the
//! `test-node` command the test's driver starts once per node.
//!
//! ```text
//! nix-winvm-builder test                  the derivation's builder ($winvmTestNodes, $testScript)
//!  |- the forwarder (vm::vlan)           plugged into every node's switch: the test network
//!  '- python3 driver.py                  the tools closure's Python; the NixOS driver's verbs
//!      '- nix-winvm-builder test-node    one per started node: the image revived as a build
//!           |                            revives it, the login relayed to nodes/NAME/login.sock
//!           '- vde_switch, QEMU guest, QEMU controller (the session's own)
//! ```
//!
//! Each node is a whole session: its guest and controller revived from its image (or layer),
//! the controller serving the store, on a switch of its own where the guest is 192.168.0.1
//! as in every build. The test network joins the nodes at `TEST_NET_PREFIX.N` through the
//! forwarder. The results (the driver's log, screenshots, JUnit XML, each node's serial log and
//! capture, the test network's capture) are gathered in the work folder's `results/`, which
//! becomes `$out` when the script succeeds and stays (with `nix-build -K`) when it fails.

use super::image;
use super::{env, env_path, io, BuilderError, Progress};
use crate::guest;
use crate::session::{self, After, Limit, Task};
use crate::spec::TEST_NET_PREFIX;
use crate::vm::process::{describe_status, ProcessGuard};
use crate::vm::vlan::{Forwarder, Node};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The driver, written into the work folder and run by the tools closure's Python.
pub const DRIVER: &str = include_str!("driver.py");
/// In each node's work folder: the driver's end of the node's login.
pub const LOGIN_SOCKET: &str = "login.sock";
/// In each node's work folder: a QMP socket of the guest for the driver alone (screenshots,
/// keys): a monitor is a backend, not a device, so a revived guest takes it.
pub const DRIVER_QMP_SOCKET: &str = "driver-qmp.sock";
/// What the test's folder of results is called in the work folder.
pub const RESULTS_DIR: &str = "results";
/// The default bound of the whole test, as of a build.
pub const DEFAULT_TEST_TIMEOUT_SECS: u64 = 3600;

/// One node, as the derivation names it (`winvmTestNodes`, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    pub image: PathBuf,
    /// The image's memory stage (`winvmMemory`), when it names one: the node maps its RAM file
    /// as a build does; otherwise the node expands the memory into its work folder.
    #[serde(default)]
    pub memory: Option<PathBuf>,
}

/// What the driver is told (`driver.json`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct DriverConfig {
    builder: PathBuf,
    results: PathBuf,
    timeout_secs: u64,
    interactive: bool,
    nodes: Vec<DriverNode>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct DriverNode {
    name: String,
    image: PathBuf,
    work: PathBuf,
    address: String,
    guest: String,
    /// The `test-node` command line after the program.
    args: Vec<String>,
    login_socket: PathBuf,
    qmp_socket: PathBuf,
}

/// A node's address on the test network: the nodes in the order of their names, from 1.
pub fn node_address(index: usize) -> String {
    format!("{TEST_NET_PREFIX}.{}", index + 1)
}

/// Node names become host names and folder names: letters, digits and '-', starting with a
/// letter (the NixOS driver's machines are Python names; '-' is read as '_' there).
pub fn check_node_name(name: &str) -> Result<(), BuilderError> {
    let ok = name.len() <= 63
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(BuilderError::Usage(format!(
            "windowsTest: node name '{name}' is not a host name (letters, digits and '-', starting with a letter)"
        )))
    }
}

/// The `test` stage: the nodes' driver runs the script; the results become `$out`.
pub fn stage(progress: &Progress) -> Result<i32, BuilderError> {
    let mut nodes: Vec<NodeSpec> = serde_json::from_str(&env("winvmTestNodes")?)
        .map_err(io("reading winvmTestNodes (a list of { name; image; })"))?;
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let script = env("testScript")?;
    let out = env_path("out")?;
    let timeout_secs =
        std::env::var("winvmTestTimeout").ok().and_then(|t| t.parse().ok()).unwrap_or(DEFAULT_TEST_TIMEOUT_SECS);
    let tmp = std::env::var_os("TMPDIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let work = tmp.join("test");
    let outcome = run_test(&nodes, &script, &work, timeout_secs, false, progress)?;
    let results = work.join(RESULTS_DIR);
    if outcome == 0 {
        copy_dir(&results, &out)?;
        progress.say(&format!("test passed; results in {}", out.display()));
        return Ok(0);
    }
    let shown = crate::vm::sys::os::host_path(&results).unwrap_or(results);
    Err(BuilderError::TestFailed { code: outcome, results: shown })
}

/// `nix-winvm-builder test-interactive NODES_JSON [SCRIPT]`: the driver's prompt with the nodes,
/// outside Nix, in a scratch folder; leaving the prompt stops every VM.
pub fn interactive_main(args: &[String]) -> Result<i32, BuilderError> {
    let usage = || BuilderError::Usage("usage: nix-winvm-builder test-interactive NODES_JSON [SCRIPT_FILE]".into());
    let nodes_json = args.first().ok_or_else(usage)?;
    let mut nodes: Vec<NodeSpec> =
        serde_json::from_str(nodes_json).map_err(io("reading the nodes (a list of { name; image; })"))?;
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let script = match args.get(1) {
        Some(f) => std::fs::read_to_string(f).map_err(io(format!("reading {f}")))?,
        None => String::new(),
    };
    let progress = Progress::new();
    let work = tempfile::Builder::new().prefix("winvm-test-").tempdir().map_err(io("creating a work directory"))?;
    progress.say(&format!("work folder {} (removed at the end)", work.path().display()));
    let code = run_test(&nodes, &script, work.path(), 7 * 24 * 3600, true, &progress)?;
    Ok(code)
}

/// Runs the driver on `nodes` in `work`; its exit code (0: the script passed).
fn run_test(
    nodes: &[NodeSpec],
    script: &str,
    work: &Path,
    timeout_secs: u64,
    interactive: bool,
    progress: &Progress,
) -> Result<i32, BuilderError> {
    if nodes.is_empty() {
        return Err(BuilderError::Usage("windowsTest: `nodes` is empty".into()));
    }
    for n in nodes {
        check_node_name(&n.name)?;
    }
    let python = crate::tools::find("python3")?;
    let results = work.join(RESULTS_DIR);
    for dir in [work, &results, &work.join("nodes")] {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let hosts: Vec<(String, String)> =
        nodes.iter().enumerate().map(|(i, n)| (node_address(i), n.name.clone())).collect();
    let hosts_json = serde_json::to_string(&hosts).map_err(io("writing the hosts"))?;
    let mut driver_nodes = vec![];
    let mut vlan = vec![];
    for (i, n) in nodes.iter().enumerate() {
        let node_work = work.join("nodes").join(&n.name);
        let meta = image::ImageMeta::load(&n.image)?;
        let address = node_address(i);
        vlan.push(Node {
            address: address.parse::<Ipv4Addr>().map_err(io("the node's address"))?,
            switch_ctl: node_work.join("vde.ctl"),
        });
        driver_nodes.push(DriverNode {
            name: n.name.clone(),
            image: n.image.clone(),
            work: node_work.clone(),
            address: address.clone(),
            guest: meta.spec.guest.name().to_owned(),
            args: vec![
                "test-node".into(),
                n.image.display().to_string(),
                node_work.display().to_string(),
                n.name.clone(),
                address,
                hosts_json.clone(),
                timeout_secs.to_string(),
                n.memory.as_ref().map_or_else(String::new, |m| m.display().to_string()),
            ],
            login_socket: node_work.join(LOGIN_SOCKET),
            qmp_socket: node_work.join(DRIVER_QMP_SOCKET),
        });
    }
    let config = DriverConfig {
        builder: std::env::current_exe().map_err(io("finding this program"))?,
        results: results.clone(),
        timeout_secs,
        interactive,
        nodes: driver_nodes.clone(),
    };
    let config_path = work.join("driver.json");
    let driver_path = work.join("driver.py");
    let script_path = work.join("test-script.py");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).map_err(io("writing driver.json"))?)
        .map_err(io(format!("writing {}", config_path.display())))?;
    std::fs::write(&driver_path, DRIVER).map_err(io(format!("writing {}", driver_path.display())))?;
    std::fs::write(&script_path, script).map_err(io(format!("writing {}", script_path.display())))?;
    let forwarder = Forwarder::start(vlan, &results.join("test-network.pcap"))
        .map_err(io("starting the test network's forwarder"))?;
    progress.say(&format!(
        "test network {TEST_NET_PREFIX}.0/24: {}",
        hosts.iter().map(|(a, n)| format!("{n} {a}")).collect::<Vec<_>>().join(", ")
    ));
    let code = super::runtime()?.block_on(async {
        let mut cmd = tokio::process::Command::new(&python);
        // The closure's Python finds its library beside its bin/ (`lib/python3.X`).
        if let Some(home) = python.parent().and_then(Path::parent) {
            cmd.env("PYTHONHOME", home);
        }
        cmd.env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .arg("-s")
            .arg(&driver_path)
            .arg(&config_path)
            .arg(&script_path);
        if !interactive {
            cmd.stdin(std::process::Stdio::null());
        }
        run_driver(cmd, interactive, Duration::from_secs(timeout_secs), progress).await
    })?;
    drop(forwarder);
    gather(&driver_nodes, &results);
    Ok(code)
}

/// The driver run to its end, or stopped by the test's time-out or by Nix; either way its
/// process group (every node it started, and through their guards every VM) is gone after.
async fn run_driver(
    cmd: tokio::process::Command,
    interactive: bool,
    timeout: Duration,
    progress: &Progress,
) -> Result<i32, BuilderError> {
    let mut nix = session::NixWatch::new()?;
    if interactive {
        // The prompt needs the terminal, so the driver stays in this process group; its nodes
        // die with it (it starts them with a parent-death signal) and stop their VMs.
        let mut cmd = cmd;
        cmd.kill_on_drop(true);
        let mut child = cmd.spawn().map_err(io("starting the driver"))?;
        let status = tokio::select! {
            s = child.wait() => s.map_err(io("waiting for the driver"))?,
            e = nix.stopped() => return Err(e.into()),
        };
        return Ok(status.code().unwrap_or(1));
    }
    let mut driver = ProcessGuard::spawn("driver", cmd)?;
    let status = tokio::select! {
        s = driver.wait() => Ok(s),
        _ = tokio::time::sleep(timeout) => Err(BuilderError::TestTimeout { secs: timeout.as_secs() }),
        e = nix.stopped() => Err(e.into()),
    };
    // The driver stops its nodes itself; a time-out or Nix's signal stops it, and with it them.
    driver.shutdown(Duration::from_secs(15)).await;
    let left = driver.survivors();
    if !left.is_empty() {
        let names = left.iter().map(|(pid, n)| format!("{n} (pid {pid})")).collect::<Vec<_>>().join(", ");
        progress.say(&format!("the driver left processes behind, now killed: {names}"));
        driver.kill_group();
    }
    let status = status?;
    progress.say(&format!("driver ended: {}", describe_status(status)));
    Ok(status.code().unwrap_or(1))
}

/// Each node's serial log, capture and session log into the results (what exists of them: a
/// node never started has none).
fn gather(nodes: &[DriverNode], results: &Path) {
    for n in nodes {
        let to = results.join("nodes").join(&n.name);
        let _ = std::fs::create_dir_all(&to);
        for (from, name) in [
            (crate::session::GUEST_SERIAL_LOG, "serial.log"),
            (crate::session::CONTROLLER_SERIAL_LOG, "controller-serial.log"),
            (crate::vm::vde::CAPTURE_FILE, "network.pcap"),
        ] {
            let _ = std::fs::copy(n.work.join(from), to.join(name));
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), BuilderError> {
    std::fs::create_dir_all(to).map_err(io(format!("creating {}", to.display())))?;
    for entry in std::fs::read_dir(from).map_err(io(format!("reading {}", from.display())))? {
        let entry = entry.map_err(io(format!("reading {}", from.display())))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().map_err(io(format!("reading {}", src.display())))?;
        if kind.is_dir() {
            copy_dir(&src, &dst)?;
        } else if kind.is_file() {
            std::fs::copy(&src, &dst).map_err(io(format!("copying {}", src.display())))?;
        }
    }
    Ok(())
}

/// `nix-winvm-builder test-node IMAGE WORK NAME ADDRESS HOSTS_JSON TIMEOUT_SECS MEMORY`: one
/// node, revived as a build revives its image (MEMORY: the image's memory stage, or empty), its
/// login on `WORK/login.sock` until the driver ends it.
pub fn node_main(args: &[String]) -> Result<i32, BuilderError> {
    let usage = || {
        BuilderError::Usage(
            "usage: nix-winvm-builder test-node IMAGE WORK NAME ADDRESS HOSTS_JSON TIMEOUT_SECS MEMORY".into(),
        )
    };
    let [image, work, name, address, hosts, timeout, memory] = args else { return Err(usage()) };
    let (image, work) = (PathBuf::from(image), PathBuf::from(work));
    let hosts: Vec<(String, String)> = serde_json::from_str(hosts).map_err(io("reading the hosts"))?;
    let timeout = Duration::from_secs(timeout.parse().map_err(|_| usage())?);
    let progress = Progress::new();
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(io(format!("removing {}", work.display())))?;
    }
    std::fs::create_dir_all(&work).map_err(io(format!("creating {}", work.display())))?;
    let revivable = image::revivable(&image, None, &progress)?;
    let disk = work.join("disk.qcow2");
    image::overlay(&revivable.tools, &image.join("disk.qcow2"), &disk)?;
    let profile = guest::profile(&revivable.meta.spec.guest);
    let command = profile.test_node_login(name, address, &hosts);
    let memory = (!memory.is_empty()).then(|| PathBuf::from(memory));
    let memory = revivable.memory(memory, &work, &progress)?;
    let task = Task { command, after: After::Quit, timeout, limit: Limit::Test };
    let mut cfg = revivable.session(disk, &work, task, memory.as_ref())?;
    cfg.terminal = Some(crate::protocol::TerminalRequest { term: "dumb".into(), cols: 200, rows: 50 });
    cfg.login_socket = Some(work.join(LOGIN_SOCKET));
    let qmp = format!("unix:{},server=on,wait=off", crate::vm::qemu::option_path(&work.join(DRIVER_QMP_SOCKET)));
    cfg.guest.machine.extra_args.extend(["-qmp".into(), qmp.into()]);
    progress.say(&format!("node {name}: {address} on the test network, revived from {}", image.display()));
    let result = super::runtime()?.block_on(session::run(&cfg, &progress));
    super::finish(result, &progress, &[&work])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_must_be_host_names() {
        for good in ["server", "client", "win-10", "a1"] {
            assert!(check_node_name(good).is_ok(), "{good}");
        }
        for bad in ["", "1st", "my_node", "a.b", "has space"] {
            let e = check_node_name(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("node name '{bad}' is not a host name")), "{e}");
        }
    }

    /// The login joins the test network the profile's way: `ip` on the standin, `netsh` on
    /// Windows (whose computer name cannot change without a restart: the hosts file names it).
    #[test]
    fn a_nodes_login_sets_its_address_and_names_then_reads_commands() {
        let hosts = vec![(node_address(0), "client".to_owned()), (node_address(1), "server".to_owned())];
        let standin = guest::Profile::Standin.test_node_login("server", &node_address(1), &hosts);
        for part in [
            "ip addr add 192.168.1.2/24 dev eth0\n",
            "hostname server\n",
            "printf '127.0.0.1 localhost\\n192.168.1.1 client\\n192.168.1.2 server\\n' > /etc/hosts\n",
        ] {
            assert!(standin.contains(part), "{part:?} not in {standin}");
        }
        assert!(
            standin.ends_with("stty raw -echo\necho winvm-test-shell-ready\nexec /bin/sh /proc/self/fd/0\n"),
            "{standin}"
        );
        let options = crate::spec::WindowsOptions::new("Windows 10 Pro");
        let windows = guest::Profile::Windows(&options).test_node_login("server", &node_address(1), &hosts);
        for part in [
            "\"$sys/netsh.exe\" interface ipv4 add address name=Ethernet 192.168.1.2 255.255.255.0",
            "firewall add rule name=nix-winvm-test dir=in action=allow remoteip=192.168.1.0/24",
            "printf '192.168.1.1 client\\n192.168.1.2 server\\n' | sed 's/$/\\r/' >> \"$(cygpath -W)/System32/drivers/etc/hosts\"",
        ] {
            assert!(windows.contains(part), "{part:?} not in {windows}");
        }
        assert!(windows.ends_with("echo winvm-test-shell-ready\nexec /bin/bash /dev/stdin\n"), "{windows}");
    }

    #[test]
    fn nodes_are_numbered_from_one_on_the_test_network() {
        assert_eq!(node_address(0), "192.168.1.1");
        assert_eq!(node_address(2), "192.168.1.3");
    }
}
