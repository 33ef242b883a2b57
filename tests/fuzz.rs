//! Fuzzing of the formats read from outside the program: the state file
//! (src/format/state.rs and src/vm/state.rs), QEMU's QMP lines (src/vm/qmp.rs), Cygwin's
//! setup.ini (src/guest/windows/cygwin.rs) and the shim's node arrays (src/plugin/value.rs);
//! and of every other codec of src/format/ (tests/fuzz/formats.rs).
//!
//! Each target makes its inputs from a seeded generator that knows the format: valid files,
//! lines and trees first, then damaged in the ways that reach each check (bytes flipped,
//! inserted or cut, files truncated at their seams, length fields set to extremes, a frame
//! re-sealed around a damaged payload, child ranges that overlap). Every input must end
//! without a panic, within HANG_AFTER, without holding more memory than its target's budget,
//! with an error of the reader's own type; where the format has an encoder, decoding what it
//! wrote gives the value back.
//!
//! NIX_WINVM_FUZZ_INPUTS inputs per target (default 20000); NIX_WINVM_FUZZ_SEED changes them
//! (decimal or 0x-hex); NIX_WINVM_FUZZ_ONLY=N runs input N alone, prints it and lets a panic
//! through. scripts/fuzz runs a million of each in release mode.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use flate2::Crc;
use nix_winvm::format::state::{FrameError, END_MAGIC, MAGIC};
use nix_winvm::testing::cygwin::{self, SetupIni, SetupIniError};
use nix_winvm::testing::plugin_bridge::{Kind, Node};
use nix_winvm::testing::plugin_value::{from_nodes, to_nodes, DecodeError, Val};
use nix_winvm::testing::qmp::{self, Message, MessageError};
use nix_winvm::testing::state::{self, StateFileError, StateHeader};
use serde_json::Value;

#[path = "fuzz/formats.rs"]
mod formats;

const DEFAULT_INPUTS: u64 = 20_000;
const DEFAULT_SEED: u64 = 0x6e69_782d_7769_6e76; // "nix-winv"
/// An input still running after this is a hang: the process is stopped with the input's number.
const HANG_AFTER: Duration = Duration::from_secs(20);
/// An input slower than this fails its target: every format here is read in linear time, and
/// the largest generated input takes milliseconds.
const SLOW_AFTER: Duration = Duration::from_secs(3);
/// A single allocation this large during an input stops the process: it can only come from a
/// length field taken at its word.
const HUGE_ALLOCATION: usize = 1 << 30;

// ---------------------------------------------------------------------------------------------
// The harness

struct Settings {
    inputs: u64,
    seed: u64,
    only: Option<u64>,
}

fn settings() -> Settings {
    let number = |name: &str| {
        std::env::var(name).ok().map(|text| {
            let text = text.trim().replace('_', "");
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{name}={text} is not a number"))
        })
    };
    Settings {
        inputs: number("NIX_WINVM_FUZZ_INPUTS").unwrap_or(DEFAULT_INPUTS),
        seed: number("NIX_WINVM_FUZZ_SEED").unwrap_or(DEFAULT_SEED),
        only: number("NIX_WINVM_FUZZ_ONLY"),
    }
}

/// xorshift64*, seeded per input so that any input can be made again from its number.
struct Rng(u64);

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    fn for_input(seed: u64, index: u64) -> Rng {
        Rng(splitmix(seed ^ splitmix(index)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// 0..n; n > 0.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Small numbers far more often than large ones: 0..=max.
    fn size(&mut self, max: usize) -> usize {
        let bound = self.below(max + 1);
        self.below(bound + 1)
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// One of `extremes`, or now and then `random` of a fresh number.
    fn extreme<T: Copy>(&mut self, extremes: &[T], random: impl FnOnce(u64) -> T) -> T {
        match self.below(extremes.len() + 1) {
            i if i < extremes.len() => extremes[i],
            _ => random(self.next()),
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// What an input did, when it did nothing wrong.
enum Verdict {
    Accepted,
    Refused(String),
}

// Per-thread accounting of live heap bytes, so that an input's peak can be measured.
thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static CURRENT_INPUT: Cell<u64> = const { Cell::new(u64::MAX) };
    static QUIET_PANICS: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

struct CountingAllocator;

fn note_allocation(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn refuse_huge(size: usize) -> bool {
    let index = CURRENT_INPUT.try_with(Cell::get).unwrap_or(u64::MAX);
    if size < HUGE_ALLOCATION || index == u64::MAX {
        return false;
    }
    // No formatting here: it would allocate.
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = index;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut err = io::stderr();
    let _ = err.write_all(b"\nfuzz: input #");
    let _ = err.write_all(&digits[at..]);
    let _ = err.write_all(
        b" asked for 1 GiB or more at once (a length field taken at its word); rerun it with NIX_WINVM_FUZZ_ONLY\n",
    );
    true
}

// SAFETY: every call is passed on to the system allocator unchanged; the bookkeeping only
// touches const-initialized thread-locals without destructors, which never allocate. A refused
// allocation returns null, which the allocation API allows.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if refuse_huge(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout, passed on as the GlobalAlloc contract requires.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            note_allocation(layout.size() as isize);
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if refuse_huge(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as in alloc.
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            note_allocation(layout.size() as isize);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: the pointer came from System with this layout (alloc above).
        unsafe { System.dealloc(pointer, layout) };
        note_allocation(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if refuse_huge(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: the pointer came from System with this layout; new_size is the caller's.
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            note_allocation(new_size as isize - layout.size() as isize);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Panics inside an input are recorded, not printed; any other panic (a test's own assertion)
/// goes to the default hook.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET_PANICS.with(Cell::get) {
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(a panic without a message)".into());
                let place = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                LAST_PANIC.with(|last| *last.borrow_mut() = Some(format!("panicked: {message}{place}")));
            } else {
                default(info);
            }
        }));
    });
}

/// Watches the running input from another thread; a hang cannot be caught, so it ends the
/// process with the input's number.
struct Watchdog {
    started_nanos: Arc<AtomicU64>,
    index: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    origin: Instant,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(target: &'static str, seed: u64) -> Watchdog {
        let started_nanos = Arc::new(AtomicU64::new(0));
        let index = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let origin = Instant::now();
        let thread = {
            let (started_nanos, index, done) = (started_nanos.clone(), index.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    let started = started_nanos.load(Ordering::Relaxed);
                    if started != 0 && origin.elapsed().as_nanos() as u64 - started > HANG_AFTER.as_nanos() as u64 {
                        eprintln!(
                            "\nfuzz {target}: input #{} has run for more than {} s: a hang. \
                             Rerun it with NIX_WINVM_FUZZ_SEED={seed:#x} NIX_WINVM_FUZZ_ONLY={}",
                            index.load(Ordering::Relaxed),
                            HANG_AFTER.as_secs(),
                            index.load(Ordering::Relaxed)
                        );
                        std::process::abort();
                    }
                }
            })
        };
        Watchdog { started_nanos, index, done, origin, thread: Some(thread) }
    }

    fn begin(&self, index: u64) {
        self.index.store(index, Ordering::Relaxed);
        self.started_nanos.store(self.origin.elapsed().as_nanos() as u64 + 1, Ordering::Relaxed);
    }

    fn end(&self) {
        self.started_nanos.store(0, Ordering::Relaxed);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &text[..end], text.len())
}

/// Runs `target`: input i is `generate(Rng::for_input(seed, i))`, judged by `check`.
fn run<I>(
    target: &'static str,
    memory_budget: usize,
    mut generate: impl FnMut(&mut Rng) -> I,
    mut check: impl FnMut(&I) -> Result<Verdict, String>,
    show: impl Fn(&I) -> String,
) {
    install_panic_hook();
    let settings = settings();
    if let Some(index) = settings.only {
        let input = generate(&mut Rng::for_input(settings.seed, index));
        println!("fuzz {target}: input #{index} of seed {:#x}:\n{}", settings.seed, show(&input));
        match check(&input) {
            Ok(Verdict::Accepted) => println!("fuzz {target}: accepted"),
            Ok(Verdict::Refused(kind)) => println!("fuzz {target}: refused ({kind})"),
            Err(violation) => panic!("fuzz {target}: {violation}"),
        }
        return;
    }
    let watchdog = Watchdog::start(target, settings.seed);
    let started = Instant::now();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut accepted = 0u64;
    let mut crashes: Vec<String> = Vec::new();
    let mut crash_count = 0u64;
    let mut slowest = (Duration::ZERO, 0u64);
    let mut peak_memory = 0isize;
    for index in 0..settings.inputs {
        let input = generate(&mut Rng::for_input(settings.seed, index));
        let base = LIVE.with(Cell::get);
        PEAK.with(|peak| peak.set(base));
        CURRENT_INPUT.with(|current| current.set(index));
        QUIET_PANICS.with(|quiet| quiet.set(true));
        watchdog.begin(index);
        let clock = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| check(&input)));
        let took = clock.elapsed();
        watchdog.end();
        QUIET_PANICS.with(|quiet| quiet.set(false));
        CURRENT_INPUT.with(|current| current.set(u64::MAX));
        let used = PEAK.with(Cell::get) - base;
        peak_memory = peak_memory.max(used);
        if took > slowest.0 {
            slowest = (took, index);
        }
        let failure = match outcome {
            Ok(Ok(Verdict::Accepted)) => {
                accepted += 1;
                None
            }
            Ok(Ok(Verdict::Refused(kind))) => {
                *errors.entry(kind).or_default() += 1;
                None
            }
            Ok(Err(violation)) => Some(violation),
            Err(_) => Some(LAST_PANIC.with(|last| last.borrow_mut().take()).unwrap_or_else(|| "panicked".into())),
        };
        let failure = failure
            .or_else(|| {
                (used > memory_budget as isize).then(|| format!("held {used} bytes at once (budget {memory_budget})"))
            })
            .or_else(|| (took > SLOW_AFTER).then(|| format!("took {:.1} s", took.as_secs_f64())));
        if let Some(failure) = failure {
            crash_count += 1;
            if crashes.len() < 5 {
                crashes.push(format!("input #{index}: {failure}\n    input: {}", shorten(&show(&input), 1500)));
            }
        }
    }
    drop(watchdog);
    println!(
        "fuzz {target}: {} inputs, {} distinct error kinds, {crash_count} crashes \
         ({accepted} accepted; slowest input {:.1} ms (#{}); peak {} KiB; seed {:#x}; {:.1} s)",
        settings.inputs,
        errors.len(),
        slowest.0.as_secs_f64() * 1000.0,
        slowest.1,
        peak_memory / 1024,
        settings.seed,
        started.elapsed().as_secs_f64()
    );
    let kinds: Vec<String> = errors.iter().map(|(kind, n)| format!("{kind} {n}")).collect();
    println!("fuzz {target}: errors: {}", kinds.join(", "));
    if !crashes.is_empty() {
        panic!(
            "fuzz {target}: {crash_count} of {} inputs failed; the first:\n{}\nRerun one with \
             NIX_WINVM_FUZZ_SEED={:#x} NIX_WINVM_FUZZ_ONLY=N",
            settings.inputs,
            crashes.join("\n"),
            settings.seed
        );
    }
}

