//! Reading a daemon's TOML configuration file.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Errors reading a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not valid TOML, misses a key or has one it should not.
    #[error("parsing config {path}")]
    Parse {
        /// Config file.
        path: PathBuf,
        /// The cause, with line and column.
        #[source]
        source: toml::de::Error,
    },
    /// The file cannot be read.
    #[error("reading config {path}")]
    Read {
        /// Config file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A configuration with checks beyond what its TOML types express.
pub trait Checked: DeserializeOwned {
    /// The config's error type, which can carry a [`ConfigError`].
    type Error: From<ConfigError>;

    /// Checks the parsed values; `path` names the file in errors.
    fn check(&self, path: &Path) -> Result<(), Self::Error>;
}

/// Reads, parses and checks the TOML file at `path`.
pub fn load_checked<T: Checked>(path: &Path) -> Result<T, T::Error> {
    let config: T = load(path)?;
    config.check(path)?;
    Ok(config)
}

/// Parses and checks TOML `text`; `path` names the file in errors.
pub fn parse_checked<T: Checked>(text: &str, path: &Path) -> Result<T, T::Error> {
    let config: T = parse(text, path)?;
    config.check(path)?;
    Ok(config)
}

/// Reads and parses the TOML file at `path`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses TOML `text`; `path` names the file in errors.
pub fn parse<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}
