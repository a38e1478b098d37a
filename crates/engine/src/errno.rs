//! Texts for operating-system errors, as QEMU prints them.

/// The strerror-like text of an I/O error, without Rust's " (os error N)" suffix.
pub fn errno_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// [`errno_text`] of a raw errno.
pub fn errno_code_text(e: rustix::io::Errno) -> String {
    errno_text(&std::io::Error::from(e))
}