/// Generic damage to a byte string, from `tokens` where a token makes sense.
fn damage_bytes(rng: &mut Rng, bytes: &mut Vec<u8>, tokens: &[&[u8]]) {
    let at = |rng: &mut Rng, bytes: &Vec<u8>| rng.below(bytes.len() + 1);
    match rng.below(9) {
        0 if !bytes.is_empty() => {
            let i = rng.below(bytes.len());
            bytes[i] ^= 1 << rng.below(8);
        }
        1 if !bytes.is_empty() => {
            let i = rng.below(bytes.len());
            let random = rng.next() as u8;
            bytes[i] = *rng.pick(&[0, 0xff, 0x7f, 0x80, b'\n', b'"', random]);
        }
        2 => {
            let i = at(rng, bytes);
            let n = rng.size(16);
            let noise = rng.bytes(n);
            bytes.splice(i..i, noise);
        }
        3 if !bytes.is_empty() => {
            let i = rng.below(bytes.len());
            let n = 1 + rng.size(32).min(bytes.len() - i - 1);
            bytes.drain(i..i + n);
        }
        4 => {
            let keep = rng.below(bytes.len() + 1);
            bytes.truncate(keep);
        }
        5 if !bytes.is_empty() => {
            // A piece of the input again, elsewhere.
            let from = rng.below(bytes.len());
            let n = 1 + rng.size(64).min(bytes.len() - from - 1);
            let piece = bytes[from..from + n].to_vec();
            let i = at(rng, bytes);
            bytes.splice(i..i, piece);
        }
        6 if bytes.len() >= 2 => {
            let (i, j) = (rng.below(bytes.len()), rng.below(bytes.len()));
            bytes.swap(i, j);
        }
        _ if !tokens.is_empty() => {
            let i = at(rng, bytes);
            let token = rng.pick(tokens).to_vec();
            bytes.splice(i..i, token);
        }
        _ => {}
    }
}

