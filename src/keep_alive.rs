//! How long a model stays loaded after its last request, written as Ollama writes it:
//! a JSON number of seconds or a Go duration string ("5m", "1h30m", "300ms"); negative
//! means forever, zero means unload as soon as the request is answered.

use std::time::Duration;

/// `None` is forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive(pub Option<Duration>);

impl KeepAlive {
    pub const FOREVER: KeepAlive = KeepAlive(None);
    pub const NOW: KeepAlive = KeepAlive(Some(Duration::ZERO));

    pub fn is_zero(self) -> bool {
        self.0 == Some(Duration::ZERO)
    }

    fn from_secs(s: f64) -> Self {
        if s < 0.0 {
            Self::FOREVER
        } else {
            // Beyond ~584 years Duration overflows; that is forever too.
            Duration::try_from_secs_f64(s).map_or(Self::FOREVER, |d| KeepAlive(Some(d)))
        }
    }

    /// A request's `keep_alive`: `null` (or absent) is the server's default.
    pub fn from_json(v: &serde_json::Value) -> Result<Option<Self>, String> {
        match v {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::Number(n) => Ok(n.as_f64().map(Self::from_secs)),
            serde_json::Value::String(s) => Self::parse(s).map(Some),
            other => Err(format!(
                "keep_alive must be a duration (\"5m\") or a number of seconds, not {other}"
            )),
        }
    }

    /// A duration string ("5m", "-1", "1h30m") or a bare number of seconds, as
    /// OLLAMA_KEEP_ALIVE accepts.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(secs) = s.parse::<f64>() {
            return Ok(Self::from_secs(secs));
        }
        parse_go_duration(s).map(Self::from_secs).ok_or_else(|| {
            format!("invalid duration \"{s}\" (expected e.g. \"5m\", \"1h30m\", \"-1\")")
        })
    }

    /// When a model idle since `from` unloads (`None`: never).
    pub fn deadline(self, from: std::time::Instant) -> Option<std::time::Instant> {
        self.0.and_then(|d| from.checked_add(d))
    }
}

impl std::fmt::Display for KeepAlive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => write!(f, "forever"),
            Some(d) => write!(f, "{:?}", d),
        }
    }
}

/// Go's time.ParseDuration, in seconds: an optional sign, then one or more decimal
/// numbers each with a unit (ns, us, µs, ms, s, m, h).
fn parse_go_duration(s: &str) -> Option<f64> {
    let (sign, mut rest) = match s.as_bytes().first()? {
        b'-' => (-1.0, &s[1..]),
        b'+' => (1.0, &s[1..]),
        _ => (1.0, s),
    };
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += number * scale;
    }
    Some(sign * total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secs(k: KeepAlive) -> Option<f64> {
        k.0.map(|d| d.as_secs_f64())
    }

    #[test]
    fn durations_parse_as_ollama_reads_them() {
        let p = |s: &str| secs(KeepAlive::parse(s).unwrap());
        assert_eq!(p("5m"), Some(300.0));
        assert_eq!(p("1h30m"), Some(5400.0));
        assert_eq!(p("1.5h"), Some(5400.0));
        assert_eq!(p("300ms"), Some(0.3));
        assert_eq!(p("0"), Some(0.0));
        assert_eq!(p("0s"), Some(0.0));
        assert_eq!(p("30"), Some(30.0));
        assert_eq!(p("-1"), None);
        assert_eq!(p("-1m"), None);
        assert!(KeepAlive::parse("5 minutes").is_err());
        assert!(KeepAlive::parse("").is_err());
        assert!(KeepAlive::parse("m").is_err());
    }

    #[test]
    fn json_numbers_are_seconds_and_null_is_the_default() {
        let j = |v| KeepAlive::from_json(&v).unwrap().map(secs);
        assert_eq!(j(json!(0)), Some(Some(0.0)));
        assert_eq!(j(json!(-1)), Some(None));
        assert_eq!(j(json!(2.5)), Some(Some(2.5)));
        assert_eq!(j(json!("10m")), Some(Some(600.0)));
        assert_eq!(j(json!(null)), None);
        assert_eq!(j(json!(1e300)), Some(None));
        assert!(KeepAlive::from_json(&json!(true)).is_err());
        assert!(KeepAlive::from_json(&json!("soon")).is_err());
    }
}
