//! Layered loading (defaults < `config/default.toml` < `--config` file < `OODGATE__*`
//! environment), unknown-key detection with suggestions, and type checks of raw values.

use std::path::{Path, PathBuf};

use super::keys::{KEYS, KeyInfo, Kind, env_var_for, key_info};
use super::{
    ConfigError, DEFAULT_TOML, ENV_LIST_SEPARATOR, ENV_PREFIX, ENV_SEPARATOR, Secret, Settings,
};

impl Settings {
    /// Loads defaults < embedded `config/default.toml` < `file` < `OODGATE__*` variables of this
    /// process, then validates (everything except what only `serve` needs, see
    /// [`Settings::validate_for_serve`]).
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        // vars_os + into_string: a non-Unicode variable elsewhere in the environment must not
        // panic (std::env::vars would); a non-Unicode OODGATE__ variable is reported.
        let mut env = Vec::new();
        for (k, v) in std::env::vars_os() {
            let Ok(k) = k.into_string() else { continue };
            if !is_oodgate_var(&k) {
                continue;
            }
            match v.into_string() {
                Ok(v) => env.push((k, v)),
                Err(_) => {
                    return Err(ConfigError::Load(format!(
                        "environment variable {k} is not valid UTF-8"
                    )));
                }
            }
        }
        Settings::load_from(file, env)
    }

    /// Like [`Settings::load`] with the given environment instead of the process's (tests pass
    /// a map). Variables without the `OODGATE__` prefix are ignored.
    pub fn load_from<I>(file: Option<&Path>, env: I) -> Result<Settings, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        check_unknown_keys(DEFAULT_TOML, "the built-in config/default.toml")?;
        let mut builder = ::config::Config::builder().add_source(::config::File::from_str(
            DEFAULT_TOML,
            ::config::FileFormat::Toml,
        ));

        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            check_unknown_keys(&text, &format!("config file {}", path.display()))?;
            // Given by path (not from_str) so type errors name the file.
            builder = builder.add_source(
                ::config::File::from(path.to_path_buf())
                    .format(::config::FileFormat::Toml)
                    .required(true),
            );
        }

        // Environment: known keys only; string-like keys verbatim, the rest type-parsed.
        let mut verbatim = ::config::Map::new();
        let mut parsed = ::config::Map::new();
        for (name, value) in env {
            if !is_oodgate_var(&name) {
                continue;
            }
            let key = env_key(&name);
            let Some(info) = key_info(&key) else {
                return Err(ConfigError::UnknownKey {
                    suggestion: suggest(&key).map(env_var_for),
                    key,
                    origin: format!("environment variable {name}"),
                });
            };
            if value.trim().is_empty() {
                continue; // an empty variable counts as unset (compose's `${X:-}`)
            }
            check_env_type(info, &name, &value)?;
            if info.kind.env_parsed() {
                parsed.insert(name, value);
            } else {
                verbatim.insert(name, value);
            }
        }
        builder = builder
            .add_source(env_source(false).source(Some(verbatim)))
            .add_source(env_source(true).source(Some(parsed)));

        let mut settings: Settings = builder.build()?.try_deserialize()?;
        settings.normalize();
        settings.validate()?;
        Ok(settings)
    }

    /// Empty optional strings mean unset; list items are trimmed and empty items dropped.
    fn normalize(&mut self) {
        fn none_if_empty_s(o: &mut Option<String>) {
            if o.as_ref().is_some_and(|s| s.trim().is_empty()) {
                *o = None;
            }
        }
        fn none_if_empty_secret(o: &mut Option<Secret>) {
            if o.as_ref().is_some_and(Secret::is_empty) {
                *o = None;
            }
        }
        fn none_if_empty_p(o: &mut Option<PathBuf>) {
            if o.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                *o = None;
            }
        }
        fn clean_list(v: &mut Vec<String>) {
            *v = v
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        let n = &mut self.nats;
        clean_list(&mut n.servers);
        none_if_empty_s(&mut n.user);
        none_if_empty_secret(&mut n.password);
        none_if_empty_secret(&mut n.token);
        none_if_empty_secret(&mut n.nkey);
        for p in [
            &mut n.creds_file,
            &mut n.tls_ca,
            &mut n.tls_cert,
            &mut n.tls_key,
        ] {
            none_if_empty_p(p);
        }
        clean_list(&mut self.input.subjects);
        none_if_empty_p(&mut self.model.ort_library);
        none_if_empty_p(&mut self.detector.bank);
    }
}

fn env_source(parse: bool) -> ::config::Environment {
    let mut e = ::config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
        .try_parsing(parse);
    if parse {
        e = e.list_separator(ENV_LIST_SEPARATOR);
        for k in KEYS.iter().filter(|k| k.kind == Kind::StringList) {
            e = e.with_list_parse_key(k.key);
        }
    }
    e
}