fn escaped(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

// ---------------------------------------------------------------------------------------------
// Target 1: the state file

struct StateSeed {
    bytes: Vec<u8>,
    raw_len: usize,
    raw_crc: u32,
    header: StateHeader,
    /// Where the payload starts; everything from here to the end is the payload and trailer.
    payload_offset: usize,
}

struct StateInput {
    bytes: Vec<u8>,
    /// Memory, QEMU version and machine type the reader asks for.
    wanted: Option<(u32, String, String)>,
    /// The seed whose payload and trailer end the file unchanged, if any: a read that succeeds
    /// must then give exactly that seed's stream.
    intact: Option<usize>,
    /// A file written by state::write for this input, and the stream it holds.
    round_trip: Option<(StateHeader, Vec<u8>)>,
}

fn crc_of(bytes: &[u8]) -> u32 {
    let mut crc = Crc::new();
    crc.update(bytes);
    crc.sum()
}

fn scratch_dir() -> tempfile::TempDir {
    // tmpfs when there is one: state::write syncs every file it writes.
    let shm = Path::new("/dev/shm");
    let builder = tempfile::Builder::new().prefix("nix-winvm-fuzz").tempdir_in(shm);
    builder.or_else(|_| tempfile::Builder::new().prefix("nix-winvm-fuzz").tempdir()).expect("scratch folder")
}

fn random_text(rng: &mut Rng, max: usize) -> String {
    let pieces = ["a", "Z", "0", " ", "\"", "\\", "\n", "\t", "\u{0}", "é", "🦀", "{", "}", ":", ",", "(Debian)"];
    (0..rng.size(max)).map(|_| *rng.pick(&pieces)).collect()
}

fn random_stream(rng: &mut Rng, max: usize) -> Vec<u8> {
    let n = rng.size(max);
    match rng.below(4) {
        0 => vec![0; n],
        1 => rng.bytes(n),
        2 => (0..n).map(|i| if i % 7 == 0 { (i % 251) as u8 } else { 0 }).collect(),
        _ => {
            let mut out = Vec::with_capacity(n);
            while out.len() < n {
                let run = 1 + rng.size(64);
                let byte = rng.next() as u8;
                out.extend(std::iter::repeat(byte).take(run.min(n - out.len())));
            }
            out
        }
    }
}

fn make_state_seeds(dir: &Path) -> Vec<StateSeed> {
    let standard = StateHeader {
        qemu_version: "9.2.0 (Debian 1:9.2.0+ds-1)".into(),
        memory_mib: 256,
        guest: "standin".into(),
        machine: "pc-q35-9.2".into(),
        ram_outside: false,
    };
    let odd = StateHeader {
        qemu_version: "10.0.2 \"quoted\"\n🦀".into(),
        memory_mib: u32::MAX,
        guest: "windows".into(),
        machine: "pc-q35-10.0,\"x\"".into(),
        ram_outside: true,
    };
    let mut rng = Rng::for_input(DEFAULT_SEED, u64::MAX);
    let streams: Vec<(StateHeader, Vec<u8>)> = vec![
        (standard.clone(), vec![]),
        (standard.clone(), (0..3000u32).map(|i| if i % 7 == 0 { (i % 251) as u8 } else { 0 }).collect()),
        (standard.clone(), rng.bytes(1500)),
        (odd, (0..6000u32).map(|i| (i / 100) as u8).collect()),
        (standard, b"QEVM\0\0\0\x03".repeat(40)),
    ];
    streams
        .into_iter()
        .enumerate()
        .map(|(i, (header, raw))| {
            let path = dir.join(format!("seed-{i}"));
            let info = state::write(&path, &header, &mut &raw[..]).expect("writing a seed");
            let bytes = std::fs::read(&path).expect("reading a seed");
            StateSeed {
                bytes,
                raw_len: raw.len(),
                raw_crc: crc_of(&raw),
                header,
                payload_offset: info.payload_offset as usize,
            }
        })
        .collect()
}

fn header_json(rng: &mut Rng, seed: &StateHeader) -> Vec<u8> {
    let memory: Value = match rng.below(8) {
        0 => Value::from(-1),
        1 => Value::from(u64::from(u32::MAX) + 1),
        2 => Value::from(1e300),
        3 => Value::from("256"),
        4 => Value::Null,
        _ => Value::from(seed.memory_mib),
    };
    let mut fields = vec![
        ("qemuVersion".to_string(), Value::from(seed.qemu_version.clone())),
        ("memoryMib".to_string(), memory),
        ("guest".to_string(), Value::from(random_text(rng, 12))),
    ];
    if rng.percent(20) {
        fields.remove(rng.below(fields.len()));
    }
    if rng.percent(10) {
        fields.push(("extra".into(), Value::from(true)));
    }
    match rng.below(10) {
        0 => {
            let depth = rng.size(4000);
            b"[".repeat(depth)
        }
        1 => {
            let n = rng.size(40);
            rng.bytes(n)
        }
        2 => vec![],
        _ => {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("{}:{v}", Value::from(k.as_str()))).collect();
            format!("{{{}}}", body.join(",")).into_bytes()
        }
    }
}

fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    if bytes.len() >= at + 4 {
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }
}

fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
    if bytes.len() >= at + 8 {
        bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }
}

/// Recomputes the trailer (lengths, checksum, end marker) around whatever now lies between
/// the header and the trailer, so that a damaged payload reaches the inflater.
fn reseal(rng: &mut Rng, bytes: &mut [u8], payload_offset: usize, raw_len: u64) {
    if bytes.len() < payload_offset + 28 {
        return;
    }
    let payload_end = bytes.len() - 28;
    let payload = &bytes[payload_offset..payload_end];
    let crc = crc_of(payload);
    let raw_len = if rng.percent(50) {
        // What the damaged payload really inflates to, so that some pass every check.
        let mut decoder = flate2::read::DeflateDecoder::new(payload);
        let mut sink = CountingSink::default();
        match io::copy(&mut decoder, &mut sink) {
            Ok(n) => n,
            Err(_) => raw_len,
        }
    } else {
        raw_len
    };
    let length = payload.len() as u64;
    put_u64(bytes, payload_end, length);
    put_u64(bytes, payload_end + 8, raw_len);
    put_u32(bytes, payload_end + 16, crc);
    bytes[payload_end + 20..].copy_from_slice(END_MAGIC);
}

#[derive(Default)]
struct CountingSink {
    len: u64,
    crc: Crc,
}

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.len += buf.len() as u64;
        self.crc.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn damage_state(rng: &mut Rng, seeds: &[StateSeed], seed: &StateSeed, bytes: &mut Vec<u8>) {
    let len = bytes.len() as u64;
    let trailer = bytes.len().saturating_sub(28);
    let extremes_u64 = [
        0,
        1,
        u64::MAX,
        u64::MAX - 1,
        1 << 60,
        1 << 63,
        len,
        // payload_offset + payload_len + 28 just past u64::MAX, and just below.
        u64::MAX - (seed.payload_offset as u64 + 27),
        u64::MAX - (seed.payload_offset as u64 + 28),
        (trailer - seed.payload_offset.min(trailer)) as u64 + 1,
    ];
    match rng.below(14) {
        0 => {
            let random = rng.next() as u32;
            let v = *rng.pick(&[0, 2, u32::MAX, 1 << 31, random]);
            put_u32(bytes, 16, v);
        }
        1 => {
            let header_len = bytes.len().saturating_sub(24) as u32;
            let random = rng.next() as u32;
            let v = *rng.pick(&[0, 1, 64 * 1024, 64 * 1024 + 1, u32::MAX, header_len, header_len + 1, random]);
            put_u32(bytes, 20, v);
        }
        2 => {
            let v = *rng.pick(&extremes_u64);
            put_u64(bytes, trailer, v);
        }
        3 => {
            let random = rng.next();
            let v = *rng.pick(&[0, 1, u64::MAX, 1 << 60, seed.raw_len as u64 + 1, random]);
            put_u64(bytes, trailer + 8, v);
        }
        4 => put_u32(bytes, trailer + 16, rng.next() as u32),
        5 if bytes.len() >= 8 => {
            let i = bytes.len() - 1 - rng.below(8);
            bytes[i] ^= 0x20;
        }
        6 => {
            // Truncated at one of its seams.
            let cut = *rng.pick(&[0, 15, 16, 20, 23, 24, seed.payload_offset, trailer, bytes.len().saturating_sub(1)]);
            bytes.truncate(cut.min(bytes.len()));
        }
        7 if bytes.len() > 24 => {
            // Another header, the frame kept consistent around it.
            let json = header_json(rng, &seed.header);
            let old_end = seed.payload_offset.min(bytes.len());
            bytes.splice(24..old_end, json.iter().copied());
            put_u32(bytes, 20, json.len() as u32);
            if rng.percent(50) {
                reseal(rng, bytes, 24 + json.len(), seed.raw_len as u64);
            }
        }
        8 if bytes.len() > seed.payload_offset + 28 => {
            // Damage inside the payload, then a trailer that matches it.
            let end = bytes.len() - 28;
            let mut payload = bytes[seed.payload_offset..end].to_vec();
            for _ in 0..1 + rng.size(3) {
                damage_bytes(rng, &mut payload, &[b"\x00\x00\xff\xff", b"\x03\x00", b"\x01"]);
            }
            bytes.splice(seed.payload_offset..end, payload);
            reseal(rng, bytes, seed.payload_offset, seed.raw_len as u64);
        }
        9 => {
            // The front of one seed, the back of another.
            let other = rng.pick(seeds);
            let cut = rng.below(bytes.len() + 1);
            let from = rng.below(other.bytes.len() + 1);
            bytes.truncate(cut);
            bytes.extend_from_slice(&other.bytes[from..]);
        }
        _ => {
            for _ in 0..1 + rng.size(3) {
                damage_bytes(rng, bytes, &[MAGIC, END_MAGIC, b"\xff\xff\xff\xff"]);
            }
        }
    }
}

