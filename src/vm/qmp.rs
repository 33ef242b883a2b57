//! A QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! Commands are types (see [`Command`]); a command's error reply comes back as
//! [`QmpError::Command`] with QEMU's own `class` and `desc`. Events that arrive while a reply
//! is awaited are queued for [`Qmp::take_events`], never dropped. Every wait has a deadline,
//! and end-of-file is an error ([`QmpError::Closed`]), so a dead QEMU never hangs the caller.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::time::Instant;

use super::wait::{Deadline, TimedOut};

/// How long `execute` waits for a reply unless told otherwise.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_RETRY_INTERVAL: Duration = Duration::from_millis(25);
const MIGRATION_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// A revive loads in a fraction of a second: poll it finely.
const INCOMING_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// QEMU's replies are small; a longer line means the peer is not QEMU or is broken.
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// A QMP command: its wire name, its `arguments` (the serialized value; a unit struct sends
/// none) and the type of its `return` value.
pub trait Command: Serialize {
    const NAME: &'static str;
    type Reply: DeserializeOwned;
    /// QEMU may close the socket right after such a command (`quit`): end-of-file in place
    /// of the reply then counts as success.
    const CLOSES_CONNECTION: bool = false;
}

/// The `{}` that most commands return.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Empty {}

macro_rules! unit_command {
    ($(#[$doc:meta])* $type:ident, $name:literal, $reply:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct $type;
        impl Command for $type {
            const NAME: &'static str = $name;
            type Reply = $reply;
        }
    };
}

unit_command!(
    /// Sent once by [`Qmp::connect`]; leaves negotiation mode.
    QmpCapabilities, "qmp_capabilities", Empty);
unit_command!(
    /// Pauses the guest's CPUs.
    Stop, "stop", Empty);
unit_command!(
    /// Resumes the guest, also after an incoming migration.
    Cont, "cont", Empty);
unit_command!(QueryStatus, "query-status", StatusInfo);
unit_command!(QueryMigrate, "query-migrate", MigrationInfo);

/// Ends QEMU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Quit;
impl Command for Quit {
    const NAME: &'static str = "quit";
    type Reply = Empty;
    const CLOSES_CONNECTION: bool = true;
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// "running", "paused", "prelaunch", "inmigrate", "postmigrate", "shutdown", ...
    pub status: String,
    pub running: bool,
}

/// Starts saving the VM's state to `uri` (`exec:CMD`, `file:PATH`, `unix:PATH`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Migrate {
    pub uri: String,
}
impl Command for Migrate {
    const NAME: &'static str = "migrate";
    type Reply = Empty;
}

/// Takes the file descriptor that arrives with this command, under `fdname` (see
/// [`Qmp::pass_fd`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GetFd {
    pub fdname: String,
}
impl Command for GetFd {
    const NAME: &'static str = "getfd";
    type Reply = Empty;
}

/// Writes the VM's display as a binary PPM to `filename`, a path QEMU opens itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Screendump {
    pub filename: String,
}
impl Command for Screendump {
    const NAME: &'static str = "screendump";
    type Reply = Empty;
}

/// Presses and releases `keys` together, as a keyboard would.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SendKey {
    pub keys: Vec<KeyValue>,
}
impl Command for SendKey {
    const NAME: &'static str = "send-key";
    type Reply = Empty;
}

/// A key by its QEMU code name ("ret", "spc", "a", ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyValue {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub data: String,
}

impl KeyValue {
    pub fn qcode(name: &str) -> KeyValue {
        KeyValue { kind: "qcode", data: name.to_owned() }
    }
}

/// Starts loading state from `uri` into a QEMU started with `-incoming defer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateIncoming {
    pub uri: String,
}
impl Command for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Reply = Empty;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateSetCapabilities {
    pub capabilities: Vec<MigrationCapability>,
}
impl Command for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    type Reply = Empty;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationCapability {
    /// QEMU's name, e.g. "events", "mapped-ram", "multifd".
    pub capability: String,
    pub state: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct MigrationInfo {
    /// Absent until a migration has been started.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(rename = "error-desc", default)]
    pub error_desc: Option<String>,
    #[serde(default)]
    pub ram: Option<MigrationRam>,
    #[serde(rename = "total-time", default)]
    pub total_time_ms: Option<u64>,
}

impl MigrationInfo {
    pub fn ram_transferred(&self) -> Option<u64> {
        self.ram.as_ref().map(|ram| ram.transferred)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct MigrationRam {
    /// Bytes sent so far.
    pub transferred: u64,
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub remaining: u64,
}

/// What [`Qmp::wait_migration`] saw when the migration completed.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationSummary {
    pub ram_transferred: Option<u64>,
    /// QEMU's own measure; only the sending side reports it.
    pub total_time_ms: Option<u64>,
    pub waited: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Event {
    pub event: String,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub timestamp: Option<Timestamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Greeting {
    pub version: GreetingVersion,
    #[serde(default)]
    pub capabilities: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GreetingVersion {
    pub qemu: QemuVersion,
    #[serde(default)]
    pub package: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("could not connect to QMP socket {} within {}: {source}", socket.display(), seconds(*waited))]
    Connect { socket: PathBuf, waited: Duration, source: io::Error },
    #[error("{peer}: {during}: {source}")]
    Io { peer: String, during: String, source: io::Error },
    #[error("{peer}: timed out after {} waiting for {awaited}", seconds(*after))]
    Timeout { peer: String, awaited: String, after: Duration },
    /// End of file while something was awaited, or the connection was closed before.
    #[error("{peer} closed while waiting for {awaited}")]
    Closed { peer: String, awaited: String },
    #[error("{peer}: protocol error: {what}")]
    Protocol { peer: String, what: String },
    /// QEMU's error reply, as on the wire.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
    #[error("migration ended with status {status}{}", match desc {
        Some(desc) => format!(": {desc}"),
        None => " (QEMU gave no reason)".to_owned(),
    })]
    MigrationFailed { status: String, desc: Option<String> },
}

fn seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

/// One message from QEMU, as [`parse_message`] reads it from a line.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Greeting(Greeting),
    Event(Event),
    /// `id` is whatever the reply carried (QEMU echoes the request's); absent when QEMU could
    /// not parse the request.
    Reply {
        id: Option<Value>,
        result: Result<Value, WireError>,
    },
}

