//! Resolution of validated settings into the types the rest of oodgate runs with: NATS
//! authentication, output subjects, the execution device, the score method and the
//! approximation parameters. The target types stay where they are defined (`model`, `detect`);
//! only this file knows how keys map onto them.

use std::net::SocketAddr;
use std::path::Path;

use super::validate::{Problem, check_device, method_message};
use super::{
    ConfigError, DetectorSettings, HttpSettings, ModelSettings, NatsSettings, Secret, Settings,
};
use crate::detect::approx::ApproxParams;
use crate::detect::score::Method;
use crate::model::Device;

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

/// The three output subjects, resolved from `[output]`.
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

impl ModelSettings {
    /// The configured execution device.
    pub fn device(&self) -> Result<Device, ConfigError> {
        check_device(&self.device)
            .map_err(|m| ConfigError::Invalid(vec![Problem::new("model.device", m)]))?;
        self.device
            .parse()
            .map_err(|e: crate::model::RuntimeError| {
                ConfigError::Invalid(vec![Problem::new("model.device", e.to_string())])
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
}