fn generate_state(rng: &mut Rng, seeds: &[StateSeed]) -> StateInput {
    if rng.percent(8) {
        let header = StateHeader {
            qemu_version: random_text(rng, 30),
            memory_mib: rng.extreme(&[0, 1, 256, 4096, u32::MAX], |r| r as u32),
            guest: random_text(rng, 10),
            machine: random_text(rng, 12),
            ram_outside: rng.percent(50),
        };
        let stream = random_stream(rng, 20_000);
        return StateInput { bytes: vec![], wanted: None, intact: None, round_trip: Some((header, stream)) };
    }
    let index = rng.below(seeds.len());
    let seed = &seeds[index];
    let mut bytes = seed.bytes.clone();
    for _ in 0..1 + rng.size(2) {
        damage_state(rng, seeds, seed, &mut bytes);
    }
    let tail = &seed.bytes[seed.payload_offset..];
    let intact = (bytes.len() >= tail.len() && bytes.ends_with(tail)).then_some(index);
    let h = &seed.header;
    let wanted = match rng.below(5) {
        0 => Some((h.memory_mib, h.qemu_version.clone(), h.machine.clone())),
        1 => Some((rng.next() as u32, h.qemu_version.clone(), h.machine.clone())),
        2 => Some((h.memory_mib, random_text(rng, 8), h.machine.clone())),
        3 => Some((h.memory_mib, h.qemu_version.clone(), random_text(rng, 8))),
        _ => None,
    };
    StateInput { bytes, wanted, intact, round_trip: None }
}

fn state_kind(error: &StateFileError) -> String {
    use FrameError::*;
    let kind = match error {
        StateFileError::Frame(frame) => match frame {
            Io { .. } => "Io",
            NotAStateFile { .. } => "NotAStateFile",
            UnsupportedFormat { .. } => "UnsupportedFormat",
            BadHeader { detail, .. } if detail.starts_with("header length") => "BadHeader(length)",
            BadHeader { .. } => "BadHeader(json)",
            Truncated { .. } => "Truncated",
            Checksum { .. } => "Checksum",
            Corrupt { detail, .. } if detail.starts_with("payload length") => "Corrupt(size)",
            Corrupt { detail, .. } if detail.starts_with("it inflates to") => "Corrupt(raw length)",
            Corrupt { .. } => "Corrupt(inflate)",
        },
        StateFileError::MemoryMismatch { .. } => "MemoryMismatch",
        StateFileError::QemuMismatch { .. } => "QemuMismatch",
        StateFileError::MachineMismatch { .. } => "MachineMismatch",
        StateFileError::RamMismatch { .. } => "RamMismatch",
    };
    kind.to_string()
}

fn check_state(input: &StateInput, path: &Path, seeds: &[StateSeed]) -> Result<Verdict, String> {
    if let Some((header, stream)) = &input.round_trip {
        let written = state::write(path, header, &mut &stream[..]).map_err(|e| format!("write failed: {e}"))?;
        let mut sink = CountingSink::default();
        let wanted = Some(state::Wanted {
            memory_mib: header.memory_mib,
            qemu_version: &header.qemu_version,
            machine: &header.machine,
        });
        let read = state::read(path, wanted, &mut sink).map_err(|e| format!("reading what write wrote: {e}"))?;
        if read != written || sink.len != stream.len() as u64 || sink.crc.sum() != crc_of(stream) {
            return Err(format!("round trip: wrote {written:?}, read {read:?}, {} bytes back", sink.len));
        }
        return Ok(Verdict::Accepted);
    }
    std::fs::write(path, &input.bytes).map_err(|e| format!("cannot write the input: {e}"))?;
    let wanted = input.wanted.as_ref().map(|(memory_mib, qemu_version, machine)| state::Wanted {
        memory_mib: *memory_mib,
        qemu_version,
        machine,
    });
    let inspected = state::inspect(path, wanted);
    let mut sink = CountingSink::default();
    let read = state::read(path, wanted, &mut sink);
    let shown = path.display().to_string();
    match (&inspected, &read) {
        (_, Err(error)) if !error.to_string().contains(&shown) => {
            Err(format!("the error does not name the file: {error}"))
        }
        (_, Err(error @ StateFileError::Frame(FrameError::Io { .. }))) => {
            Err(format!("an I/O error reading a readable file: {error}"))
        }
        (Err(first), Err(second)) if state_kind(first) != state_kind(second) => {
            Err(format!("inspect said {first}, read said {second}"))
        }
        (Err(_), Err(error)) => Ok(Verdict::Refused(state_kind(error))),
        (Err(error), Ok(_)) => Err(format!("inspect refused ({error}) what read accepted")),
        (Ok(_), Err(error)) => match error {
            StateFileError::Frame(
                FrameError::Truncated { .. } | FrameError::Checksum { .. } | FrameError::Corrupt { .. },
            ) => {
                if let Some(seed) = input.intact.map(|i| &seeds[i]) {
                    if seed.raw_len > 0 && sink.len == seed.raw_len as u64 && sink.crc.sum() == seed.raw_crc {
                        return Err(format!("refused ({error}) after handing over the whole stream"));
                    }
                }
                Ok(Verdict::Refused(state_kind(error)))
            }
            other => Err(format!("read refused, after inspect accepted, with {other}")),
        },
        (Ok(first), Ok(info)) => {
            if first != info {
                return Err(format!("inspect gave {first:?}, read {info:?}"));
            }
            if sink.len != info.raw_len {
                return Err(format!("read handed over {} bytes, the file records {}", sink.len, info.raw_len));
            }
            if let Some(seed) = input.intact.map(|i| &seeds[i]) {
                if sink.len != seed.raw_len as u64 || sink.crc.sum() != seed.raw_crc {
                    return Err("the seed's payload read back as another stream".into());
                }
            }
            Ok(Verdict::Accepted)
        }
    }
}

#[test]
fn fuzz_state_file() {
    let dir = scratch_dir();
    let seeds = make_state_seeds(dir.path());
    let path = dir.path().join("input");
    run(
        "state-file",
        16 << 20,
        |rng| generate_state(rng, &seeds),
        |input| check_state(input, &path, &seeds),
        |input| match &input.round_trip {
            Some((header, stream)) => format!("round trip of {header:?} and {} bytes", stream.len()),
            None => format!("wanted {:?}, {} bytes: {}", input.wanted, input.bytes.len(), escaped(&input.bytes)),
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Target 2: QMP lines

/// Lines as QEMU 9 and 10 write them.
const QMP_SEEDS: &[&str] = &[
    r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 9}, "package": "Debian 1:9.2.0+ds-1"}, "capabilities": ["oob"]}}"#,
    r#"{"return": {}}"#,
    r#"{"return": {}, "id": 1}"#,
    r#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": 2}"#,
    r#"{"return": {"status": "inmigrate", "running": false}, "id": 3}"#,
    r#"{"return": {"expected-downtime": 300, "status": "active", "setup-time": 2, "total-time": 1014, "ram": {"total": 268435456, "postcopy-requests": 0, "dirty-sync-count": 1, "page-size": 4096, "remaining": 0, "mbps": 0, "transferred": 1234567, "duplicate": 65000, "normal-bytes": 1000000, "normal": 244}}, "id": 7}"#,
    r#"{"return": {"status": "completed", "total-time": 42, "ram": {"transferred": 1089}}, "id": 8}"#,
    r#"{"timestamp": {"seconds": 1700000000, "microseconds": 123456}, "event": "STOP"}"#,
    r#"{"timestamp": {"seconds": 1700000001, "microseconds": 5}, "event": "MIGRATION", "data": {"status": "completed"}}"#,
    r#"{"timestamp": {"seconds": 1700000002, "microseconds": 99}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#,
    r#"{"error": {"class": "GenericError", "desc": "Failed to open file '/nonexistent': No such file or directory"}, "id": 4}"#,
    r#"{"error": {"class": "CommandNotFound", "desc": "The command foo has not been found"}}"#,
    r#"{"id": "text", "return": [1, 2.5, null, "x"]}"#,
];