/// An error reply's object, as on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct WireError {
    pub class: String,
    pub desc: String,
}

/// Why a line from the peer is not a QMP message. Each variant keeps the line (lossily
/// decoded, trailing whitespace dropped) for the error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("not JSON ({detail}): {line}")]
    NotJson { detail: String, line: String },
    #[error("not a JSON object: {line}")]
    NotAnObject { line: String },
    #[error("bad greeting ({detail}): {line}")]
    BadGreeting { detail: String, line: String },
    #[error("bad event ({detail}): {line}")]
    BadEvent { detail: String, line: String },
    #[error("bad error reply ({detail}): {line}")]
    BadErrorReply { detail: String, line: String },
    #[error("neither greeting, event nor reply: {line}")]
    Unrecognized { line: String },
}

/// Reads one line from QEMU (newline optional) as a greeting, an event or a reply. Pure, so
/// that it can be tested and fuzzed apart from the socket.
pub fn parse_message(line: &[u8]) -> Result<Message, MessageError> {
    let shown = || String::from_utf8_lossy(line).trim_end().to_string();
    let value: Value =
        serde_json::from_slice(line).map_err(|e| MessageError::NotJson { detail: e.to_string(), line: shown() })?;
    let Value::Object(mut object) = value else {
        return Err(MessageError::NotAnObject { line: shown() });
    };
    if let Some(greeting) = object.remove("QMP") {
        return serde_json::from_value(greeting)
            .map(Message::Greeting)
            .map_err(|e| MessageError::BadGreeting { detail: e.to_string(), line: shown() });
    }
    if object.contains_key("event") {
        return serde_json::from_value(Value::Object(object))
            .map(Message::Event)
            .map_err(|e| MessageError::BadEvent { detail: e.to_string(), line: shown() });
    }
    let id = object.remove("id");
    if let Some(value) = object.remove("return") {
        return Ok(Message::Reply { id, result: Ok(value) });
    }
    if let Some(error) = object.remove("error") {
        let error: WireError = serde_json::from_value(error)
            .map_err(|e| MessageError::BadErrorReply { detail: e.to_string(), line: shown() })?;
        return Ok(Message::Reply { id, result: Err(error) });
    }
    Err(MessageError::Unrecognized { line: shown() })
}

pub struct Qmp {
    peer: String,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// Bytes of a line not yet complete; kept here so a timed-out read loses nothing.
    partial: Vec<u8>,
    next_id: u64,
    events: VecDeque<Event>,
    greeting: Greeting,
    command_timeout: Duration,
    closed: bool,
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp")
            .field("peer", &self.peer)
            .field("qemu", &self.greeting.version.qemu)
            .field("queued_events", &self.events.len())
            .field("closed", &self.closed)
            .finish()
    }
}

impl Qmp {
    /// Connects to QEMU's `-qmp unix:PATH,server=on,wait=off` socket, retrying while the
    /// socket does not exist yet or refuses, then reads the greeting and leaves negotiation
    /// mode; all of it within `deadline`.
    ///
    /// A QEMU that dies before creating its socket is only noticed at the deadline: callers
    /// that own the process race this against its exit.
    pub async fn connect(path: impl AsRef<Path>, deadline: Duration) -> Result<Qmp, QmpError> {
        let path = path.as_ref();
        let start = Instant::now();
        let end = start + deadline;
        let stream = loop {
            let attempt = match tokio::time::timeout_at(end, UnixStream::connect(path)).await {
                Ok(attempt) => attempt,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect() did not finish")),
            };
            match attempt {
                Ok(stream) => break stream,
                // QEMU creates the socket a moment after it starts; anything else is final.
                Err(error)
                    if matches!(error.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused)
                        && Instant::now() + CONNECT_RETRY_INTERVAL < end =>
                {
                    tokio::time::sleep(CONNECT_RETRY_INTERVAL).await;
                }
                Err(source) => {
                    return Err(QmpError::Connect { socket: path.to_path_buf(), waited: start.elapsed(), source })
                }
            }
        };
        let remaining = end.saturating_duration_since(Instant::now());
        Qmp::handshake(stream, format!("QMP socket {}", path.display()), remaining).await
    }

