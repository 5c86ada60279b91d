//! Ember's log: `RUST_LOG`-style filters, on stderr (`ember: level:
//! message`, as always) or in a file in Firecracker's format (a UTC
//! timestamp, `[id:thread]`, optionally the level and the origin), set by
//! `--log-path` or `PUT /logger`, reopened on SIGHUP so it can be
//! rotated.
//!
//! The filter (`info`, `ember_vmm=debug,ember_api=trace`, ...) is
//! env_filter's, the timestamp jiff's: no hand-written parser.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use log::{LevelFilter, Log, Metadata, Record};

/// What can be wrong with a log configuration.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log file cannot be opened.
    #[error("cannot open the log file {}", .0.display())]
    Open(PathBuf, #[source] std::io::Error),
    /// A module filter cannot be parsed.
    #[error("invalid log filter {0:?}: {1}")]
    Filter(String, String),
    /// The logger was already installed.
    #[error("the logger is already installed")]
    Installed,
}

/// How to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSettings {
    /// The level for every module without a filter of its own.
    pub level: LevelFilter,
    /// `RUST_LOG`-style filters (`module=level,...`), applied over `level`.
    pub modules: Option<String>,
    /// Write the level on each line (files only; stderr always has it).
    pub show_level: bool,
    /// Write the file and line of each message's origin (files only).
    pub show_origin: bool,
    /// The file (or named pipe) to write to; stderr when absent.
    pub path: Option<PathBuf>,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: LevelFilter::Warn,
            modules: None,
            show_level: false,
            show_origin: false,
            path: None,
        }
    }
}

struct State {
    settings: LogSettings,
    filter: env_filter::Filter,
    file: Option<File>,
    id: String,
}

struct Logger {
    state: RwLock<Option<State>>,
}

static LOGGER: Logger = Logger {
    state: RwLock::new(None),
};

fn open(path: &Path) -> Result<File, LogError> {
    // Read and write, nonblocking: a named pipe opens without waiting for
    // its reader, as Firecracker opens it; a file is appended to.
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| LogError::Open(path.to_owned(), e))
}

fn build_filter(s: &LogSettings) -> Result<env_filter::Filter, LogError> {
    let mut b = env_filter::Builder::new();
    b.filter_level(s.level);
    if let Some(m) = &s.modules {
        b.try_parse(m)
            .map_err(|e| LogError::Filter(m.clone(), e.to_string()))?;
    }
    Ok(b.build())
}

fn state_for(settings: LogSettings, id: String) -> Result<State, LogError> {
    let filter = build_filter(&settings)?;
    let file = settings.path.as_deref().map(open).transpose()?;
    Ok(State {
        settings,
        filter,
        file,
        id,
    })
}

/// Installs the logger with `settings`, naming the instance `id` in file
/// lines.
pub fn init(settings: LogSettings, id: &str) -> Result<(), LogError> {
    let state = state_for(settings, id.to_string())?;
    let max = state.filter.filter();
    *LOGGER.state.write().unwrap_or_else(|e| e.into_inner()) = Some(state);
    log::set_logger(&LOGGER).map_err(|_| LogError::Installed)?;
    log::set_max_level(max);
    Ok(())
}

/// Replaces the settings (all or nothing: a bad filter or path changes
/// nothing).
pub fn reconfigure(settings: LogSettings) -> Result<(), LogError> {
    let mut guard = LOGGER.state.write().unwrap_or_else(|e| e.into_inner());
    let id = guard.as_ref().map(|s| s.id.clone()).unwrap_or_default();
    let state = state_for(settings, id)?;
    log::set_max_level(state.filter.filter());
    *guard = Some(state);
    Ok(())
}

/// The settings in force.
pub fn settings() -> LogSettings {
    LOGGER
        .state
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|s| s.settings.clone())
        .unwrap_or_default()
}

/// Opens the log file again (after SIGHUP: it may have been rotated).
pub fn reopen() {
    let mut guard = LOGGER.state.write().unwrap_or_else(|e| e.into_inner());
    if let Some(state) = guard.as_mut() {
        if let Some(path) = state.settings.path.clone() {
            match open(&path) {
                Ok(f) => state.file = Some(f),
                Err(e) => eprintln!("ember: error: {}", crate::error_chain(&e)),
            }
        }
    }
}

/// One line in Firecracker's format.
fn file_line(state: &State, record: &Record<'_>) -> String {
    let now = jiff::Timestamp::now();
    let thread = std::thread::current();
    let mut tag = format!("{}:{}", state.id, thread.name().unwrap_or("?"));
    if state.settings.show_level {
        tag.push(':');
        tag.push_str(record.level().as_str());
    }
    if state.settings.show_origin {
        tag.push_str(&format!(
            ":{}:{}",
            record.file().unwrap_or("?"),
            record.line().unwrap_or(0)
        ));
    }
    format!("{now:.9} [{tag}] {}\n", record.args())
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|s| s.filter.enabled(metadata))
    }

    fn log(&self, record: &Record<'_>) {
        let guard = self.state.read().unwrap_or_else(|e| e.into_inner());
        let Some(state) = guard.as_ref() else {
            return;
        };
        if !state.filter.matches(record) {
            return;
        }
        match &state.file {
            Some(f) => {
                let mut f: &File = f;
                // One write per line; a full pipe loses the line, never
                // blocks a vCPU.
                let _ = f.write_all(file_line(state, record).as_bytes());
            }
            None => {
                let line = format!(
                    "ember: {}: {}\n",
                    record.level().as_str().to_lowercase(),
                    record.args()
                );
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logger_filter_parses_modules_and_rejects_garbage() {
        let mut s = LogSettings {
            modules: Some("ember_vmm=debug,ember_api=trace".into()),
            ..Default::default()
        };
        let f = build_filter(&s).unwrap();
        assert_eq!(f.filter(), LevelFilter::Trace);
        s.modules = Some("ember_vmm=loud".into());
        assert!(matches!(build_filter(&s), Err(LogError::Filter(..))));
    }

    #[test]
    fn logger_file_line_has_timestamp_id_and_optional_fields() {
        let dir = std::env::temp_dir().join(format!("ember-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let settings = LogSettings {
            level: LevelFilter::Info,
            show_level: true,
            show_origin: true,
            path: Some(dir.join("log")),
            ..Default::default()
        };
        let state = state_for(settings, "vm7".into()).unwrap();
        let record = Record::builder()
            .args(format_args!("hello"))
            .level(log::Level::Warn)
            .file(Some("src/x.rs"))
            .line(Some(12))
            .build();
        let line = file_line(&state, &record);
        assert!(line.ends_with("] hello\n"), "{line}");
        assert!(line.contains("[vm7:"), "{line}");
        assert!(line.contains(":WARN:src/x.rs:12]"), "{line}");
        assert!(line.starts_with("20"), "RFC 3339 timestamp: {line}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn logger_missing_directory_is_a_clear_error() {
        let settings = LogSettings {
            path: Some("/nonexistent/dir/log".into()),
            ..Default::default()
        };
        let e = state_for(settings, "x".into()).err().unwrap();
        assert!(e.to_string().contains("/nonexistent/dir/log"));
    }
}
