"""nix-winvm's test driver: the NixOS test driver's verbs for nodes revived from images.

Run by `nix-winvm-builder test` (src/builder/test.rs) with the tools closure's Python:

    python3 driver.py DRIVER_JSON SCRIPT_FILE

Each node is a `nix-winvm-builder test-node` process (a session: switch, guest, controller)
that relays a login in the guest to a unix socket. The login's pty is raw and silent; each
command goes as one line, base64, and comes back as its exit code and its stdout and stderr,
base64, between markers. Screenshots and keys go through a QMP socket of the guest's QEMU.
Written for nix-winvm: the NixOS driver's names and behaviour, not its code.
"""

import base64
import contextlib
import ctypes
import io
import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import traceback
import zlib

READY = "winvm-test-shell-ready"


class TestFailure(Exception):
    """A verb that did not get what it waited for: the test fails with this message."""


class Log:
    """The test's log: every line with its time since the start, to stderr (the build log) and
    to results/log.txt; subtests nest."""

    def __init__(self, path):
        self.file = open(path, "a", encoding="utf-8")
        self.start = time.monotonic()
        self.depth = 0

    def __call__(self, message):
        stamp = "%8.2f" % (time.monotonic() - self.start)
        for line in str(message).splitlines() or [""]:
            text = "%s %s%s" % (stamp, "  " * self.depth, line)
            # A terminal that closed (the prompt's) must not stop the cleanup that logs.
            with contextlib.suppress(OSError):
                print(text, file=sys.stderr, flush=True)
            self.file.write(text + "\n")
        self.file.flush()

    @contextlib.contextmanager
    def nested(self, message):
        self(message)
        self.depth += 1
        start = time.monotonic()
        try:
            yield
        finally:
            self.depth -= 1
            self("(%.2f s)" % (time.monotonic() - start))


def die_with_parent():
    """In a node's process before it runs: SIGTERM when the driver dies (PR_SET_PDEATHSIG),
    so a killed driver leaves no node; the node's session stops its VMs on SIGTERM."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


# QEMU's key names (QKeyCode) for the characters send_chars types.
SHIFTED = {
    "!": "1", "@": "2", "#": "3", "$": "4", "%": "5", "^": "6", "&": "7", "*": "8", "(": "9",
    ")": "0", "_": "minus", "+": "equal", "{": "bracket_left", "}": "bracket_right", "|": "backslash",
    ":": "semicolon", '"': "apostrophe", "~": "grave_accent", "<": "comma", ">": "dot", "?": "slash",
}
PLAIN = {
    " ": "spc", "\n": "ret", "\t": "tab", "-": "minus", "=": "equal", "[": "bracket_left",
    "]": "bracket_right", "\\": "backslash", ";": "semicolon", "'": "apostrophe", "`": "grave_accent",
    ",": "comma", ".": "dot", "/": "slash",
}
# The NixOS driver's spellings that QEMU names otherwise.
KEY_ALIASES = {"enter": "ret", "return": "ret", "esc": "esc", "space": "spc", "backspace": "backspace"}


def char_keys(c):
    if c.isascii() and c.isalpha():
        return ["shift", c.lower()] if c.isupper() else [c]
    if c.isascii() and c.isdigit():
        return [c]
    if c in PLAIN:
        return [PLAIN[c]]
    if c in SHIFTED:
        return ["shift", SHIFTED[c]]
    raise TestFailure("send_chars: no key types %r" % c)


def ppm_to_png(ppm):
    """QEMU's screendump (binary PPM, P6) as a PNG (RGB, 8 bits, no filter)."""
    fields, pos = [], 0
    while len(fields) < 4:
        while ppm[pos:pos + 1].isspace():
            pos += 1
        if ppm[pos:pos + 1] == b"#":
            pos = ppm.index(b"\n", pos)
            continue
        end = pos
        while not ppm[end:end + 1].isspace():
            end += 1
        fields.append(ppm[pos:end])
        pos = end
    if fields[0] != b"P6" or fields[3] != b"255":
        raise TestFailure("screendump: not an 8-bit binary PPM")
    width, height = int(fields[1]), int(fields[2])
    pixels = ppm[pos + 1:pos + 1 + width * height * 3]
    rows = b"".join(b"\x00" + pixels[y * width * 3:(y + 1) * width * 3] for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b"")


