//! Resource quantities in manifests: CPU (`500m`, `0.5`, `2`) and memory
//! (`134217728`, `128Mi`, `1G`), parsed exactly with integer arithmetic and
//! printed back in one canonical form.

use thiserror::Error;

/// Why a quantity was refused; the caller prefixes it with the text it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum QuantityError {
    /// Not of the CPU shape at all.
    #[error("expected a number of CPUs like 0.5 or 2, or millicpus like 500m")]
    CpuSyntax,
    /// Not of the memory shape at all.
    #[error("expected bytes or a number with suffix Ki, Mi, Gi, Ti, k, M, G, T")]
    MemorySyntax,
    /// Zero or negative.
    #[error("must be greater than zero")]
    NotPositive,
    /// Finer than a thousandth of a CPU, which cgroups cannot express here.
    #[error("must be a whole number of millicpus (at most 3 decimals)")]
    CpuTooPrecise,
    /// A fraction that does not come to a whole number of bytes.
    #[error("must be a whole number of bytes")]
    MemoryNotWhole,
    /// Over what the wire type holds.
    #[error("must be at most {max}")]
    TooLarge {
        /// The largest value accepted, in the unit of the field.
        max: &'static str,
    },
}

/// Longer texts are refused before any arithmetic: no real quantity needs it.
const MAX_TEXT: usize = 64;

const KI: u64 = 1 << 10;
const MI: u64 = 1 << 20;
const GI: u64 = 1 << 30;
const TI: u64 = 1 << 40;

/// Memory suffixes and their multipliers. Binary first so that `Mi` is not
/// read as `M` followed by junk.
const MEMORY_SUFFIXES: [(&str, u64); 8] = [
    ("Ki", KI),
    ("Mi", MI),
    ("Gi", GI),
    ("Ti", TI),
    ("k", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
];

/// A non-negative decimal `int[.frac]` split into its parts; `frac` has its
/// trailing zeros removed so that `0.500` and `0.5` are the same number.
struct Decimal<'a> {
    int: &'a str,
    frac: &'a str,
}

