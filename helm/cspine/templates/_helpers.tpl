{{/* Names and labels shared by every object of the chart. */}}

{{- define "cspine.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's prefix: RELEASE-cspine, or RELEASE alone when it already says cspine. */}}
{{- define "cspine.fullname" -}}
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

{{- define "cspine.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "cspine.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: call with (dict "root" $ "component" "triton"). */}}
{{- define "cspine.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cspine.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cspine.componentLabels" -}}
{{ include "cspine.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cspine.tritonName" -}}{{ include "cspine.fullname" . }}-triton{{- end }}
{{- define "cspine.tritonHeadless" -}}{{ include "cspine.fullname" . }}-triton-headless{{- end }}
{{- define "cspine.gatewayName" -}}{{ include "cspine.fullname" . }}-gateway{{- end }}
{{- define "cspine.postgresqlName" -}}{{ include "cspine.fullname" . }}-postgresql{{- end }}
{{- define "cspine.dicomName" -}}{{ include "cspine.fullname" . }}-dicom{{- end }}

{{- define "cspine.image" -}}
{{ .repository }}:{{ .tag }}
{{- end }}

{{/* The Secret and key holding the support store's URL. */}}
{{- define "cspine.storeSecret" -}}
{{- if .Values.store.existingSecret }}{{ .Values.store.existingSecret }}{{ else }}{{ include "cspine.postgresqlName" . }}{{ end }}
{{- end }}

{{/* The Secret and key holding the DICOM node's destinations. */}}
{{- define "cspine.dicomDestinationsSecret" -}}
{{- if .Values.dicom.destinationsSecret.existingSecret }}{{ .Values.dicom.destinationsSecret.existingSecret }}{{ else }}{{ include "cspine.dicomName" . }}-destinations{{ end }}
{{- end }}

{{/* The data dir's volume lies on a PersistentVolumeClaim: the DICOM node on, with persistence. */}}
{{- define "cspine.dicomPersistent" -}}
{{- if and .Values.dicom.enabled .Values.dicom.persistence.enabled }}true{{ end }}
{{- end }}

{{- define "cspine.tokensSecret" -}}
{{- if .Values.gateway.tokens.existingSecret }}{{ .Values.gateway.tokens.existingSecret }}{{ else }}{{ include "cspine.gatewayName" . }}-tokens{{ end }}
{{- end }}

{{/* Non-root, no privilege escalation, no capabilities, read-only root filesystem. */}}
{{- define "cspine.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}