class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")
        self._message()  # the greeting
        self.execute("qmp_capabilities")

    def _message(self):
        line = self.reader.readline()
        if not line:
            raise TestFailure("QMP: the guest's QEMU closed its socket")
        return json.loads(line)

    def execute(self, command, **arguments):
        request = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._message()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise TestFailure("QMP %s: %s" % (command, reply["error"].get("desc")))
            # An event before the reply: not ours to handle.

    def close(self):
        with contextlib.suppress(Exception):
            self.sock.close()


class Machine:
    """One node. The NixOS driver's verbs; a command runs in the guest's shell (the standin's
    busybox sh, Cygwin's bash on Windows) in /tmp."""

    def __init__(self, driver, spec):
        self.driver = driver
        self.name = spec["name"]
        self.spec = spec
        self.address = spec["address"]
        self.guest = spec["guest"]
        self.process = None
        self.conn = None
        self.buffer = b""
        self.qmp = None
        self.serial = 0
        self.last_stderr = ""

    def __repr__(self):
        return "<Machine %s>" % self.name

    def log(self, message):
        self.driver.log("%s: %s" % (self.name, message))

    # --- the node's life -------------------------------------------------------------------

    def is_up(self):
        return self.conn is not None

    def start(self):
        """Revives the node from its image; returns once its shell reads commands."""
        if self.is_up():
            return
        with self.driver.log.nested("%s: starting (revived from %s)" % (self.name, self.spec["image"])):
            self._spawn()
            self._connect()

    def _spawn(self):
        if self.process is not None:
            return
        os.makedirs(self.spec["work"], exist_ok=True)
        log_path = os.path.join(self.driver.results, "nodes", self.name)
        os.makedirs(log_path, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.spec["loginSocket"])
        with open(os.path.join(log_path, "node.log"), "ab") as out:
            self.process = subprocess.Popen(
                [self.driver.builder] + self.spec["args"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, preexec_fn=die_with_parent,
            )
        self.started_at = time.monotonic()

    def _connect(self):
        # A revive takes seconds; the test's own time-out bounds it (a Windows node under TCG).
        deadline = time.monotonic() + self.driver.timeout
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise TestFailure("%s: the node ended while starting (%s); its log: %s"
                                  % (self.name, code, self.node_log_tail()))
            conn = socket.socket(socket.AF_UNIX)
            try:
                conn.connect(self.spec["loginSocket"])
                break
            except OSError:
                conn.close()
            if time.monotonic() > deadline:
                raise TestFailure("%s: no login after %d s; its log: %s"
                                  % (self.name, self.driver.timeout, self.node_log_tail()))
            time.sleep(0.02)
        self.conn = conn
        self.buffer = b""
        self._read_until(READY.encode(), deadline, "its shell")
        # The rest of the marker's line.
        self._read_until(b"\n", deadline, "its shell")
        self.log("up (%.2f s after its start)" % (time.monotonic() - self.started_at))

    def node_log_tail(self, lines=15):
        path = os.path.join(self.driver.results, "nodes", self.name, "node.log")
        with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as f:
            return "\n" + "".join(f.readlines()[-lines:])
        return "(none)"

    def _read_until(self, marker, deadline, what):
        while marker not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TestFailure("%s: timed out waiting for %s" % (self.name, what))
            self.conn.settimeout(min(remaining, 1.0))
            try:
                data = self.conn.recv(65536)
            except socket.timeout:
                if self.process is not None and self.process.poll() is not None:
                    raise TestFailure("%s: the node ended (%s) while waiting for %s; its log: %s"
                                      % (self.name, self.process.returncode, what, self.node_log_tail()))
                continue
            if not data:
                raise TestFailure("%s: the node's login closed while waiting for %s; its log: %s"
                                  % (self.name, what, self.node_log_tail()))
            self.buffer += data
        at = self.buffer.index(marker) + len(marker)
        before, self.buffer = self.buffer[:at], self.buffer[at:]
        return before

    # --- commands --------------------------------------------------------------------------

    def execute(self, command, check_return=True, timeout=900):
        """Runs `command`; returns (exit code, stdout). Its stderr goes to the log."""
        self.start()
        self.serial += 1
        tag = "WINVM%d_%d" % (os.getpid(), self.serial)
        encoded = base64.b64encode(command.encode()).decode()
        # The markers are put together by the shell, so that a terminal's echo of this line
        # never holds them.
        line = (
            "t=%s; printf %%s %s | base64 -d > /tmp/.winvm-cmd; "
            "sh /tmp/.winvm-cmd </dev/null >/tmp/.winvm-out 2>/tmp/.winvm-err; "
            "echo \"$t-RC $?\"; base64 /tmp/.winvm-out; echo \"$t-ERR\"; base64 /tmp/.winvm-err; echo \"$t-END\"\n"
        ) % (tag, encoded)
        self.conn.sendall(line.encode())
        deadline = time.monotonic() + (timeout if timeout is not None else 10 ** 9)
        what = "the command `%s` (%s s)" % (command, timeout)
        self._read_until(("%s-RC " % tag).encode(), deadline, what)
        rc_line = self._read_until(b"\n", deadline, what)
        out_b64 = self._read_until(("%s-ERR" % tag).encode(), deadline, what)
        err_b64 = self._read_until(("%s-END" % tag).encode(), deadline, what)
        self._read_until(b"\n", deadline, what)
        status = int(rc_line.strip().decode())

        def decode(b64, marker):
            text = b64[: -len(marker)].replace(b"\r", b"").replace(b"\n", b"")
            return base64.b64decode(text).decode("utf-8", errors="replace")

        stdout = decode(out_b64, ("%s-ERR" % tag).encode())
        stderr = decode(err_b64, ("%s-END" % tag).encode())
        if stderr:
            for l in stderr.rstrip("\n").splitlines():
                self.log("stderr: " + l)
        self.last_stderr = stderr
        return status, stdout

    def succeed(self, *commands, timeout=900):
        """Runs each command; fails the test if one exits non-zero. Their stdout, joined."""
        output = ""
        for command in commands:
            with self.driver.log.nested("%s: must succeed: %s" % (self.name, command)):
                status, out = self.execute(command, timeout=timeout)
                if status != 0:
                    self.log("output: " + out)
                    raise TestFailure("%s: command `%s` failed (exit code %d)\n--- its output ---\n%s%s"
                                      % (self.name, command, status, out,
                                         "--- its stderr ---\n" + self.last_stderr if self.last_stderr else ""))
                output += out
        return output

    def fail(self, *commands, timeout=900):
        """Runs each command; fails the test if one exits zero. Their stdout, joined."""
        output = ""
        for command in commands:
            with self.driver.log.nested("%s: must fail: %s" % (self.name, command)):
                status, out = self.execute(command, timeout=timeout)
                if status == 0:
                    raise TestFailure("%s: command `%s` unexpectedly succeeded\n--- its output ---\n%s"
                                      % (self.name, command, out))
                output += out
        return output

    def wait_until_succeeds(self, command, timeout=900):
        """Runs `command` every second until it succeeds; its stdout."""
        with self.driver.log.nested("%s: waiting for success: %s" % (self.name, command)):
            deadline = time.monotonic() + timeout
            while True:
                status, out = self.execute(command, timeout=timeout)
                if status == 0:
                    return out
                if time.monotonic() > deadline:
                    raise TestFailure("%s: command `%s` did not succeed within %d s (last exit code %d)\n--- its last output ---\n%s"
                                      % (self.name, command, timeout, status, out))
                time.sleep(1)

    def wait_until_fails(self, command, timeout=900):
        with self.driver.log.nested("%s: waiting for failure: %s" % (self.name, command)):
            deadline = time.monotonic() + timeout
            while True:
                status, out = self.execute(command, timeout=timeout)
                if status != 0:
                    return out
                if time.monotonic() > deadline:
                    raise TestFailure("%s: command `%s` did not fail within %d s" % (self.name, command, timeout))
                time.sleep(1)

    def port_check(self, port, addr):
        if self.guest == "windows":
            return "timeout 2 bash -c 'exec 3<>/dev/tcp/%s/%d'" % (addr, port)
        # busybox nc has no -z: refused is exit code 1; a connection that stays open is cut
        # by timeout (143) or ends when the server closes (0).
        return "timeout 2 nc %s %d </dev/null >/dev/null 2>&1; [ $? -ne 1 ]" % (shlex.quote(addr), port)

    def wait_for_open_port(self, port, addr="localhost", timeout=900):
        """Waits until something listens on `addr`:`port` (seen from this node)."""
        with self.driver.log.nested("%s: waiting for TCP port %d on %s" % (self.name, port, addr)):
            deadline = time.monotonic() + timeout
            while self.execute(self.port_check(port, addr), timeout=timeout)[0] != 0:
                if time.monotonic() > deadline:
                    raise TestFailure("%s: TCP port %d on %s did not open within %d s" % (self.name, port, addr, timeout))
                time.sleep(1)

    def wait_for_closed_port(self, port, addr="localhost", timeout=900):
        with self.driver.log.nested("%s: waiting for TCP port %d on %s to close" % (self.name, port, addr)):
            deadline = time.monotonic() + timeout
            while self.execute(self.port_check(port, addr), timeout=timeout)[0] == 0:
                if time.monotonic() > deadline:
                    raise TestFailure("%s: TCP port %d on %s did not close within %d s" % (self.name, port, addr, timeout))
                time.sleep(1)

    def wait_for_file(self, path, timeout=900):
        self.wait_until_succeeds("test -e %s" % shlex.quote(path), timeout=timeout)

    def copy_from_vm(self, source, target_dir=""):
        """The file or folder `source` of the guest into the results, under `target_dir`."""
        with self.driver.log.nested("%s: copying %s out of the guest" % (self.name, source)):
            parent, base = os.path.split(source.rstrip("/")) or ("/", source)
            status, out = self.execute("tar cf - -C %s %s | base64" % (shlex.quote(parent or "/"), shlex.quote(base)))
            if status != 0:
                raise TestFailure("%s: cannot copy %s out of the guest (exit code %d)" % (self.name, source, status))
            data = base64.b64decode(out.replace("\n", "").replace("\r", ""))
            to = os.path.join(self.driver.results, target_dir)
            os.makedirs(to, exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar.getmembers():
                    if member.name.startswith("/") or ".." in member.name.split("/"):
                        raise TestFailure("%s: unsafe name in the copy: %s" % (self.name, member.name))
                tar.extractall(to)

    # --- screen and keys ---------------------------------------------------------------------

    def _qmp(self):
        self.start()
        if self.qmp is None:
            self.qmp = Qmp(self.spec["qmpSocket"])
        return self.qmp

    def screenshot(self, name):
        """The guest's screen as results/screenshots/NAME.png."""
        qmp = self._qmp()
        folder = os.path.join(self.driver.results, "screenshots")
        os.makedirs(folder, exist_ok=True)
        ppm = os.path.join(self.spec["work"], "screendump.ppm")
        qmp.execute("screendump", filename=ppm)
        with open(ppm, "rb") as f:
            png = ppm_to_png(f.read())
        os.unlink(ppm)
        path = os.path.join(folder, name if name.endswith(".png") else name + ".png")
        with open(path, "wb") as f:
            f.write(png)
        self.log("screenshot %s" % os.path.relpath(path, self.driver.results))
        return path

    def send_key(self, key, delay=0.01):
        """Presses a key or a chord such as "ctrl-alt-delete" (QEMU's key names)."""
        keys = [KEY_ALIASES.get(k, k) for k in key.split("-")] if key != "-" else ["minus"]
        self._qmp().execute("send-key", keys=[{"type": "qcode", "data": k} for k in keys])
        if delay:
            time.sleep(delay)

    def send_chars(self, chars, delay=0.01):
        """Types `chars` on the guest's keyboard."""
        self.log("typing %r" % chars)
        for c in chars:
            keys = char_keys(c)
            self._qmp().execute("send-key", keys=[{"type": "qcode", "data": k} for k in keys])
            if delay:
                time.sleep(delay)

    # --- stopping ----------------------------------------------------------------------------

    def shutdown(self):
        """Ends the node's login: the session stops both VMs and the switch."""
        if not self.is_up():
            return
        with self.driver.log.nested("%s: shutting down" % self.name):
            with contextlib.suppress(OSError):
                self.conn.sendall(b"exit 0\n")
            self._stop(timeout=60)

    def crash(self):
        """Stops the node at once (its session kills both VMs)."""
        if self.process is None:
            return
        self.log("crashing")
        self._stop(timeout=0)

    def _stop(self, timeout):
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.process is not None:
            try:
                self.process.wait(timeout=timeout) if timeout else None
            except subprocess.TimeoutExpired:
                pass
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.log("stopped (%s)" % self.process.returncode)
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
        self.conn = None
        self.process = None


class Driver:
    def __init__(self, config):
        self.builder = config["builder"]
        self.results = config["results"]
        self.timeout = config["timeoutSecs"]
        os.makedirs(self.results, exist_ok=True)
        self.log = Log(os.path.join(self.results, "log.txt"))
        self.machines = [Machine(self, spec) for spec in config["nodes"]]
        self.cases = []  # (name, seconds, failure or None)

    def start_all(self):
        """Starts every node at once (each revive is a process of its own), then waits for
        each one's shell."""
        with self.log.nested("starting all nodes"):
            for m in self.machines:
                if not m.is_up():
                    m._spawn()
            for m in self.machines:
                if not m.is_up():
                    m._connect()

    @contextlib.contextmanager
    def subtest(self, name):
        start = time.monotonic()
        with self.log.nested("subtest: %s" % name):
            try:
                yield
            except Exception as e:
                self.cases.append((name, time.monotonic() - start, e))
                raise
        self.cases.append((name, time.monotonic() - start, None))

    def globals(self):
        g = {
            "start_all": self.start_all,
            "subtest": self.subtest,
            "machines": self.machines,
            "log": self.log,
            "TestFailure": TestFailure,
            "driver": self,
        }
        for m in self.machines:
            g[m.name.replace("-", "_")] = m
        return g

    def stop_all(self):
        """Every node's login ended (its session then stops its VMs); a node that does not end
        so is stopped with SIGTERM."""
        for m in self.machines:
            with contextlib.suppress(Exception):
                if m.is_up():
                    m.conn.sendall(b"exit 0\n")
        for m in self.machines:
            with contextlib.suppress(Exception):
                if m.process is not None:
                    m._stop(timeout=20)

    def junit(self, name, seconds, failure):
        cases = list(self.cases)
        # The script as a whole is a case too: its failure outside any subtest shows there.
        cases.append(("test script", seconds, failure))
        failures = sum(1 for c in cases if c[2] is not None)

        def esc(text):
            return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                    .replace('"', "&quot;"))

        lines = ['<?xml version="1.0" encoding="UTF-8"?>',
                 '<testsuites><testsuite name="%s" tests="%d" failures="%d" time="%.3f">'
                 % (esc(name), len(cases), failures, seconds)]
        for case, secs, error in cases:
            lines.append('<testcase classname="%s" name="%s" time="%.3f">' % (esc(name), esc(case), secs))
            if error is not None:
                lines.append('<failure message="%s">%s</failure>'
                             % (esc(str(error).splitlines()[0] if str(error) else type(error).__name__), esc(error)))
            lines.append("</testcase>")
        lines.append("</testsuite></testsuites>")
        with open(os.path.join(self.results, "junit.xml"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


def main():
    config_path, script_path = sys.argv[1], sys.argv[2]
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    with open(script_path, encoding="utf-8") as f:
        script = f.read()
    driver = Driver(config)
    name = os.environ.get("name", "test")
    # Nix's SIGTERM or the builder's, or the prompt's terminal closed (SIGHUP): the nodes are
    # stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    start = time.monotonic()
    failure = None
    try:
        if config.get("interactive"):
            import code

            banner = ("nix-winvm test driver: nodes %s (start_all(), NODE.succeed(...), test_script());"
                      " Ctrl-D stops every VM" % ", ".join(m.name for m in driver.machines))
            g = driver.globals()
            g["test_script"] = lambda: exec(compile(script, "testScript", "exec"), g)
            code.interact(banner=banner, local=g, exitmsg="stopping every VM")
        else:
            with driver.log.nested("running the test script"):
                exec(compile(script, "testScript", "exec"), driver.globals())
    except BaseException as e:  # noqa: B902 - SystemExit and KeyboardInterrupt end the test too
        failure = e
        if isinstance(e, TestFailure):
            driver.log("error: %s" % e)
        elif not isinstance(e, SystemExit):
            driver.log("error: " + "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip())
    finally:
        with driver.log.nested("stopping every node"):
            driver.stop_all()
        driver.junit(name, time.monotonic() - start, failure if not isinstance(failure, SystemExit) or failure.code else None)
    if failure is not None and not (isinstance(failure, SystemExit) and not failure.code):
        driver.log("test failed")
        sys.exit(1)
    driver.log("test passed")


if __name__ == "__main__":
    main()
