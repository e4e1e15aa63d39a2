//! Human units on the command line: `15m`, `8h`, `10G`.

/// `90`, `90s`, `15m`, `8h`, `14d` → seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86400),
        _ => (s, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 30s, 15m, 8h, 14d)"))?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(format!("{s:?} is not a duration (try 30s, 15m, 8h, 14d)"));
    }
    Ok((n * f64::from(mult)).round() as u64)
}

/// `1048576`, `512M`, `10G`, `10GiB` → bytes (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower.trim_end_matches("ib").trim_end_matches('b');
    let (num, shift) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 10),
        Some('m') => (&stripped[..stripped.len() - 1], 20),
        Some('g') => (&stripped[..stripped.len() - 1], 30),
        Some('t') => (&stripped[..stripped.len() - 1], 40),
        _ => (stripped, 0),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{t:?} is not a size (try 512M, 10G)"))?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(format!("{t:?} is not a size (try 512M, 10G)"));
    }
    Ok((n * (1u64 << shift) as f64) as u64)
}

/// One formatter for sizes across the CLI (the image builder's progress uses it too).
pub use berth_image::human_bytes as format_bytes;

pub fn format_duration(secs: u64) -> String {
    match secs {
        s if s % 86400 == 0 && s > 0 => format!("{}d", s / 86400),
        s if s % 3600 == 0 && s > 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("15m").unwrap(), 900);
        assert_eq!(parse_duration("8h").unwrap(), 28800);
        assert_eq!(parse_duration("14d").unwrap(), 14 * 86400);
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("big").is_err());
        assert_eq!(format_duration(900), "15m");
        assert_eq!(format_bytes(1536), "1.5 KiB");
    }
}
