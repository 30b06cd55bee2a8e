{{- define "epp.name" -}}{{ .Release.Name }}-epp{{- end }}
{{- define "epp.labels" -}}
app.kubernetes.io/name: epp
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
{{- define "epp.poolGroup" -}}
{{- if eq .Values.inferencePool.apiVersion "inference.networking.x-k8s.io/v1alpha2" -}}inference.networking.x-k8s.io{{- else -}}inference.networking.k8s.io{{- end -}}
{{- end }}