/// Splits `digits[.digits]`; `None` when the text is not of that shape.
fn decimal(text: &str) -> Option<Decimal<'_>> {
    let (int, frac) = match text.split_once('.') {
        Some((int, frac)) if !frac.is_empty() => (int, frac),
        Some(_) => return None,
        None => (text, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    Some(Decimal {
        int,
        frac: frac.trim_end_matches('0'),
    })
}

/// Parses an unsigned integer made of ASCII digits; `None` on overflow.
fn digits_u64(s: &str) -> Option<u64> {
    s.bytes().try_fold(0u64, |acc, b| {
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

fn is_zero(d: &Decimal<'_>) -> bool {
    d.frac.is_empty() && d.int.bytes().all(|b| b == b'0')
}

/// Parses a CPU quantity into thousandths of a CPU.
pub fn parse_cpu(text: &str) -> Result<u32, QuantityError> {
    const TOO_LARGE: QuantityError = QuantityError::TooLarge { max: "4294967295m" };
    if text.len() > MAX_TEXT {
        return Err(QuantityError::CpuSyntax);
    }
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (number, milli) = match unsigned.strip_suffix('m') {
        Some(number) => (number, true),
        None => (unsigned, false),
    };
    let d = decimal(number).ok_or(QuantityError::CpuSyntax)?;
    if negative || is_zero(&d) {
        return Err(QuantityError::NotPositive);
    }
    let millis = if milli {
        if !d.frac.is_empty() {
            return Err(QuantityError::CpuTooPrecise);
        }
        digits_u64(d.int).ok_or(TOO_LARGE)?
    } else {
        if d.frac.len() > 3 {
            return Err(QuantityError::CpuTooPrecise);
        }
        let whole = digits_u64(d.int)
            .and_then(|n| n.checked_mul(1000))
            .ok_or(TOO_LARGE)?;
        // Pad the fraction to three digits: "5" is 500 thousandths.
        let frac = digits_u64(d.frac).unwrap_or(0) * 10u64.pow(3 - d.frac.len() as u32);
        whole.checked_add(frac).ok_or(TOO_LARGE)?
    };
    u32::try_from(millis).map_err(|_| TOO_LARGE)
}

/// Parses a memory quantity into bytes.
pub fn parse_memory(text: &str) -> Result<u64, QuantityError> {
    const TOO_LARGE: QuantityError = QuantityError::TooLarge {
        max: "18446744073709551615 bytes",
    };
    if text.len() > MAX_TEXT {
        return Err(QuantityError::MemorySyntax);
    }
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (number, multiplier) = MEMORY_SUFFIXES
        .iter()
        .find_map(|&(suffix, mul)| unsigned.strip_suffix(suffix).map(|n| (n, mul)))
        .unwrap_or((unsigned, 1));
    let d = decimal(number).ok_or(QuantityError::MemorySyntax)?;
    if negative || is_zero(&d) {
        return Err(QuantityError::NotPositive);
    }
    let whole = digits_u64(d.int)
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or(TOO_LARGE)?;
    if d.frac.is_empty() {
        return Ok(whole);
    }
    // Up to 19 digits the fraction fits in a u64 and its product with any
    // multiplier in a u128. Longer exact fractions exist (2^-40 has 40
    // digits) but nobody writes them; refusing them keeps this overflow-free.
    if d.frac.len() > 19 {
        return Err(QuantityError::MemoryNotWhole);
    }
    let scale = 10u128.pow(d.frac.len() as u32);
    let frac = u128::from(digits_u64(d.frac).unwrap_or(0)) * u128::from(multiplier);
    if frac % scale != 0 {
        return Err(QuantityError::MemoryNotWhole);
    }
    let frac = u64::try_from(frac / scale).map_err(|_| TOO_LARGE)?;
    whole.checked_add(frac).ok_or(TOO_LARGE)
}

/// The canonical text of a CPU quantity: whole CPUs as `"2"`, else `"500m"`.
pub fn format_cpu(millis: u32) -> String {
    if millis % 1000 == 0 {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// The canonical form of a memory quantity: the largest binary suffix that
/// divides it exactly (`"64Mi"`), else the plain number of bytes.
pub fn format_memory(bytes: u64) -> serde_json::Value {
    if bytes != 0 {
        for (suffix, mul) in [("Ti", TI), ("Gi", GI), ("Mi", MI), ("Ki", KI)] {
            if bytes % mul == 0 {
                return serde_json::Value::String(format!("{}{suffix}", bytes / mul));
            }
        }
    }
    serde_json::Value::from(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_accepted() {
        for (text, millis) in [
            ("500m", 500),
            ("1m", 1),
            ("0.5", 500),
            ("0.500", 500),
            ("0.001", 1),
            ("2", 2000),
            ("2.0", 2000),
            ("1.25", 1250),
            ("0002", 2000),
            ("4294967295m", u32::MAX),
            ("4294967.295", u32::MAX),
        ] {
            assert_eq!(parse_cpu(text), Ok(millis), "{text}");
        }
    }

    #[test]
    fn cpu_refused() {
        let too_large = QuantityError::TooLarge { max: "4294967295m" };
        for (text, err) in [
            ("", QuantityError::CpuSyntax),
            ("m", QuantityError::CpuSyntax),
            ("1.", QuantityError::CpuSyntax),
            (".5", QuantityError::CpuSyntax),
            ("1 ", QuantityError::CpuSyntax),
            ("2cpu", QuantityError::CpuSyntax),
            ("1e3", QuantityError::CpuSyntax),
            ("+1", QuantityError::CpuSyntax),
            ("1Mi", QuantityError::CpuSyntax),
            ("0", QuantityError::NotPositive),
            ("0m", QuantityError::NotPositive),
            ("0.000", QuantityError::NotPositive),
            ("-1", QuantityError::NotPositive),
            ("-500m", QuantityError::NotPositive),
            ("0.0005", QuantityError::CpuTooPrecise),
            ("1.5m", QuantityError::CpuTooPrecise),
            ("4294967296m", too_large),
            ("4294967.296", too_large),
            ("99999999999999999999999", too_large),
            ("99999999999999999999999m", too_large),
        ] {
            assert_eq!(parse_cpu(text), Err(err), "{text}");
        }
        assert_eq!(parse_cpu(&"1".repeat(65)), Err(QuantityError::CpuSyntax));
    }

    #[test]
    fn memory_accepted() {
        for (text, bytes) in [
            ("134217728", 134_217_728),
            ("128Mi", 128 * MI),
            ("1Gi", GI),
            ("500M", 500_000_000),
            ("1G", 1_000_000_000),
            ("64Ki", 64 * KI),
            ("1k", 1000),
            ("2Ti", 2 * TI),
            ("3T", 3_000_000_000_000),
            ("1.5Gi", 3 * GI / 2),
            ("0.5Ki", 512),
            ("1.000", 1),
            ("18446744073709551615", u64::MAX),
            ("16777215.5Ti", 18_446_743_523_953_737_728),
            ("18446744.073709551615T", u64::MAX),
        ] {
            assert_eq!(parse_memory(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn memory_refused() {
        let too_large = QuantityError::TooLarge {
            max: "18446744073709551615 bytes",
        };
        for (text, err) in [
            ("", QuantityError::MemorySyntax),
            ("12Q", QuantityError::MemorySyntax),
            ("1K", QuantityError::MemorySyntax),
            ("1KB", QuantityError::MemorySyntax),
            ("1mi", QuantityError::MemorySyntax),
            ("Mi", QuantityError::MemorySyntax),
            ("1 Mi", QuantityError::MemorySyntax),
            ("1e9", QuantityError::MemorySyntax),
            ("0", QuantityError::NotPositive),
            ("0Mi", QuantityError::NotPositive),
            ("-64Mi", QuantityError::NotPositive),
            ("0.5", QuantityError::MemoryNotWhole),
            ("0.1Ki", QuantityError::MemoryNotWhole),
            ("1.00000000000000000001Gi", QuantityError::MemoryNotWhole),
            ("99999999Ti", too_large),
            ("18446744073709551616", too_large),
            ("16777216Ti", too_large),
            ("18446744.073709551616T", too_large),
        ] {
            assert_eq!(parse_memory(text), Err(err), "{text}");
        }
    }

    #[test]
    fn canonical_forms_read_back() {
        for millis in [1, 500, 999, 1000, 1500, 2000, u32::MAX] {
            assert_eq!(parse_cpu(&format_cpu(millis)), Ok(millis), "{millis}");
        }
        assert_eq!(format_cpu(500), "500m");
        assert_eq!(format_cpu(2000), "2");
        for bytes in [1, 1000, 1024, 1536, 64 * MI, GI, 5 * TI, u64::MAX] {
            let text = match format_memory(bytes) {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            assert_eq!(parse_memory(&text), Ok(bytes), "{text}");
        }
        assert_eq!(format_memory(64 * MI), serde_json::json!("64Mi"));
        assert_eq!(format_memory(1536), serde_json::json!(1536));
        assert_eq!(format_memory(1000), serde_json::json!(1000));
    }
}
