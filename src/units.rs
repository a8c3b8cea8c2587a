//! Byte sizes and counts as people write them: `5GB` in, `8.03B` out.

/// Parses a size the way transformers' `max_shard_size` does: decimal units
/// (KB, MB, GB, TB) are powers of 10, binary ones (KiB, MiB, GiB) powers of
/// 2, `B` is bytes. A bare number is refused: `--shard-size 5` almost
/// always means 5GB, not 5 bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a size like 5GB or 500MB"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" => return Err(format!("'{s}' has no unit: write it like 5GB, 500MB or 2GiB ({t}B for bytes)")),
        "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1048576.0,
        "GIB" => 1073741824.0,
        "TIB" => 1099511627776.0,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")),
    };
    let v = n * mult;
    if !(1.0..1e18).contains(&v) {
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
    fn sizes_parse_like_transformers_and_need_a_unit() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5MB").unwrap(), 1_500_000);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
        assert_eq!(parse_size(" 5 gb ").unwrap(), 5_000_000_000);
        assert!(parse_size("5").unwrap_err().contains("has no unit"));
        assert!(parse_size("5XB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("0B").unwrap_err().contains("out of range"));
        assert!(parse_size("GB").is_err());
    }

    #[test]
    fn counts_and_bytes_read_like_model_cards() {
        assert_eq!(human_count(999), "999");
        assert_eq!(human_count(8_030_261_248), "8.03B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(269_005), "262.7 KiB");
    }
}
