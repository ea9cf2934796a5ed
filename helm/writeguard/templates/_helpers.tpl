{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "writeguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource names: the release name, or release-chart when the release name does not contain the chart's. */}}
{{- define "writeguard.fullname" -}}
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

{{- define "writeguard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "writeguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "writeguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "writeguard.labels" -}}
helm.sh/chart: {{ include "writeguard.chart" . }}
{{ include "writeguard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: worker
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "writeguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "writeguard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The worker's metrics port: config.worker.metrics.port, 9464 when the config leaves it out. */}}
{{- define "writeguard.metricsPort" -}}
{{- $worker := .Values.config.worker | default dict }}
{{- $metrics := $worker.metrics | default dict }}
{{- $metrics.port | default 9464 | int }}
{{- end }}

{{/* The environment variables the chart gives the worker from Secrets (name -> secretKeyRef), as a dict. */}}
{{- define "writeguard.secretEnv" -}}
{{- $s := .Values.secrets }}
{{- $env := dict }}
{{- with $s.kafkaSasl }}
{{- if .existingSecret }}
{{- $_ := set $env .usernameEnv (dict "name" .existingSecret "key" .usernameKey) }}
{{- $_ := set $env .passwordEnv (dict "name" .existingSecret "key" .passwordKey) }}
{{- end }}
{{- end }}
{{- with $s.postgres }}
{{- if .existingSecret }}
{{- $_ := set $env .passwordEnv (dict "name" .existingSecret "key" .passwordKey) }}
{{- end }}
{{- end }}
{{- with $s.webhook }}
{{- if .existingSecret }}
{{- $_ := set $env .secretEnv (dict "name" .existingSecret "key" .secretKey) }}
{{- end }}
{{- end }}
{{- with $s.control }}
{{- if .existingSecret }}
{{- $_ := set $env .secretEnv (dict "name" .existingSecret "key" .secretKey) }}
{{- end }}
{{- end }}
{{- toJson $env }}
{{- end }}

{{/*
The rendered writeguard.yaml. Fails when the config names a ${VAR} that neither a Secret above nor extraEnv
provides: the worker would refuse to start with "environment variable VAR is not set".
*/}}
{{- define "writeguard.configYaml" -}}
{{- $yaml := toYaml .Values.config }}
{{- if not .Values.extraEnvFrom }}
{{- $provided := keys (include "writeguard.secretEnv" . | fromJson) }}
{{- range .Values.extraEnv }}
{{- $provided = append $provided .name }}
{{- end }}
{{- range regexFindAll "\\$\\{[A-Za-z_][A-Za-z0-9_]*\\}" $yaml -1 }}
{{- $var := . | trimPrefix "${" | trimSuffix "}" }}
{{- if not (has $var $provided) }}
{{- fail (printf "config names ${%s}, but the worker would not have %s: set the matching secrets.*.existingSecret (variables %s) or add it to extraEnv" $var $var (join ", " (list $.Values.secrets.kafkaSasl.usernameEnv $.Values.secrets.kafkaSasl.passwordEnv $.Values.secrets.postgres.passwordEnv $.Values.secrets.webhook.secretEnv $.Values.secrets.control.secretEnv))) }}
{{- end }}
{{- end }}
{{- end }}
{{- $yaml }}
{{- end }}
