//! Byte sizes and counts as people write them: `5GB` in, `8.03B` out.

/// The forms a size may take, for error messages.
const FORMS: &str = "5000000 (bytes), 500K, 500M, 5B or 5G (thousands, millions, billions of bytes, as mergekit reads them), 5KB, 5MB, 5GB, 5TB (powers of 10, as transformers reads them), 5KiB, 5MiB, 5GiB, 5TiB (powers of 2)";

/// Parses a size as mergekit (`--out-shard-size`) and transformers
/// (`max_shard_size`) read them, one grammar for every size option and
/// recipe key: a bare number is bytes; `K`, `M`, `B` or `G`, `T` are
/// thousands, millions, billions, trillions of bytes (mergekit's `5B` is 5
/// billion bytes); `KB`, `MB`, `GB`, `TB` powers of 10 and `KiB`, `MiB`,
/// `GiB`, `TiB` powers of 2. A lowercase `b` after a prefix (`5Gb`,
/// `500mb`), which transformers reads as bits, and a lone `b` (`5b`),
/// which mergekit reads as billions, could each mean two things: refused,
/// with the forms accepted. A decimal (`1.5GB`) must come to whole bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let bad = || format!("'{s}' is not a size; write one of: {FORMS}");
    if num.is_empty() || num.matches('.').count() > 1 || num.starts_with('.') || num.ends_with('.') {
        return Err(bad());
    }
    let ambiguous = |why: &str| format!("'{s}' could mean {why}; write one of: {FORMS}");
    let mult: u128 = match unit {
        "" => 1,
        "b" => return Err(ambiguous("5 billion bytes (as mergekit reads 'b') or bytes")),
        u if u.len() == 2 && u.ends_with('b') && !u.starts_with(['b', 'B']) => {
            return Err(ambiguous("bits (as transformers reads a lowercase 'b') or bytes"));
        }
        u => match u.to_ascii_uppercase().as_str() {
            "K" | "KB" => 1_000,
            "M" | "MB" => 1_000_000,
            "B" | "G" | "GB" => 1_000_000_000,
            "T" | "TB" => 1_000_000_000_000,
            "KIB" => 1 << 10,
            "MIB" => 1 << 20,
            "GIB" => 1 << 30,
            "TIB" => 1 << 40,
            _ => return Err(format!("'{s}': unknown unit '{u}'; write one of: {FORMS}")),
        },
    };
    // Exactly, in integers: whole and fraction digits, then the unit.
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if whole.len() + frac.len() > 30 {
        return Err(format!("'{s}' is out of range (1 byte to 1 EB)"));
    }
    let digits: u128 = format!("{whole}{frac}").parse().map_err(|_| bad())?;
    let scale = 10u128.pow(frac.len() as u32);
    let bytes = digits * mult;
    if !bytes.is_multiple_of(scale) {
        return Err(format!("'{s}' is not a whole number of bytes"));
    }
    let v = bytes / scale;
    if !(1..=1_000_000_000_000_000_000).contains(&v) {
        return Err(format!("'{s}' is out of range (1 byte to 1 EB)"));
    }
    Ok(v as u64)
}

/// Parameter counts the way model cards write them (8.03B, 1.10M).
pub fn human_count(n: u64) -> String {
    let f = n as f64;
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.2}K", f / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2}M", f / 1e6),
        _ => format!("{:.2}B", f / 1e9),
    }
}

/// Byte sizes in binary units (262.7 KiB, 14.96 GiB).
pub fn human_bytes(n: u64) -> String {
    let f = n as f64;
    if n < 1 << 10 {
        format!("{n} B")
    } else if n < 1 << 20 {
        format!("{:.1} KiB", f / 1024.0)
    } else if n < 1 << 30 {
        format!("{:.1} MiB", f / 1048576.0)
    } else {
        format!("{:.2} GiB", f / 1073741824.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_mergekit_and_transformers_read_them() {
        for (text, bytes) in [
            ("5GB", 5_000_000_000u64),
            ("5G", 5_000_000_000),
            ("5B", 5_000_000_000),
            ("500M", 500_000_000),
            ("500m", 500_000_000),
            ("2K", 2_000),
            ("2GiB", 2 << 30),
            ("1.5MB", 1_500_000),
            ("0.5KiB", 512),
            ("4096", 4096),
            (" 5 gB ", 5_000_000_000),
            ("1TB", 1_000_000_000_000),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn a_size_that_could_mean_two_things_is_refused_with_the_forms() {
        for text in ["5Gb", "500mb", "5kb", "5b"] {
            let e = parse_size(text).unwrap_err();
            assert!(e.contains("could mean") && e.contains("5GiB"), "{text}: {e}");
        }
        assert!(parse_size("5XB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("0").unwrap_err().contains("out of range"));
        assert!(parse_size("2EB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("1.0001KB").unwrap_err().contains("whole number of bytes"));
        for bad in ["GB", ".5GB", "1..5GB", "-5GB", ""] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn counts_and_bytes_read_like_model_cards() {
        assert_eq!(human_count(999), "999");
        assert_eq!(human_count(8_030_261_248), "8.03B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(269_005), "262.7 KiB");
    }
}