    /// The greeting and capabilities negotiation on an already connected stream. `peer`
    /// names it in error messages.
    pub async fn handshake(stream: UnixStream, peer: impl Into<String>, deadline: Duration) -> Result<Qmp, QmpError> {
        let (reader, writer) = stream.into_split();
        let mut qmp = Qmp {
            peer: peer.into(),
            reader: BufReader::new(reader),
            writer,
            partial: Vec::new(),
            next_id: 1,
            events: VecDeque::new(),
            greeting: Greeting {
                version: GreetingVersion { qemu: QemuVersion { major: 0, minor: 0, micro: 0 }, package: String::new() },
                capabilities: Vec::new(),
            },
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            closed: false,
        };
        let end = Instant::now() + deadline;
        loop {
            match qmp.read_message("the QMP greeting", end, deadline).await? {
                Message::Greeting(greeting) => {
                    qmp.greeting = greeting;
                    break;
                }
                Message::Event(event) => qmp.events.push_back(event),
                Message::Reply { .. } => return Err(qmp.protocol("a reply arrived before the QMP greeting".into())),
            }
        }
        let remaining = end.saturating_duration_since(Instant::now());
        qmp.execute_within(&QmpCapabilities, remaining).await?;
        Ok(qmp)
    }

    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Runs `command` and waits for its reply for the command timeout (30 s by default).
    pub async fn execute<C: Command>(&mut self, command: &C) -> Result<C::Reply, QmpError> {
        self.execute_within(command, self.command_timeout).await
    }

    pub async fn execute_within<C: Command>(&mut self, command: &C, timeout: Duration) -> Result<C::Reply, QmpError> {
        self.execute_with_fd(command, None, timeout).await
    }

