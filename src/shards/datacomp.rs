//! DataComp's subset file: the `uid`s of the kept samples as the `.npy` its resharder reads,
//! a structured array of two little-endian u64 (`f0` = the uid's first 16 hex digits, `f1` =
//! the last 16), sorted and without repeats (the resharder matches with `searchsorted`, so an
//! unsorted file loses samples silently, and emits a uid listed k times k times). About
//! twenty lines of format, written here rather than through an npy crate, which has no
//! structured dtypes of this shape.

use std::path::Path;

use arrow_array::Array;
use arrow_array::cast::AsArray;

use super::tables::{TableError, read_table};

/// A 32-hex-digit uid as the pair of u64 DataComp stores; `None` for anything else.
pub fn parse_uid(uid: &str) -> Option<(u64, u64)> {
    if uid.len() != 32 || !uid.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let hi = u64::from_str_radix(&uid[..16], 16).ok()?;
    let lo = u64::from_str_radix(&uid[16..], 16).ok()?;
    Some((hi, lo))
}

/// The `.npy` bytes of `uids` (sorted and deduplicated here).
pub fn npy_bytes(mut uids: Vec<(u64, u64)>) -> Vec<u8> {
    uids.sort_unstable();
    uids.dedup();
    let mut header = format!(
        "{{'descr': [('f0', '<u8'), ('f1', '<u8')], 'fortran_order': False, 'shape': ({},), }}",
        uids.len()
    );
    // Magic (6) + version (2) + length (2) + header, padded with spaces and a newline to a
    // multiple of 64 bytes.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 16 * uids.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for (hi, lo) in uids {
        out.extend_from_slice(&hi.to_le_bytes());
        out.extend_from_slice(&lo.to_le_bytes());
    }
    out
}

/// What [`id_uids`] found.
#[derive(Debug, Default, PartialEq)]
pub struct UidReport {
    /// Distinct uids of samples decided `id`.
    pub written: usize,
    /// `id` rows whose uid is missing or not 32 hex digits.
    pub without_uid: usize,
}

/// Collects the uids of every `id` row in the scores tables under `scores_dir`; `None` when no
/// row has a uid (not a DataComp dataset).
pub fn id_uids(scores_dir: &Path) -> Result<Option<(Vec<u8>, UidReport)>, TableError> {
    let mut uids = Vec::new();
    let mut report = UidReport::default();
    let mut any_uid = false;
    for e in walkdir::WalkDir::new(scores_dir).sort_by_file_name() {
        let Ok(e) = e else { continue };
        if !e.file_type().is_file() || e.path().extension().is_none_or(|x| x != "parquet") {
            continue;
        }
        for b in read_table(e.path())? {
            let (Some(d), Some(u)) = (b.column_by_name("decision"), b.column_by_name("uid")) else {
                continue;
            };
            let (d, u) = (d.as_string::<i32>(), u.as_string::<i32>());
            for i in 0..b.num_rows() {
                let uid = (!u.is_null(i)).then(|| u.value(i));
                any_uid |= uid.is_some();
                if d.value(i) != "id" {
                    continue;
                }
                match uid.and_then(parse_uid) {
                    Some(x) => uids.push(x),
                    None => report.without_uid += 1,
                }
            }
        }
    }
    if !any_uid {
        return Ok(None);
    }
    let mut distinct = uids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    report.written = distinct.len();
    Ok(Some((npy_bytes(distinct), report)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_parse_as_two_u64_and_the_file_has_numpys_layout() {
        assert_eq!(
            parse_uid("0123456789abcdefFEDCBA9876543210"),
            Some((0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210))
        );
        assert_eq!(parse_uid("0123"), None);
        assert_eq!(parse_uid("g123456789abcdef0123456789abcdef"), None);
        let b = npy_bytes(vec![(2, 1), (1, 9), (2, 1)]);
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
        assert!(header.starts_with("{'descr': [('f0', '<u8'), ('f1', '<u8')]"));
        assert!(header.contains("'shape': (2,)"), "{header}");
        assert!(header.ends_with('\n'));
        let rows: Vec<u64> = b[10 + hlen..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(rows, [1, 9, 2, 1], "sorted, the repeat dropped");
    }
}
