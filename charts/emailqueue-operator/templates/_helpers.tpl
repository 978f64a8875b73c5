{{/* Chart name, truncated to the 63 characters a label value may hold. */}}
{{- define "emailqueue-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name alone when it already contains the chart name
(so `helm install emailqueue-operator` gives `emailqueue-operator`, not a doubled name).
Monitoring does not depend on it: the operator ServiceMonitor takes the job from app.kubernetes.io/name.
*/}}
{{- define "emailqueue-operator.fullname" -}}
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

{{/* chart label value: name-version */}}
{{- define "emailqueue-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "emailqueue-operator.labels" -}}
helm.sh/chart: {{ include "emailqueue-operator.chart" . }}
{{ include "emailqueue-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: emailqueue
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels (immutable on Deployments: never add to them). */}}
{{- define "emailqueue-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "emailqueue-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Operator component labels. */}}
{{- define "emailqueue-operator.operator.selectorLabels" -}}
{{ include "emailqueue-operator.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Worker component: its own name so `-l app.kubernetes.io/name=email-worker` finds the pods. */}}
{{- define "emailqueue-operator.worker.fullname" -}}
{{- if .Values.worker.fullnameOverride }}
{{- .Values.worker.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-worker" (include "emailqueue-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "emailqueue-operator.worker.selectorLabels" -}}
app.kubernetes.io/name: email-worker
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "emailqueue-operator.worker.labels" -}}
helm.sh/chart: {{ include "emailqueue-operator.chart" . }}
{{ include "emailqueue-operator.worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: emailqueue
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "emailqueue-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "emailqueue-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image reference: repository:tag, the tag defaulting to the chart appVersion. */}}
{{- define "emailqueue-operator.image" -}}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) }}
{{- end }}

{{/*
Namespaces whose Secrets the operator may read: rbac.secretNamespaces, else the watched
namespaces (empty list = every namespace through the ClusterRole).
*/}}
{{- define "emailqueue-operator.secretNamespaces" -}}
{{- if .Values.rbac.secretNamespaces }}
{{- toJson .Values.rbac.secretNamespaces }}
{{- else }}
{{- toJson .Values.operator.watchNamespaces }}
{{- end }}
{{- end }}
