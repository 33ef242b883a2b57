//! A VM's serial log read as it grows: the lines its system writes there with a marker (an
//! installer's steps), each once, as soon as the line is whole.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

pub struct MarkedLines {
    path: PathBuf,
    marker: &'static str,
    offset: u64,
    partial: Vec<u8>,
}

impl MarkedLines {
    /// Follows `path` (it need not exist yet) for lines holding `marker`.
    pub fn new(path: impl Into<PathBuf>, marker: &'static str) -> MarkedLines {
        MarkedLines { path: path.into(), marker, offset: 0, partial: Vec::new() }
    }

    /// The text after the marker of each new whole line that holds it, trimmed (a Windows
    /// console ends its lines with CR LF). An unreadable log gives none, for now.
    pub fn poll(&mut self) -> Vec<String> {
        let mut bytes = Vec::new();
        let read = std::fs::File::open(&self.path).and_then(|mut f| {
            f.seek(SeekFrom::Start(self.offset))?;
            f.read_to_end(&mut bytes)
        });
        let Ok(n) = read else { return Vec::new() };
        self.offset += n as u64;
        self.partial.extend_from_slice(&bytes);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else { return Vec::new() };
        let whole: Vec<u8> = self.partial.drain(..=end).collect();
        String::from_utf8_lossy(&whole)
            .lines()
            .filter_map(|line| line.split_once(self.marker).map(|(_, rest)| rest.trim().to_owned()))
            .filter(|rest| !rest.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn each_marked_line_comes_once_and_only_when_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut follow = MarkedLines::new(&log, "winvm-install:");
        assert!(follow.poll().is_empty(), "no log yet");
        let mut f = std::fs::File::create(&log).unwrap();
        f.write_all(b"[    0.1] kernel noise\r\nwinvm-install: formatting /dev/vda\r\nwinvm-install: copy").unwrap();
        assert_eq!(follow.poll(), ["formatting /dev/vda"]);
        assert!(follow.poll().is_empty(), "nothing new");
        f.write_all(b"ing the system\nnoise winvm-install:   \nnix-winvm-install: done\n").unwrap();
        assert_eq!(follow.poll(), ["copying the system", "done"]);
    }
}
