//! The message contract: what an input payload may be, and the headers of every output.

use async_nats::HeaderMap;
use serde::Deserialize;

pub const H_DECISION: &str = "Oodgate-Decision";
pub const H_SCORE: &str = "Oodgate-Score";
/// With the adaptive detector: the static score, whether its term was active (`active`, or
/// `warming` while the memory holds fewer than k entries), the penalty subtracted and the last
/// admission folded in before this input.
pub const H_SCORE_STATIC: &str = "Oodgate-Score-Static";
pub const H_ADAPTIVE: &str = "Oodgate-Adaptive";
pub const H_ADAPTIVE_PENALTY: &str = "Oodgate-Adaptive-Penalty";
pub const H_ADAPTIVE_SEQ: &str = "Oodgate-Adaptive-Seq";
pub const H_METHOD: &str = "Oodgate-Method";
pub const H_THRESHOLD: &str = "Oodgate-Threshold";
pub const H_TOP_LABEL: &str = "Oodgate-Top-Label";
pub const H_NEAREST_OUTLIERS: &str = "Oodgate-Nearest-Outliers";
pub const H_BANK: &str = "Oodgate-Bank";
pub const H_MODEL: &str = "Oodgate-Model";
pub const H_SOURCE: &str = "Oodgate-Source";
pub const H_ERROR: &str = "Oodgate-Error";
pub const H_ERROR_KIND: &str = "Oodgate-Error-Kind";
pub const H_MSG_ID: &str = "Nats-Msg-Id";
/// A producer's own `Nats-Msg-Id`, carried onto the output (the output has its own id).
pub const H_INPUT_MSG_ID: &str = "Oodgate-Input-Msg-Id";

/// A claim check: the image lives in a NATS Object Store bucket.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Envelope {
    #[serde(default)]
    pub id: serde_json::Value,
    pub object: ObjectRef,
    #[serde(default)]
    pub meta: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ObjectRef {
    pub bucket: String,
    pub name: String,
}

/// What an input payload holds. The kind is sniffed from the bytes: no image format starts
/// with `{`, so a payload that does must be a valid envelope.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Image,
    Envelope(Envelope),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PayloadError {
    #[error(
        "bad envelope: {0} (expected {{\"id\": ..., \"object\": {{\"bucket\": ..., \"name\": ...}}, \"meta\": {{...}}}})"
    )]
    BadEnvelope(String),
}

pub fn classify(bytes: &[u8]) -> Result<Payload, PayloadError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Ok(Payload::Image);
    }
    let env: Envelope =
        serde_json::from_slice(bytes).map_err(|e| PayloadError::BadEnvelope(e.to_string()))?;
    if env.object.bucket.is_empty() || env.object.name.is_empty() {
        return Err(PayloadError::BadEnvelope(
            "object.bucket and object.name must not be empty".into(),
        ));
    }
    Ok(Payload::Envelope(env))
}

/// `Nats-Msg-Id` of an output: input stream, the stream's identity (`epoch`: its creation
/// time, so a deleted and recreated stream whose sequences restart at 1 never reuses an id),
/// stream sequence and bank version. A redelivered input maps to the same id, so the output
/// stream drops the second copy inside its duplicate window.
pub fn output_msg_id(stream: &str, epoch: &str, sequence: u64, bank_version: &str) -> String {
    format!("{stream}:{epoch}:{sequence}:{bank_version}")
}

/// Header values may not contain CR/LF; long explanations are capped.
pub fn header_value(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() > 512 {
        let mut end = 512;
        while !clean.is_char_boundary(end) {
            end -= 1;
        }
        clean[..end].to_string()
    } else {
        clean
    }
}

/// Bytes a header map takes on the wire: `NATS/1.0\r\n`, one `Name: value\r\n` per value,
/// and the closing `\r\n`. The server's `max_payload` applies to headers plus payload.
pub fn header_bytes(h: &HeaderMap) -> usize {
    let mut n = "NATS/1.0\r\n".len() + 2;
    for (name, values) in h.iter() {
        let name = name.to_string().len();
        for v in values {
            n += name + 2 + v.as_str().len() + 2;
        }
    }
    n
}

/// The input's headers minus NATS control headers (`Nats-*`: message id, expectations), which
/// must not leak into the output stream, and minus every `Oodgate-*` header, which only the
/// worker writes. The one filter for ID, OOD and dead-letter outputs.
pub fn carry_headers(input: Option<&HeaderMap>) -> HeaderMap {
    let mut out = HeaderMap::new();
    if let Some(h) = input {
        for (name, values) in h.iter() {
            let lower = name.to_string().to_ascii_lowercase();
            // NATS control headers, and every `Oodgate-*` header in any case: a producer must
            // never be able to forge (or shadow, in another case) what the worker decides.
            if lower.starts_with("nats-") || lower.starts_with("oodgate-") {
                continue;
            }
            for v in values {
                out.append(name.clone(), v.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_sniffed() {
        assert_eq!(classify(b"\xff\xd8\xff\xe0rest").unwrap(), Payload::Image);
        assert_eq!(classify(b"").unwrap(), Payload::Image);
        let env = classify(
            br#" {"id": 7, "object": {"bucket": "b", "name": "n.jpg"}, "meta": {"k": 1}}"#,
        )
        .unwrap();
        match env {
            Payload::Envelope(e) => {
                assert_eq!(e.object.bucket, "b");
                assert_eq!(e.object.name, "n.jpg");
                assert_eq!(e.id, serde_json::json!(7));
            }
            other => panic!("{other:?}"),
        }
        assert!(classify(b"{not json").is_err());
        assert!(classify(br#"{"object": {"bucket": "", "name": "x"}}"#).is_err());
    }

    #[test]
    fn msg_id_and_headers() {
        assert_eq!(
            output_msg_id("IMAGES", "1764000000000000000", 42, "abcd"),
            "IMAGES:1764000000000000000:42:abcd"
        );
        assert_eq!(header_value("a\r\nb"), "a  b");
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", "x");
        h.insert("Nats-Expected-Stream", "y");
        h.insert("X-Custom", "keep");
        assert_eq!(
            header_bytes(&h),
            "NATS/1.0\r\nNats-Msg-Id: x\r\nNats-Expected-Stream: y\r\nX-Custom: keep\r\n\r\n".len()
        );
        let out = carry_headers(Some(&h));
        assert!(out.get("Nats-Msg-Id").is_none());
        assert!(out.get("Nats-Expected-Stream").is_none());
        assert_eq!(out.get("X-Custom").map(|v| v.as_str()), Some("keep"));
    }
}
