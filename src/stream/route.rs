//! Routing: a verdict or a failure becomes an output subject and its headers. One header
//! builder serves the ID, OOD and dead-letter outputs, so every output carries the same
//! identity (source, bank, model, `Nats-Msg-Id`). Pure: no I/O, testable without NATS.

use async_nats::HeaderMap;

use super::inflight::Source;
use super::message as msg;
use crate::detect::detector::{Decision, Verdict};
use crate::model::preprocess::PreprocessError;

/// The three output subjects, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSubjects {
    pub id: String,
    pub ood: String,
    pub dlq: String,
}

impl OutputSubjects {
    /// `[id, ood, dlq]`: the subjects of the output stream.
    pub fn all(&self) -> [&str; 3] {
        [&self.id, &self.ood, &self.dlq]
    }
}

/// Why an input is dead-lettered: the value of `Oodgate-Error-Kind` (a contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadKind {
    /// A JSON payload that is not a valid claim-check envelope.
    BadEnvelope,
    /// The envelope's bucket or object does not exist.
    MissingObject,
    /// Payload or object above `limits.max_bytes`.
    TooLarge,
    Empty,
    NotImage,
    UnsupportedFormat,
    TooManyPixels,
    Corrupt,
    Resize,
    /// Delivered `input.max_deliver` times without an output.
    MaxDeliveries,
    /// The encoder fails on this image alone (its batch neighbours work).
    Encoder,
    /// The scorer fails on this image alone.
    Score,
    /// A JPEG with more scans than `limits.max_jpeg_scans`.
    TooComplex,
}

impl DeadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadKind::BadEnvelope => "bad_envelope",
            DeadKind::MissingObject => "missing_object",
            DeadKind::TooLarge => "too_large",
            DeadKind::Empty => "empty",
            DeadKind::NotImage => "not_image",
            DeadKind::UnsupportedFormat => "unsupported_format",
            DeadKind::TooManyPixels => "too_many_pixels",
            DeadKind::Corrupt => "corrupt",
            DeadKind::Resize => "resize",
            DeadKind::MaxDeliveries => "max_deliveries",
            DeadKind::Encoder => "encoder",
            DeadKind::Score => "score",
            DeadKind::TooComplex => "too_complex",
        }
    }

    /// The dead-letter kind of a decoding failure.
    pub fn of_preprocess(e: &PreprocessError) -> DeadKind {
        match e {
            PreprocessError::Empty => DeadKind::Empty,
            PreprocessError::TooLarge { .. } => DeadKind::TooLarge,
            PreprocessError::NotAnImage { .. } => DeadKind::NotImage,
            PreprocessError::UnsupportedFormat(_) => DeadKind::UnsupportedFormat,
            PreprocessError::TooManyPixels { .. } => DeadKind::TooManyPixels,
            PreprocessError::Corrupt { .. } | PreprocessError::ZeroSize { .. } => DeadKind::Corrupt,
            PreprocessError::Resize(_) => DeadKind::Resize,
            PreprocessError::TooComplex { .. } => DeadKind::TooComplex,
            PreprocessError::Panicked(_) => DeadKind::Corrupt,
        }
    }
}

impl std::fmt::Display for DeadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an input ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Id,
    Ood,
    Dead(DeadKind),
}

impl Outcome {
    /// The `decision` label of `oodgate_messages_out_total`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Id => "id",
            Outcome::Ood => "ood",
            Outcome::Dead(_) => "dlq",
        }
    }
}

/// An output ready to publish.
#[derive(Debug, Clone)]
pub struct Output {
    pub subject: String,
    pub headers: HeaderMap,
    pub outcome: Outcome,
}

/// Turns verdicts and failures into outputs for one bank, model and method.
#[derive(Debug, Clone)]
pub struct Router {
    subjects: OutputSubjects,
    redelivery: Redelivery,
    /// The server's limit on headers + payload (0 = none).
    max_payload: usize,
    bank_version: String,
    model_fingerprint: String,
    method: String,
    threshold: String,
}

