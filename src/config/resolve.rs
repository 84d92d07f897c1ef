//! Resolution of validated settings into the types the rest of oodgate runs with: NATS
//! authentication and connection options, output subjects, the JetStream topology, the pipeline
//! configuration, the execution device and encoder options, the score method and the
//! approximation parameters. The target types stay where they are defined (`stream`, `model`,
//! `detect`); only this file knows how keys map onto them.

use std::net::SocketAddr;
use std::path::Path;

use super::validate::{Problem, device_problem, method_message};
use super::{
    ConfigError, DetectorSettings, HttpSettings, ModelSettings, NatsSettings, Secret, Settings,
};
use crate::detect::approx::ApproxParams;
use crate::detect::method::Method;
use crate::model::Device;
use crate::model::encoder::EncoderOptions;
use crate::stream::PipelineConfig;
use crate::stream::route::OutputSubjects;
use crate::stream::setup::{NatsOptions, Topology};
use crate::stream::stream_spec::{self, StreamSpec};

/// How the worker authenticates to NATS (at most one method; see [`NatsSettings::auth`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsAuth<'a> {
    None,
    UserPassword { user: &'a str, password: &'a Secret },
    Token(&'a Secret),
    NKeySeed(&'a Secret),
    CredsFile(&'a Path),
}

impl NatsSettings {
    /// The configured authentication method. [`Settings::validate`] guarantees at most one.
    pub fn auth(&self) -> NatsAuth<'_> {
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            NatsAuth::UserPassword { user, password }
        } else if let Some(t) = &self.token {
            NatsAuth::Token(t)
        } else if let Some(s) = &self.nkey {
            NatsAuth::NKeySeed(s)
        } else if let Some(p) = &self.creds_file {
            NatsAuth::CredsFile(p)
        } else {
            NatsAuth::None
        }
    }
}

impl ModelSettings {
    /// The configured execution device, parsed by [`Device`]'s `FromStr` (the one device
    /// grammar; validation uses the same parser).
    pub fn device(&self) -> Result<Device, ConfigError> {
        self.device
            .parse()
            .map_err(|_| ConfigError::Invalid(vec![device_problem(&self.device)]))
    }

    /// The ONNX Runtime session settings (`model.intra_spinning`, `model.cpu_arena`,
    /// `model.memory_pattern`, `model.prepacking`, `model.cpu_run_batch`, `model.trim_heap`, `model.io_binding`).
    pub fn tuning(&self) -> crate::model::encoder::SessionTuning {
        crate::model::encoder::SessionTuning {
            spinning: self.intra_spinning,
            cpu_arena: self.cpu_arena,
            memory_pattern: self.memory_pattern,
            prepacking: self.prepacking,
            cpu_run_batch: self.cpu_run_batch,
            trim_heap: self.trim_heap,
            io_binding: if self.io_binding {
                crate::model::encoder::IoBindingMode::Cuda
            } else {
                crate::model::encoder::IoBindingMode::Never
            },
        }
    }

    /// How the encoder is loaded: `model.device`, `model.intra_threads`, `model.ort_library`.
    /// The daemon embeds images only, so the text encoder is not loaded.
    pub fn encoder_options(&self) -> Result<EncoderOptions, ConfigError> {
        Ok(EncoderOptions {
            device: self.device()?,
            intra_threads: self.intra_threads,
            ort_library: self.ort_library.clone(),
            load_text: false,
            tuning: self.tuning(),
        })
    }
}

impl DetectorSettings {
    /// When and how large outlier banks are scored approximately.
    pub fn approx_params(&self) -> ApproxParams {
        ApproxParams {
            exact_limit: self.exact_limit,
            candidates: self.approx_candidates,
            ef_search: self.approx_ef_search,
            tail_sample: self.approx_tail_sample,
            seed: 0,
        }
    }

    /// The adaptive detector's memory knobs; an unset floor is the fallback here and the
    /// bank's calibrated floor once the calibration is known
    /// ([`crate::detect::adaptive::AdaptiveCalibration::resolve_floor`]).
    pub fn adaptive_params(&self) -> crate::detect::adaptive::AdaptiveParams {
        let a = &self.adaptive;
        crate::detect::adaptive::AdaptiveParams {
            capacity: a.capacity,
            k: a.k,
            floor: a.floor.unwrap_or(crate::detect::adaptive::FALLBACK_FLOOR),
            bucket_cap: a.bucket_cap,
            admit_per_mille: a.admit_per_mille,
            max_age_ms: a.max_age.as_millis().try_into().unwrap_or(u64::MAX),
        }
    }