fn is_oodgate_var(name: &str) -> bool {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    name.len() > prefix.len()
        && name.is_char_boundary(prefix.len())
        && name[..prefix.len()].eq_ignore_ascii_case(&prefix)
}

/// `OODGATE__BATCH__MAX_SIZE` → `batch.max_size` (the mapping the config crate applies).
fn env_key(name: &str) -> String {
    let prefix_len = ENV_PREFIX.len() + ENV_SEPARATOR.len();
    name.get(prefix_len..)
        .unwrap_or_default()
        .to_lowercase()
        .replace(ENV_SEPARATOR, ".")
}

/// Rejects keys (or sections) of a TOML document that are not in [`KEYS`], and values of the
/// wrong type.
fn check_unknown_keys(text: &str, origin: &str) -> Result<(), ConfigError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            origin: origin.to_string(),
            message: e.to_string().trim().to_string(),
        })?;
    for (section, value) in &table {
        let Some(inner) = value.as_table() else {
            return Err(ConfigError::UnknownKey {
                suggestion: suggest(section).map(str::to_string),
                key: section.clone(),
                origin: origin.to_string(),
            });
        };
        if !KEYS.iter().any(|k| k.section() == section) {
            return Err(ConfigError::UnknownKey {
                suggestion: suggest_section(section),
                key: section.clone(),
                origin: origin.to_string(),
            });
        }
        check_table(section, inner, origin)?;
    }
    Ok(())
}

/// The keys of one section, and of its subsections (`[detector.adaptive]`).
fn check_table(prefix: &str, table: &toml::Table, origin: &str) -> Result<(), ConfigError> {
    for (name, value) in table {
        let full = format!("{prefix}.{name}");
        if let (Some(sub), true) = (
            value.as_table(),
            KEYS.iter().any(|k| k.key.starts_with(&format!("{full}."))),
        ) {
            check_table(&full, sub, origin)?;
            continue;
        }
        let Some(info) = key_info(&full) else {
            return Err(ConfigError::UnknownKey {
                suggestion: suggest(&full).map(str::to_string),
                key: full,
                origin: origin.to_string(),
            });
        };
        check_toml_type(info, value, origin)?;
    }
    Ok(())
}

/// The config crate converts between types freely (3.5 becomes `true`); files must use the
/// key's own type.
fn check_toml_type(info: &KeyInfo, value: &toml::Value, origin: &str) -> Result<(), ConfigError> {
    use toml::Value as V;
    let ok = match info.kind {
        Kind::String | Kind::Secret | Kind::Path | Kind::Duration | Kind::SocketAddr => {
            value.is_str()
        }
        Kind::StringList => value.as_array().is_some_and(|a| a.iter().all(V::is_str)),
        Kind::Bool => value.is_bool(),
        Kind::Integer => value.is_integer(),
        Kind::Float => value.is_float() || value.is_integer(),
    };
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Load(format!(
            "{} must be {} in {origin} (got {} {value})",
            info.key,
            kind_article(info.kind),
            value.type_str()
        )))
    }
}

/// Environment values are text: the parsed kinds must parse as their type.
fn check_env_type(info: &KeyInfo, name: &str, value: &str) -> Result<(), ConfigError> {
    let v = value.trim();
    let ok = match info.kind {
        Kind::Bool => v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("false"),
        Kind::Integer => v.parse::<i64>().is_ok(),
        Kind::Float => v.parse::<f64>().is_ok(),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Load(format!(
            "{} must be {} in environment variable {name} (got {value:?})",
            info.key,
            kind_article(info.kind)
        )))
    }
}

fn kind_article(kind: Kind) -> &'static str {
    match kind {
        Kind::String => "a string",
        Kind::Secret => "a string",
        Kind::Path => "a path string",
        Kind::StringList => "a list of strings",
        Kind::Bool => "a boolean (true or false)",
        Kind::Integer => "an integer",
        Kind::Float => "a number",
        Kind::Duration => "a duration string such as \"30s\"",
        Kind::SocketAddr => "an \"IP:PORT\" string",
    }
}

/// The known key closest to `key` (a typo within a small edit distance), if any.
fn suggest(key: &str) -> Option<&'static str> {
    KEYS.iter()
        .map(|k| (strsim::levenshtein(k.key, key), k.key))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn suggest_section(section: &str) -> Option<String> {
    KEYS.iter()
        .map(|k| k.section())
        .map(|s| (strsim::levenshtein(s, section), s))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, s)| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_pick_the_closest_key_or_section() {
        assert_eq!(suggest("batch.max_sise"), Some("batch.max_size"));
        assert_eq!(suggest("batch.maxsize"), Some("batch.max_size"));
        assert_eq!(suggest("nats.sever"), Some("nats.servers"));
        assert_eq!(suggest("max_size"), None);
        assert_eq!(suggest_section("bacth").as_deref(), Some("batch"));
        assert_eq!(suggest_section("modle").as_deref(), Some("model"));
        assert_eq!(suggest_section("nothing"), None);
    }
}