impl Router {
    pub fn new(
        subjects: OutputSubjects,
        bank_version: &str,
        model_fingerprint: &str,
        method: &str,
        threshold: f64,
    ) -> Router {
        Router {
            subjects,
            redelivery: Redelivery::default(),
            max_payload: 0,
            bank_version: bank_version.to_string(),
            model_fingerprint: model_fingerprint.to_string(),
            method: method.to_string(),
            threshold: msg::header_value(&format!("{threshold}")),
        }
    }

    /// Outputs above `max_payload` bytes (headers + payload) are dead-lettered by [`Router::fit`].
    pub fn with_max_payload(mut self, max_payload: usize) -> Router {
        self.max_payload = max_payload;
        self
    }

    /// How inputs are retried after a transient failure they may have caused.
    pub fn with_redelivery(mut self, redelivery: Redelivery) -> Router {
        self.redelivery = redelivery;
        self
    }

    pub fn subjects(&self) -> &OutputSubjects {
        &self.subjects
    }

    /// The headers every output carries: the input's own (minus NATS control headers), the
    /// source, bank, model and the output's `Nats-Msg-Id`.
    fn base(&self, source: &Source, inbound: Option<&HeaderMap>) -> HeaderMap {
        let mut h = msg::carry_headers(inbound);
        h.insert(msg::H_BANK, self.bank_version.as_str());
        h.insert(msg::H_MODEL, self.model_fingerprint.as_str());
        h.insert(msg::H_SOURCE, source.label().as_str());
        h.insert(
            msg::H_MSG_ID,
            msg::output_msg_id(
                &source.stream,
                &source.epoch,
                source.sequence,
                &self.bank_version,
            )
            .as_str(),
        );
        if let Some(id) = inbound.and_then(|h| h.get(msg::H_MSG_ID)) {
            h.insert(msg::H_INPUT_MSG_ID, msg::header_value(id.as_str()).as_str());
        }
        h
    }

    /// The ID or OOD output of a scored input.
    pub fn verdict(&self, source: &Source, inbound: Option<&HeaderMap>, v: &Verdict) -> Output {
        let mut h = self.base(source, inbound);
        h.insert(msg::H_DECISION, v.decision.as_str());
        h.insert(msg::H_SCORE, format!("{:.6e}", v.score).as_str());
        if let Some(a) = &v.adaptive {
            h.insert(
                msg::H_SCORE_STATIC,
                format!("{:.6e}", a.static_score).as_str(),
            );
            h.insert(msg::H_ADAPTIVE, if a.active { "active" } else { "warming" });
            h.insert(
                msg::H_ADAPTIVE_PENALTY,
                format!("{:.6e}", a.penalty).as_str(),
            );
            h.insert(msg::H_ADAPTIVE_SEQ, a.seq.to_string().as_str());
        }
        h.insert(msg::H_METHOD, self.method.as_str());
        h.insert(msg::H_THRESHOLD, self.threshold.as_str());
        h.insert(msg::H_TOP_LABEL, msg::header_value(&v.top_label).as_str());
        let outliers: Vec<&str> = v
            .explanation
            .as_ref()
            .map(|e| e.nearest_outliers.iter().map(|o| o.0.as_str()).collect())
            .unwrap_or_default();
        h.insert(
            msg::H_NEAREST_OUTLIERS,
            msg::header_value(&outliers.join(", ")).as_str(),
        );
        let (subject, outcome) = match v.decision {
            Decision::Id => (&self.subjects.id, Outcome::Id),
            Decision::Ood => (&self.subjects.ood, Outcome::Ood),
        };
        Output {
            subject: subject.clone(),
            headers: h,
            outcome,
        }
    }

    /// The dead-letter output of an input that cannot be processed.
    pub fn dead(
        &self,
        source: &Source,
        inbound: Option<&HeaderMap>,
        kind: DeadKind,
        why: &str,
    ) -> Output {
        let mut h = self.base(source, inbound);
        h.insert(msg::H_ERROR, msg::header_value(why).as_str());
        h.insert(msg::H_ERROR_KIND, kind.as_str());
        Output {
            subject: self.subjects.dlq.clone(),
            headers: h,
            outcome: Outcome::Dead(kind),
        }
    }
}

