//! Validates what can be validated here of the deployment artifacts: CRDs and RBAC parse as
//! Kubernetes types, the Role grants every API call epp makes, Envoy configs carry the settings
//! epp relies on, and the chart ships the same plugin config as the repository.

use std::path::{Path, PathBuf};

use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_docs(text: &str) -> Vec<Value> {
    text.split("\n---")
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|d| serde_saphyr::from_str::<Value>(d).unwrap_or_else(|e| panic!("{e}\n{d}")))
        .collect()
}

fn read(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(root().join(p.as_ref()))
        .unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

/// Stand-in for Helm on templates made only of `{{ … }}` value substitutions.
fn substitute(template: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").expect("unclosed {{") + start + 2;
        out.push_str("rendered");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[test]
fn crds_parse_and_describe_both_pool_versions() {
    for (file, group, version) in [
        (
            "deploy/crds/inferencepool-v1.yaml",
            "inference.networking.k8s.io",
            "v1",
        ),
        (
            "deploy/crds/inferencepool-v1alpha2.yaml",
            "inference.networking.x-k8s.io",
            "v1alpha2",
        ),
    ] {
        let crd: CustomResourceDefinition =
            serde_json::from_value(yaml_docs(&read(file)).remove(0)).unwrap();
        assert_eq!(crd.spec.group, group);
        assert_eq!(crd.spec.names.plural, "inferencepools");
        assert_eq!(crd.spec.names.kind, "InferencePool");
        assert_eq!(crd.spec.versions[0].name, version);
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"];
        if version == "v1" {
            assert!(spec["selector"]["properties"]["matchLabels"].is_object());
            assert!(spec["targetPorts"]["items"]["properties"]["number"].is_object());
        } else {
            assert!(spec["targetPortNumber"].is_object());
        }
    }
}

#[test]
fn role_grants_every_call_epp_makes() {
    let docs = yaml_docs(&substitute(&read("deploy/charts/epp/templates/rbac.yaml")));
    let role: Role = serde_json::from_value(docs[0].clone()).unwrap();
    let _binding: RoleBinding = serde_json::from_value(docs[1].clone()).unwrap();
    let rules = role.rules.unwrap();
    let allows = |group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    // The calls tests/kube_discovery.rs observes: list and watch of pods and of the pool.
    for verb in ["get", "list", "watch"] {
        assert!(allows("", "pods", verb), "pods {verb}");
        assert!(allows(
            "inference.networking.k8s.io",
            "inferencepools",
            verb
        ));
        assert!(allows(
            "inference.networking.x-k8s.io",
            "inferencepools",
            verb
        ));
    }
    // Nothing beyond reads, except the leader-election Lease.
    for r in &rules {
        let writes = r
            .verbs
            .iter()
            .any(|v| !["get", "list", "watch"].contains(&v.as_str()));
        if writes {
            assert_eq!(r.resources.as_deref(), Some(&["leases".to_owned()][..]));
        }
    }
}

#[test]
fn chart_values_follow_the_gie_inferencepool_chart() {
    let v = yaml_docs(&read("deploy/charts/epp/values.yaml")).remove(0);
    for path in [
        "/inferenceExtension/replicas",
        "/inferenceExtension/image",
        "/inferenceExtension/extProcPort",
        "/inferenceExtension/env",
        "/inferenceExtension/flags",
        "/inferenceExtension/pluginsConfigFile",
        "/inferenceExtension/pluginsCustomConfig",
        "/inferencePool/targetPorts",
        "/inferencePool/modelServerType",
        "/inferencePool/apiVersion",
        "/inferencePool/modelServers/matchLabels",
    ] {
        assert!(v.pointer(path).is_some(), "values.yaml lacks {path}");
    }
    let chart = yaml_docs(&read("deploy/charts/epp/Chart.yaml")).remove(0);
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(
        read("deploy/charts/epp/files/default-plugins.yaml"),
        read("config/default-plugins.yaml"),
        "the chart's plugin config drifted from config/default-plugins.yaml"
    );
    let deployment = read("deploy/charts/epp/templates/deployment.yaml");
    for needle in [
        "service: readiness",
        "service: liveness",
        "--pool-name=",
        "--config-file=/config/",
    ] {
        assert!(deployment.contains(needle), "deployment lacks {needle}");
    }
}

#[test]
fn envoy_configs_carry_what_epp_relies_on() {
    let epp = yaml_docs(&read("deploy/envoy/envoy.yaml")).remove(0);
    let text = serde_json::to_string(&epp).unwrap();
    for needle in [
        "\"request_body_mode\":\"FULL_DUPLEX_STREAMED\"",
        "\"request_trailer_mode\":\"SEND\"",
        "\"failure_mode_allow\":false",
        "\"untyped\":[\"envoy.lb\"]",
        "\"http_header_name\":\"x-gateway-destination-endpoint\"",
        "\"lb_policy\":\"CLUSTER_PROVIDED\"",
        "\"http2_protocol_options\":{}",
        "\"message_timeout\":\"1000s\"",
    ] {
        assert!(text.contains(needle), "envoy.yaml lacks {needle}");
    }
    let rr = yaml_docs(&read("deploy/envoy/envoy-round-robin.yaml")).remove(0);
    assert_eq!(
        rr["static_resources"]["clusters"][0]["lb_policy"],
        "ROUND_ROBIN"
    );
}
