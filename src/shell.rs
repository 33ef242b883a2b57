//! Quoting for POSIX shells (busybox sh, Cygwin's bash, the `run-vm` script, QEMU's `exec:`).
//! The one quoter of the project: everything that writes shell text uses it.

/// `s` as one shell word: bare when it holds only characters no shell treats specially,
/// single-quoted otherwise.
pub fn quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b)) {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `quote` for bytes that need not be UTF-8 (a Nix string may hold any): single quotes keep
/// every byte as it is.
pub fn quote_bytes(v: &[u8]) -> Vec<u8> {
    if let Ok(text) = std::str::from_utf8(v) {
        return quote(text).into_bytes();
    }
    let mut q = vec![b'\''];
    for &b in v {
        if b == b'\'' {
            q.extend_from_slice(br"'\''");
        } else {
            q.push(b);
        }
    }
    q.push(b'\'');
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_bare_or_single_quoted() {
        assert_eq!(quote("/build/xchg"), "/build/xchg");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote(""), "''");
        assert_eq!(quote_bytes(b"caf\xe9 'x'"), b"'caf\xe9 '\\''x'\\'''".to_vec());
        assert_eq!(quote_bytes(b"plain"), b"plain".to_vec());
    }

    #[test]
    fn quoted_words_round_trip_through_sh() {
        for value in ["", "plain", "it's", "'", "a'b'c", "$(rm -rf /) `x` \\ \"q\"", "line\nbreak", "*?[a]~"] {
            let out = std::process::Command::new("sh").arg("-c").arg(format!("printf '%s' {}", quote(value))).output();
            let out = out.expect("sh runs");
            assert_eq!(String::from_utf8_lossy(&out.stdout), value);
        }
    }
}