/// Redelivery after a transient failure an input may have caused (an object fetch, the
/// encoder or the scorer failing on its batch): NAK delays double with each delivery up to a
/// cap; on its last delivery the input is dead-lettered (`max_deliveries`) by the worker
/// instead of being dropped by the server. Output outages never come here: the sink holds
/// those inputs (see [`super::breaker`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Redelivery {
    pub nak_delay: std::time::Duration,
    pub nak_delay_max: std::time::Duration,
    /// The consumer's `max_deliver` (−1 or 0: unlimited).
    pub max_deliver: i64,
}

impl Default for Redelivery {
    fn default() -> Self {
        Redelivery {
            nak_delay: std::time::Duration::from_secs(2),
            nak_delay_max: std::time::Duration::from_secs(60),
            max_deliver: -1,
        }
    }
}

/// What becomes of an input after a transient failure.
#[derive(Debug, Clone)]
pub enum Retry {
    /// Redeliver after this delay.
    Nak(std::time::Duration),
    /// Its last delivery: dead-letter it.
    Dead(Output),
}

impl Router {
    /// NAK with a delay that grows with the input's deliveries, or dead-letter it on its last.
    pub fn after_transient_failure(
        &self,
        source: &Source,
        inbound: Option<&HeaderMap>,
        why: &str,
    ) -> Retry {
        let r = self.redelivery;
        let delivered = source.delivered.max(1);
        if r.max_deliver > 0 && delivered >= r.max_deliver {
            let why = format!(
                "delivered {delivered} times (input.max_deliver = {}); last failure: {why}",
                r.max_deliver
            );
            return Retry::Dead(self.dead(source, inbound, DeadKind::MaxDeliveries, &why));
        }
        let doublings = u32::try_from(delivered - 1).unwrap_or(u32::MAX).min(20);
        Retry::Nak(
            r.nak_delay
                .saturating_mul(1u32 << doublings)
                .min(r.nak_delay_max),
        )
    }

