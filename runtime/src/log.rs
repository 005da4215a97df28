//! The library prints nothing: what it has to say (a GPU provider that could not start and fell
//! back to the CPU, a stale prepared engine) goes to the [`Logger`] the caller gave in
//! [`LoadOptions`](crate::LoadOptions), and is dropped when there is none. The CLI prints it;
//! a service forwards it to its own log.

use std::fmt;
use std::sync::Arc;

/// How much a message matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Something the caller may want to know (a graph is being built now, minutes for a UNet).
    Info,
    /// Something went differently from what was asked (CPU fallback, a stale engine not used).
    Warning,
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogLevel::Info => "note",
            LogLevel::Warning => "warning",
        })
    }
}

/// A log callback, shared by everything a model loads (`Send + Sync`; called from the thread that
/// does the work). `Logger::default()` drops every message.
#[derive(Clone, Default)]
pub struct Logger(Option<Arc<LogSink>>);

/// What a [`Logger`] calls.
pub type LogSink = dyn Fn(LogLevel, &str) + Send + Sync;

impl Logger {
    pub fn new(sink: impl Fn(LogLevel, &str) + Send + Sync + 'static) -> Self {
        Logger(Some(Arc::new(sink)))
    }

    pub(crate) fn log(&self, level: LogLevel, message: &str) {
        if let Some(sink) = &self.0 {
            sink(level, message);
        }
    }

    pub(crate) fn warn(&self, message: &str) {
        self.log(LogLevel::Warning, message);
    }

    pub(crate) fn info(&self, message: &str) {
        self.log(LogLevel::Info, message);
    }
}

impl fmt::Debug for Logger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Logger(callback)" } else { "Logger(none)" })
    }
}

/// Two loggers are equal when they are the same callback (or both none), so settings that hold one
/// still compare.
impl PartialEq for Logger {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Logger {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn messages_reach_the_callback_and_none_is_silent() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let logger = Logger::new(move |level, message| sink.lock().unwrap().push(format!("{level}: {message}")));
        logger.warn("fell back");
        logger.info("building");
        Logger::default().warn("dropped");
        assert_eq!(*seen.lock().unwrap(), ["warning: fell back", "note: building"]);
        assert_eq!(logger, logger.clone());
        assert_ne!(logger, Logger::default());
    }
}
