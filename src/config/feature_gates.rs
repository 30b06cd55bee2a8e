//! `featureGates` of an EndpointPickerConfig: `name` (on) or `name=true|false`, as the Go EPP
//! reads them. The gates the Go EPPs know are accepted with epp's fixed behaviour; a gate
//! turning on what epp lacks, or a name no EPP knows, is a config error naming the entry.
//!
//! | gate | the Go EPP | epp |
//! |---|---|---|
//! | `dataLayer` | the pluggable metrics data layer | always on (`metrics-data-source`, `core-metrics-extractor`) |
//! | `enableLegacyMetrics` | the legacy metric-name flags | always honoured |
//! | `haPopulateNonLeaderDatastore` | non-leaders keep their datastore current | always (a standby takes over warm) |
//! | `flowControl` | the flow-control queue | refused when on: epp has none |

use super::picker_config::{PickerConfigError, err};

/// Gates epp accepts whatever their value.
const ALWAYS_ON: [&str; 3] = [
    "dataLayer",
    "enableLegacyMetrics",
    "haPopulateNonLeaderDatastore",
];

/// The gate epp refuses to turn on.
const FLOW_CONTROL: &str = "flowControl";

/// Why flow control (the gate, or a `flowControl` section) is refused.
pub const NO_FLOW_CONTROL: &str = "not supported: epp has no flow-control queue (requests are \
     scheduled at once; sheddable ones get 429 while the pool is saturated)";

/// Checks every gate; `Ok` when epp runs the configuration as the Go EPP would.
pub fn check(gates: &[String]) -> Result<(), PickerConfigError> {
    for (i, gate) in gates.iter().enumerate() {
        let field = format!("featureGates[{i}]");
        let (name, on) = parse(gate).map_err(|reason| err(&field, reason))?;
        if name == FLOW_CONTROL {
            if on {
                return Err(err(field, NO_FLOW_CONTROL));
            }
        } else if ALWAYS_ON.contains(&name) {
            tracing::info!(
                gate = name,
                on,
                "feature gate accepted; epp always has this behaviour"
            );
        } else {
            return Err(err(
                field,
                format!("unknown feature gate {name:?} (known: {ALWAYS_ON:?}, {FLOW_CONTROL:?})"),
            ));
        }
    }
    Ok(())
}

/// `name` or `name=bool` (Go's strconv.ParseBool spellings, any case).
fn parse(gate: &str) -> Result<(&str, bool), String> {
    let Some((name, value)) = gate.split_once('=') else {
        return Ok((gate.trim(), true));
    };
    let on = match value.trim().to_ascii_lowercase().as_str() {
        "1" | "t" | "true" => true,
        "0" | "f" | "false" => false,
        other => return Err(format!("{other:?} is not a boolean")),
    };
    Ok((name.trim(), on))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gates(list: &[&str]) -> Result<(), PickerConfigError> {
        check(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn known_gates_are_accepted_in_every_form() {
        gates(&[
            "dataLayer",
            "enableLegacyMetrics=false",
            "haPopulateNonLeaderDatastore=TRUE",
        ])
        .unwrap();
        gates(&["flowControl=false", "flowControl=0"]).unwrap();
    }

    #[test]
    fn flow_control_on_unknown_names_and_bad_values_are_refused_by_entry() {
        let e = gates(&["dataLayer", "flowControl"]).unwrap_err();
        assert_eq!(e.field, "featureGates[1]");
        assert!(e.reason.contains("not supported"));
        let e = gates(&["turbo"]).unwrap_err();
        assert!(e.reason.contains("unknown feature gate \"turbo\""), "{e}");
        let e = gates(&["dataLayer=maybe"]).unwrap_err();
        assert_eq!(e.field, "featureGates[0]");
        assert!(e.reason.contains("not a boolean"));
    }
}
