//! Sizes on the command line: `512M`, `2G`, `1GiB`, `1.5g`, plain bytes; binary units
//! (K = 1024), as memory sizes usually are.

/// Parses a size in bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() {
        return Err(format!("size {text:?} has no number (e.g. 512M, 2G, 4096)"));
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!("unknown unit {other:?} in size {text:?} (use K, M, G or T, e.g. 512M)"))
        }
    };
    if number.is_empty() {
        return Err(format!("size {text:?} has no number (e.g. 512M, 2G, 4096)"));
    }
    let value: f64 =
        number.parse().map_err(|_| format!("size {text:?} is not a number (e.g. 512M, 2G, 4096)"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("size {text:?} is too large"));
    }
    if bytes.fract() != 0.0 {
        return Err(format!("size {text:?} is not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

/// Parses a size, or a percentage of `of` (`25%`), rounded down to whole pages.
pub fn parse_size_or_percent(text: &str, of: u64) -> Result<u64, String> {
    let bytes = match text.trim().strip_suffix('%') {
        Some(p) => {
            let pct: f64 =
                p.trim().parse().map_err(|_| format!("{text:?} is not a percentage (e.g. 25%)"))?;
            if !(pct > 0.0 && pct <= 100.0) {
                return Err(format!("percentage {text:?} must be in (0, 100]"));
            }
            (of as f64 * pct / 100.0) as u64
        }
        None => parse_size(text)?,
    };
    Ok(bytes / 4096 * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("8 KB"), Ok(8192));
    }

    #[test]
    fn bad_sizes_say_why() {
        assert!(parse_size("").unwrap_err().contains("no number"));
        assert!(parse_size("12Q").unwrap_err().contains("unknown unit"));
        assert!(parse_size("G").unwrap_err().contains("no number"));
        assert!(parse_size("1.2.3M").unwrap_err().contains("not a number"));
        assert!(parse_size("0.3").unwrap_err().contains("whole number"));
        assert!(parse_size("99999999T").unwrap_err().contains("too large"));
    }

    #[test]
    fn percentages_are_of_the_region() {
        assert_eq!(parse_size_or_percent("25%", 2 << 30), Ok(512 << 20));
        assert_eq!(parse_size_or_percent("64M", 2 << 30), Ok(64 << 20));
        assert!(parse_size_or_percent("0%", 1 << 30).is_err());
        assert!(parse_size_or_percent("150%", 1 << 30).is_err());
        assert!(parse_size_or_percent("x%", 1 << 30).is_err());
    }
}