const JSON_TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"\"",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"\\uDBFF\\uDFFF",
    b"1e999999",
    b"-0",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"null",
    b"true",
    b"\"QMP\":",
    b"\"event\":",
    b"\"return\":",
    b"\"error\":",
    b"\"id\":",
    b"\"data\":",
    b"\"timestamp\":",
    b"\r\n",
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b" ",
];

fn random_json(rng: &mut Rng, depth: usize) -> Value {
    let leaf = depth == 0 || rng.percent(40);
    match rng.below(if leaf { 5 } else { 7 }) {
        0 => Value::Null,
        1 => Value::from(rng.percent(50)),
        2 => match rng.below(4) {
            0 => Value::from(rng.next()),
            1 => Value::from(rng.next() as i64),
            // Floats with few digits, which read back exactly.
            2 => Value::from((rng.next() as i32) as f64 / 4.0),
            _ => Value::from(*rng.pick(&[0u64, 1, u64::from(u32::MAX), u64::MAX])),
        },
        3 | 4 => Value::from(random_text(rng, 20)),
        5 => Value::Array((0..rng.size(5)).map(|_| random_json(rng, depth - 1)).collect()),
        _ => {
            let mut object = serde_json::Map::new();
            for _ in 0..rng.size(5) {
                object.insert(random_text(rng, 8), random_json(rng, depth - 1));
            }
            Value::Object(object)
        }
    }
}

/// Writes an object's members in a random order, as another QEMU might.
fn object_text(rng: &mut Rng, members: Vec<(&str, Value)>) -> String {
    let mut members = members;
    for i in (1..members.len()).rev() {
        members.swap(i, rng.below(i + 1));
    }
    let body: Vec<String> = members.iter().map(|(k, v)| format!("{}: {v}", Value::from(*k))).collect();
    format!("{{{}}}", body.join(", "))
}

/// A well-formed message and the line that carries it.
fn qmp_model(rng: &mut Rng) -> (Message, String) {
    match rng.below(4) {
        0 => {
            let qemu = qmp::QemuVersion {
                major: *rng.pick(&[0, 9, 10, u32::MAX]),
                minor: rng.next() as u32 % 8,
                micro: rng.next() as u32,
            };
            let package = if rng.percent(70) { Some(random_text(rng, 20)) } else { None };
            let capabilities: Option<Vec<String>> =
                rng.percent(70).then(|| (0..rng.size(3)).map(|_| random_text(rng, 6)).collect());
            let mut version =
                vec![("qemu", serde_json::json!({"major": qemu.major, "minor": qemu.minor, "micro": qemu.micro}))];
            if let Some(package) = &package {
                version.push(("package", Value::from(package.clone())));
            }
            let version_text = object_text(rng, version);
            let mut greeting = vec![("version", serde_json::from_str(&version_text).expect("own JSON"))];
            if let Some(capabilities) = &capabilities {
                greeting.push(("capabilities", Value::from(capabilities.clone())));
            }
            if rng.percent(20) {
                greeting.push(("unknown-member", random_json(rng, 2)));
            }
            let inner = object_text(rng, greeting);
            let line = format!("{{\"QMP\": {inner}}}");
            let message = Message::Greeting(qmp::Greeting {
                version: qmp::GreetingVersion { qemu, package: package.unwrap_or_default() },
                capabilities: capabilities.unwrap_or_default(),
            });
            (message, line)
        }
        1 => {
            let name = random_text(rng, 16);
            let data = rng.percent(70).then(|| random_json(rng, 4));
            let timestamp = rng.percent(80).then(|| qmp::Timestamp {
                seconds: rng.extreme(&[0, -1, i64::MAX, i64::MIN], |r| r as i64),
                microseconds: rng.next() as i64 % 1_000_000,
            });
            let mut members = vec![("event", Value::from(name.clone()))];
            if let Some(data) = &data {
                members.push(("data", data.clone()));
            }
            if let Some(t) = &timestamp {
                members.push(("timestamp", serde_json::json!({"seconds": t.seconds, "microseconds": t.microseconds})));
            }
            let event = qmp::Event { event: name, data: data.unwrap_or(Value::Null), timestamp };
            (Message::Event(event), object_text(rng, members))
        }
        2 => {
            let id = rng.percent(80).then(|| random_json(rng, 1));
            let value = random_json(rng, 4);
            let mut members = vec![("return", value.clone())];
            if let Some(id) = &id {
                members.push(("id", id.clone()));
            }
            (Message::Reply { id, result: Ok(value) }, object_text(rng, members))
        }
        _ => {
            let id = rng.percent(80).then(|| Value::from(rng.next() % 1000));
            let error = qmp::WireError { class: random_text(rng, 12), desc: random_text(rng, 40) };
            let mut body = vec![("class", Value::from(error.class.clone())), ("desc", Value::from(error.desc.clone()))];
            if rng.percent(20) {
                body.push(("extra", random_json(rng, 2)));
            }
            let body_text = object_text(rng, body);
            let mut members = vec![("error", serde_json::from_str(&body_text).expect("own JSON"))];
            if let Some(id) = &id {
                members.push(("id", id.clone()));
            }
            (Message::Reply { id, result: Err(error) }, object_text(rng, members))
        }
    }
}

struct QmpInput {
    line: Vec<u8>,
    /// For a line left as it was made: what it must read as.
    expected: Option<Message>,
}

fn generate_qmp(rng: &mut Rng) -> QmpInput {
    if rng.below(5000) == 0 {
        // A long line, to show the time stays linear.
        let n = 200_000 + rng.size(800_000);
        let line = match rng.below(3) {
            0 => format!("{{\"return\": \"{}\"}}", "x".repeat(n)),
            1 => format!("{{\"return\": [{}0]}}", "0,".repeat(n / 2)),
            _ => "[".repeat(n),
        };
        return QmpInput { line: line.into_bytes(), expected: None };
    }
    let (expected, mut line) = match rng.below(3) {
        0 => (None, rng.pick(QMP_SEEDS).as_bytes().to_vec()),
        1 => (None, random_json(rng, 5).to_string().into_bytes()),
        _ => {
            let (message, text) = qmp_model(rng);
            (Some(message), text.into_bytes())
        }
    };
    let damaged = rng.percent(60);
    if damaged {
        for _ in 0..1 + rng.size(4) {
            damage_bytes(rng, &mut line, JSON_TOKENS);
        }
    }
    line.extend_from_slice(rng.pick::<&[u8]>(&[b"\r\n", b"\n", b""]));
    QmpInput { line, expected: if damaged { None } else { expected } }
}

fn check_qmp(input: &QmpInput) -> Result<Verdict, String> {
    let parsed = qmp::parse_message(&input.line);
    if let Some(expected) = &input.expected {
        return match parsed {
            Ok(message) if &message == expected => Ok(Verdict::Accepted),
            other => Err(format!("read as {other:?}, made as {expected:?}")),
        };
    }
    match parsed {
        Ok(Message::Greeting(_)) | Ok(Message::Event(_)) | Ok(Message::Reply { .. }) => Ok(Verdict::Accepted),
        Err(error) => {
            let text = error.to_string();
            if text.is_empty() {
                return Err("an empty error message".into());
            }
            let kind = match error {
                MessageError::NotJson { .. } => "NotJson",
                MessageError::NotAnObject { .. } => "NotAnObject",
                MessageError::BadGreeting { .. } => "BadGreeting",
                MessageError::BadEvent { .. } => "BadEvent",
                MessageError::BadErrorReply { .. } => "BadErrorReply",
                MessageError::Unrecognized { .. } => "Unrecognized",
            };
            Ok(Verdict::Refused(kind.into()))
        }
    }
}