    /// The configured score method.
    pub fn method(&self) -> Result<Method, ConfigError> {
        self.method.parse().map_err(|_| {
            ConfigError::Invalid(vec![Problem::new(
                "detector.method",
                method_message(&self.method),
            )])
        })
    }
}

impl HttpSettings {
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.trim().parse().map_err(|_| {
            ConfigError::Invalid(vec![Problem::new(
                "http.listen",
                format!("must be IP:PORT, e.g. 0.0.0.0:9464 (got {:?})", self.listen),
            )])
        })
    }
}

impl Settings {
    /// The output subjects, `<prefix>.id|ood|dlq` unless set explicitly.
    pub fn output_subjects(&self) -> OutputSubjects {
        let o = &self.output;
        let pick = |explicit: &str, suffix: &str| {
            let explicit = explicit.trim();
            if explicit.is_empty() {
                format!("{}.{suffix}", o.prefix.trim())
            } else {
                explicit.to_string()
            }
        };
        OutputSubjects {
            id: pick(&o.id_subject, "id"),
            ood: pick(&o.ood_subject, "ood"),
            dlq: pick(&o.dlq_subject, "dlq"),
        }
    }

    /// The consumer's ack subject prefix, `$JS.ACK.<stream>.<durable>` (for permissions).
    pub fn ack_subject_prefix(&self) -> String {
        format!("$JS.ACK.{}.{}", self.input.stream, self.input.durable)
    }

    /// Connection options for `stream::setup::connect`, from `[nats]`.
    pub fn nats_options(&self) -> NatsOptions {
        let n = &self.nats;
        NatsOptions {
            servers: n.servers.clone(),
            name: n.name.clone(),
            user: n.user.clone(),
            password: n.password.as_ref().map(|p| p.expose().to_string()),
            token: n.token.as_ref().map(|p| p.expose().to_string()),
            nkey: n.nkey.as_ref().map(|p| p.expose().to_string()),
            creds_file: n.creds_file.clone(),
            tls_ca: n.tls_ca.clone(),
            tls_cert: n.tls_cert.clone(),
            tls_key: n.tls_key.clone(),
            tls_required: n.tls_required,
            connect_timeout: n.connect_timeout,
            inbox_prefix: n.inbox_prefix.clone(),
        }
    }

    /// The streams and the consumer `stream::setup::declare` creates or checks, from `[input]`
    /// and `[output]`.
    pub fn topology(&self) -> Topology {
        let subjects = self.output_subjects();
        Topology {
            input_stream: self.input.stream.clone(),
            input_subjects: self.input.subjects.clone(),
            create_input: self.input.create_if_missing,
            filter_subject: self.input.filter_subject.clone(),
            durable: self.input.durable.clone(),
            ack_wait: self.input.ack_wait,
            max_deliver: self.input.max_deliver,
            max_ack_pending: self.input.max_ack_pending,
            input_spec: self.input_stream_spec(),
            update_input: self.input.update_existing,
            output_stream: self.output.stream.clone(),
            output_subjects: subjects,
            create_output: self.output.create_if_missing,
            duplicate_window: self.output.duplicate_window,
            output_spec: self.output_stream_spec(),
            update_output: self.output.update_existing,
            object_bucket: self.input.object_store_bucket.clone(),
            object_ttl: self.input.object_store_ttl,
        }
    }

    /// The buckets claim checks may name: `input.object_store_buckets`, or when it is empty
    /// `input.object_store_bucket` alone.
    pub fn allowed_buckets(&self) -> Vec<String> {
        if self.input.object_store_buckets.is_empty() {
            vec![self.input.object_store_bucket.clone()]
        } else {
            self.input.object_store_buckets.clone()
        }
    }

