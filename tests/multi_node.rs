//! Tests with several machines (nix/default.nix's `windowsTest`), as Nix runs them: real
//! nix-build in the sandbox, TCG, standin nodes revived from a real image (and a layer), real
//! QEMU, vde_switch, smbd and SSH, the tools closure's Python running the driver. Each test's
//! script carries a token of its own, so its test is built anew on every run; the image is
//! shared.
#![cfg(feature = "plugin")]

mod common;
use common::{kept_build_dir, remove_kept, sandboxed_nix_build, STANDIN_TCG};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn token(name: &str) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{name}-{t}")
}

fn library() -> String {
    format!("{}/nix", env!("CARGO_MANIFEST_DIR"))
}

/// A Nix string literal ('' ... '') holding `text`.
fn lit(text: &str) -> String {
    format!("''{}''", text.replace("''", "'''").replace("${", "''${"))
}

/// A windowsTest of `nodes` (Nix text: `{ server = image; ... }`, with `image` and `layer` in
/// scope) running `script`.
fn test_expr(name: &str, nodes: &str, script: &str) -> String {
    format!(
        r#"let
  winvm = import {lib} {{ }};
  image = {STANDIN_TCG};
  layer = winvm.layer {{
    base = image;
    name = "test-layer";
    installCommands = [ "mkdir -p /opt/layer && echo layer-marker > /opt/layer/marker" ];
  }};
in winvm.windowsTest {{ name = "{name}"; nodes = {nodes}; testScript = {script}; }}"#,
        lib = library(),
        script = lit(script),
    )
}