#[test]
fn fuzz_qmp_reply_parser() {
    run("qmp", 64 << 20, generate_qmp, check_qmp, |input| {
        format!("expected {:?}, line: {}", input.expected, escaped(&input.line))
    });
}

// ---------------------------------------------------------------------------------------------
// Target 3: setup.ini

const SETUP_INI_FIXTURE: &str = include_str!("fixtures/setup.ini");

fn token(rng: &mut Rng) -> String {
    // A letter first: a name of dots would make an install path that is rightly refused.
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_+.-";
    let n = rng.size(12);
    let first = *rng.pick(&CHARS[..26]) as char;
    std::iter::once(first).chain((0..n).map(|_| *rng.pick(CHARS) as char)).collect()
}

fn words(rng: &mut Rng, max: usize) -> String {
    const WORDS: &[&str] = &["the", "GNU", "shell", "@", "[prev]", "key:", "value", "#", "é", "(x)", "a,b", "🦀", "'"];
    (0..1 + rng.size(max)).map(|_| *rng.pick(WORDS)).collect::<Vec<_>>().join(" ")
}

/// A package as the generator writes it, with what the parser must make of it.
struct PackagePlan {
    lines: Vec<String>,
    expected: cygwin::Package,
}

fn dependency_field(rng: &mut Rng, names: &[String]) -> (String, Vec<String>) {
    let mut text: Vec<String> = Vec::new();
    let mut expected: Vec<String> = Vec::new();
    let comma = rng.percent(70);
    for _ in 0..rng.size(6) {
        let name = if rng.percent(70) && !names.is_empty() { rng.pick(names).clone() } else { token(rng) };
        let constraint = match rng.below(4) {
            0 => format!(" (>= {}.{})", rng.below(10), rng.below(10)),
            1 => "(=2 (nested) )".to_string(),
            _ => String::new(),
        };
        if !expected.contains(&name) {
            expected.push(name.clone());
        }
        text.push(format!("{name}{constraint}"));
    }
    (text.join(if comma { ", " } else { " " }), expected)
}

fn quoted_lines(rng: &mut Rng) -> (String, String) {
    let lines: Vec<String> =
        (0..1 + rng.size(4)).map(|_| if rng.percent(20) { String::new() } else { words(rng, 6) }).collect();
    // Quotes end the value, and the first line loses trailing blanks before its quote is seen.
    let lines: Vec<String> = lines.into_iter().map(|l| l.replace('"', "").trim().to_string()).collect();
    (format!("\"{}\"", lines.join("\n")), lines.join("\n"))
}

fn package_plan(rng: &mut Rng, name: &str, names: &[String]) -> PackagePlan {
    let mut expected = cygwin::Package { name: name.to_string(), ..Default::default() };
    let mut fields: Vec<String> = Vec::new();
    if rng.percent(90) {
        let version = format!("{}.{}-{}", rng.below(10), rng.below(100), rng.below(5));
        fields.push(format!("version: {version}"));
        expected.version = Some(version);
    }
    if rng.percent(80) {
        let sdesc = words(rng, 5).replace('"', "");
        fields.push(format!("sdesc: \"{sdesc}\""));
        expected.sdesc = Some(sdesc);
    }
    if rng.percent(70) {
        let (text, value) = quoted_lines(rng);
        fields.push(format!("ldesc: {text}"));
        expected.ldesc = Some(value);
    }
    if rng.percent(80) {
        let categories: Vec<String> =
            (0..rng.size(3)).map(|_| rng.pick(&["Base", "Net", "Shells", "Devel"]).to_string()).collect();
        fields.push(format!("category: {}", categories.join(" ")));
        expected.categories = categories;
    }
    let requires = rng.percent(40).then(|| dependency_field(rng, names));
    let depends2 = rng.percent(70).then(|| dependency_field(rng, names));
    if let Some((text, _)) = &requires {
        fields.push(format!("requires: {text}"));
    }
    if let Some((text, _)) = &depends2 {
        fields.push(format!("depends2: {text}"));
    }
    expected.depends = match (depends2, requires) {
        (Some((_, names)), _) | (None, Some((_, names))) => names,
        (None, None) => vec![],
    };
    if rng.percent(20) {
        let (text, provided) = dependency_field(rng, &[]);
        fields.push(format!("provides: {text}"));
        expected.provides = provided;
    }
    if rng.percent(85) {
        let path = format!("x86_64/release/{name}/{name}-{}.tar.xz", rng.below(100));
        let size = rng.extreme(&[0, 1, 1_265_140, u64::MAX], |r| r);
        let hash: String = (0..128).map(|_| *rng.pick(b"0123456789abcdefABCDEF") as char).collect();
        fields.push(format!("install: {path}  {size} {hash}"));
        expected.install = Some(cygwin::Install { path, size, sha512: hash.to_ascii_lowercase() });
    }
    if rng.percent(30) {
        fields.push(format!("source: x86_64/release/{name}/{name}-src.tar.xz 10 00"));
    }
    if rng.percent(20) {
        fields.push(format!("message: {name} \"a quoted\nmessage\""));
    }
    for i in (1..fields.len()).rev() {
        fields.swap(i, rng.below(i + 1));
    }
    let mut lines = vec![format!("{} {name}{}", "@", if rng.percent(10) { "  " } else { "" })];
    if rng.percent(10) {
        lines.push("[curr]".into());
    }
    lines.extend(fields);
    if rng.percent(40) {
        // Older and trial versions: none of it counts.
        lines.push(rng.pick(&["[prev]", "[test]", " [prev] "]).to_string());
        lines.push("version: 0.1-1".into());
        lines.push("version: 0.0-1".into());
        lines.push(format!("depends2: {}", token(rng)));
        lines.push("install: x86_64/release/old.tar.xz 1 00".into());
    }
    PackagePlan { lines, expected }
}

struct SetupIniInput {
    text: String,
    expected: Option<BTreeMap<String, cygwin::Package>>,
    roots: Vec<String>,
}

