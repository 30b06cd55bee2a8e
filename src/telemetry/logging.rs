//! Logging: the Go EPP's logging flags mapped onto `tracing`. `RUST_LOG`, when set, overrides
//! the level.
//!
//! | flag | effect |
//! |---|---|
//! | `--v N` / `-v N` | 0–2 info (the Go EPP logs its normal output at V(2)), 3–4 debug, 5+ trace |
//! | `--log-level L` | trace, debug, info, warn, error (overrides `-v`) |
//! | `--zap-log-level L` | debug, info, warn, error, dpanic, panic, fatal, or a number (zap's: −N is V(N)) |
//! | `--zap-devel` | debug level unless another flag sets one |
//! | `--zap-encoder json\|console` | one JSON object per line with zap's keys ([`super::zap_json`]), or text |
//! | `--zap-time-encoding E` | epoch, millis, nano (numbers); iso8601, rfc3339, rfc3339nano (text) |

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};

use super::zap_json::ZapJson;

/// How to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogOptions {
    /// An `EnvFilter` directive: `info`, `debug`…
    pub level: String,
    pub json: bool,
    pub time: TimeEncoding,
}

impl Default for LogOptions {
    /// Info level, text, RFC 3339 times.
    fn default() -> Self {
        Self {
            level: "info".into(),
            json: false,
            time: TimeEncoding::Rfc3339,
        }
    }
}

/// Timestamp format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeEncoding {
    /// RFC 3339 text (the default).
    Rfc3339,
    /// Seconds since the epoch, fractional.
    Epoch,
    /// Milliseconds since the epoch, fractional.
    Millis,
    /// Nanoseconds since the epoch.
    Nanos,
}

/// The level for a Go `-v` verbosity.
pub fn level_for_verbosity(v: u8) -> &'static str {
    match v {
        0..=2 => "info",
        3 | 4 => "debug",
        _ => "trace",
    }
}

/// The level for a zap level name or number.
pub fn level_for_zap(level: &str) -> Result<&'static str, String> {
    match level.trim() {
        "debug" => Ok("debug"),
        "info" => Ok("info"),
        "warn" => Ok("warn"),
        "error" | "dpanic" | "panic" | "fatal" => Ok("error"),
        n => match n.parse::<i32>() {
            Ok(n) if n >= 2 => Ok("error"),
            Ok(1) => Ok("warn"),
            Ok(n) => Ok(level_for_verbosity(u8::try_from(-n).unwrap_or(u8::MAX))),
            Err(_) => Err(format!("--zap-log-level: unknown level {level:?}")),
        },
    }
}

impl LogOptions {
    /// From the flags, in precedence order: `--log-level`, `--zap-log-level`, `--zap-devel`,
    /// then `-v`.
    pub fn from_flags(
        verbosity: u8,
        log_level: Option<&str>,
        zap_level: Option<&str>,
        zap_devel: Option<bool>,
        zap_encoder: Option<&str>,
        zap_time: Option<&str>,
    ) -> Result<Self, String> {
        let level = match (log_level, zap_level) {
            (Some(l), _) => match l.trim() {
                l @ ("trace" | "debug" | "info" | "warn" | "error") => l.to_owned(),
                other => return Err(format!("--log-level: unknown level {other:?}")),
            },
            (None, Some(z)) => level_for_zap(z)?.to_owned(),
            (None, None) if zap_devel == Some(true) => "debug".to_owned(),
            (None, None) => level_for_verbosity(verbosity).to_owned(),
        };
        let json = match zap_encoder.map(str::trim) {
            None | Some("console") => false,
            Some("json") => true,
            Some(other) => return Err(format!("--zap-encoder: unknown encoder {other:?}")),
        };
        let time = match zap_time.map(str::trim) {
            None
            | Some("iso8601" | "ISO8601" | "rfc3339" | "RFC3339" | "rfc3339nano" | "RFC3339Nano") => {
                TimeEncoding::Rfc3339
            }
            Some("epoch") => TimeEncoding::Epoch,
            Some("millis") => TimeEncoding::Millis,
            Some("nano" | "nanos") => TimeEncoding::Nanos,
            Some(other) => return Err(format!("--zap-time-encoding: unknown encoding {other:?}")),
        };
        Ok(Self { level, json, time })
    }
}

/// Numeric timestamps since the epoch.
#[derive(Debug, Clone, Copy)]
struct EpochTime(TimeEncoding);

impl FormatTime for EpochTime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        match self.0 {
            TimeEncoding::Millis => write!(w, "{:.3}", now.as_secs_f64() * 1e3),
            TimeEncoding::Nanos => write!(w, "{}", now.as_nanos()),
            _ => write!(w, "{:.6}", now.as_secs_f64()),
        }
    }
}

/// Whether text logs get terminal colours: only on a terminal, and not when `NO_COLOR` is
/// set to anything non-empty (no-color.org). A log file or a container runtime's pipe gets
/// plain text.
fn colours(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber (once; later calls do nothing).
pub fn init(options: &LogOptions) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&options.level));
    let ansi = colours(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR"),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match (options.json, options.time) {
        (true, TimeEncoding::Rfc3339) => builder
            .event_format(ZapJson { timer: SystemTime })
            .try_init(),
        (true, t) => builder
            .event_format(ZapJson {
                timer: EpochTime(t),
            })
            .try_init(),
        (false, TimeEncoding::Rfc3339) => builder.try_init(),
        (false, t) => builder.with_timer(EpochTime(t)).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colours(true, None));
        assert!(!colours(false, None), "a pipe or a file");
        assert!(!colours(true, Some("1".into())));
        assert!(
            colours(true, Some("".into())),
            "an empty NO_COLOR does not count"
        );
    }

    #[test]
    fn flags_map_to_levels_formats_and_times() {
        let o = LogOptions::from_flags(2, None, None, None, None, None).unwrap();
        assert_eq!(
            o,
            LogOptions {
                level: "info".into(),
                json: false,
                time: TimeEncoding::Rfc3339
            }
        );
        let o = LogOptions::from_flags(1, None, None, Some(true), Some("json"), Some("millis"))
            .unwrap();
        assert_eq!(
            (o.level.as_str(), o.json, o.time),
            ("debug", true, TimeEncoding::Millis)
        );
        assert_eq!(level_for_zap("-4").unwrap(), "debug");
        assert_eq!(level_for_zap("-1").unwrap(), "info");
        assert_eq!(level_for_zap("error").unwrap(), "error");
        assert_eq!(
            LogOptions::from_flags(5, Some("warn"), Some("debug"), None, None, None)
                .unwrap()
                .level,
            "warn"
        );
        assert!(LogOptions::from_flags(0, None, None, None, Some("xml"), None).is_err());
        assert!(level_for_zap("loud").is_err());
    }
}