    /// The input stream's shape; names are validated, so unknown ones fall back to defaults.
    pub fn input_stream_spec(&self) -> StreamSpec {
        let i = &self.input;
        let d = StreamSpec::unlimited("input");
        StreamSpec {
            replicas: i.replicas,
            storage: stream_spec::parse_storage(&i.storage).unwrap_or(d.storage),
            retention: stream_spec::parse_retention(&i.retention).unwrap_or(d.retention),
            max_bytes: i.max_bytes,
            max_msgs: i.max_msgs,
            max_age: i.max_age,
            discard: stream_spec::parse_discard(&i.discard).unwrap_or(d.discard),
            ..d
        }
    }

    /// The output stream's shape (always limits retention: outputs are read by others).
    pub fn output_stream_spec(&self) -> StreamSpec {
        let o = &self.output;
        let d = StreamSpec::unlimited("output");
        StreamSpec {
            replicas: o.replicas,
            storage: stream_spec::parse_storage(&o.storage).unwrap_or(d.storage),
            max_bytes: o.max_bytes,
            max_msgs: o.max_msgs,
            max_age: o.max_age,
            discard: stream_spec::parse_discard(&o.discard).unwrap_or(d.discard),
            ..d
        }
    }

    /// The pipeline's configuration around `topology` (usually [`Settings::topology`]).
    /// `batch.decode_workers = 0` resolves to [`auto_decode_workers`].
    pub fn pipeline_config(&self, topology: Topology) -> PipelineConfig {
        let batch_max = self.batch.max_size;
        PipelineConfig {
            topology,
            pull_batch: self.input.pull_batch,
            pull_expires: self.input.pull_expires,
            heartbeat: self.input.heartbeat,
            publish_timeout: self.output.publish_timeout,
            publish_retries: self.output.publish_retries,
            max_inflight_publishes: self.output.max_inflight_publishes,
            batch_max,
            batch_wait: self.batch.max_wait,
            decode_workers: if self.batch.decode_workers == 0 {
                auto_decode_workers()
            } else {
                self.batch.decode_workers
            },
            queue_depth: self.batch.queue_depth,
            max_in_flight: (self.input.pull_batch + self.batch.queue_depth + 2 * batch_max).max(1),
            drain_timeout: self.shutdown.drain_timeout,
            nak_delay: self.input.nak_delay,
            nak_delay_max: self.input.nak_delay_max,
            retry_max_delay: self.output.retry_max_delay,
            max_processing: self.input.max_processing,
            object_max_bytes: self.limits.max_bytes as usize,
            fetch_timeout: self.input.fetch_timeout,
            delete_objects: self.input.object_after_routing == "delete",
            allowed_buckets: self.allowed_buckets(),
            max_bytes_in_flight: self.input.max_bytes_in_flight as usize,
            adaptive: None,
            adaptive_shared_prefix: (self.detector.adaptive.sync == "shared")
                .then(|| self.output.prefix.clone()),
        }
    }
}

/// Decode workers when `batch.decode_workers = 0`: half the cores (the encoder takes the rest).
pub fn auto_decode_workers() -> usize {
    crate::available_cores().div_ceil(2).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_configurations_follow_the_settings() {
        let mut s = Settings::default();
        s.output.prefix = "filter".into();
        s.output.dlq_subject = "dead.letters".into();
        s.nats.password = Some(Secret::new("pw"));
        s.batch.decode_workers = 0;

        let n = s.nats_options();
        assert_eq!(n.servers, ["nats://127.0.0.1:4222"]);
        assert_eq!(n.password.as_deref(), Some("pw"));

        let t = s.topology();
        assert_eq!(
            t.output_subjects.all(),
            ["filter.id", "filter.ood", "dead.letters"]
        );
        assert_eq!(t.filter_subject, "images.in");

        let c = s.pipeline_config(t);
        assert_eq!(c.decode_workers, auto_decode_workers());
        assert!(c.decode_workers >= 1);
        assert_eq!(c.max_in_flight, 32 + 64 + 2 * 32);
        assert_eq!(c.object_max_bytes, 32 * 1024 * 1024);
        s.batch.decode_workers = 3;
        assert_eq!(s.pipeline_config(s.topology()).decode_workers, 3);

        let e = s.model.encoder_options().expect("default device");
        assert_eq!(e.device, Device::Auto);
        assert!(!e.load_text);
        assert_eq!(s.detector.approx_params().seed, 0);
    }
}
