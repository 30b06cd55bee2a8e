{{/*
epp.v: every value the templates read, from either values layout, as YAML (templates read it
with `include "epp.v" . | fromYaml`).
  - llm-d-router-gateway: `router.epp.*`, `router.modelServers.*`, `router.inferencePool.*`,
    `router.monitoring`, `router.tracing`, `router.inferenceObjectives`; `provider`, `httpRoute`.
  - GIE inferencepool v1.5.0: `inferenceExtension.*`, `inferencePool.*`, `provider`,
    `experimentalHttpRoute`, `inferenceObjectives`.
*/}}
{{- define "epp.v" -}}
{{- $llmd := hasKey .Values "router" -}}
{{- $r := .Values.router | default dict -}}
{{- $e := ternary ($r.epp | default dict) (.Values.inferenceExtension | default dict) $llmd -}}
{{- $pool := ternary ($r.inferencePool | default dict) (.Values.inferencePool | default dict) $llmd -}}
{{- $servers := ternary ($r.modelServers | default dict) (dict "type" $pool.modelServerType "protocol" $pool.modelServerProtocol "targetPorts" $pool.targetPorts "matchLabels" (($pool.modelServers | default dict).matchLabels)) $llmd -}}
{{- $standalone := dict -}}
{{- if and (not $llmd) $e.endpointsServer (not $e.endpointsServer.createInferencePool) -}}
{{- $standalone = $e.endpointsServer -}}
{{- end -}}
{{- $monitoring := ternary ($r.monitoring | default dict) ($e.monitoring | default dict) $llmd -}}
{{- $prom := $monitoring.prometheus | default dict -}}
{{- $tracing := ternary ($r.tracing | default dict) ($e.tracing | default dict) $llmd -}}
{{- $image := $e.image | default dict -}}
{{- $repo := $image.repository | default "" -}}
{{- /* The Go EPP's images are replaced by epp's: the point of the chart. */ -}}
{{- if or (eq $repo "") (contains "gateway-api-inference-extension/epp" $repo) (contains "llm-d-router-endpoint-picker" $repo) -}}
{{- $image = .Values.eppImage -}}
{{- end -}}
{{- $createPool := ternary (ne ($pool.create | toString) "false") (empty $standalone) $llmd -}}
{{- $type := $servers.type | default "vllm" -}}
{{- if $standalone -}}{{- $type = $standalone.modelServerType | default "vllm" -}}{{- end -}}
{{- $protocol := $servers.protocol | default "http" -}}
{{- if $standalone -}}{{- $protocol = $standalone.modelServerProtocol | default "http" -}}{{- end -}}
{{- $route := ternary (.Values.httpRoute | default dict) (.Values.experimentalHttpRoute | default dict) $llmd -}}
llmd: {{ $llmd }}
replicas: {{ $e.replicas | default 1 | int }}
image:
  registry: {{ $image.registry | quote }}
  repository: {{ $image.repository | quote }}
  tag: {{ $image.tag | toString | quote }}
  pullPolicy: {{ $image.pullPolicy | default "IfNotPresent" | quote }}
extProcPort: {{ $e.extProcPort | default 9002 | int }}
healthPort: {{ $e.grpcHealthPort | default 9003 | int }}
metricsPort: {{ $e.metricsPort | default 9090 | int }}
failureMode: {{ ternary ($pool.failureMode | default "FailOpen") ($e.failureMode | default "FailOpen") $llmd | quote }}
flags: {{ $e.flags | default dict | toJson }}
env: {{ $e.env | default list | toJson }}
pluginsConfigFile: {{ $e.pluginsConfigFile | default "default-plugins.yaml" | quote }}
pluginsCustomConfig: {{ $e.pluginsCustomConfig | default dict | toJson }}
extraContainerPorts: {{ $e.extraContainerPorts | default list | toJson }}
extraServicePorts: {{ ternary ($r.extraServicePorts | default list) ($e.extraServicePorts | default list) $llmd | toJson }}
resources: {{ $e.resources | default dict | toJson }}
affinity: {{ $e.affinity | default dict | toJson }}
tolerations: {{ $e.tolerations | default list | toJson }}
podAnnotations: {{ $e.podAnnotations | default dict | toJson }}
volumes: {{ $e.volumes | default list | toJson }}
volumeMounts: {{ $e.volumeMounts | default list | toJson }}
metricsDataSource: {{ $e.metricsDataSource | default dict | toJson }}
parsers: {{ ternary ($e.parsers | default list) (list) $llmd | toJson }}
parser: {{ ternary "" ($pool.parser | default "") $llmd | quote }}
modelServerType: {{ $type | quote }}
modelServerProtocol: {{ $protocol | quote }}
targetPorts: {{ $servers.targetPorts | default (list (dict "number" 8000)) | toJson }}
matchLabels: {{ $servers.matchLabels | default dict | toJson }}
poolApiVersion: {{ ternary "inference.networking.k8s.io/v1" ($pool.apiVersion | default "inference.networking.k8s.io/v1") $llmd | quote }}
createPool: {{ $createPool }}
standalone: {{ $standalone | toJson }}
monitoring:
  interval: {{ $monitoring.interval | default "10s" | quote }}
  prometheus:
    enabled: {{ $prom.enabled | default false }}
    authEnabled: {{ ne ((($prom.auth | default dict).enabled) | toString) "false" }}
    secretName: {{ (($prom.auth | default dict).secretName) | default "inference-gateway-sa-metrics-reader-secret" | quote }}
    extraLabels: {{ $prom.extraLabels | default dict | toJson }}
tracing:
  enabled: {{ $tracing.enabled | default false }}
inferenceObjectives: {{ ternary ($r.inferenceObjectives | default list) (.Values.inferenceObjectives | default list) $llmd | toJson }}
provider: {{ .Values.provider | default (dict "name" "none") | toJson }}
route:
  enabled: {{ or $route.enabled $route.create | default false }}
  gateway: {{ $route.inferenceGatewayName | default (printf "%s-inference-gateway" .Release.Name) | quote }}
  gatewayNamespace: {{ $route.inferenceGatewayNamespace | default "" | quote }}
  requestTimeout: {{ $route.requestTimeout | default "300s" | quote }}
  baseModel: {{ $route.baseModel | default "" | quote }}
networkPolicy: {{ .Values.networkPolicy | default dict | toJson }}
tls: {{ .Values.tls | default dict | toJson }}
{{- end -}}

{{- define "epp.name" -}}
{{- $base := .Release.Name | default "default-pool" | lower | trim | trunc 40 -}}
{{ $base }}-epp
{{- end -}}

{{- define "epp.clusterRbacName" -}}
{{- $base := .Release.Name | default "default-pool" | lower | trim | trunc 40 -}}
{{- $ns := .Release.Namespace | default "default" | lower | trim | trunc 40 -}}
{{- printf "%s-%s-epp" $base $ns | trunc 84 -}}
{{- end -}}

{{- define "epp.labels" -}}
app.kubernetes.io/name: {{ include "epp.name" . }}
app.kubernetes.io/component: endpoint-picker
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
{{- end -}}

{{- define "epp.selectorLabels" -}}
{{- $v := include "epp.v" . | fromYaml -}}
{{- if $v.standalone -}}
epp: {{ include "epp.name" . }}
{{- else -}}
inferencepool: {{ include "epp.name" . }}
{{- end -}}
{{- end -}}

{{- define "epp.modeLabels" -}}
{{- $v := include "epp.v" . | fromYaml -}}
inference.networking.k8s.io/igw-mode: {{ ternary "standalone" "inferencepool" (not (empty $v.standalone)) }}
{{- end -}}
