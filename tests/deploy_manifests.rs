//! Deployment artifacts that need no renderer: CRDs parse as Kubernetes types, Envoy configs
//! carry the settings epp relies on, the chart ships the repository's plugin config, and the
//! Dockerfile has the shape the chart expects (the chart itself: tests/helm_chart.rs).

use std::path::{Path, PathBuf};

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
fn chart_ships_the_repository_default_config() {
    assert_eq!(
        read("deploy/charts/epp/files/default-plugins.yaml"),
        read("config/default-plugins.yaml"),
        "the chart's plugin config drifted from config/default-plugins.yaml"
    );
}

/// `docker build` cannot run here: the Dockerfile's shape is checked instead.
#[test]
fn dockerfile_is_multi_stage_pinned_and_non_root() {
    let text = read("Dockerfile");
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    for f in &froms {
        let image = f.split_whitespace().nth(1).unwrap();
        assert!(
            image.contains("@sha256:"),
            "base image not pinned by digest: {image}"
        );
    }
    assert!(text.contains("--locked"), "builds from Cargo.lock");
    let user = text.lines().rev().find(|l| l.starts_with("USER ")).unwrap();
    assert!(!user.contains("root") || user.contains("nonroot"), "{user}");
    // The chart runs the image's entrypoint with args and mounts /config.
    assert!(text.contains("ENTRYPOINT [\"/epp\"]"));
    assert!(text.contains("EXPOSE 9002 9003 9090"));
}

#[test]
fn envoy_configs_carry_what_epp_relies_on() {
    let epp = yaml_docs(&read("deploy/envoy/envoy.yaml")).remove(0);
    let text = serde_json::to_string(&epp).unwrap();
    for needle in [
        "\"request_body_mode\":\"STREAMED\"",
        "\"request_trailer_mode\":\"SEND\"",
        "\"response_body_mode\":\"STREAMED\"",
        "\"response_trailer_mode\":\"SEND\"",
        "\"send_body_without_waiting_for_header_response\":true",
        "\"failure_mode_allow\":false",
        "\"untyped\":[\"envoy.lb\"]",
        "\"http_header_name\":\"x-gateway-destination-endpoint\"",
        "\"lb_policy\":\"CLUSTER_PROVIDED\"",
        "\"http2_protocol_options\":{}",
        "\"max_requests\":40000",
        "\"message_timeout\":\"1000s\"",
    ] {
        assert!(text.contains(needle), "envoy.yaml lacks {needle}");
    }
    // The buffered variant differs in the request body mode only, the route-only one in the
    // response body mode only.
    for (file, field, value) in [
        ("envoy-buffered.yaml", "request_body_mode", "BUFFERED"),
        ("envoy-route-only.yaml", "response_body_mode", "NONE"),
    ] {
        let mut variant = yaml_docs(&read(format!("deploy/envoy/{file}"))).remove(0);
        let mode = &mut variant["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
            [0]["typed_config"]["http_filters"][1]["typed_config"]["processing_mode"][field];
        assert_eq!(*mode, value, "{file}");
        *mode = "STREAMED".into();
        assert_eq!(variant, epp, "{file} drifted from envoy.yaml");
    }
    let rr = yaml_docs(&read("deploy/envoy/envoy-round-robin.yaml")).remove(0);
    assert_eq!(
        rr["static_resources"]["clusters"][0]["lb_policy"],
        "ROUND_ROBIN"
    );
}
