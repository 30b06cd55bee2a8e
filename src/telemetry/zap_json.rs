//! `--zap-encoder json`: one JSON object per line with the keys the Go EPP's zap logger writes
//! — `level` (lower case), `ts`, `logger` (the module), `caller` (`file:line`), `msg` — and the
//! event's fields beside them, so log pipelines built for the Go EPP read epp's lines
//! unchanged. `ts` is a number for the numeric time encodings (epoch, millis, nano) and RFC
//! 3339 text otherwise. A field named like one of those keys does not replace it.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::registry::LookupSpan;

/// The event formatter, with the timer that writes `ts`.
#[derive(Debug, Clone, Copy)]
pub struct ZapJson<T> {
    pub timer: T,
}

impl<S, N, T> FormatEvent<S, N> for ZapJson<T>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    T: FormatTime,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        writeln!(writer, "{}", self.line(event))
    }
}

impl<T: FormatTime> ZapJson<T> {
    fn line(&self, event: &Event<'_>) -> Value {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut map = Map::new();
        map.insert(
            "level".into(),
            meta.level().as_str().to_ascii_lowercase().into(),
        );
        map.insert("ts".into(), self.timestamp());
        map.insert("logger".into(), meta.target().into());
        if let (Some(file), Some(line)) = (meta.file(), meta.line()) {
            map.insert("caller".into(), format!("{file}:{line}").into());
        }
        if let Some(msg) = fields.0.remove("message") {
            map.insert("msg".into(), msg);
        }
        for (key, value) in fields.0 {
            map.entry(key).or_insert(value);
        }
        Value::Object(map)
    }

    /// The timer's text as a JSON number when it is one, else as a string.
    fn timestamp(&self) -> Value {
        let mut text = String::new();
        if self.timer.format_time(&mut Writer::new(&mut text)).is_err() {
            return Value::Null;
        }
        if let Ok(n) = text.parse::<u64>() {
            return n.into();
        }
        match text.parse::<f64>() {
            Ok(f) if f.is_finite() => f.into(),
            _ => text.into(),
        }
    }
}

/// An event's fields as JSON values.
#[derive(Default)]
struct Fields(Map<String, Value>);

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        self.0.insert(field.name().to_owned(), value);
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = if value.is_finite() {
            value.into()
        } else {
            value.to_string().into()
        };
        self.put(field, v);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Lines written by a subscriber, shared with the test.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged<T: FormatTime + Send + Sync + 'static>(timer: T, f: impl FnOnce()) -> Value {
        let out = Lines::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(ZapJson { timer })
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn lines_carry_zaps_keys_and_typed_fields() {
        let v = logged(tracing_subscriber::fmt::time::SystemTime, || {
            let e = std::io::Error::other("refused");
            tracing::warn!(
                endpoint = "pod-a",
                in_flight = 3u64,
                share = 0.5,
                ok = true,
                error = &e as &(dyn std::error::Error + 'static),
                level = "not the level",
                "metrics scrape failing"
            );
        });
        assert_eq!(v["level"], "warn");
        assert_eq!(v["msg"], "metrics scrape failing");
        assert_eq!(v["logger"], module_path!());
        assert!(
            v["caller"].as_str().unwrap().contains("zap_json.rs:"),
            "{v}"
        );
        assert!(v["ts"].as_str().unwrap().ends_with('Z'), "RFC 3339: {v}");
        assert_eq!(v["endpoint"], "pod-a");
        assert_eq!(v["in_flight"], 3);
        assert_eq!(v["share"], 0.5);
        assert_eq!(v["ok"], true);
        assert_eq!(v["error"], "refused");
        assert!(
            v.get("message").is_none() && v.get("fields").is_none(),
            "{v}"
        );
    }

    #[test]
    fn numeric_time_encodings_give_numbers() {
        struct Fixed(&'static str);
        impl FormatTime for Fixed {
            fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
                w.write_str(self.0)
            }
        }
        let ts = |t| logged(Fixed(t), || tracing::info!("x"))["ts"].clone();
        assert_eq!(ts("1733600000.123456"), 1_733_600_000.123_456);
        assert_eq!(ts("1733600000123456789"), 1_733_600_000_123_456_789u64);
    }
}