    /// Checks that `output` with `payload` fits the server's `max_payload`. One that does not
    /// would be refused on every redelivery, so it becomes a `too_large` dead letter without
    /// the payload (the input stays in its stream, named by `Oodgate-Source`); if even the
    /// input's own headers make that too large, they are dropped as well.
    pub fn fit(
        &self,
        source: &Source,
        inbound: Option<&HeaderMap>,
        output: Output,
        payload: bytes::Bytes,
    ) -> (Output, bytes::Bytes) {
        let headers = msg::header_bytes(&output.headers);
        let size = payload.len() + headers;
        if self.max_payload == 0 || size <= self.max_payload {
            return (output, payload);
        }
        let why = format!(
            "the {} output is {size} bytes (payload {}, headers {headers}), above the server's \
             max_payload of {} bytes: published without the payload",
            output.outcome.label(),
            payload.len(),
            self.max_payload
        );
        tracing::warn!(source = %source.label(), %why, "output too large");
        let dead = self.dead(source, inbound, DeadKind::TooLarge, &why);
        if msg::header_bytes(&dead.headers) <= self.max_payload {
            return (dead, bytes::Bytes::new());
        }
        (
            self.dead(source, None, DeadKind::TooLarge, &why),
            bytes::Bytes::new(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::bank::Explanation;

    fn router() -> Router {
        Router::new(
            OutputSubjects {
                id: "o.id".into(),
                ood: "o.ood".into(),
                dlq: "o.dlq".into(),
            },
            "bank1",
            "model1",
            "ole",
            0.25,
        )
    }

    fn source() -> Source {
        Source {
            stream: "IMAGES".into(),
            epoch: "1000".into(),
            sequence: 7,
            delivered: 1,
        }
    }

    fn get<'a>(h: &'a HeaderMap, k: &str) -> Option<&'a str> {
        h.get(k).map(|v| v.as_str())
    }

    /// Names of `h`'s headers that start with `oodgate-` in any case, lowercased, with counts.
    fn oodgate_headers(h: &HeaderMap) -> Vec<(String, usize)> {
        let mut names: Vec<(String, usize)> = h
            .iter()
            .map(|(k, v)| (k.to_string().to_ascii_lowercase(), v.len()))
            .filter(|(k, _)| k.starts_with("oodgate-"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn inbound_oodgate_headers_are_dropped_in_any_case_on_every_subject() {
        let mut inbound = HeaderMap::new();
        inbound.insert("Oodgate-Error-Kind", "none");
        inbound.insert("oodgate-decision", "id");
        inbound.insert("OODGATE-SCORE", "1e9");
        inbound.insert("oodgate-bank", "forged");
        inbound.insert("Oodgate-Custom", "x");
        inbound.insert("X-Trace", "t-1");
        let v = Verdict {
            score: -1.0,
            decision: Decision::Ood,
            top_label: "dog".into(),
            top_id: 0,
            adaptive: None,
            explanation: None,
        };
        let r = router();
        let verdict = r.verdict(&source(), Some(&inbound), &v).headers;
        let dead = r
            .dead(&source(), Some(&inbound), DeadKind::NotImage, "no")
            .headers;
        for h in [&verdict, &dead] {
            assert_eq!(get(h, "X-Trace"), Some("t-1"));
            assert_eq!(get(h, msg::H_BANK), Some("bank1"));
            // Only the worker's own headers, each once, in the worker's spelling.
            assert!(oodgate_headers(h).iter().all(|(_, n)| *n == 1), "{h:?}");
            assert!(h.iter().all(|(k, _)| {
                let k = k.to_string();
                !k.to_ascii_lowercase().starts_with("oodgate-") || k.starts_with("Oodgate-")
            }));
            assert!(get(h, "Oodgate-Custom").is_none());
        }
        assert_eq!(get(&verdict, msg::H_DECISION), Some("ood"));
        assert!(get(&verdict, msg::H_ERROR_KIND).is_none());
        assert_eq!(get(&dead, msg::H_ERROR_KIND), Some("not_image"));
        assert!(get(&dead, msg::H_DECISION).is_none());
    }

    #[test]
    fn verdicts_route_by_decision_with_every_header() {
        let mut inbound = HeaderMap::new();
        inbound.insert("Nats-Msg-Id", "producer-1");
        inbound.insert("X-Trace", "t-1");
        let v = Verdict {
            score: 0.123456789,
            decision: Decision::Ood,
            top_label: "dog\r\n".into(),
            top_id: 0,
            adaptive: None,
            explanation: Some(Explanation {
                top_labels: vec![("dog".into(), 0.3)],
                nearest_outliers: vec![("cat".into(), 0.2), ("car".into(), 0.1)],
            }),
        };
        let out = router().verdict(&source(), Some(&inbound), &v);
        assert_eq!(out.subject, "o.ood");
        assert_eq!(out.outcome, Outcome::Ood);
        let h = &out.headers;
        assert_eq!(get(h, msg::H_DECISION), Some("ood"));
        assert_eq!(get(h, msg::H_SCORE), Some("1.234568e-1"));
        assert_eq!(get(h, msg::H_METHOD), Some("ole"));
        assert_eq!(get(h, msg::H_THRESHOLD), Some("0.25"));
        assert_eq!(get(h, msg::H_TOP_LABEL), Some("dog  "));
        assert_eq!(get(h, msg::H_NEAREST_OUTLIERS), Some("cat, car"));
        assert_eq!(get(h, msg::H_BANK), Some("bank1"));
        assert_eq!(get(h, msg::H_MODEL), Some("model1"));
        assert_eq!(get(h, msg::H_SOURCE), Some("IMAGES:7"));
        // The producer's message id never travels as the output's: the output has its own,
        // and the producer's is kept beside it.
        assert_eq!(get(h, msg::H_MSG_ID), Some("IMAGES:1000:7:bank1"));
        assert_eq!(get(h, msg::H_INPUT_MSG_ID), Some("producer-1"));
        assert_eq!(get(h, "X-Trace"), Some("t-1"));
        assert!(get(h, msg::H_ERROR).is_none());

        let id = router().verdict(
            &source(),
            None,
            &Verdict {
                decision: Decision::Id,
                explanation: None,
                ..v
            },
        );
        assert_eq!((id.subject.as_str(), id.outcome), ("o.id", Outcome::Id));
        assert_eq!(get(&id.headers, msg::H_NEAREST_OUTLIERS), Some(""));
    }

    #[test]
    fn failures_go_to_the_dead_letter_subject() {
        let out = router().dead(&source(), None, DeadKind::BadEnvelope, "no\nbucket");
        assert_eq!(out.subject, "o.dlq");
        assert_eq!(out.outcome, Outcome::Dead(DeadKind::BadEnvelope));
        assert_eq!(out.outcome.label(), "dlq");
        let h = &out.headers;
        assert_eq!(get(h, msg::H_ERROR_KIND), Some("bad_envelope"));
        assert_eq!(get(h, msg::H_ERROR), Some("no bucket"));
        assert_eq!(get(h, msg::H_MSG_ID), Some("IMAGES:1000:7:bank1"));
        assert!(get(h, msg::H_DECISION).is_none());
    }

    #[test]
    fn outputs_above_max_payload_become_too_large_dead_letters_without_payload() {
        let v = Verdict {
            score: 0.5,
            decision: Decision::Id,
            top_label: "dog".into(),
            top_id: 0,
            adaptive: None,
            explanation: None,
        };
        let out = router().verdict(&source(), None, &v);
        let headers = msg::header_bytes(&out.headers);
        let payload = bytes::Bytes::from(vec![7u8; 1000]);
        // Exactly at the limit: unchanged.
        let r = router().with_max_payload(1000 + headers);
        let (o, p) = r.fit(&source(), None, out.clone(), payload.clone());
        assert_eq!((o.outcome, p.len()), (Outcome::Id, 1000));
        // One byte over: a dead letter without the payload.
        let r = router().with_max_payload(999 + headers);
        let (o, p) = r.fit(&source(), None, out.clone(), payload.clone());
        assert_eq!(o.outcome, Outcome::Dead(DeadKind::TooLarge));
        assert_eq!(o.subject, "o.dlq");
        assert!(p.is_empty());
        assert!(
            get(&o.headers, msg::H_ERROR)
                .unwrap()
                .contains("max_payload")
        );
        assert_eq!(get(&o.headers, msg::H_MSG_ID), Some("IMAGES:1000:7:bank1"));
        // Inbound headers that alone are too large are dropped too.
        let mut inbound = HeaderMap::new();
        inbound.insert("X-Big", "x".repeat(2000).as_str());
        let out = router().verdict(&source(), Some(&inbound), &v);
        let (o, _) = r.fit(&source(), Some(&inbound), out, payload);
        assert_eq!(o.outcome, Outcome::Dead(DeadKind::TooLarge));
        assert!(get(&o.headers, "X-Big").is_none());
        assert!(msg::header_bytes(&o.headers) <= 999 + headers);
    }

    #[test]
    fn transient_failures_back_off_then_dead_letter_on_the_last_delivery() {
        let r = router().with_redelivery(Redelivery {
            nak_delay: std::time::Duration::from_secs(2),
            nak_delay_max: std::time::Duration::from_secs(10),
            max_deliver: 5,
        });
        let at = |delivered| Source {
            delivered,
            ..source()
        };
        let delays: Vec<u64> = (1..=4)
            .map(
                |d| match r.after_transient_failure(&at(d), None, "timeout") {
                    Retry::Nak(d) => d.as_secs(),
                    Retry::Dead(o) => panic!("{o:?}"),
                },
            )
            .collect();
        assert_eq!(delays, [2, 4, 8, 10]);
        match r.after_transient_failure(&at(5), None, "encoder failed") {
            Retry::Dead(o) => {
                assert_eq!(o.outcome, Outcome::Dead(DeadKind::MaxDeliveries));
                let why = get(&o.headers, msg::H_ERROR).unwrap();
                assert!(why.contains("delivered 5 times") && why.contains("encoder failed"));
            }
            Retry::Nak(d) => panic!("NAK {d:?} on the last delivery"),
        }
        // Unlimited deliveries: always NAK.
        assert!(matches!(
            router().after_transient_failure(&at(100), None, "x"),
            Retry::Nak(_)
        ));
    }

    #[test]
    fn dead_kinds_keep_their_contract_names() {
        assert_eq!(
            DeadKind::of_preprocess(&PreprocessError::Empty).as_str(),
            "empty"
        );
        assert_eq!(DeadKind::MaxDeliveries.to_string(), "max_deliveries");
        assert_eq!(DeadKind::MissingObject.as_str(), "missing_object");
    }
}
