//! This process's memory as the kernel counts it (Linux `/proc/self/status`;
//! `None` elsewhere): logged by long runs, so growth shows in `log.jsonl`.

/// Resident set size now (`VmRSS`), bytes.
pub fn rss_bytes() -> Option<u64> {
    status_kb("VmRSS:").map(|kb| kb * 1024)
}

/// Peak resident set size so far (`VmHWM`), bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kb("VmHWM:").map(|kb| kb * 1024)
}

fn status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
