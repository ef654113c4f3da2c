{{/* The chart name. */}}
{{- define "projectionist.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource name. */}}
{{- define "projectionist.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "projectionist.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "projectionist.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "projectionist.selectorLabels" -}}
app.kubernetes.io/name: {{ include "projectionist.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "projectionist.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "projectionist.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "projectionist.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "projectionist.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "projectionist.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "projectionist.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository (default .Chart.AppVersion .Values.sidecar.image.tag) }}
{{- end }}

{{- define "projectionist.webhookService" -}}
{{- printf "%s-webhook" (include "projectionist.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "projectionist.webhookConfig" -}}
{{- printf "%s-sidecar-injector" (include "projectionist.fullname" .) }}
{{- end }}

{{- define "projectionist.webhookSecret" -}}
{{- printf "%s-webhook-tls" (include "projectionist.fullname" .) }}
{{- end }}