fn setup_ini_model(rng: &mut Rng) -> (String, BTreeMap<String, cygwin::Package>) {
    let mut names: Vec<String> = Vec::new();
    for _ in 0..rng.size(12) {
        let name = token(rng);
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let mut lines: Vec<String> = vec!["# generated".into(), "release: cygwin".into(), "arch: x86_64".into()];
    if rng.percent(20) {
        lines.push("include-setup: \"a header value\nover two lines\"".into());
    }
    let mut expected = BTreeMap::new();
    for name in &names {
        let plan = package_plan(rng, name, &names);
        lines.push(String::new());
        lines.extend(plan.lines);
        expected.insert(name.clone(), plan.expected);
    }
    let newline = if rng.percent(30) { "\r\n" } else { "\n" };
    (lines.join(newline) + newline, expected)
}

fn damage_setup_ini(rng: &mut Rng, text: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    const STRUCTURE: &[&str] = &[
        "@",
        "@ ",
        "@ bash",
        "[prev]",
        "[",
        "]",
        "[]",
        "\"",
        "ldesc: \"",
        "sdesc: \"x\" y",
        "version: 2",
        "install: ../x 1 ab",
        "install: /abs 1 00",
        "install: a\\b 1 00",
        "install: a//b 1 00",
        "install: a/./b 1 00",
        "install: x 18446744073709551616 00",
        "depends2: a (>= 1",
        "depends2: a )",
        "requires: ((",
        "category:",
        ":",
        "#\"",
    ];
    for _ in 0..1 + rng.size(4) {
        let at = rng.below(lines.len() + 1);
        match rng.below(6) {
            0 if at < lines.len() => {
                lines.remove(at);
            }
            1 if at < lines.len() => {
                let copy = lines[at].clone();
                lines.insert(at, copy);
            }
            2 => lines.insert(at, rng.pick(STRUCTURE).to_string()),
            3 if lines.len() >= 2 => {
                let (one, other) = (at.min(lines.len() - 1), rng.below(lines.len()));
                lines.swap(one, other);
            }
            _ => {
                let mut bytes = lines.join("\n").into_bytes();
                damage_bytes(rng, &mut bytes, &[b"\"", b"\r", b"\n", b"(", b")", b"@", b"[", b":", b"\xff", b"\xc3"]);
                lines = String::from_utf8_lossy(&bytes).lines().map(str::to_string).collect();
            }
        }
    }
    lines.join("\n")
}

fn generate_setup_ini(rng: &mut Rng) -> SetupIniInput {
    if rng.below(5000) == 0 {
        // Large inputs, to show the time stays linear.
        let n = 20_000 + rng.size(80_000);
        let text = match rng.below(3) {
            0 => format!("@ a\ndepends2: {}\n", (0..n).map(|i| format!("p{i}")).collect::<Vec<_>>().join(", ")),
            1 => (0..n).map(|i| format!("@ p{i}\nversion: 1\ndepends2: p{}\n", i + 1)).collect(),
            _ => format!("@ a\nldesc: \"{}\"\n", "line\n".repeat(n)),
        };
        return SetupIniInput { text, expected: None, roots: vec!["a".into(), "p0".into()] };
    }
    let (text, expected) = match rng.below(3) {
        0 => (SETUP_INI_FIXTURE.to_string(), None),
        _ => {
            let (text, expected) = setup_ini_model(rng);
            (text, Some(expected))
        }
    };
    let mut roots: Vec<String> = match &expected {
        Some(packages) => packages.keys().filter(|_| rng.percent(30)).cloned().collect(),
        None => vec!["openssh".into(), "bash".into()],
    };
    if rng.percent(10) {
        roots.push(token(rng));
    }
    if rng.percent(70) {
        return SetupIniInput { text: damage_setup_ini(rng, &text), expected: None, roots };
    }
    SetupIniInput { text, expected, roots }
}

fn check_closure(ini: &SetupIni, roots: &[String]) -> Result<(), String> {
    let mut providers: BTreeMap<&str, &str> = BTreeMap::new();
    for package in ini.packages.values() {
        for name in &package.provides {
            providers.entry(name.as_str()).or_insert(package.name.as_str());
        }
    }
    let resolve =
        |name: &str| ini.packages.get(name).or_else(|| providers.get(name).and_then(|p| ini.packages.get(*p)));
    let roots: Vec<&str> = roots.iter().map(String::as_str).collect();
    match cygwin::closure(ini, &roots) {
        Ok(packages) => {
            let chosen: BTreeSet<&str> = packages.iter().map(|p| p.name.as_str()).collect();
            if chosen.len() != packages.len() || !packages.windows(2).all(|w| w[0].name < w[1].name) {
                return Err("the closure is not sorted and unique".into());
            }
            for root in &roots {
                if !resolve(root).is_some_and(|p| chosen.contains(p.name.as_str())) {
                    return Err(format!("root {root} missing from the closure"));
                }
            }
            for package in &packages {
                for dependency in package.depends.iter().filter(|d| *d != "_windows") {
                    if !resolve(dependency).is_some_and(|p| chosen.contains(p.name.as_str())) {
                        return Err(format!("{dependency} of {} missing from the closure", package.name));
                    }
                }
            }
            let layout = cygwin::local_repo_layout(&packages);
            if !layout.windows(2).all(|w| w[0] < w[1]) {
                return Err("the repository layout is not sorted and unique".into());
            }
            let _ = cygwin::nix_package_set(&packages, "${mirror}");
            Ok(())
        }
        Err(cygwin::ClosureError::UnknownPackage { name }) if resolve(&name).is_none() => Ok(()),
        Err(cygwin::ClosureError::MissingDependency { name, .. }) if resolve(&name).is_none() => Ok(()),
        Err(error) => Err(format!("closure refused a package it has: {error}")),
    }
}

fn setup_ini_kind(error: &SetupIniError) -> (&'static str, usize) {
    use SetupIniError as E;
    match error {
        E::MissingPackageName { line } => ("MissingPackageName", *line),
        E::DuplicatePackage { line, .. } => ("DuplicatePackage", *line),
        E::SectionOutsidePackage { line } => ("SectionOutsidePackage", *line),
        E::UnterminatedQuote { line } => ("UnterminatedQuote", *line),
        E::TextAfterClosingQuote { line } => ("TextAfterClosingQuote", *line),
        E::DuplicateCurrentVersion { line, .. } => ("DuplicateCurrentVersion", *line),
        E::InstallFieldCount { line, .. } => ("InstallFieldCount", *line),
        E::UnsafeInstallPath { line, .. } => ("UnsafeInstallPath", *line),
        E::InvalidInstallSize { line, .. } => ("InvalidInstallSize", *line),
        E::InstallHashNotSha512 { line } => ("InstallHashNotSha512", *line),
        E::UnbalancedParentheses { line } => ("UnbalancedParentheses", *line),
    }
}

fn check_setup_ini(input: &SetupIniInput) -> Result<Verdict, String> {
    match SetupIni::parse(&input.text) {
        Err(error) => {
            let (kind, line) = setup_ini_kind(&error);
            let lines = input.text.lines().count();
            if line == 0 || line > lines {
                return Err(format!("{error}: the text has {lines} lines"));
            }
            if input.expected.is_some() {
                return Err(format!("a well-formed index was refused: {error}"));
            }
            Ok(Verdict::Refused(kind.into()))
        }
        Ok(ini) => {
            if let Some(expected) = &input.expected {
                if &ini.packages != expected {
                    let differ: Vec<_> = expected.iter().filter(|(k, v)| ini.packages.get(*k) != Some(v)).collect();
                    return Err(format!(
                        "read {} packages; these differ from what was written: {differ:?}",
                        ini.packages.len()
                    ));
                }
            }
            for (name, package) in &ini.packages {
                if name != &package.name || name.is_empty() || name.trim() != name {
                    return Err(format!("package name {name:?}"));
                }
                if let Some(install) = &package.install {
                    let hex = install.sha512.len() == 128
                        && install.sha512.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                    let safe = !install.path.starts_with('/')
                        && !install.path.contains('\\')
                        && install.path.split('/').all(|p| !p.is_empty() && p != "." && p != "..");
                    if !hex || !safe {
                        return Err(format!("install {install:?} passed"));
                    }
                }
            }
            let extra: Vec<String> = input.roots.clone();
            let roots = cygwin::base_roots(&ini, &extra);
            check_closure(&ini, &input.roots)?;
            check_closure(&ini, &roots)?;
            Ok(Verdict::Accepted)
        }
    }
}

#[test]
fn fuzz_setup_ini_parser() {
    run("setup.ini", 64 << 20, generate_setup_ini, check_setup_ini, |input| {
        format!("roots {:?}, expected {:?}, text:\n{}", input.roots, input.expected.is_some(), input.text)
    });
}

// ---------------------------------------------------------------------------------------------
// Target 4: the plugin's node arrays

const KINDS: &[Kind] = &[
    Kind::Null,
    Kind::Bool,
    Kind::Int,
    Kind::Float,
    Kind::Str,
    Kind::Path,
    Kind::Set,
    Kind::List,
    Kind::Function,
    Kind::Derivation,
    Kind::Unforced,
    Kind::External,
];

fn random_bytes_text(rng: &mut Rng) -> String {
    random_text(rng, 10)
}

fn random_val(rng: &mut Rng, depth: usize) -> Val {
    let leaf = depth == 0 || rng.percent(45);
    match rng.below(if leaf { 10 } else { 12 }) {
        0 => Val::Null,
        1 => Val::Bool(rng.percent(50)),
        2 => Val::Int(rng.extreme(&[0, -1, i64::MIN, i64::MAX], |r| r as i64)),
        3 => Val::Float(rng.extreme(&[0.0, -0.0, 1.5, f64::INFINITY, f64::MIN_POSITIVE], |r| (r as i32) as f64)),
        4 => Val::Str { text: random_bytes_text(rng), context: rng.percent(30) },
        5 => Val::NonUtf8Str { valid_up_to: rng.size(20), context: rng.percent(30) },
        6 => Val::Path(format!("/{}", random_bytes_text(rng))),
        7 => Val::Derivation { image_spec: rng.percent(50).then(|| random_bytes_text(rng)), memory: rng.percent(50) },
        8 => rng.pick(&[Val::Function, Val::Unforced, Val::External]).clone(),
        9 => Val::List(vec![]),
        10 => Val::List((0..rng.size(6)).map(|_| random_val(rng, depth - 1)).collect()),
        _ => Val::Set((0..rng.size(6)).map(|_| (random_bytes_text(rng), random_val(rng, depth - 1))).collect()),
    }
}

fn nested(depth: usize) -> Val {
    (0..depth).fold(Val::Int(1), |inner, _| Val::List(vec![inner]))
}

fn tree_size(v: &Val) -> usize {
    1 + match v {
        Val::List(items) => items.iter().map(tree_size).sum(),
        Val::Set(attrs) => attrs.iter().map(|(_, v)| tree_size(v)).sum(),
        _ => 0,
    }
}

fn depth_of(v: &Val) -> usize {
    match v {
        Val::List(items) => 1 + items.iter().map(depth_of).max().unwrap_or(0),
        Val::Set(attrs) => 1 + attrs.iter().map(|(_, v)| depth_of(v)).max().unwrap_or(0),
        _ => 0,
    }
}

struct NodesInput {
    nodes: Vec<Node>,
    /// For nodes laid out by to_nodes and left alone: the value they must decode to.
    expected: Option<Val>,
}

fn blank_node(kind: Kind) -> Node {
    Node { kind, key: vec![], text: vec![], int_value: 0, float_value: 0.0, context: false, first: 0, count: 0 }
}

fn damage_nodes(rng: &mut Rng, nodes: &mut Vec<Node>) {
    if nodes.is_empty() {
        nodes.push(blank_node(Kind::Null));
    }
    let len = nodes.len();
    let i = rng.below(len);
    match rng.below(10) {
        0 => nodes[i].kind = *rng.pick(KINDS),
        1 => nodes[i].kind = Kind { repr: 12 + rng.below(244) as u8 },
        2 | 3 => {
            let first = nodes[i].first;
            let value =
                rng.extreme(&[0, 1, i, i + 1, len - 1, len, len + 1, usize::MAX, usize::MAX - first], |r| r as usize);
            if rng.percent(50) {
                nodes[i].first = value;
            } else {
                nodes[i].count = value;
            }
        }
        4 => {
            let field = if rng.percent(50) { &mut nodes[i].key } else { &mut nodes[i].text };
            let at = rng.below(field.len() + 1);
            let bad = rng.pick::<&[u8]>(&[b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]);
            field.splice(at..at, bad.iter().copied());
        }
        5 => {
            // Two values claim the same children.
            let j = rng.below(len);
            nodes[i].first = nodes[j].first;
            nodes[i].count = nodes[j].count.max(1);
            if nodes[i].kind != Kind::Set {
                nodes[i].kind = Kind::List;
            }
        }
        6 => {
            let j = rng.below(len);
            nodes.swap(i, j);
        }
        7 => {
            nodes.truncate(rng.below(len + 1));
        }
        8 => {
            let copy = nodes[i].clone();
            nodes.insert(rng.below(len + 1), copy);
        }
        _ => {
            nodes[i].int_value = *rng.pick(&[0, 1, -1, i64::MIN]);
            nodes[i].float_value = *rng.pick(&[f64::NAN, -0.0, f64::NEG_INFINITY]);
            nodes[i].context = rng.percent(50);
        }
    }
}

/// Each node a list of the next two: a DAG whose unfolding doubles with each level.
fn overlapping_chain(n: usize) -> Vec<Node> {
    (0..n)
        .map(|i| {
            let mut node = blank_node(if i + 2 < n { Kind::List } else { Kind::Null });
            if i + 2 < n {
                (node.first, node.count) = (i + 1, 2);
            }
            node
        })
        .collect()
}

fn generate_nodes(rng: &mut Rng) -> NodesInput {
    match rng.below(20) {
        0 => return NodesInput { nodes: overlapping_chain(3 + rng.below(62)), expected: None },
        1 => {
            let v = nested(60 + rng.below(10));
            return NodesInput { nodes: to_nodes(&v), expected: Some(v) };
        }
        2 => {
            // Raw nodes, as the existing property test makes them, but more and larger.
            let n = rng.size(40);
            let nodes = (0..n)
                .map(|_| {
                    let mut node = blank_node(*rng.pick(KINDS));
                    node.first = rng.below(n + 2);
                    node.count = rng.size(6);
                    node.int_value = rng.next() as i64;
                    node
                })
                .collect();
            return NodesInput { nodes, expected: None };
        }
        _ => {}
    }
    let depth = 1 + rng.below(5);
    let v = random_val(rng, depth);
    let mut nodes = to_nodes(&v);
    if rng.percent(40) {
        return NodesInput { nodes, expected: Some(v) };
    }
    for _ in 0..1 + rng.size(4) {
        damage_nodes(rng, &mut nodes);
    }
    NodesInput { nodes, expected: None }
}

fn has_nan(v: &Val) -> bool {
    match v {
        Val::Float(f) => f.is_nan(),
        Val::List(items) => items.iter().any(has_nan),
        Val::Set(attrs) => attrs.iter().any(|(_, v)| has_nan(v)),
        _ => false,
    }
}

fn check_nodes(input: &NodesInput) -> Result<Verdict, String> {
    let decoded = from_nodes(&input.nodes);
    if let Some(expected) = &input.expected {
        // from_nodes reads values at most 64 levels below the root.
        let too_deep = depth_of(expected) > 64;
        return match (&decoded, too_deep) {
            (Ok(v), false) if v == expected => Ok(Verdict::Accepted),
            (Err(DecodeError::Malformed(m)), true) if m == "value nested too deeply" => {
                Ok(Verdict::Refused("Malformed(value nested too deeply)".into()))
            }
            _ => Err(format!("decoded as {decoded:?}, laid out from {expected:?}")),
        };
    }
    match decoded {
        Ok(v) => {
            if tree_size(&v) > input.nodes.len() {
                return Err(format!("{} nodes decoded into a tree of {}", input.nodes.len(), tree_size(&v)));
            }
            if !has_nan(&v) && from_nodes(&to_nodes(&v)).as_ref() != Ok(&v) {
                return Err(format!("{v:?} does not survive to_nodes and from_nodes"));
            }
            Ok(Verdict::Accepted)
        }
        Err(error) => {
            let message = error.message("windowsImage");
            if !(message.starts_with("windowsImage: ") || message.starts_with("nix-winvm: internal error")) {
                return Err(format!("message {message:?}"));
            }
            let kind = match error {
                DecodeError::NonUtf8Name { .. } => "NonUtf8Name".to_string(),
                DecodeError::NonUtf8Text { .. } => "NonUtf8Text".to_string(),
                DecodeError::Malformed(m) => format!("Malformed({m})"),
            };
            Ok(Verdict::Refused(kind))
        }
    }
}

#[test]
fn fuzz_plugin_value_decoder() {
    run("plugin-value", 8 << 20, generate_nodes, check_nodes, |input| {
        format!("expected {:?}, nodes: {:?}", input.expected, input.nodes)
    });
}
