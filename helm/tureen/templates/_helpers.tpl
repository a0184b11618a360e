{{/* Names, labels, and the pieces the Deployment is made of. */}}

{{- define "tureen.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tureen.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tureen.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tureen.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tureen.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tureen.labels" -}}
helm.sh/chart: {{ include "tureen.chart" . }}
{{ include "tureen.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: server
{{- end }}

{{- define "tureen.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tureen.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tureen.image" -}}
{{- $variant := ternary "cuda" "cpu" .Values.gpu.enabled }}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion $variant) .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* The device flag: with a GPU requested, "auto" becomes "cuda" so that a pod without one fails loudly. */}}
{{- define "tureen.device" -}}
{{- if and .Values.gpu.enabled (eq .Values.server.device "auto") }}cuda{{ else }}{{ .Values.server.device }}{{ end }}
{{- end }}

{{/* The most pods this release may run at once. */}}
{{- define "tureen.maxReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ .Values.autoscaling.maxReplicas }}{{ else }}{{ .Values.replicaCount }}{{ end }}
{{- end }}

{{- define "tureen.clientCASecret" -}}
{{- default .Values.tls.secretName .Values.tls.clientCA.secretName }}
{{- end }}

{{- define "tureen.serverName" -}}
{{- default (printf "%s.%s.svc" (include "tureen.fullname" .) .Release.Namespace) .Values.tls.serverName }}
{{- end }}

{{/* The Secret holding the admin token: the operator's, or the one the chart generates; empty: no token. */}}
{{- define "tureen.adminTokenSecret" -}}
{{- if .Values.auth.adminToken.existingSecret }}{{ .Values.auth.adminToken.existingSecret }}
{{- else if .Values.auth.adminToken.generate }}{{ include "tureen.fullname" . }}-admin-token
{{- end }}
{{- end }}

{{/* Paths inside the container. */}}
{{- define "tureen.specsDir" -}}/etc/tureen/specs{{- end }}
{{- define "tureen.adminTokenDir" -}}/etc/tureen/admin-token{{- end }}
{{- define "tureen.inferenceTokenDir" -}}/etc/tureen/inference-token{{- end }}
{{- define "tureen.tlsDir" -}}/etc/tureen/tls{{- end }}
{{- define "tureen.clientCADir" -}}/etc/tureen/tls-client-ca{{- end }}
{{- define "tureen.probeDir" -}}/etc/tureen/probe{{- end }}

{{/*
Checks the schema cannot express: replicas sharing a store need a shared volume, and the
Secrets that features read from must be named.
*/}}
{{- define "tureen.validate" -}}
{{- $store := .Values.persistence.store }}
{{- if gt (int (include "tureen.maxReplicas" .)) 1 }}
{{- if not $store.enabled }}
{{- fail "more than one replica (replicaCount or autoscaling.maxReplicas) needs persistence.store.enabled: replicas converge through a shared spec store" }}
{{- end }}
{{- if and (not $store.existingClaim) (not (has "ReadWriteMany" $store.accessModes)) }}
{{- fail "more than one replica (replicaCount or autoscaling.maxReplicas) needs the spec store on a shared volume: set persistence.store.accessModes to [ReadWriteMany] (with a storage class that provides it) or persistence.store.existingClaim to a ReadWriteMany claim" }}
{{- end }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName: a kubernetes.io/tls Secret with tls.crt and tls.key" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.enabled) }}
{{- fail "tls.clientCA.enabled needs tls.enabled" }}
{{- end }}
{{- if and .Values.persistence.ingredients.readOnly .Values.demo.enabled }}
{{- fail "persistence.ingredients.readOnly cannot go with demo.enabled: the demo trains its ingredients into that volume" }}
{{- end }}
{{- if and .Release.IsInstall (not .Values.demo.enabled) (not .Values.specs) (not .Values.persistence.store.existingClaim) }}
{{- fail "nothing to serve: a new store is empty, so enable the demo (demo.enabled), give specs, or set persistence.store.existingClaim to a store that has versions" }}
{{- end }}
{{- end }}

{{/* The command line of `tureen serve`: the contract between the chart and the CLI (tests/test_helm.py runs it). */}}
{{- define "tureen.args" -}}
- --log-level={{ .Values.server.logLevel }}
- serve
- --grpc-port={{ .Values.server.grpcPort }}
- --http-port={{ .Values.server.httpPort | int | eq 0 | ternary "off" (.Values.server.httpPort | toString) }}
- --metrics-port={{ .Values.server.metricsPort }}
- --device={{ include "tureen.device" . }}
- --store={{ .Values.persistence.store.mountPath }}
- --keep-versions={{ .Values.server.keepVersions }}
- --store-poll-seconds={{ .Values.server.storePollSeconds }}
- --grpc-workers={{ .Values.server.grpcWorkers }}
- --max-message-mb={{ .Values.server.maxMessageMb }}
- --merge-kernels={{ .Values.server.mergeKernels }}
- --ingredient-placement={{ .Values.server.ingredientPlacement }}
{{- if .Values.server.cpuThreads }}
- --cpu-threads={{ .Values.server.cpuThreads }}
{{- end }}
{{- if .Values.server.blendMemoryMb }}
- --blend-memory-mb={{ .Values.server.blendMemoryMb }}
{{- end }}
{{- if and .Values.demo.enabled (eq (.Values.demo.kind | default "digits") "llm") }}
- --demo=llm
- --demo-dir={{ .Values.persistence.ingredients.mountPath }}/demo-llm
{{- else if .Values.demo.enabled }}
- --demo
- --demo-dir={{ .Values.persistence.ingredients.mountPath }}/demo
{{- end }}
{{- range $file, $_ := .Values.specs }}
- --spec={{ include "tureen.specsDir" $ }}/{{ $file }}
{{- end }}
{{- if include "tureen.adminTokenSecret" . }}
- --admin-token-file={{ include "tureen.adminTokenDir" . }}/{{ .Values.auth.adminToken.key }}
{{- end }}
- --ingredient-root={{ .Values.persistence.ingredients.mountPath }}
{{- range .Values.server.allowFactories }}
- --allow-factory={{ . }}
{{- end }}
{{- range .Values.server.adminAllowFrom }}
- --admin-allow-from={{ . }}
{{- end }}
{{- with .Values.auth.inferenceToken }}
{{- if .existingSecret }}
- --inference-token-file={{ include "tureen.inferenceTokenDir" $ }}/{{ .key }}
{{- end }}
{{- end }}
{{- if .Values.tls.enabled }}
- --tls-cert={{ include "tureen.tlsDir" . }}/tls.crt
- --tls-key={{ include "tureen.tlsDir" . }}/tls.key
{{- if .Values.tls.clientCA.enabled }}
- --tls-client-ca={{ include "tureen.clientCADir" . }}/{{ .Values.tls.clientCA.key }}
{{- end }}
{{- end }}
{{- range .Values.server.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
One probe. Without TLS: Kubernetes' native gRPC probe. With TLS: the kubelet's gRPC probe cannot
speak TLS, so the chart's probe script (files/grpc_health_probe.py) checks the same health service.
Arguments: dict "root" $ "probe" <probe values> "grpc" <true for a gRPC check, false for TCP>.
*/}}
{{- define "tureen.probe" -}}
{{- $root := .root }}
{{- $probe := .probe }}
{{- if not .grpc -}}
tcpSocket:
  port: grpc
{{- else if $root.Values.tls.enabled -}}
exec:
  command:
    - python
    - {{ include "tureen.probeDir" $root }}/grpc_health_probe.py
    - --port={{ $root.Values.server.grpcPort }}
    - --service={{ $probe.service }}
    - --timeout={{ $probe.timeoutSeconds }}
    - --ca={{ include "tureen.tlsDir" $root }}/ca.crt
    - --ca={{ include "tureen.tlsDir" $root }}/tls.crt
    - --server-name={{ include "tureen.serverName" $root }}
    {{- if $root.Values.tls.clientCA.enabled }}
    - --cert={{ include "tureen.tlsDir" $root }}/tls.crt
    - --key={{ include "tureen.tlsDir" $root }}/tls.key
    {{- end }}
{{- else -}}
grpc:
  port: {{ $root.Values.server.grpcPort }}
  service: {{ $probe.service | quote }}
{{- end }}
periodSeconds: {{ $probe.periodSeconds }}
timeoutSeconds: {{ $probe.timeoutSeconds }}
failureThreshold: {{ $probe.failureThreshold }}
{{- with $probe.successThreshold }}
successThreshold: {{ . }}
{{- end }}
{{- end }}

{{- define "tureen.claimName" -}}
{{- $volume := index .root.Values.persistence .which }}
{{- default (printf "%s-%s" (include "tureen.fullname" .root) .which) $volume.existingClaim }}
{{- end }}

{{/* Whether a claim this chart makes can be mounted by one node only. */}}
{{- define "tureen.rwoClaims" -}}
{{- range $which := list "store" "ingredients" }}
{{- $volume := index $.Values.persistence $which }}
{{- if and $volume.enabled (not $volume.existingClaim) (not (has "ReadWriteMany" $volume.accessModes)) (not (has "ReadOnlyMany" $volume.accessModes)) }}true{{ end }}
{{- end }}
{{- end }}
