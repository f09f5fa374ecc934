{{- define "kiln.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kiln.labels" -}}
app.kubernetes.io/name: kiln-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kiln
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: kiln-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kiln.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kiln.leaseName" -}}
{{- default (include "kiln.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}

{{- /*
RBAC rules for the namespaces the operator reconciles in (a ClusterRole's rules when it watches
all namespaces, a Role's in each watched namespace otherwise). Only the verbs the code uses;
tests/integration/test_chart.py runs every kind with exactly these.
*/}}
{{- define "kiln.namespacedRules" -}}
# The four kinds: watched and read; status written (the spec only by users and `kiln promote`).
- apiGroups: [kiln.dev]
  resources: [models, trainingjobs, inferenceservices, featuregroups]
  verbs: [get, list, watch]
- apiGroups: [kiln.dev]
  resources: [models/status, trainingjobs/status, inferenceservices/status, featuregroups/status]
  verbs: [patch]
# ttlSecondsAfterFinished deletes finished TrainingJobs; a Model's spec.retraining creates them.
- apiGroups: [kiln.dev]
  resources: [trainingjobs]
  verbs: [create, delete]
# TrainingJob gangs: pods are created and deleted whole; the headless Service is applied.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, create, delete]
# Services of TrainingJobs and InferenceServices (server-side apply: patch, create when absent).
- apiGroups: [""]
  resources: [services]
  verbs: [list, watch, create, patch, delete]
# InferenceService children.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [list, create, patch, delete]
- apiGroups: [monitoring.coreos.com]
  resources: [servicemonitors, prometheusrules]
  verbs: [list, create, patch, delete]
- apiGroups: [gateway.networking.k8s.io]
  resources: [httproutes]
  verbs: [list, create, patch, delete]
- apiGroups: [inference.networking.k8s.io]
  resources: [inferencepools]
  verbs: [list, create, patch, delete]
# FeatureGroup materialization: one Job per run (created, watched for results, deleted when it
# writes superseded definitions) and the schedule's CronJob (server-side apply, deleted when the
# schedule goes). Pods' termination messages are read through the pods rule above.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, delete]
- apiGroups: [batch]
  resources: [cronjobs]
  verbs: [list, create, patch, delete]
# Transitions are reported as core/v1 Events (Kiln's and kopf's).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Kueue: a TrainingJob labelled kueue.x-k8s.io/queue-name gets a Workload Kiln creates, watches
# and deletes; Kiln writes its status to give quota back after an eviction and to finish it.
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [get, list, watch, create, delete]
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads/status]
  verbs: [patch]
{{- end -}}

{{- /*
Cluster-scoped reads for Kueue: the priority classes whose value goes into a Workload, and the
ResourceFlavors whose node labels and tolerations place an admitted gang's pods.
*/}}
{{- define "kiln.kueueClusterRules" -}}
- apiGroups: [kueue.x-k8s.io]
  resources: [resourceflavors, workloadpriorityclasses]
  verbs: [get]
- apiGroups: [scheduling.k8s.io]
  resources: [priorityclasses]
  verbs: [get]
{{- end -}}

{{- /*
The operator's artifact store, as /work/notes/S3-CONTRACT.md (issue 11) defines the variables:
KILN_ARTIFACT_ROOT (s3://bucket/prefix, else file://<mountPath> when a volume is given),
KILN_STORAGE_SECRET_NAME, AWS_ENDPOINT_URL, AWS_REGION. Each only when its value is set.
*/}}
{{- define "kiln.artifactEnv" -}}
{{- $s3 := .Values.artifacts.s3 -}}
{{- if $s3.bucket }}
- name: KILN_ARTIFACT_ROOT
  value: {{ printf "s3://%s/%s" $s3.bucket (trimAll "/" $s3.prefix) | trimSuffix "/" | quote }}
{{- else if .Values.artifacts.volume }}
- name: KILN_ARTIFACT_ROOT
  value: {{ printf "file://%s" .Values.artifacts.mountPath | quote }}
{{- end }}
{{- with $s3.secretName }}
- name: KILN_STORAGE_SECRET_NAME
  value: {{ . | quote }}
{{- end }}
{{- with $s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with $s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{- /*
The image of FeatureGroup materialization Jobs whose spec.materialization.image is unset.
*/}}
{{- define "kiln.featuresImage" -}}
{{- with .Values.features.image -}}
{{- if .repository -}}
{{ .repository }}:{{ .tag | default $.Chart.AppVersion }}
{{- end -}}
{{- end -}}
{{- end -}}