fn build(expr: &str, keep: bool) -> Output {
    let mut c = sandboxed_nix_build();
    c.arg("--no-out-link");
    if keep {
        c.arg("-K");
    }
    c.arg("-E").arg(expr).stdin(Stdio::null()).output().expect("run nix-build")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn out_path(o: &Output) -> PathBuf {
    assert!(o.status.success(), "nix-build failed:\n{}", stderr(o));
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The frames of a capture as tcpdump reads them.
fn tcpdump(pcap: &Path) -> String {
    let o = Command::new("tcpdump").args(["-nn", "-r"]).arg(pcap).output().expect("run tcpdump");
    assert!(o.status.success(), "tcpdump -r {}: {}", pcap.display(), stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every node's session tore its VMs down (the session's last line before its verdict).
fn assert_nodes_stopped(results: &Path, nodes: &[&str]) {
    for node in nodes {
        let log = read(&results.join("nodes").join(node).join("node.log"));
        assert!(log.contains("VMs stopped"), "{node}'s session did not stop its VMs:\n{log}");
    }
}

/// The results every test has, passed or failed: the log, JUnit XML, each node's serial log and
/// capture, the test network's capture.
fn assert_results(results: &Path, nodes: &[&str]) {
    for f in ["log.txt", "junit.xml", "test-network.pcap"] {
        assert!(results.join(f).is_file(), "no {f} in {}", results.display());
    }
    for node in nodes {
        for f in ["serial.log", "network.pcap", "node.log"] {
            let p = results.join("nodes").join(node).join(f);
            assert!(p.is_file(), "no {}", p.display());
        }
        // The revived guest's console: its sshd logs the controller's logon.
        let serial = read(&results.join("nodes").join(node).join("serial.log"));
        assert!(serial.contains("(Administrator)"), "{node}'s serial log:\n{serial}");
    }
}

/// Two standin nodes: `server` serves a file with busybox httpd, `client` waits for the port
/// (by the server's name), fetches the file over the test network and checks it; a command of
/// 100 kB goes through, keys typed through QMP reach the guest's keyboard (its interrupt count),
/// a folder is copied out; a screenshot is taken. $out holds the log, the screenshot (a PNG), each node's serial log and capture,
/// the test network's capture (the HTTP exchange between the two test addresses passed
/// through the forwarder) and JUnit XML with the subtests; no node is left running.
#[test]
fn two_nodes_serve_and_fetch_a_file_over_the_test_network() {
    let tok = token("httpd");
    let script = format!(
        r#"start_all()
with subtest("the server serves"):
    server.succeed("mkdir -p /tmp/www && echo '{tok}' > /tmp/www/index.html")
    server.succeed("httpd -p 80 -h /tmp/www")
    server.wait_for_open_port(80)
with subtest("the client fetches by name"):
    client.wait_for_open_port(80, "server")
    got = client.succeed("wget -q -O - http://server/index.html")
    assert got.strip() == "{tok}", got
    assert client.succeed("hostname").strip() == "client"
    client.fail("wget -q -O - http://server/missing.html")
with subtest("long commands, keys and copies"):
    assert server.succeed("echo " + "y" * 100000 + " | wc -c").strip() == "100001"
    keyboard = lambda: int(server.succeed("grep i8042 /proc/interrupts | head -n 1").split()[1])
    before = keyboard()
    server.send_chars("Typed 1!\n")
    server.send_key("ctrl-alt-f2")
    assert keyboard() > before, "no key reached the guest's keyboard"
    server.copy_from_vm("/tmp/www", "copied")
client.screenshot("client-screen")
"#
    );
    let o = build(&test_expr("two-nodes", "{ server = image; client = image; }", &script), false);
    let out = out_path(&o);
    assert_results(&out, &["client", "server"]);
    assert_nodes_stopped(&out, &["client", "server"]);
    assert_eq!(read(&out.join("copied/www/index.html")), format!("{tok}\n"), "copy_from_vm");
    let png = std::fs::read(out.join("screenshots/client-screen.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000, "not a PNG of a screen");
    let log = read(&out.join("log.txt"));
    assert!(log.contains("subtest: the client fetches by name") && log.contains("test passed"), "{log}");
    let junit = read(&out.join("junit.xml"));
    assert!(junit.contains(r#"failures="0""#) && junit.contains(r#"name="the server serves""#), "{junit}");
    // client is 192.168.1.1, server 192.168.1.2 (the names' order): the request and the answer
    // went through the forwarder.
    let frames = tcpdump(&out.join("test-network.pcap"));
    assert!(frames.contains("192.168.1.1.") && frames.contains("> 192.168.1.2.80:"), "{frames}");
    assert!(frames.contains("192.168.1.2.80 > 192.168.1.1."), "{frames}");
    assert!(!stderr(&o).contains("left processes behind"), "{}", stderr(&o));
}

/// A `succeed` whose command fails fails the test with the node, the command, its exit code and
/// its output; the build's error names the results folder, which `nix-build -K` keeps with the
/// log, the screenshot taken before, the serial logs, the captures and JUnit XML with the
/// failure; every node was stopped.
#[test]
fn a_failing_succeed_names_node_command_and_output_and_keeps_the_results() {
    let tok = token("fails");
    let script = format!(
        r#"start_all()
server.screenshot("before")
with subtest("a command that fails"):
    server.succeed("echo 'said {tok}'; exit 3")
client.succeed("echo never reached")
"#
    );
    let o = build(&test_expr("failing", "{ server = image; client = image; }", &script), true);
    let err = stderr(&o);
    assert!(!o.status.success(), "the test passed:\n{err}");
    let named = format!("server: command `echo 'said {tok}'; exit 3` failed (exit code 3)");
    assert!(err.contains(&named), "the error does not name node, command and code:\n{err}");
    assert!(err.contains(&format!("said {tok}")), "the error does not show the output:\n{err}");
    assert!(!err.contains("never reached"), "the script went on after the failure:\n{err}");
    let kept = kept_build_dir(&err);
    let results = err
        .lines()
        .find_map(|l| l.split("JUnit XML) are in ").nth(1))
        .map(|r| PathBuf::from(r.split(" (kept").next().unwrap()))
        .unwrap_or_else(|| panic!("no results folder named:\n{err}"));
    assert!(results.starts_with(&kept), "{} is not in the kept {}", results.display(), kept.display());
    assert_results(&results, &["client", "server"]);
    assert_nodes_stopped(&results, &["client", "server"]);
    assert!(results.join("screenshots/before.png").is_file());
    let junit = read(&results.join("junit.xml"));
    assert!(junit.contains(r#"<testcase classname="failing" name="a command that fails""#), "{junit}");
    assert!(
        junit.contains("<failure message=\"server: command `echo &apos;")
            || junit.contains("<failure message=\"server: command"),
        "{junit}"
    );
    assert!(read(&results.join("log.txt")).contains("test failed"));
    remove_kept(&kept);
}

/// Three nodes, one of them a layer on the others' image: each has its own name and address,
/// the layer's node has the layer's file and the others do not, and every node reaches the
/// others by name.
#[test]
fn three_nodes_one_a_layer_reach_each_other_by_name() {
    let tok = token("three");
    let script = format!(
        r#"start_all()
for m in machines:
    assert m.succeed("hostname").strip() == m.name, m.name
layered.succeed("grep layer-marker /opt/layer/marker")
alpha.fail("test -e /opt/layer/marker")
gamma.fail("test -e /opt/layer/marker")
layered.succeed("mkdir -p /tmp/www && cp /opt/layer/marker /tmp/www/m && echo '{tok}' >> /tmp/www/m && httpd -p 8080 -h /tmp/www")
for m in (alpha, gamma):
    m.wait_for_open_port(8080, "layered")
    got = m.succeed("wget -q -O - http://layered:8080/m")
    assert got == "layer-marker\n{tok}\n", got
    m.succeed("ping -c 1 -W 5 layered")
alpha.succeed("ping -c 1 -W 5 gamma")
alpha.succeed("grep -qx '192.168.1.2 gamma' /etc/hosts")
"#
    );
    let o = build(&test_expr("three-nodes", "{ alpha = image; layered = layer; gamma = image; }", &script), false);
    let out = out_path(&o);
    assert_results(&out, &["alpha", "layered", "gamma"]);
    assert_nodes_stopped(&out, &["alpha", "layered", "gamma"]);
}

/// `driverInteractive`: a prompt with the nodes; what is typed runs in them, and leaving the
/// prompt (end of input) stops every VM: no process of the test's folder is left on the host.
#[test]
fn the_interactive_prompt_runs_commands_and_stops_every_vm_when_it_closes() {
    let tok = token("interactive");
    let expr = test_expr("prompt", "{ server = image; client = image; }", "server.succeed('true')");
    let o = build(&format!("({expr}).driverInteractive"), false);
    let driver = out_path(&o).join("bin/nix-winvm-test-driver");
    let mut child = Command::new(&driver)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the driver");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("start_all()\nprint(server.succeed('echo {tok}; hostname'))\ntest_script()\n").as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(o.status.success(), "the prompt failed:\n{out}\n{err}");
    assert!(out.contains(&format!("{tok}\nserver")), "the command's output is not shown:\n{out}\n{err}");
    assert!(err.contains("stopping every VM"), "{err}");
    let work = err
        .lines()
        .find_map(|l| l.split("work folder ").nth(1))
        .map(|w| w.split(" (removed").next().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no work folder named:\n{err}"));
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&work))
        .collect();
    assert!(left.is_empty(), "processes of the test are left: {left:?}");
}
