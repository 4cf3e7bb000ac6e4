{{- define "semantis.fullname" -}}
{{- if contains "semantis" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-semantis-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "semantis.labels" -}}
app.kubernetes.io/name: semantis-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "semantis.selectorLabels" -}}
app.kubernetes.io/name: semantis-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "semantis.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "semantis.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Rules for the namespaced objects a SemanticCache owns. */}}
{{- define "semantis.namespacedRules" -}}
- apiGroups: [semantis.dev]
  resources: [semanticcaches]
  verbs: [get, list, watch, patch, update]
- apiGroups: [semantis.dev]
  resources: [semanticcaches/status]
  verbs: [get, patch, update]
- apiGroups: [semantis.dev]
  resources: [semanticcaches/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [configmaps, secrets, services, persistentvolumeclaims]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [apps]
  resources: [statefulsets, deployments]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [batch]
  resources: [jobs, cronjobs]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [monitoring.coreos.com]
  resources: [servicemonitors]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