    /// Hands QEMU a file descriptor under `name` (`getfd`): it travels with the command's bytes
    /// as SCM_RIGHTS, and `fd:NAME` in a migration URI then means it. QEMU keeps its own copy;
    /// the caller may close theirs once this returns.
    pub async fn pass_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), QmpError> {
        self.execute_with_fd(&GetFd { fdname: name.to_string() }, Some(fd), self.command_timeout).await?;
        Ok(())
    }

    async fn execute_with_fd<C: Command>(
        &mut self,
        command: &C,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
        timeout: Duration,
    ) -> Result<C::Reply, QmpError> {
        let awaited = format!("the reply to {}", C::NAME);
        if self.closed {
            return Err(QmpError::Closed { peer: self.peer.clone(), awaited });
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut request = serde_json::Map::new();
        request.insert("execute".into(), Value::from(C::NAME));
        let arguments = serde_json::to_value(command)
            .map_err(|error| self.protocol(format!("cannot encode the arguments of {}: {error}", C::NAME)))?;
        match arguments {
            Value::Null => {}
            Value::Object(ref fields) if fields.is_empty() => {}
            Value::Object(_) => {
                request.insert("arguments".into(), arguments);
            }
            other => {
                return Err(
                    self.protocol(format!("the arguments of {} must encode to a JSON object, not {other}", C::NAME))
                )
            }
        }
        request.insert("id".into(), Value::from(id));
        let mut line = Value::Object(request).to_string().into_bytes();
        line.push(b'\n');

        let end = Instant::now() + timeout;
        let send = async {
            let mut sent = 0;
            if let Some(fd) = fd {
                // The descriptor goes with the first bytes; the rest of the line, if the socket
                // took only part of it, follows plainly.
                let stream: &UnixStream = self.writer.as_ref();
                sent = loop {
                    stream.writable().await?;
                    match stream
                        .try_io(tokio::io::Interest::WRITABLE, || super::process::send_with_fd(stream, &line, fd))
                    {
                        Ok(n) => break n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e),
                    }
                };
            }
            self.writer.write_all(&line[sent..]).await
        };
        match tokio::time::timeout_at(end, send).await {
            Ok(Ok(())) => {}
            Ok(Err(source)) => {
                self.closed = true;
                let during = format!("sending {}", C::NAME);
                return Err(QmpError::Io { peer: self.peer.clone(), during, source });
            }
            Err(_) => {
                // Part of the line may be out: the stream can no longer be trusted.
                self.closed = true;
                let awaited = format!("{} to be sent", C::NAME);
                return Err(QmpError::Timeout { peer: self.peer.clone(), awaited, after: timeout });
            }
        }

        let result = loop {
            let message = match self.read_message(&awaited, end, timeout).await {
                Ok(message) => message,
                Err(QmpError::Closed { .. }) if C::CLOSES_CONNECTION => {
                    break Ok(Value::Object(serde_json::Map::new()));
                }
                Err(error) => return Err(error),
            };
            match message {
                Message::Event(event) => self.events.push_back(event),
                Message::Greeting(_) => {
                    return Err(self.protocol(format!("a second greeting arrived while waiting for {awaited}")))
                }
                Message::Reply { id: reply_id, result } => match reply_id {
                    // QEMU leaves out the id only when it could not parse the request.
                    None => break result,
                    Some(reply_id) if reply_id == id => break result,
                    // A late reply to a request whose wait timed out earlier.
                    Some(Value::Number(n)) if n.as_u64().is_some_and(|old| old < id) => continue,
                    Some(other) => {
                        return Err(self
                            .protocol(format!("reply with unknown id {other} while waiting for {awaited} (id {id})")))
                    }
                },
            }
        };
        match result {
            Ok(value) => serde_json::from_value(value.clone())
                .map_err(|error| self.protocol(format!("unexpected reply to {}: {error}: {value}", C::NAME))),
            Err(WireError { class, desc }) => Err(QmpError::Command { command: C::NAME.to_string(), class, desc }),
        }
    }

    /// The events received so far, oldest first; the queue is left empty.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// The first event called `name`, taken from the queue if it already arrived; other
    /// events stay queued. (Only the tests wait for an event: the session polls the VM's state.)
    #[cfg(test)]
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Event, QmpError> {
        if let Some(index) = self.events.iter().position(|event| event.event == name) {
            if let Some(event) = self.events.remove(index) {
                return Ok(event);
            }
        }
        let awaited = format!("event {name}");
        if self.closed {
            return Err(QmpError::Closed { peer: self.peer.clone(), awaited });
        }
        let end = Instant::now() + timeout;
        loop {
            match self.read_message(&awaited, end, timeout).await? {
                Message::Event(event) if event.event == name => return Ok(event),
                Message::Event(event) => self.events.push_back(event),
                Message::Reply { id: Some(Value::Number(n)), .. }
                    if n.as_u64().is_some_and(|old| old < self.next_id) => {}
                Message::Reply { .. } | Message::Greeting(_) => {
                    return Err(self
                        .protocol(format!("unexpected message while waiting for {awaited}, with no command pending")))
                }
            }
        }
    }

    /// Polls `query-migrate` until the migration (outgoing or incoming) has completed.
    /// A `failed` or `cancelled` migration is [`QmpError::MigrationFailed`].
    pub async fn wait_migration(&mut self, deadline: Duration) -> Result<MigrationSummary, QmpError> {
        let wait = Deadline::new("the migration to complete", deadline).every(MIGRATION_POLL_INTERVAL);
        loop {
            let info = self.execute_within(&QueryMigrate, wait.remaining()).await.map_err(|error| {
                match error {
                    // The poll's own timeout is the migration's.
                    QmpError::Timeout { .. } => self.migration_timeout(None, deadline),
                    other => other,
                }
            })?;
            match info.status.as_deref() {
                Some("completed") => {
                    return Ok(MigrationSummary {
                        ram_transferred: info.ram_transferred(),
                        total_time_ms: info.total_time_ms,
                        waited: wait.elapsed(),
                    })
                }
                Some(status @ ("failed" | "cancelled")) => {
                    return Err(QmpError::MigrationFailed { status: status.to_string(), desc: info.error_desc })
                }
                _ => {}
            }
            if wait.remaining() <= MIGRATION_POLL_INTERVAL {
                return Err(self.migration_timeout(Some(&info), deadline));
            }
            wait.pause().await;
        }
    }

    /// Polls `query-status` while a VM started with `-incoming` loads its state; returns the
    /// run state it ended in (`paused`, `postmigrate`, `prelaunch` or `running`). Any other
    /// state is [`QmpError::MigrationFailed`].
    pub async fn wait_incoming(&mut self, deadline: Duration) -> Result<String, QmpError> {
        let wait = Deadline::new("the saved state to load", deadline).every(INCOMING_POLL_INTERVAL);
        loop {
            let status = self.execute_within(&QueryStatus, wait.remaining()).await.map_err(|error| match error {
                QmpError::Timeout { .. } => self.timeout_error(wait.timed_out()),
                other => other,
            })?;
            match status.status.as_str() {
                "inmigrate" => {}
                "paused" | "postmigrate" | "prelaunch" | "running" => return Ok(status.status),
                other => return Err(QmpError::MigrationFailed { status: other.to_string(), desc: None }),
            }
            wait.check().map_err(|t| self.timeout_error(t))?;
            wait.pause().await;
        }
    }

    fn migration_timeout(&self, last: Option<&MigrationInfo>, after: Duration) -> QmpError {
        let mut awaited = String::from("the migration to complete");
        if let Some(info) = last {
            let status = info.status.as_deref().unwrap_or("none");
            awaited.push_str(&format!(" (last status: {status}"));
            if let Some(sent) = info.ram_transferred() {
                awaited.push_str(&format!(", {sent} bytes of RAM sent"));
            }
            awaited.push(')');
        }
        QmpError::Timeout { peer: self.peer.clone(), awaited, after }
    }

    fn timeout_error(&self, t: TimedOut) -> QmpError {
        QmpError::Timeout { peer: self.peer.clone(), awaited: t.what, after: t.after }
    }

    fn protocol(&self, what: String) -> QmpError {
        QmpError::Protocol { peer: self.peer.clone(), what }
    }

    /// The next message, waiting at most until `end`; `timeout` is only for the error.
    async fn read_message(&mut self, awaited: &str, end: Instant, timeout: Duration) -> Result<Message, QmpError> {
        let line = match tokio::time::timeout_at(end, self.read_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => {
                self.closed = true;
                return Err(QmpError::Closed { peer: self.peer.clone(), awaited: awaited.into() });
            }
            Ok(Err(source)) => {
                self.closed = true;
                let during = format!("reading while waiting for {awaited}");
                return Err(QmpError::Io { peer: self.peer.clone(), during, source });
            }
            Err(_) => {
                let (peer, awaited) = (self.peer.clone(), awaited.to_string());
                return Err(QmpError::Timeout { peer, awaited, after: timeout });
            }
        };
        parse_message(&line).map_err(|error| self.protocol(error.to_string()))
    }

    /// One line, newline included; `None` at end of file. Cancel-safe: bytes read before a
    /// cancellation stay in `partial`.
    async fn read_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut scanned = 0;
        loop {
            if let Some(at) = self.partial[scanned..].iter().position(|&b| b == b'\n') {
                let rest = self.partial.split_off(scanned + at + 1);
                return Ok(Some(std::mem::replace(&mut self.partial, rest)));
            }
            scanned = self.partial.len();
            if scanned > MAX_MESSAGE_BYTES {
                let what = format!("a message longer than {MAX_MESSAGE_BYTES} bytes");
                return Err(io::Error::new(io::ErrorKind::InvalidData, what));
            }
            let buffer = self.reader.fill_buf().await?;
            if buffer.is_empty() {
                return Ok(None);
            }
            let taken = buffer.len();
            self.partial.extend_from_slice(buffer);
            self.reader.consume(taken);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::AsyncBufReadExt;

    const SHORT: Duration = Duration::from_secs(5);

    /// The QEMU side of a socketpair, scripted by each test.
    struct FakeQemu {
        lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
        writer: OwnedWriteHalf,
    }

    impl FakeQemu {
        async fn send(&mut self, message: Value) {
            let mut line = message.to_string();
            line.push_str("\r\n");
            self.writer.write_all(line.as_bytes()).await.unwrap();
        }

        async fn greet(&mut self) {
            self.send(json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
                "package": "fake"}, "capabilities": ["oob"]}}))
                .await;
        }

        async fn receive(&mut self) -> Value {
            let line = self.lines.next_line().await.unwrap().expect("client closed");
            serde_json::from_str(&line).unwrap()
        }

        /// Reads one request, checks its command name, returns its id and arguments.
        async fn expect(&mut self, name: &str) -> (Value, Option<Value>) {
            let request = self.receive().await;
            assert_eq!(request["execute"], name, "{request}");
            (request["id"].clone(), request.get("arguments").cloned())
        }

        async fn reply(&mut self, id: Value, value: Value) {
            self.send(json!({"return": value, "id": id})).await;
        }

        /// Greeting plus the capabilities negotiation.
        async fn accept(&mut self) {
            self.greet().await;
            let (id, arguments) = self.expect("qmp_capabilities").await;
            assert_eq!(arguments, None, "no arguments for a unit command");
            self.reply(id, json!({})).await;
        }
    }

    fn pair() -> (UnixStream, FakeQemu) {
        let (client, server) = UnixStream::pair().unwrap();
        let (read, writer) = server.into_split();
        (client, FakeQemu { lines: BufReader::new(read).lines(), writer })
    }

    async fn connected() -> (Qmp, FakeQemu) {
        let (client, mut server) = pair();
        let (qmp, ()) = tokio::join!(Qmp::handshake(client, "fake QMP", SHORT), server.accept());
        (qmp.unwrap(), server)
    }

    #[tokio::test]
    async fn handshake_reads_greeting_and_negotiates() {
        let (client, mut server) = pair();
        let server_side = async {
            server.greet().await;
            let request = server.receive().await;
            assert_eq!(request, json!({"execute": "qmp_capabilities", "id": 1}));
            server.reply(json!(1), json!({})).await;
        };
        let (qmp, ()) = tokio::join!(Qmp::handshake(client, "fake QMP", SHORT), server_side);
        let qmp = qmp.unwrap();
        assert_eq!(qmp.greeting().version.qemu, QemuVersion { major: 10, minor: 0, micro: 2 });
        assert_eq!(qmp.greeting().capabilities, ["oob"]);
    }

    #[tokio::test]
    async fn events_before_a_reply_are_queued() {
        let (mut qmp, mut server) = connected().await;
        let server_side = async {
            let (id, _) = server.expect("stop").await;
            server.send(json!({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}})).await;
            server.send(json!({"event": "RESUME", "data": {"x": 1}})).await;
            server.reply(id, json!({})).await;
            let (id, _) = server.expect("query-status").await;
            server.reply(id, json!({"status": "paused", "running": false, "singlestep": false})).await;
        };
        let client_side = async {
            qmp.execute(&Stop).await.unwrap();
            qmp.execute(&QueryStatus).await.unwrap()
        };
        let (status, ()) = tokio::join!(client_side, server_side);
        assert_eq!(status, StatusInfo { status: "paused".into(), running: false });
        let events = qmp.take_events();
        let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(names, ["STOP", "RESUME"]);
        assert_eq!(events[0].timestamp, Some(Timestamp { seconds: 1, microseconds: 2 }));
        assert_eq!(events[1].data, json!({"x": 1}));
        assert!(qmp.take_events().is_empty());
    }

    #[tokio::test]
    async fn error_replies_mirror_the_wire() {
        let (mut qmp, mut server) = connected().await;
        let server_side = async {
            let (id, arguments) = server.expect("migrate").await;
            assert_eq!(arguments, Some(json!({"uri": "exec:gzip -c > /x/state.gz"})));
            server
                .send(json!({"id": id, "error": {"class": "GenericError",
                "desc": "Migration is disabled when VirtFS export path '/' is mounted"}}))
                .await;
        };
        let migrate = Migrate { uri: "exec:gzip -c > /x/state.gz".into() };
        let (result, ()) = tokio::join!(qmp.execute(&migrate), server_side);
        let error = result.unwrap_err();
        assert!(matches!(&error, QmpError::Command { class, .. } if class == "GenericError"), "{error:?}");
        assert_eq!(
            error.to_string(),
            "QMP command migrate failed: GenericError: \
             Migration is disabled when VirtFS export path '/' is mounted"
        );
    }

    #[tokio::test]
    async fn eof_while_waiting_is_closed_not_a_hang() {
        let (mut qmp, mut server) = connected().await;
        let server_side = async move {
            server.expect("query-status").await;
            drop(server);
        };
        let (result, ()) = tokio::join!(qmp.execute(&QueryStatus), server_side);
        let error = result.unwrap_err();
        assert!(matches!(error, QmpError::Closed { .. }), "{error:?}");
        assert_eq!(error.to_string(), "fake QMP closed while waiting for the reply to query-status");
        // Later calls fail at once instead of writing into a dead socket.
        let error = qmp.execute(&Cont).await.unwrap_err();
        assert_eq!(error.to_string(), "fake QMP closed while waiting for the reply to cont");
        let error = qmp.wait_event("SHUTDOWN", SHORT).await.unwrap_err();
        assert_eq!(error.to_string(), "fake QMP closed while waiting for event SHUTDOWN");
    }

    #[tokio::test]
    async fn eof_in_the_middle_of_a_line_is_closed() {
        let (mut qmp, mut server) = connected().await;
        let server_side = async move {
            server.expect("query-status").await;
            server.writer.write_all(b"{\"return\": {\"status\": ").await.unwrap();
            drop(server);
        };
        let (result, ()) = tokio::join!(qmp.execute(&QueryStatus), server_side);
        assert!(matches!(result, Err(QmpError::Closed { .. })), "{result:?}");
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_and_a_late_reply_is_skipped() {
        let (mut qmp, mut server) = connected().await;
        let server_side = async {
            let (late_id, _) = server.expect("query-status").await;
            let (id, _) = server.expect("query-status").await;
            server.reply(late_id, json!({"status": "stale", "running": false})).await;
            server.reply(id, json!({"status": "running", "running": true})).await;
        };
        let client_side = async {
            let error = qmp.execute_within(&QueryStatus, Duration::from_millis(200)).await.unwrap_err();
            assert_eq!(error.to_string(), "fake QMP: timed out after 0.2 s waiting for the reply to query-status");
            qmp.execute(&QueryStatus).await
        };
        let (status, ()) = tokio::join!(client_side, server_side);
        assert_eq!(status.unwrap().status, "running");
    }

    /// The pure reader that tests/fuzz.rs drives: each kind of line, and nesting deeper than
    /// serde_json's limit refused as not JSON rather than overflowing the stack.
    #[test]
    fn parse_message_reads_each_kind_of_line() {
        let greeting = br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}}}}"#;
        let Ok(Message::Greeting(g)) = parse_message(greeting) else { panic!("not a greeting") };
        assert_eq!((g.version.qemu.major, g.version.package.as_str(), g.capabilities.len()), (10, "", 0));
        assert_eq!(
            parse_message(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}, \"id\": 3}\r\n"),
            Ok(Message::Reply {
                id: Some(json!(3)),
                result: Err(WireError { class: "GenericError".into(), desc: "no".into() })
            })
        );
        let deep = format!("{}\n", "[".repeat(100_000));
        assert!(matches!(parse_message(deep.as_bytes()), Err(MessageError::NotJson { .. })));
        let cases: [(&[u8], &str); 5] = [
            (b"[1]\n", "not a JSON object: [1]"),
            (br#"{"QMP": 1}"#, "bad greeting (invalid type: integer `1`, expected struct Greeting): {\"QMP\": 1}"),
            (br#"{"event": 5}"#, "bad event (invalid type: integer `5`, expected a string): {\"event\": 5}"),
            (
                br#"{"error": {"class": "X"}}"#,
                "bad error reply (missing field `desc`): {\"error\": {\"class\": \"X\"}}",
            ),
            (br#"{"id": 1}"#, "neither greeting, event nor reply: {\"id\": 1}"),
        ];
        for (line, message) in cases {
            assert_eq!(parse_message(line).unwrap_err().to_string(), message);
        }
    }

    #[tokio::test]
    async fn unknown_ids_and_garbage_are_protocol_errors() {
        let (mut qmp, mut server) = connected().await;
        let server_side = async {
            server.expect("stop").await;
            server.reply(json!(999), json!({})).await;
        };
        let (result, ()) = tokio::join!(qmp.execute(&Stop), server_side);
        assert_eq!(
            result.unwrap_err().to_string(),
            "fake QMP: protocol error: reply with unknown id 999 while waiting for \
             the reply to stop (id 2)"
        );
        let server_side = async {
            server.expect("cont").await;
            server.writer.write_all(b"not json\n").await.unwrap();
        };
        let (result, ()) = tokio::join!(qmp.execute(&Cont), server_side);
        let text = result.unwrap_err().to_string();
        assert!(text.starts_with("fake QMP: protocol error: not JSON ("), "{text}");
        assert!(text.ends_with("): not json"), "{text}");
        let server_side = async {
            let (id, _) = server.expect("query-status").await;
            server.reply(id, json!({"status": 5})).await;
        };
        let (result, ()) = tokio::join!(qmp.execute(&QueryStatus), server_side);
        let text = result.unwrap_err().to_string();
        assert!(text.starts_with("fake QMP: protocol error: unexpected reply to query-status"), "{text}");
    }

    #[tokio::test]
    async fn greeting_must_come_in_time() {
        let (client, _server) = pair();
        let error = Qmp::handshake(client, "fake QMP", Duration::from_millis(100)).await.unwrap_err();
        assert_eq!(error.to_string(), "fake QMP: timed out after 0.1 s waiting for the QMP greeting");
        let (client, server) = pair();
        drop(server);
        let error = Qmp::handshake(client, "fake QMP", SHORT).await.unwrap_err();
        assert_eq!(error.to_string(), "fake QMP closed while waiting for the QMP greeting");
    }

    #[tokio::test]
    async fn migration_is_polled_until_completed() {
        let (mut qmp, mut server) = connected().await;
        let server_side = async {
            let (id, arguments) = server.expect("migrate-set-capabilities").await;
            assert_eq!(arguments, Some(json!({"capabilities": [{"capability": "events", "state": true}]})));
            server.reply(id, json!({})).await;
            let (id, _) = server.expect("stop").await;
            server.reply(id, json!({})).await;
            let (id, arguments) = server.expect("migrate").await;
            assert_eq!(arguments, Some(json!({"uri": "file:/build/state"})));
            server.reply(id, json!({})).await;
            for reply in [
                json!({"status": "setup"}),
                json!({"status": "active", "ram": {"transferred": 100, "total": 1000, "remaining": 900}}),
                json!({"status": "completed", "total-time": 42, "ram": {"transferred": 1089}}),
            ] {
                let (id, _) = server.expect("query-migrate").await;
                server.send(json!({"event": "MIGRATION", "data": {"status": reply["status"]}})).await;
                server.reply(id, reply).await;
            }
        };
        let client_side = async {
            let capabilities = vec![MigrationCapability { capability: "events".into(), state: true }];
            qmp.execute(&MigrateSetCapabilities { capabilities }).await.unwrap();
            qmp.execute(&Stop).await.unwrap();
            qmp.execute(&Migrate { uri: "file:/build/state".into() }).await.unwrap();
            qmp.wait_migration(SHORT).await
        };
        let (summary, ()) = tokio::join!(client_side, server_side);
        let summary = summary.unwrap();
        assert_eq!(summary.ram_transferred, Some(1089));
        assert_eq!(summary.total_time_ms, Some(42));
        assert_eq!(qmp.take_events().len(), 3, "MIGRATION events kept");
    }

    #[tokio::test]
    async fn failed_migration_says_why() {
        let (mut qmp, mut server) = connected().await;
        let server_side = async {
            let (id, _) = server.expect("query-migrate").await;
            server.reply(id, json!({"status": "active"})).await;
            let (id, _) = server.expect("query-migrate").await;
            server.reply(id, json!({"status": "failed", "error-desc": "No space left on device"})).await;
        };
        let (result, ()) = tokio::join!(qmp.wait_migration(SHORT), server_side);
        assert_eq!(result.unwrap_err().to_string(), "migration ended with status failed: No space left on device");
    }

    #[tokio::test]
    async fn stuck_migration_times_out_with_its_last_status() {
        let (mut qmp, mut server) = connected().await;
        let server_side = async {
            while let Ok(Some(line)) = server.lines.next_line().await {
                let request: Value = serde_json::from_str(&line).unwrap();
                let reply = json!({"status": "active", "ram": {"transferred": 5}});
                server.reply(request["id"].clone(), reply).await;
            }
        };
        let client_side = async {
            let result = qmp.wait_migration(Duration::from_millis(300)).await;
            drop(qmp);
            result
        };
        let (result, ()) = tokio::join!(client_side, server_side);
        assert_eq!(
            result.unwrap_err().to_string(),
            "fake QMP: timed out after 0.3 s waiting for the migration to complete \
             (last status: active, 5 bytes of RAM sent)"
        );
    }

    #[tokio::test]
    async fn quit_accepts_eof_in_place_of_its_reply() {
        let (mut qmp, mut server) = connected().await;
        let server_side = async move {
            server.expect("quit").await;
            server.send(json!({"event": "SHUTDOWN", "data": {"guest": false}})).await;
            drop(server);
        };
        let (result, ()) = tokio::join!(qmp.execute(&Quit), server_side);
        assert_eq!(result.unwrap(), Empty {});
        assert_eq!(qmp.take_events()[0].event, "SHUTDOWN");
    }

    #[tokio::test]
    async fn wait_event_takes_queued_or_future_events() {
        let (mut qmp, mut server) = connected().await;
        let server_side = async {
            let (id, _) = server.expect("stop").await;
            server.send(json!({"event": "STOP"})).await;
            server.reply(id, json!({})).await;
            server.send(json!({"event": "RTC_CHANGE", "data": {"offset": 1}})).await;
            server.send(json!({"event": "SHUTDOWN", "data": {"guest": true}})).await;
        };
        let client_side = async {
            qmp.execute(&Stop).await.unwrap();
            let stop = qmp.wait_event("STOP", SHORT).await.unwrap();
            let shutdown = qmp.wait_event("SHUTDOWN", SHORT).await.unwrap();
            (stop, shutdown)
        };
        let ((stop, shutdown), ()) = tokio::join!(client_side, server_side);
        assert_eq!(stop.event, "STOP");
        assert_eq!(shutdown.data, json!({"guest": true}));
        let rest: Vec<String> = qmp.take_events().into_iter().map(|e| e.event).collect();
        assert_eq!(rest, ["RTC_CHANGE"]);
        let error = qmp.wait_event("RESET", Duration::from_millis(100)).await.unwrap_err();
        assert_eq!(error.to_string(), "fake QMP: timed out after 0.1 s waiting for event RESET");
    }

    #[tokio::test]
    async fn connect_retries_until_the_socket_appears() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let error = Qmp::connect(&socket, Duration::from_millis(200)).await.unwrap_err();
        let text = error.to_string();
        assert!(text.starts_with(&format!("could not connect to QMP socket {} within 0.", socket.display())), "{text}");
        assert!(text.ends_with("No such file or directory (os error 2)"), "{text}");

        let listener_path = socket.clone();
        let server_side = async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let listener = tokio::net::UnixListener::bind(&listener_path).unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            let (read, writer) = stream.into_split();
            let mut server = FakeQemu { lines: BufReader::new(read).lines(), writer };
            server.accept().await;
            server
        };
        let (qmp, _server) = tokio::join!(Qmp::connect(&socket, SHORT), server_side);
        assert_eq!(qmp.unwrap().greeting().version.qemu.major, 10);
    }

    // -----------------------------------------------------------------------------------
    // Real QEMU

    const QEMU: &str = "qemu-system-x86_64";

    fn qemu_available() -> bool {
        let found = std::process::Command::new(QEMU).arg("--version").output().is_ok();
        crate::tools::test_requires(QEMU, found)
    }

    fn spawn_qemu(socket: &Path, extra: &[&str]) -> tokio::process::Child {
        tokio::process::Command::new(QEMU)
            .args(["-machine", "none", "-nodefaults", "-display", "none"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .args(extra)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    async fn exits_within(child: &mut tokio::process::Child, deadline: Duration) {
        let status = tokio::time::timeout(deadline, child.wait())
            .await
            .unwrap_or_else(|_| panic!("QEMU still running {} after quit", seconds(deadline)))
            .unwrap();
        assert!(status.success(), "QEMU exited with {status}");
    }

    #[tokio::test]
    async fn real_qemu_query_status_then_quit() {
        if !qemu_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let mut child = spawn_qemu(&socket, &[]);
        let mut qmp = Qmp::connect(&socket, Duration::from_secs(20)).await.unwrap();
        assert!(qmp.greeting().version.qemu.major >= 2, "{:?}", qmp.greeting());
        let status = qmp.execute(&QueryStatus).await.unwrap();
        assert_eq!(status, StatusInfo { status: "running".into(), running: true });
        let error = qmp.execute(&MigrateIncoming { uri: "file:/nonexistent".into() }).await.unwrap_err();
        assert!(matches!(error, QmpError::Command { .. }), "{error:?}");
        qmp.execute(&Quit).await.unwrap();
        exits_within(&mut child, Duration::from_secs(20)).await;
    }

    /// Save with `stop` + `migrate file:`, restore into `-incoming defer`, as the suspend and
    /// build stages do (on a machine with no devices, so it takes milliseconds).
    #[tokio::test]
    async fn real_qemu_saves_and_restores_state() {
        if !qemu_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let uri = format!("file:{}", state.display());

        let socket = dir.path().join("save.sock");
        let mut saver = spawn_qemu(&socket, &[]);
        let mut qmp = Qmp::connect(&socket, Duration::from_secs(20)).await.unwrap();
        let events = vec![MigrationCapability { capability: "events".into(), state: true }];
        qmp.execute(&MigrateSetCapabilities { capabilities: events }).await.unwrap();
        qmp.execute(&Stop).await.unwrap();
        qmp.execute(&Migrate { uri: uri.clone() }).await.unwrap();
        let summary = qmp.wait_migration(Duration::from_secs(60)).await.unwrap();
        assert!(summary.ram_transferred.is_some_and(|sent| sent > 0), "{summary:?}");
        assert!(state.metadata().unwrap().len() > 0);
        let names: Vec<String> = qmp.take_events().into_iter().map(|e| e.event).collect();
        assert!(names.contains(&"STOP".to_string()), "{names:?}");
        qmp.execute(&Quit).await.unwrap();
        exits_within(&mut saver, Duration::from_secs(20)).await;

        let socket = dir.path().join("restore.sock");
        let mut restorer = spawn_qemu(&socket, &["-incoming", "defer"]);
        let mut qmp = Qmp::connect(&socket, Duration::from_secs(20)).await.unwrap();
        assert_eq!(qmp.execute(&QueryStatus).await.unwrap().status, "inmigrate");
        qmp.execute(&MigrateIncoming { uri }).await.unwrap();
        qmp.wait_migration(Duration::from_secs(60)).await.unwrap();
        assert_eq!(qmp.execute(&QueryStatus).await.unwrap().status, "paused");
        qmp.execute(&Cont).await.unwrap();
        assert!(qmp.execute(&QueryStatus).await.unwrap().running);
        qmp.execute(&Quit).await.unwrap();
        exits_within(&mut restorer, Duration::from_secs(20)).await;
    }
}
